"""The status page on the admin listener: / (HTML, also as Chromium renders it) and
/status.json, checked against traffic of known size, with one process and with
workers; `[metrics] status_page = false`; user names escaped."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PASSWORD, USER, basic_token, chromium
from integration import socks5client
from integration.socks5client import recv_exact
from integration.test_metrics import metrics_address
from integration.test_workers import workers_started

HOSTILE = "<script>alert(1)</script>"
HOSTILE_PASSWORD = "hostile-pass-1"


def get(daemon, path: str) -> tuple[int, str, bytes]:
    code, headers, body = get_with_headers(daemon, path)
    return code, headers["Content-Type"], body


def get_with_headers(daemon, path: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection(*metrics_address(daemon), timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def status_json(daemon) -> dict:
    code, kind, body = get(daemon, "/status.json")
    assert code == 200 and kind == "application/json", (code, kind)
    return json.loads(body)


def user_bytes(report: dict, user: str | None) -> int:
    return sum(row["bytes"] for row in report["top_users"] if row["user"] == user)


def client_bytes(report: dict, client: str) -> int:
    return sum(row["bytes"] for row in report["top_clients"] if row["client"] == client)


def until(check, timeout: float = 8.0):
    """Poll `check()` (it raises AssertionError while not yet true) until it passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def tunnel(daemon, port: int, payload: bytes, auth=None) -> None:
    with socks5client.open_tunnel(daemon.address, "127.0.0.1", port, auth=auth) as sock:
        sock.sendall(payload)
        assert recv_exact(sock, len(payload)) == payload


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def two_users(users_file: Path, tmp_path: Path) -> Path:
    """alice, and a user whose name is an HTML tag."""
    path = tmp_path / "users"
    path.write_bytes(users_file.read_bytes())
    subprocess.run(
        [sys.executable, "-m", "proxyd", "passwd", "--file", str(path), HOSTILE],
        input=f"{HOSTILE_PASSWORD}\n".encode(),
        check=True,
        capture_output=True,
    )
    return path


def test_status_page_shows_the_traffic(start_daemon, two_users, tcp_server, origin, tmp_path):
    server = tcp_server()
    denied_port = tcp_server().port
    dead_parent = free_port()
    via_port = tcp_server().port
    daemon = start_daemon(
        f'[auth]\nusers_file = "{two_users}"\n[metrics]\nlisten = "127.0.0.1:0"\n'
        f'[[upstreams]]\nname = "egress"\nservers = ["socks5://127.0.0.1:{dead_parent}"]\n'
        "max_fails = 1\n"
        f'[[rules]]\naction = "deny"\nports = [{denied_port}]\n'
        f'[[rules]]\naction = "allow"\nports = [{via_port}]\nvia = "egress"\n'
    )
    alice = (USER, PASSWORD)
    # a tunnel that stays open: counted active, its bytes shown while it runs
    held = socks5client.open_tunnel(daemon.address, "127.0.0.1", server.port, auth=alice)
    held.sendall(b"h" * 7000)
    assert recv_exact(held, 7000) == b"h" * 7000
    try:
        for size in (10_000, 50_000):
            tunnel(daemon, server.port, os.urandom(size), auth=alice)
        tunnel(daemon, server.port, b"x" * 123, auth=(HOSTILE, HOSTILE_PASSWORD))
        sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", denied_port, auth=alice)
        sock.close()
        assert rep == 2
        sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", via_port, auth=alice)
        sock.close()
        assert rep != 0  # the only parent is dead: parent_failed, and it is out
        # a forwarded request: its bytes come from its access line, once
        conn = http.client.HTTPConnection(*daemon.address, timeout=10)
        conn.request("GET", origin.url, headers={"Proxy-Authorization": f"Basic {basic_token()}"})
        assert conn.getresponse().read() == origin.body
        conn.close()
        daemon.wait_for(lambda _e: len(daemon.named("access")) >= 6)
        forwarded = next(e for e in daemon.access_events() if e["protocol"] == "http")
        http_bytes = forwarded["bytes_up"] + forwarded["bytes_down"]
        closed = 2 * (10_000 + 50_000) + http_bytes

        def alice_counted(running: int) -> dict:
            report = status_json(daemon)
            assert user_bytes(report, USER) == closed + running, report["top_users"]
            return report

        # the held tunnel's bytes come with the next tick (every 5 s), before it ends
        report = until(lambda: alice_counted(14_000))
        assert user_bytes(report, HOSTILE) == 246
        assert client_bytes(report, "127.0.0.1") == closed + 14_000 + 246
        assert report["bytes_up"] + report["bytes_down"] == closed + 14_000 + 246
        assert report["active"] == {"socks5": 1} and report["active_total"] == 1
        assert report["connections"] == 7
        assert sum(report["series"]["connections"]) == 7
        assert report["refusals"] == {"denied": 1, "parent_failed": 1}
        assert report["upstreams"] == [
            {
                "group": "egress",
                "servers": [{"server": f"socks5://127.0.0.1:{dead_parent}", "up": False}],
            }
        ]
        assert report["workers"] == report["workers_reporting"] == 1
        assert report["listeners"] == [f"127.0.0.1:{daemon.port}"]

        code, headers, body = get_with_headers(daemon, "/")
        assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert headers["Content-Security-Policy"].startswith("default-src 'none';")
        page = body.decode()
        assert f"{closed + 14_000:,} B" in page
        assert "alice" in page and "127.0.0.1" in page and "denied" in page
        assert "parent_failed" in page and f"socks5://127.0.0.1:{dead_parent}" in page
        assert '<span id="active">1</span>' in page
        # a user name is text, never markup
        assert HOSTILE not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "<script" not in page and "http://" not in page.split("<body>")[0]

        # a real browser renders it
        url = "http://{}:{}/".format(*metrics_address(daemon))
        shot = tmp_path / "status.png"
        result = chromium(tmp_path, url, f"--screenshot={shot}", "--window-size=1000,1200")
        assert result.returncode == 0, result.stderr[-2000:]
        png = shot.read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000, len(png)
        result = chromium(tmp_path, url, "--dump-dom")
        assert result.returncode == 0, result.stderr[-2000:]
        dom = result.stdout.decode()
        assert f"{closed + 14_000:,} B" in dom and "denied" in dom
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
        assert '<span id="active">1</span>' in dom
    finally:
        held.close()
    until(lambda: assert_equal(status_json(daemon)["active_total"], 0))


def assert_equal(a, b) -> None:
    assert a == b, (a, b)


def test_workers_page_sums_every_worker(start_daemon, tcp_server, tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    daemon = start_daemon(
        '[server]\nworkers = 2\n[metrics]\nlisten = "127.0.0.1:0"\n',
        env={"RUNTIME_DIRECTORY": str(runtime)},
    )
    pids = workers_started(daemon, 2)
    server = tcp_server()
    for _ in range(20):
        tunnel(daemon, server.port, b"w" * 1000)
    daemon.wait_for(lambda _e: len(daemon.named("access")) >= 20)
    assert {e["conn_id"] % 2 for e in daemon.access_events()} == {0, 1}  # both served some

    def summed() -> None:
        report = status_json(daemon)
        assert report["workers"] == report["workers_reporting"] == 2, report
        assert report["connections"] == 20, report["connections"]
        assert report["bytes_up"] == report["bytes_down"] == 20_000
        assert user_bytes(report, None) == client_bytes(report, "127.0.0.1") == 40_000

    # each worker's share reaches the other at its next tick (every 5 s)
    until(summed, timeout=10)
    time.sleep(1.1)  # an answer made before is served again for a second (STATUS_FRESH)
    for _ in range(6):  # whichever worker answers, it answers for both
        summed()
        code, _, body = get(daemon, "/")
        assert code == 200
        assert '<span id="connections">20</span>' in body.decode()
        assert '<span id="workers">2 of 2</span>' in body.decode()

    # a worker that ends takes its share along: the supervisor removes its file
    (files,) = [path / "status" for path in runtime.iterdir()]
    assert {path.name for path in files.iterdir()} == {f"{pid}.json" for pid in pids.values()}
    os.kill(pids[0], signal.SIGKILL)
    daemon.wait_for(lambda e: e.get("event") == "worker_restarted")
    workers_started(daemon, 3)
    # worker 0 numbered its connections 1, 3, 5, ...: what is left is worker 1's
    left = sum(e["conn_id"] % 2 == 0 for e in daemon.access_events())

    def without_the_dead() -> None:
        report = status_json(daemon)
        assert report["workers_reporting"] == 2 and report["connections"] == left, report
        assert f"{pids[0]}.json" not in {path.name for path in files.iterdir()}

    until(without_the_dead)


def test_status_page_off(start_daemon):
    daemon = start_daemon('[metrics]\nlisten = "127.0.0.1:0"\nstatus_page = false\n')
    assert get(daemon, "/")[0] == 404
    assert get(daemon, "/status.json")[0] == 404
    assert get(daemon, "/metrics")[0] == 200
    # a reload turns it on (the listener stays where it is)
    outcome = daemon.reload('[metrics]\nlisten = "127.0.0.1:0"\n')[0]
    assert outcome["event"] == "reloaded", outcome
    assert get(daemon, "/")[0] == 200


def test_the_page_counts_what_log_access_does_not_print(start_daemon, tcp_server, origin):
    """With `log.access = false` no access line is printed, yet a forwarded request's
    bytes and a refusal still reach the page."""
    refused = free_port()
    daemon = start_daemon(
        '[metrics]\nlisten = "127.0.0.1:0"\n[log]\naccess = false\n'
        f'[[rules]]\naction = "deny"\ndestinations = ["127.0.0.1/32"]\nports = [{refused}]\n'
    )
    conn = http.client.HTTPConnection(*daemon.address, timeout=10)
    conn.request("GET", f"{origin.url}")
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200
    conn.close()
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", refused)
    sock.close()
    assert rep == 0x02

    def shown() -> dict:
        report = status_json(daemon)
        assert report["refusals"] == {"denied": 1}
        assert report["bytes_down"] == len(body)
        return report

    until(shown)
    assert not daemon.access_events()


def test_the_page_answers_an_address_not_a_name(start_daemon):
    """DNS rebinding: a browser sent to the admin listener by a name (which another
    site may have pointed at it) gets 421, and no user name or address; asked by
    IP address or localhost, it gets the page. /metrics is not concerned."""
    daemon = start_daemon('[metrics]\nlisten = "127.0.0.1:0"\n')
    host, port = metrics_address(daemon)
    for name, code in [
        (f"evil.example:{port}", 421),
        ("evil.example", 421),
        ("[::1]evil.example", 421),
        ("[::1]:evil.example", 421),
        ("127.0.0.1:evil.example", 421),
        ("localhost:evil.example", 421),
        ("[fe80::1%25evil.example]", 421),
        ("127.0.0.1.evil.example", 421),
        (f"{host}:{port}", 200),
        (f"localhost:{port}", 200),
        (f"[::1]:{port}", 200),
    ]:
        for path in ("/", "/status.json"):
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", path, headers={"Host": name})
            response = conn.getresponse()
            body = response.read()
            conn.close()
            assert response.status == code, (name, path, body)
            if code == 421:
                assert b"DNS rebinding" in body
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/metrics", headers={"Host": "evil.example"})
    assert conn.getresponse().status == 200
    conn.close()
