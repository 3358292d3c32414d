"""No slot held without credentials: a connection over limits.per_client is closed at
accept and never counts toward server.max_connections, and a kept-alive HTTP
connection that has not passed the credentials check (a PAC fetch) must send its
next request within timeouts.handshake, not timeouts.idle."""

from __future__ import annotations

import select
import socket
import time

from conftest import PASSWORD, USER, request_head
from integration import socks5client
from integration.test_metrics import scrape, value

SILENT = 80  # silent connections from one address
BOUND = 10.0  # seconds: generous, far below timeouts.idle (60)


def ended(sock: socket.socket, limit: float = BOUND) -> bool:
    """Whether the daemon ends the connection (EOF or reset) within `limit` seconds,
    reading (and dropping) what it sends meanwhile."""
    deadline = time.monotonic() + limit
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            return False
        try:
            if not sock.recv(65536):
                return True
        except ConnectionError:
            return True
    return False


def test_connections_over_per_client_are_closed_at_accept(start_daemon, tcp_server):
    """80 silent connections from one address hold 5 slots (limits.per_client), not 80:
    the others are closed at once, and a client from another address is served,
    though server.max_connections (20) is far below 80."""
    daemon = start_daemon(
        "[server]\nmax_connections = 20\n[limits]\nper_client = 5\n"
        '[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    server = tcp_server()
    silent: list[socket.socket] = []
    try:
        for _ in range(SILENT):
            silent.append(socket.create_connection(daemon.address, timeout=BOUND))
        closed: set[socket.socket] = set()
        deadline = time.monotonic() + BOUND
        while len(closed) < SILENT - 5 and time.monotonic() < deadline:
            open_ = [s for s in silent if s not in closed]
            for sock in select.select(open_, [], [], 0.5)[0]:
                try:
                    data = sock.recv(1)
                except ConnectionError:
                    data = b""
                assert data == b"", "a refused connection is answered nothing"
                closed.add(sock)
        assert len(closed) == SILENT - 5
        # another address still gets in, well below max_connections
        sock, rep, _, _ = socks5client.connect(
            daemon.address, "127.0.0.1", server.port, source="127.0.0.2"
        )
        with sock:
            assert rep == 0
            sock.sendall(b"ping")
            assert socks5client.recv_exact(sock, 4) == b"ping"
    finally:
        for sock in silent:
            sock.close()
    daemon.wait_for(lambda e: e.get("event") == "per_client_refused")
    warnings = daemon.named("per_client_refused")
    assert warnings and warnings[0]["client"] == "127.0.0.1"
    assert len(warnings) < 5, "the warning is rate-limited"
    assert sum(w["refused"] for w in warnings) <= SILENT - 5
    # refused at accept: no access line each (a flood must cost little)
    limit_lines = [e for e in daemon.access_events() if e["status"] == "limit"]
    assert not limit_lines
    refused = value(scrape(daemon), "proxyd_connections_total", protocol="unknown", status="limit")
    assert refused == SILENT - 5


def test_a_pac_keep_alive_must_ask_again_within_the_handshake_timeout(
    start_daemon, users_file, origin
):
    """The PAC file is answered without credentials: the connection then has
    timeouts.handshake (1 s) for its next request, not timeouts.idle (60 s). Once a
    request passed the credentials, the connection waits timeouts.idle."""
    daemon = start_daemon(
        f'[auth]\nusers_file = "{users_file}"\n[timeouts]\nhandshake = 1\nidle = 60\n'
    )
    with socket.create_connection(daemon.address, timeout=BOUND) as sock:
        sock.sendall(b"GET /proxy.pac HTTP/1.1\r\nHost: proxy\r\n\r\n")
        started = time.monotonic()
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            assert data, head
            head += data
        assert head.startswith(b"HTTP/1.1 200 ")
        assert ended(sock)  # (the rest of the PAC file, then the close)
        took = time.monotonic() - started
    assert 0.8 <= took < BOUND
    # a connection whose request passed the credentials outlives timeouts.handshake
    host = f"127.0.0.1:{origin.port}"
    target = f"http://{host}/"
    with socket.create_connection(daemon.address, timeout=BOUND) as sock:
        for _ in range(2):
            sock.sendall(request_head("GET", target, host=host, password=PASSWORD))
            assert read_answer(sock).startswith(b"HTTP/1.1 200 ")
            time.sleep(1.5)  # longer than timeouts.handshake
    lines = [e for e in daemon.access_events() if e.get("user") == USER]
    assert [e["status"] for e in lines] == ["ok", "ok"]


def test_a_407_does_not_keep_the_connection(start_daemon, users_file, origin):
    """A request refused for its credentials holds no slot: its connection ends with
    the answer (at the latest within timeouts.handshake)."""
    daemon = start_daemon(
        f'[auth]\nusers_file = "{users_file}"\n[timeouts]\nhandshake = 1\nidle = 60\n'
    )
    with socket.create_connection(daemon.address, timeout=BOUND) as sock:
        host = f"127.0.0.1:{origin.port}"
        sock.sendall(request_head("GET", f"http://{host}/", host=host))
        assert read_answer(sock).startswith(b"HTTP/1.1 407 ")
        started = time.monotonic()
        assert ended(sock)
        assert time.monotonic() - started < BOUND
    assert daemon.access()["status"] == "auth_failed"


def read_answer(sock: socket.socket) -> bytes:
    """An answer with a Content-Length body, whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, data
        body += chunk
    return head + b"\r\n\r\n" + body
