"""server.max_connections and [limits]: new clients are refused cleanly, open tunnels
are unharmed."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from conftest import PASSWORD, USER, basic_token
from integration import socks5client
from integration.socks5client import recv_exact


def test_max_connections_refuses_new_clients_only(start_daemon, tcp_server):
    daemon = start_daemon("[server]\nmax_connections = 1\n")
    server = tcp_server()
    first, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    with first:
        assert rep == 0
        extra, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
        extra.close()
        assert rep == 0x01
        with socket.create_connection(daemon.address, timeout=5) as sock:
            target = f"127.0.0.1:{server.port}"
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 503 ")
        first.sendall(b"still here")
        assert recv_exact(first, 10) == b"still here"
    for conn_id in (2, 3):
        assert daemon.access(lambda e, i=conn_id: e["conn_id"] == i)["status"] == "limit"
    daemon.access(lambda e: e["conn_id"] == 1)
    # once the first tunnel is gone, a new client is served again
    deadline = time.monotonic() + 5
    while True:
        sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
        sock.close()
        if rep == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert rep == 0


def test_per_client_limit(start_daemon, tcp_server):
    daemon = start_daemon("[limits]\nper_client = 2\n")
    server = tcp_server()
    held = [socks5client.connect(daemon.address, "127.0.0.1", server.port) for _ in range(2)]
    try:
        assert [rep for _, rep, _, _ in held] == [0, 0]
        # a third one is closed at accept, unanswered (it holds no slot meanwhile)
        with pytest.raises(ConnectionError):
            socks5client.connect(daemon.address, "127.0.0.1", server.port)
        with socket.create_connection(daemon.address, timeout=5) as s:
            with contextlib.suppress(ConnectionError):
                s.sendall(f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            try:
                answer = s.recv(4096)
            except ConnectionError:
                answer = b""
            assert answer == b""
        refused = daemon.wait_for(lambda e: e.get("event") == "per_client_refused")
        assert refused["limit"] == 2
        for sock, _, _, _ in held:  # the open tunnels carry on
            sock.sendall(b"still here")
            assert recv_exact(sock, 10) == b"still here"
    finally:
        held.pop()[0].close()
    # one slot free again
    daemon.access(lambda e: e["status"] == "ok")
    again, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    again.close()
    for sock, _, _, _ in held:
        sock.close()
    assert rep == 0


def test_per_user_limit(start_daemon, tcp_server, users_file):
    daemon = start_daemon(f'[auth]\nusers_file = "{users_file}"\n[limits]\nper_user = 1\n')
    server = tcp_server()
    first, rep, _, _ = socks5client.connect(
        daemon.address, "127.0.0.1", server.port, auth=(USER, PASSWORD)
    )
    with first:
        assert rep == 0
        second, rep, _, _ = socks5client.connect(
            daemon.address, "127.0.0.1", server.port, auth=(USER, PASSWORD)
        )
        second.close()
        assert rep == 0x01
        line = daemon.access()
        assert (line["status"], line["user"]) == ("limit", USER)
        assert "limits.per_user" in line["error"]
    daemon.access(lambda e: e["status"] == "ok")
    third, rep, _, _ = socks5client.connect(
        daemon.address, "127.0.0.1", server.port, auth=(USER, PASSWORD)
    )
    third.close()
    assert rep == 0


RATE = 1_000_000  # bytes per second, each way, for all of a user's traffic
DOWNLOAD = b"d" * 1_500_000


def send_download(conn: socket.socket) -> None:
    conn.sendall(DOWNLOAD)


def count_upload(conn: socket.socket) -> None:
    total = 0
    while data := conn.recv(65536):
        total += len(data)
    conn.sendall(str(total).encode())


def test_per_user_rate_is_shared_by_the_users_tunnels(start_daemon, tcp_server, users_file):
    """Two tunnels of one user download 3 MB together at 1 MB/s: with one second of
    burst that takes at least two seconds, where each alone would allow it in one."""
    import threading

    daemon = start_daemon(
        f'[auth]\nusers_file = "{users_file}"\n[limits]\nper_user_rate = {RATE}\n'
    )
    server = tcp_server(send_download)
    received: list[int] = []

    def download() -> None:
        sock, rep, _, _ = socks5client.connect(
            daemon.address, "127.0.0.1", server.port, auth=(USER, PASSWORD), timeout=30
        )
        with sock:
            assert rep == 0
            total = 0
            while data := sock.recv(65536):
                total += len(data)
            received.append(total)

    started = time.monotonic()
    threads = [threading.Thread(target=download) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    elapsed = time.monotonic() - started
    assert received == [len(DOWNLOAD)] * 2
    assert elapsed >= (2 * len(DOWNLOAD) - RATE) / RATE * 0.9, elapsed
    lines = [daemon.access(lambda e, i=i: e["conn_id"] == i) for i in (1, 2)]
    assert [line["bytes_down"] for line in lines] == [len(DOWNLOAD)] * 2

    # upward too: 2.5 MB in one tunnel
    sink = tcp_server(count_upload)
    sock, rep, _, _ = socks5client.connect(
        daemon.address, "127.0.0.1", sink.port, auth=(USER, PASSWORD), timeout=30
    )
    with sock:
        assert rep == 0
        started = time.monotonic()
        sock.sendall(b"u" * 2_500_000)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b"2500000"
        assert time.monotonic() - started >= 1.5 * 0.9


def test_per_user_rate_polices_udp(start_daemon, users_file):
    """Datagrams beyond the rate are dropped and counted, not queued."""
    from integration.test_udp import UDP_ASSOCIATE, UdpEcho, header, udp_client

    echo = UdpEcho()
    daemon = start_daemon(f'[auth]\nusers_file = "{users_file}"\n[limits]\nper_user_rate = 3000\n')
    try:
        control, rep, host, port = socks5client.connect(
            daemon.address, "0.0.0.0", 0, auth=(USER, PASSWORD), command=UDP_ASSOCIATE
        )
        with control, udp_client() as client:
            assert rep == 0
            for _ in range(10):
                client.sendto(header("127.0.0.1", echo.port) + b"x" * 1000, (host, port))
            replies = 0
            client.settimeout(1)
            with contextlib.suppress(TimeoutError):
                while True:
                    client.recvfrom(65535)
                    replies += 1
        line = daemon.access()
        assert line["datagrams_up"] == 3  # one second's worth of burst
        # the replies are 1005 bytes each: the third may wait for the bucket, then drops
        assert replies == line["datagrams_down"] in (2, 3)
        assert line["datagrams_over_rate"] == 7 + 3 - replies
    finally:
        echo.close()


def test_per_user_rate_applies_to_forwarded_requests(start_daemon, origin, users_file):
    """A plain-HTTP download through the forwarder keeps to the rate as a tunnel does."""
    import subprocess

    rate = 100_000
    daemon = start_daemon(
        f'[auth]\nusers_file = "{users_file}"\n[limits]\nper_user_rate = {rate}\n'
    )
    started = time.monotonic()
    proxy = f"http://{USER}:{PASSWORD}@127.0.0.1:{daemon.port}"
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-x", proxy, origin.url],
        capture_output=True,
        timeout=40,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout == origin.body
    assert elapsed >= (len(origin.body) - rate) / rate * 0.9, elapsed
    assert daemon.access()["bytes_down"] == len(origin.body)


def test_a_datagram_larger_than_the_rate_passes_now_and_then(start_daemon, users_file):
    """With a rate below one datagram, a datagram passes when the bucket is full and
    the next waits until the debt is paid: not every datagram is dropped."""
    from integration.test_udp import UDP_ASSOCIATE, UdpEcho, header, udp_client

    echo = UdpEcho()
    daemon = start_daemon(f'[auth]\nusers_file = "{users_file}"\n[limits]\nper_user_rate = 500\n')
    try:
        control, rep, host, port = socks5client.connect(
            daemon.address, "0.0.0.0", 0, auth=(USER, PASSWORD), command=UDP_ASSOCIATE
        )
        with control, udp_client() as client:
            assert rep == 0
            for _ in range(3):
                client.sendto(header("127.0.0.1", echo.port) + b"x" * 1000, (host, port))
            client.recvfrom(65535)  # the first one's echo (1005 bytes, also over the rate)
            # the two others are read and judged before the association ends (under
            # load, the echo could come back before the relay had read them)
            time.sleep(0.5)
        line = daemon.access()
        assert (line["datagrams_up"], line["datagrams_over_rate"]) == (1, 2)
        assert line["datagrams_down"] == 1
    finally:
        echo.close()


def test_bytes_sent_with_the_request_pay_the_users_rate(start_daemon, tcp_server, users_file):
    """Bytes a client sends in the same packet as its request (read before the user is
    known) count toward `limits.per_user_rate` like any others: four short
    connections each carrying 4,000 bytes with their request, CONNECT and a
    forwarded POST alike, take at least (16,000 - 8,000 of burst) / 8,000 B/s = 1 s,
    where uncharged they would pass at once."""
    rate, size, count = 8000, 4000, 4
    daemon = start_daemon(
        f'[auth]\nusers_file = "{users_file}"\n[limits]\nper_user_rate = {rate}\n'
    )
    auth = f"Proxy-Authorization: Basic {basic_token()}\r\n"
    received: list[int] = []

    def sink(conn: socket.socket) -> None:
        total = 0
        while data := conn.recv(65536):
            total += len(data)
        received.append(total)

    def origin(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(65536)
        body = head.partition(b"\r\n\r\n")[2]
        while len(body) < size:
            body += conn.recv(65536)
        received.append(len(body))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    target = tcp_server(sink)
    started = time.monotonic()
    for _ in range(count):
        with socket.create_connection(daemon.address, timeout=30) as sock:
            head = f"CONNECT 127.0.0.1:{target.port} HTTP/1.1\r\nHost: a\r\n{auth}\r\n"
            sock.sendall(head.encode() + b"c" * size)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
            sock.shutdown(socket.SHUT_WR)
            sock.recv(4096)  # the target's end: everything went through
    connect_elapsed = time.monotonic() - started
    web = tcp_server(origin)
    started = time.monotonic()
    for _ in range(count):
        with socket.create_connection(daemon.address, timeout=30) as sock:
            head = (
                f"POST http://127.0.0.1:{web.port}/ HTTP/1.1\r\nHost: a\r\n{auth}"
                f"Content-Length: {size}\r\nConnection: close\r\n\r\n"
            )
            sock.sendall(head.encode() + b"p" * size)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    forward_elapsed = time.monotonic() - started
    assert received == [size] * (2 * count)
    least = (count * size - rate) / rate * 0.8
    assert connect_elapsed >= least, connect_elapsed
    assert forward_elapsed >= least, forward_elapsed
