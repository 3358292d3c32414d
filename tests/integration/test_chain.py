"""Upstream chaining against real parents: other proxyd daemons and microsocks on
loopback, with the child's rules routing through `[[upstreams]]` groups."""

from __future__ import annotations

import collections
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PASSWORD, USER, closed_port, silent_listener
from integration import socks5client
from integration.test_metrics import scrape, value
from integration.test_udp import UdpEcho, associate, header, no_datagram, udp_client

NAMES = [f"h{i}.test" for i in range(60)]


@pytest.fixture
def hosts(tmp_path: Path) -> Path:
    """origin.test and h0..h59.test, all on 127.0.0.1, for daemons given this file."""
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 origin.test\n" + "".join(f"127.0.0.1 {n}\n" for n in NAMES))
    return path


def group(name: str, servers: list[str], strategy: str = "round_robin", **keys: object) -> str:
    listed = ", ".join(f'"{s}"' for s in servers)
    toml = f'[[upstreams]]\nname = "{name}"\nservers = [{listed}]\nstrategy = "{strategy}"\n'
    return toml + "".join(f"{k} = {v}\n" for k, v in keys.items())


def via(name: str, **match: str) -> str:
    keys = "".join(f"{k} = {v}\n" for k, v in match.items())
    return f'[[rules]]\naction = "allow"\nvia = "{name}"\n{keys}'


def url(scheme: str, daemon, auth: bool = False) -> str:
    who = f"{USER}:{PASSWORD}@" if auth else ""
    return f"{scheme}://{who}{daemon.host}:{daemon.port}"


def echo_through(child, host: str, port: int, payload: bytes = b"ping") -> None:
    with socks5client.open_tunnel(child.address, host, port) as sock:
        sock.sendall(payload)
        assert socks5client.recv_exact(sock, len(payload)) == payload


def served(daemon, count: int) -> list[dict]:
    """The first `count` access lines of a parent, once they are all written."""
    daemon.wait_for(lambda _e: len(daemon.access_events()) >= count)
    return daemon.access_events()


# --- through each kind of parent ------------------------------------------------------


@pytest.mark.parametrize("scheme", ["socks5", "socks5h", "socks4a", "http"])
def test_a_tunnel_goes_through_a_proxyd_parent_of_each_kind(
    start_daemon, tcp_server, hosts, scheme
):
    echo = tcp_server()
    parent = start_daemon(hosts=hosts)
    # socks5:// means the child resolves the name itself and sends the address
    child = start_daemon(group("p", [url(scheme, parent)]) + via("p"), hosts=hosts)
    echo_through(child, "origin.test", echo.port, b"x" * 100_000)
    line = child.access(lambda e: e["command"] == "connect")
    assert line["status"] == "ok", line
    assert (line["via"], line["upstream"]) == ("p", url(scheme, parent))
    assert line["bytes_up"] == line["bytes_down"] == 100_000
    upstream_line = parent.access()
    assert upstream_line["status"] == "ok"
    want = {"socks5": "socks5", "socks5h": "socks5", "socks4a": "socks4", "http": "http"}
    assert upstream_line["protocol"] == want[scheme]
    named = f"127.0.0.1:{echo.port}" if scheme == "socks5" else f"origin.test:{echo.port}"
    assert upstream_line["target"] == named
    assert upstream_line["bytes_up"] == 100_000


def test_parent_credentials_are_used_and_never_logged(start_daemon, tcp_server, users_file):
    echo = tcp_server()
    parent = start_daemon(f'[auth]\nusers_file = "{users_file}"\n')
    servers = [url("socks5h", parent, auth=True), url("http", parent, auth=True)]
    for server in servers:
        child = start_daemon(group("p", [server]) + via("p"))
        echo_through(child, "127.0.0.1", echo.port)
        child.stop()
        assert PASSWORD not in child.output()
    lines = served(parent, 2)
    assert sorted((e["user"], e["protocol"], e["status"]) for e in lines) == [
        (USER, "http", "ok"),
        (USER, "socks5", "ok"),
    ]


def test_wrong_parent_credentials_fail_clearly(start_daemon, tcp_server, users_file):
    echo = tcp_server()
    parent = start_daemon(f'[auth]\nusers_file = "{users_file}"\n')
    wrong = f"socks5h://{USER}:not-the-password@{parent.host}:{parent.port}"
    child = start_daemon(group("p", [wrong], max_fails=0) + via("p"))
    sock, rep, _, _ = socks5client.connect(child.address, "127.0.0.1", echo.port)
    sock.close()
    assert rep == 1  # general failure: the parent, not the target, failed
    line = child.access()
    assert line["status"] == "parent_failed"
    assert "not-the-password" not in child.output()


def test_microsocks_as_parent(start_daemon, tcp_server):
    echo = tcp_server()
    port = closed_port()
    user, password = "chain", "microsocks-secret"
    cmd = ["microsocks", "-i", "127.0.0.1", "-p", str(port), "-u", user, "-P", password]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port)
        server = f"socks5h://{user}:{password}@127.0.0.1:{port}"
        child = start_daemon(group("m", [server]) + via("m"))
        echo_through(child, "127.0.0.1", echo.port, b"through microsocks")
        line = child.access()
        assert (line["status"], line["upstream"]) == ("ok", f"socks5h://127.0.0.1:{port}")
        # the echo server saw microsocks' connection, not the client's
        assert len(echo.peers) == 1
    finally:
        parent.terminate()
        parent.wait(5)


def _wait_listening(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- strategies -----------------------------------------------------------------------


@pytest.fixture
def three_parents(start_daemon, hosts):
    return [start_daemon(hosts=hosts) for _ in range(3)]


def test_round_robin_takes_the_parents_in_turn(start_daemon, tcp_server, three_parents):
    echo = tcp_server()
    servers = [url("socks5h", p) for p in three_parents]
    child = start_daemon(group("p", servers) + via("p"))
    for _ in range(9):
        echo_through(child, "127.0.0.1", echo.port)
    child.wait_for(lambda _e: len(child.access_events()) == 9)
    # in the order the tunnels opened (a line is written when its tunnel has closed)
    order = [e["upstream"] for e in sorted(child.access_events(), key=lambda e: e["conn_id"])]
    assert order == servers * 3
    for parent in three_parents:  # and each parent did carry its three
        assert [e["status"] for e in served(parent, 3)] == ["ok"] * 3


def test_random_uses_every_parent(start_daemon, tcp_server, three_parents):
    echo = tcp_server()
    servers = [url("socks5h", p) for p in three_parents]
    child = start_daemon(group("p", servers, "random") + via("p"))
    for _ in range(60):
        echo_through(child, "127.0.0.1", echo.port)
    child.wait_for(lambda _e: len(child.access_events()) == 60)
    counts = collections.Counter(e["upstream"] for e in child.access_events())
    assert set(counts) == set(servers)  # all three: (2/3)^60 * 3 says this never fails


def test_least_connections_picks_the_least_busy_parent(start_daemon, tcp_server, three_parents):
    echo = tcp_server()
    servers = [url("socks5h", p) for p in three_parents]
    child = start_daemon(group("p", servers, "least_connections") + via("p"))
    # one open tunnel through each parent (ties go round in turn: first, second, third)
    held = [socks5client.open_tunnel(child.address, "127.0.0.1", echo.port) for _ in range(3)]
    held.pop(1).close()  # the second parent's ends: it is now the least busy
    assert child.access()["upstream"] == servers[1]
    held.append(socks5client.open_tunnel(child.address, "127.0.0.1", echo.port))
    for sock in held:
        sock.close()
    # the parents' own logs: the second carried the new tunnel as well
    counts = [len(served(p, n)) for p, n in zip(three_parents, [1, 2, 1], strict=True)]
    assert counts == [1, 2, 1]


def test_hash_sticks_a_host_to_a_parent_and_moves_little(start_daemon, tcp_server, three_parents):
    echo = tcp_server()
    servers = [url("socks5h", p) for p in three_parents]
    child = start_daemon(group("p", servers, "hash") + via("p"))

    def mapping() -> dict[str, str]:
        before = len(child.access_events())
        for name in NAMES:
            echo_through(child, name, echo.port)
        child.wait_for(lambda _e: len(child.access_events()) == before + len(NAMES))
        lines = child.access_events()[before:]
        return {e["target"].split(":")[0]: e["upstream"] for e in lines}

    first = mapping()
    assert mapping() == first  # the same host, the same parent
    counts = collections.Counter(first.values())
    assert set(counts) == set(servers) and min(counts.values()) >= 8, counts
    # the third parent leaves the group: only its hosts move
    child.reload(group("p", servers[:2], "hash") + via("p"))
    second = mapping()
    for name, parent in first.items():
        if parent != servers[2]:
            assert second[name] == parent, name
        else:
            assert second[name] in servers[:2]


# --- failures and failover ----------------------------------------------------------------


def test_a_dead_parent_is_skipped_taken_out_and_probed_back(start_daemon, tcp_server, users_file):
    echo = tcp_server()
    alive = start_daemon()
    coming_back = start_daemon()
    port = coming_back.port
    coming_back.stop()  # refuses connections from now on
    servers = [url("socks5h", alive), f"socks5h://127.0.0.1:{port}"]
    # the returning parent wants a login: the probe that brings it back must log in
    listed = [servers[0], f"socks5h://{USER}:{PASSWORD}@127.0.0.1:{port}"]
    child = start_daemon(group("p", listed, max_fails=2, fail_window=60, down_time=1) + via("p"))
    for _ in range(6):  # each goes through: the dead parent's turns fail over at once
        echo_through(child, "127.0.0.1", echo.port)
    down = child.wait_for(lambda e: e.get("event") == "upstream_down")
    assert down["server"] == servers[1] and down["group"] == "p"
    failures = child.named("upstream_failed")
    assert len(failures) == 2 and all(f["server"] == servers[1] for f in failures)
    assert all(e["status"] == "ok" for e in child.access_events())
    # while it is down, it is not tried (no new failure), and the probe keeps failing
    for _ in range(4):
        echo_through(child, "127.0.0.1", echo.port)
    assert len(child.named("upstream_failed")) == 2
    child.wait_for(lambda e: e.get("event") == "upstream_probe_failed")
    # it comes back on the same port: a probe finds it and it serves again
    back = start_daemon(f'[auth]\nusers_file = "{users_file}"\n', listen=f"127.0.0.1:{port}")
    child.wait_for(lambda e: e.get("event") == "upstream_up", timeout=10)
    for _ in range(4):
        echo_through(child, "127.0.0.1", echo.port)
    assert len(served(back, 2)) >= 2
    assert all(e["user"] == USER for e in back.access_events())


def test_a_parent_that_never_answers_leaves_time_for_the_next(start_daemon, tcp_server):
    echo = tcp_server()
    alive = start_daemon()
    with silent_listener() as silent:
        servers = [f"socks5h://127.0.0.1:{silent}", url("socks5h", alive)]
        child = start_daemon(
            "[timeouts]\nconnect = 2\n" + group("p", servers, max_fails=0) + via("p")
        )
        started = time.monotonic()
        echo_through(child, "127.0.0.1", echo.port)
        elapsed = time.monotonic() - started
    line = child.access()
    assert line["status"] == "ok" and line["upstream"] == servers[1]
    # the silent parent had its share (1 s of 2), the live one answered at once
    assert 0.8 < elapsed < 2.0, elapsed


def test_every_parent_down_is_refused_at_once(start_daemon, tcp_server):
    echo = tcp_server()
    servers = [f"socks5://127.0.0.1:{closed_port()}", f"http://127.0.0.1:{closed_port()}"]
    child = start_daemon(group("p", servers, max_fails=1, down_time=60) + via("p"))
    sock, rep, _, _ = socks5client.connect(child.address, "127.0.0.1", echo.port)
    sock.close()
    assert rep == 1
    assert child.access()["status"] == "parent_failed"
    child.wait_for(lambda _e: len(child.named("upstream_down")) == 2)
    sock, rep, _, _ = socks5client.connect(child.address, "127.0.0.1", echo.port)
    sock.close()
    assert rep == 1
    line = child.access(lambda e: "down" in e.get("error", ""))
    assert "every parent proxy of 'p' is down" in line["error"]


def test_a_target_failure_at_the_parent_is_answered_not_failed_over(start_daemon, hosts):
    first, second = start_daemon(), start_daemon()
    child = start_daemon(group("p", [url("socks5h", first), url("socks5h", second)]) + via("p"))
    sock, rep, _, _ = socks5client.connect(child.address, "127.0.0.1", closed_port())
    sock.close()
    assert rep == 5  # connection refused, as the parent said
    assert child.access()["status"] == "refused"
    assert child.named("upstream_failed") == []
    assert second.access_events() == []  # not tried: it would have said the same


# --- routing by rules, and other commands ----------------------------------------------------


def test_rules_route_some_destinations_direct(start_daemon, tcp_server):
    echo = tcp_server()
    parent = start_daemon()
    direct = '[[rules]]\naction = "allow"\nvia = "direct"\nports = [' + str(echo.port) + "]\n"
    child = start_daemon(group("p", [url("socks5", parent)]) + direct + via("p"))
    echo_through(child, "127.0.0.1", echo.port)
    other = tcp_server()
    echo_through(child, "127.0.0.1", other.port)
    lines = {e["target"]: e for e in served(child, 2)}
    assert "via" not in lines[f"127.0.0.1:{echo.port}"]
    assert lines[f"127.0.0.1:{other.port}"]["via"] == "p"
    assert [e["target"] for e in served(parent, 1)] == [f"127.0.0.1:{other.port}"]


def test_bind_is_not_chained(start_daemon):
    parent = start_daemon()
    child = start_daemon(group("p", [url("socks5", parent)]) + via("p"))
    sock, rep, _, _ = socks5client.connect(child.address, "0.0.0.0", 0, command=2)
    sock.close()
    assert rep == 7
    assert child.access()["status"] == "unsupported"


@pytest.mark.parametrize("scheme", ["http", "socks5h"])
def test_plain_http_is_forwarded_through_a_parent(start_daemon, origin, users_file, scheme):
    parent = start_daemon(f'[auth]\nusers_file = "{users_file}"\n')
    child = start_daemon(group("p", [url(scheme, parent, auth=True)]) + via("p"))
    proxy = f"http://{child.host}:{child.port}"
    for _ in range(2):  # the second request reuses the connection through the parent
        body = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "-x", proxy, origin.url],
            capture_output=True,
            check=True,
        ).stdout
        assert body == origin.body
    lines = served(child, 2)
    assert [(e["command"], e["via"], e["status"]) for e in lines] == [("GET", "p", "ok")] * 2
    upstream_lines = served(parent, 2 if scheme == "http" else 1)
    if scheme == "http":  # an HTTP parent is sent the requests themselves
        assert [e["command"] for e in upstream_lines] == ["GET", "GET"]
        assert all(e["user"] == USER for e in upstream_lines)
    else:  # a SOCKS parent carries a tunnel to the origin
        assert upstream_lines[0]["command"] == "connect"


@pytest.fixture
def cleanup() -> Iterator[list]:
    things: list = []
    yield things
    for thing in things:
        thing.close()


# --- UDP through a SOCKS5 parent --------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["socks5h", "socks5"])
def test_udp_goes_through_the_parents_relay(start_daemon, hosts, scheme):
    echo = UdpEcho()
    parent = start_daemon(hosts=hosts)
    child = start_daemon(group("p", [url(scheme, parent)]) + via("p"), hosts=hosts)
    control, relay = associate(child)
    client = udp_client()
    try:
        for i, host in enumerate(["127.0.0.1", "origin.test", "127.0.0.1"]):
            client.sendto(header(host, echo.port) + b"d%d" % i, relay)
            data, sender = client.recvfrom(65535)
            assert sender == relay
            # the parent wrapped the answer with the echo server's address
            assert data == header("127.0.0.1", echo.port) + b"echo:d%d" % i
    finally:
        control.close()
        client.close()
        echo.close()
    line = child.access(lambda e: e["command"] == "udp_associate")
    assert line["status"] == "ok" and line["via"] == "p"
    assert (line["datagrams_up"], line["datagrams_down"]) == (3, 3)
    assert line["bytes_up"] == 6 and line["bytes_down"] == 6 + 3 * len(b"echo:")
    # the parent relayed them: its own association saw the same datagrams
    upstream_line = parent.access(lambda e: e["command"] == "udp_associate")
    assert (upstream_line["datagrams_up"], upstream_line["datagrams_down"]) == (3, 3)


def test_udp_through_a_group_without_socks5_parents_is_dropped(start_daemon):
    echo = UdpEcho()
    parent = start_daemon()
    child = start_daemon(group("p", [url("http", parent)]) + via("p"))
    control, relay = associate(child)
    client = udp_client()
    try:
        client.sendto(header("127.0.0.1", echo.port) + b"x", relay)
        assert no_datagram(client)
    finally:
        control.close()
        client.close()
        echo.close()
    line = child.access(lambda e: e["command"] == "udp_associate")
    assert line["datagrams_up"] == 0 and line["datagrams_dropped"] == 1
    assert child.named("udp_parent_failed")[0]["group"] == "p"


# --- parents that misbehave, and mistakes that must not loop or hang --------------------------


def http_parent_answering(status: bytes):
    """A Squid-like HTTP parent: reads the CONNECT head, answers with `status` and closes."""

    def handle(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and (chunk := conn.recv(4096)):
            head += chunk
        conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")

    return handle


def test_a_503_from_a_squid_like_parent_is_the_targets_failure(start_daemon, tcp_server):
    """Squid and gost answer 503 when the target cannot be reached: that must not take
    the parent out (else one user's dead target takes every parent down)."""
    parent = tcp_server(http_parent_answering(b"503 Service Unavailable"))
    child = start_daemon(group("p", [f"http://127.0.0.1:{parent.port}"], max_fails=1) + via("p"))
    for _ in range(3):
        sock, rep, _, _ = socks5client.connect(child.address, "127.0.0.1", closed_port())
        sock.close()
        assert rep == 1
    lines = served(child, 3)
    assert [e["status"] for e in lines] == ["error"] * 3
    assert "503" in lines[0]["error"]
    assert child.named("upstream_failed", "upstream_down") == []


def test_a_silent_http_parent_leaves_time_for_the_next(start_daemon, tcp_server):
    """An HTTP or SOCKS4a parent has no greeting: its first answer is what it may take
    no more than its share for, while other parents remain."""
    echo = tcp_server()
    alive = start_daemon()
    silent = tcp_server(lambda conn: conn.recv(65536) and time.sleep(5))  # reads, never answers
    servers = [f"http://127.0.0.1:{silent.port}", url("socks5h", alive)]
    child = start_daemon("[timeouts]\nconnect = 2\n" + group("p", servers) + via("p"))
    started = time.monotonic()
    echo_through(child, "127.0.0.1", echo.port)
    assert time.monotonic() - started < 2.0
    failed = child.wait_for(lambda e: e.get("event") == "upstream_failed")
    assert failed["server"] == servers[0] and "did not answer" in failed["error"]


def test_a_single_silent_parent_times_out_and_is_counted(start_daemon):
    with silent_listener() as port:
        server = f"socks5://127.0.0.1:{port}"
        child = start_daemon(
            "[timeouts]\nconnect = 1\n" + group("p", [server], max_fails=1) + via("p")
        )
        sock, rep, _, _ = socks5client.connect(child.address, "127.0.0.1", 9)
        sock.close()
    assert rep == 4  # a timeout, as if we had connected ourselves
    assert child.access()["status"] == "timeout"
    down = child.wait_for(lambda e: e.get("event") == "upstream_down")
    assert down["server"] == server


def test_a_name_the_parent_cannot_be_asked_for_is_refused_not_hung(start_daemon):
    parent = start_daemon()
    child = start_daemon(group("p", [url("http", parent)]) + via("p"))
    sock, rep, _, _ = socks5client.connect(child.address, "user@host.example", 80, timeout=5)
    sock.close()
    # no name holds an "@" (a CONNECT line could not carry it either): refused as it is
    # parsed, before any parent is asked
    assert rep == 4
    line = child.access()
    assert line["status"] == "bad_request" and "character" in line["error"]
    assert parent.access_events() == []


def test_a_parent_that_is_this_proxy_is_not_a_loop(start_daemon):
    port = closed_port()
    child = start_daemon(
        group("p", [f"socks5://127.0.0.1:{port}"], max_fails=0) + via("p"),
        listen=f"127.0.0.1:{port}",
    )
    sock, rep, _, _ = socks5client.connect(child.address, "127.0.0.1", 9)
    sock.close()
    assert rep == 1
    line = child.access()
    assert line["status"] == "parent_failed" and "own listener" in line["error"]
    time.sleep(0.3)
    assert len(child.access_events()) == 1  # no request came back round


def test_a_407_from_an_http_parent_on_a_forwarded_request_is_its_failure(
    start_daemon, origin, users_file
):
    parent = start_daemon(f'[auth]\nusers_file = "{users_file}"\n')
    child = start_daemon(group("p", [url("http", parent)]) + via("p"))  # no credentials
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-x",
            f"http://{child.host}:{child.port}",
            origin.url,
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.stdout == "502"  # not the parent's 407, which would ask the user
    line = child.access()
    assert line["status"] == "parent_failed" and "407" in line["error"]
    assert child.named("upstream_failed")[0]["server"] == url("http", parent)


def test_a_kept_alive_forwarding_connection_leaves_a_parent_a_reload_removed(start_daemon, origin):
    old, new = start_daemon(), start_daemon()
    child = start_daemon(group("p", [url("http", old)]) + via("p"))
    request = f"GET {origin.url} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    with socket.create_connection(child.address, timeout=10) as sock:
        for parent in (old, new):
            sock.sendall(request)
            answer = b""
            while not answer.endswith(origin.body):
                chunk = sock.recv(1 << 20)
                assert chunk, answer[:200]
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            assert served(parent, 1)[0]["command"] == "GET"
            if parent is old:  # the same client connection goes on after the reload
                child.reload(group("p", [url("http", new)]) + via("p"))
    assert len(served(old, 1)) == 1


def test_parent_health_and_load_in_the_metrics(start_daemon, tcp_server):
    echo = tcp_server()
    alive = start_daemon()
    dead = f"socks5h://127.0.0.1:{closed_port()}"
    servers = [url("socks5h", alive), dead]
    child = start_daemon(
        '[metrics]\nlisten = "127.0.0.1:0"\n'
        + group("p", servers, max_fails=2, down_time=60)
        + via("p")
    )
    held = [socks5client.open_tunnel(child.address, "127.0.0.1", echo.port) for _ in range(4)]
    child.wait_for(lambda e: e.get("event") == "upstream_down")
    samples = scrape(child)
    assert value(samples, "proxyd_upstream_up", group="p", server=servers[0]) == 1
    assert value(samples, "proxyd_upstream_up", group="p", server=dead) == 0
    assert value(samples, "proxyd_upstream_failures_total", group="p", server=dead) == 2
    active = "proxyd_upstream_connections_active"
    assert value(samples, active, group="p", server=servers[0]) == 4
    for sock in held:
        sock.close()
    child.wait_for(lambda _e: len(child.access_events()) == 4)
    assert value(scrape(child), active, group="p", server=servers[0]) == 0
    # a reload that drops the dead parent drops its series too
    child.reload('[metrics]\nlisten = "127.0.0.1:0"\n' + group("p", servers[:1]) + via("p"))
    assert ("proxyd_upstream_up", frozenset({("group", "p"), ("server", dead)})) not in scrape(
        child
    )
