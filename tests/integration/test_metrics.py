"""[metrics]: /metrics scraped with the Prometheus parser and checked against the traffic
sent and the access log, with one process and with workers; /healthz."""

from __future__ import annotations

import http.client
import os
import select
import signal
import socket
import time

from prometheus_client.parser import text_string_to_metric_families

from conftest import PASSWORD, USER, basic_token
from integration import socks5client
from integration.socks5client import recv_exact
from integration.test_udp import UDP_ASSOCIATE, UdpEcho, associate, header, udp_client
from integration.test_websocket import Client as WebSocketClient
from integration.test_workers import alive, workers_started

ALICE = (USER, PASSWORD)


def metrics_address(daemon) -> tuple[str, int]:
    line = daemon.wait_for(lambda e: e.get("event") == "metrics_listening")
    host, _, port = line["address"].rpartition(":")
    return host, int(port)


def metrics_address_latest(daemon) -> tuple[str, int]:
    host, _, port = daemon.named("metrics_listening")[-1]["address"].rpartition(":")
    return host, int(port)


def get(daemon, path: str, method: str = "GET") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection(*metrics_address(daemon), timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()
    finally:
        conn.close()


def scrape(daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics: (name, labels) -> value."""
    status, kind, text = get(daemon, "/metrics")
    assert status == 200 and kind.startswith("text/plain; version="), (status, kind)
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def tunnel(daemon, port: int, payload: bytes, *, auth=ALICE) -> None:
    with socks5client.open_tunnel(daemon.address, "127.0.0.1", port, auth=auth) as sock:
        sock.sendall(payload)
        assert recv_exact(sock, len(payload)) == payload


def settled(daemon, count: int) -> list[dict]:
    """The access lines, once `count` of them were written."""
    daemon.wait_for(lambda _e: len(daemon.named("access")) >= count)
    return daemon.access_events()


def test_counters_match_the_traffic(start_daemon, users_file, tcp_server, origin):
    server = tcp_server()
    denied_port = tcp_server().port
    daemon = start_daemon(
        f'[auth]\nusers_file = "{users_file}"\n[metrics]\nlisten = "127.0.0.1:0"\n'
        f'[[rules]]\naction = "deny"\nports = [{denied_port}]\n'
    )
    before = scrape(daemon)
    assert value(before, "proxyd_connections_total", protocol="socks5", status="ok") == 0

    for size in (1000, 20_000, 300_000):
        tunnel(daemon, server.port, os.urandom(size))
    sock, rep, _, _ = socks5client.connect(
        daemon.address, "127.0.0.1", server.port, auth=(USER, "wrong")
    )
    sock.close()
    assert rep == -1
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", denied_port, auth=ALICE)
    sock.close()
    assert rep == 2
    # two requests on one kept-alive connection
    conn = http.client.HTTPConnection(*daemon.address, timeout=10)
    for _ in range(2):
        conn.request("GET", origin.url, headers={"Proxy-Authorization": f"Basic {basic_token()}"})
        assert conn.getresponse().read() == origin.body
    conn.close()
    # a UDP association: three datagrams each way
    echo_server, client = UdpEcho(), udp_client()
    try:
        control, rep, host, port = socks5client.connect(
            daemon.address, "0.0.0.0", 0, command=UDP_ASSOCIATE, auth=ALICE
        )
        with control:
            assert rep == 0
            for n in range(3):
                client.sendto(header("127.0.0.1", echo_server.port) + b"d%d" % n, (host, port))
                client.recvfrom(65535)
    finally:
        echo_server.close()
        client.close()
    lines = settled(daemon, 3 + 2 + 2 + 1)

    samples = scrape(daemon)
    connections = {
        (dict(labels)["protocol"], dict(labels)["status"]): n
        for (name, labels), n in samples.items()
        if name == "proxyd_connections_total" and n
    }
    assert connections == {
        ("socks5", "ok"): 4,  # three tunnels and the UDP association
        ("socks5", "auth_failed"): 1,
        ("socks5", "denied"): 1,
        ("http", "ok"): 1,
    }
    assert value(samples, "proxyd_http_requests_total", status="ok") == 2
    for direction in ("up", "down"):
        assert value(samples, "proxyd_bytes_total", direction=direction) == sum(
            e[f"bytes_{direction}"] for e in lines
        )
        assert value(samples, "proxyd_udp_datagrams_total", direction=direction) == 3
    assert value(samples, "proxyd_bytes_total", direction="up") >= 321_000
    assert value(samples, "proxyd_auth_failures_total") == 1
    assert value(samples, "proxyd_auth_lockouts_total") == 0
    # complete requests: 3 tunnels, the denied one, the association; one forwarding connection
    assert value(samples, "proxyd_handshake_seconds_count", protocol="socks5") == 5
    assert value(samples, "proxyd_handshake_seconds_count", protocol="http") == 1
    assert value(samples, "proxyd_handshake_seconds_bucket", protocol="socks5", le="+Inf") == 5
    # three tunnels and at least one origin connection (it closes after HTTP/1.0 answers)
    assert 4 <= value(samples, "proxyd_upstream_connect_seconds_count") <= 5
    assert value(samples, "proxyd_connections_active", protocol="socks5") == 0

    # open connections show as active while they are
    held = [
        socks5client.connect(daemon.address, "127.0.0.1", server.port, auth=ALICE)[0]
        for _ in range(3)
    ]
    try:
        assert value(scrape(daemon), "proxyd_connections_active", protocol="socks5") == 3
    finally:
        for sock in held:
            sock.close()
    settled(daemon, len(lines) + 3)
    assert value(scrape(daemon), "proxyd_connections_active", protocol="socks5") == 0


def test_healthz_and_admin_answers(start_daemon, tcp_server):
    daemon = start_daemon('[server]\nshutdown_grace = 30\n[metrics]\nlisten = "127.0.0.1:0"\n')
    assert get(daemon, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
    assert get(daemon, "/healthz", "HEAD")[:2] == (200, "text/plain; charset=utf-8")
    assert get(daemon, "/nothing")[0] == 404
    assert get(daemon, "/metrics", "POST")[0] == 405
    # while draining, health says so (a balancer takes the instance out) and tunnels go on
    server = tcp_server()
    with socks5client.open_tunnel(daemon.address, "127.0.0.1", server.port) as sock:
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_for(lambda e: e.get("event") == "draining")
        assert get(daemon, "/healthz")[:3:2] == (503, "draining\n")
        sock.sendall(b"still here")
        assert recv_exact(sock, 10) == b"still here"
    assert daemon.proc.wait(10) == 0


def test_scrapers_that_stall_lock_no_one_out(start_daemon, tcp_server):
    """More stalled admin connections than the cap: the oldest make room, so a real
    scrape is answered while they are all still open, and the proxy serves on."""
    daemon = start_daemon('[metrics]\nlisten = "127.0.0.1:0"\n')
    stalled = [socket.create_connection(metrics_address(daemon)) for _ in range(100)]
    try:
        for sock in stalled[:50]:
            sock.sendall(b"GET /metr")  # half a request, never finished
        assert get(daemon, "/healthz")[0] == 200
        assert value(scrape(daemon), "proxyd_connections_total", protocol="socks5") == 0
        tunnel(daemon, tcp_server().port, b"served", auth=None)
        readable, _, _ = select.select(stalled, [], [], 2)
        cut = 0
        for sock in readable:
            try:
                cut += sock.recv(1) == b""
            except ConnectionResetError:
                cut += 1
        assert 100 - 64 <= cut < 50, cut  # beyond the cap (64) the oldest were closed
    finally:
        for sock in stalled:
            sock.close()


def test_kept_alive_scraper_at_stop_and_reload_leaves_no_traceback(start_daemon):
    daemon = start_daemon('[metrics]\nlisten = "127.0.0.1:0"\n')
    conn = http.client.HTTPConnection(*metrics_address(daemon), timeout=10)
    conn.request("GET", "/healthz")
    assert conn.getresponse().read() == b"ok\n"  # and the connection stays open
    (outcome,) = daemon.reload('[metrics]\nlisten = "127.0.0.2:0"\n')  # moves the listener
    assert outcome["event"] == "reloaded"
    conn.close()
    conn = http.client.HTTPConnection(*metrics_address_latest(daemon), timeout=10)
    conn.request("GET", "/healthz")
    assert conn.getresponse().read() == b"ok\n"
    assert daemon.stop() == 0
    conn.close()
    assert "Traceback" not in daemon.output() and "Exception" not in daemon.output()


def test_failed_move_of_the_metrics_listener_keeps_the_old_one(start_daemon):
    daemon = start_daemon('[metrics]\nlisten = "127.0.0.1:0"\n')
    taken = socket.socket()
    taken.bind(("127.0.0.2", 0))
    taken.listen()
    with taken:
        busy = f"127.0.0.2:{taken.getsockname()[1]}"
        (outcome,) = daemon.reload(f'[metrics]\nlisten = "{busy}"\n')
    assert outcome["event"] == "reload_failed"
    assert outcome["problems"] == [f"metrics.listen: {busy}: Address already in use"]
    assert get(daemon, "/healthz")[0] == 200  # still served where it was
    samples = scrape(daemon)
    assert value(samples, "proxyd_config_reloads_total", result="failed") == 1


def test_open_tunnels_bytes_show_before_they_close(start_daemon, tcp_server, ws_server):
    """A tunnel's bytes, and a WebSocket's through forwarding, count while they are
    open (every 5 s), and once only when they close."""
    daemon = start_daemon('[metrics]\nlisten = "127.0.0.1:0"\n')
    server = tcp_server()
    websocket = WebSocketClient(daemon.address, ws_server)
    assert websocket.exchange(b"y" * 30_000) == b"y" * 30_000
    with socks5client.open_tunnel(daemon.address, "127.0.0.1", server.port) as sock:
        sock.sendall(b"z" * 50_000)
        recv_exact(sock, 50_000)
        deadline = time.monotonic() + 15  # metered every 5 s
        while value(scrape(daemon), "proxyd_bytes_total", direction="up") < 50_000 + 30_000:
            assert time.monotonic() < deadline, "open tunnels' bytes never metered"
            time.sleep(0.5)
    websocket.close()
    settled(daemon, 2)
    samples = scrape(daemon)
    up, down = 50_000 + websocket.sent, 50_000 + websocket.received
    assert value(samples, "proxyd_bytes_total", direction="up") == up  # not twice
    assert value(samples, "proxyd_bytes_total", direction="down") == down


def test_metrics_turned_on_and_off_by_reload(start_daemon, tcp_server):
    daemon = start_daemon()
    assert not daemon.named("metrics_listening")
    (outcome,) = daemon.reload('[metrics]\nlisten = "127.0.0.1:0"\n')
    assert outcome["event"] == "reloaded"
    tunnel(daemon, tcp_server().port, b"abc", auth=None)
    settled(daemon, 1)
    samples = scrape(daemon)
    assert value(samples, "proxyd_connections_total", protocol="socks5", status="ok") == 1
    assert value(samples, "proxyd_config_reloads_total", result="ok") == 1
    address = metrics_address(daemon)
    (outcome,) = daemon.reload("")
    assert outcome["event"] == "reloaded"
    try:
        socket.create_connection(address, timeout=5).close()
        raise AssertionError("the metrics listener is still open")
    except ConnectionRefusedError:
        pass


def test_workers_numbers_add_up(start_daemon, tcp_server, tmp_path):
    daemon = start_daemon('[server]\nworkers = 2\n[metrics]\nlisten = "127.0.0.1:0"\n')
    pids = workers_started(daemon, 2)
    server = tcp_server()
    for _ in range(30):
        tunnel(daemon, server.port, b"q" * 1000, auth=None)
    lines = settled(daemon, 30)
    assert {e["conn_id"] % 2 for e in lines} == {0, 1}  # both workers served some
    for _ in range(6):  # whichever worker answers the scrape, it counts for both
        samples = scrape(daemon)
        assert value(samples, "proxyd_connections_total", protocol="socks5", status="ok") == 30
        assert value(samples, "proxyd_bytes_total", direction="up") == 30_000
        assert value(samples, "proxyd_bytes_total", direction="down") == 30_000

    held = [socks5client.connect(daemon.address, "127.0.0.1", server.port)[0] for _ in range(16)]
    try:
        assert value(scrape(daemon), "proxyd_connections_active", protocol="socks5") == 16
        # a worker that dies takes its open connections out of the gauge, not its counts
        os.kill(pids[0], signal.SIGKILL)
        daemon.wait_for(lambda e: e.get("event") == "worker_restarted")
        workers_started(daemon, 3)
        assert not alive(pids[0])
        survivors = sum(carries(sock) for sock in held)
        assert 0 < survivors < 16, survivors  # both workers held some (1 in 2**15 not)
        samples = scrape(daemon)
        assert value(samples, "proxyd_connections_active", protocol="socks5") == survivors
        assert value(samples, "proxyd_connections_total", protocol="socks5", status="ok") == 30
    finally:
        for sock in held:
            sock.close()
    settled(daemon, 30 + survivors)
    samples = scrape(daemon)
    assert value(samples, "proxyd_connections_total", protocol="socks5", status="ok") == (
        30 + survivors
    )
    assert value(samples, "proxyd_connections_active", protocol="socks5") == 0

    # the supervisor checks reloads once and counts them once, for all workers
    text = '[server]\nworkers = 2\n[metrics]\nlisten = "127.0.0.1:0"\n'
    assert [o["event"] for o in daemon.reload(text, results=2)] == ["reloaded"] * 2
    assert daemon.reload("[server\n")[0]["event"] == "reload_failed"
    samples = scrape(daemon)
    assert value(samples, "proxyd_config_reloads_total", result="ok") == 1
    assert value(samples, "proxyd_config_reloads_total", result="failed") == 1


def carries(sock: socket.socket) -> bool:
    """Whether a tunnel still echoes (its worker is alive)."""
    try:
        sock.sendall(b"ping")
        return recv_exact(sock, 4) == b"ping"
    except (OSError, EOFError, AssertionError):
        return False


def test_asyncio_tasks_come_and_go(start_daemon):
    """proxyd_asyncio_tasks counts the tasks alive: a UDP association holds its own
    until its control connection closes (a count that never comes back is a leak)."""
    daemon = start_daemon('[metrics]\nlisten = "127.0.0.1:0"\n')
    tasks = lambda: value(scrape(daemon), "proxyd_asyncio_tasks")  # noqa: E731
    before = tasks()
    controls = [associate(daemon)[0] for _ in range(3)]
    assert tasks() >= before + 3  # (the relay of each has a task of its own too)
    for control in controls:
        control.close()
    settled(daemon, 3)
    assert tasks() == before
