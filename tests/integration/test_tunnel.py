"""The relay and the timeouts, observed from real sockets through the real daemon."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time

from integration import socks5client
from integration.socks5client import recv_exact

MIB = 1024 * 1024


def stream(seed: int, total: int, chunk: int = 256 * 1024):
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield rng.randbytes(n)
        sent += n


def count_then_answer(conn: socket.socket) -> None:
    """Read to EOF, then say how much arrived: only works if half-close is propagated."""
    n = 0
    while data := conn.recv(65536):
        n += len(data)
    conn.sendall(f"got {n} bytes".encode())


def test_64_mib_each_way_intact(start_daemon, tcp_server, relay_kind):
    total = 64 * MIB
    expected_up = hashlib.sha256(b"".join(stream(1, total))).hexdigest()
    expected_down = hashlib.sha256(b"".join(stream(2, total))).hexdigest()
    received_by_server: dict[str, str] = {}
    server_done = threading.Event()

    def server_handle(conn: socket.socket) -> None:
        def send() -> None:
            for chunk in stream(2, total):
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        digest = hashlib.sha256()
        while data := conn.recv(MIB):
            digest.update(data)
        received_by_server["up"] = digest.hexdigest()
        sender.join()
        server_done.set()

    daemon = start_daemon(relay_kind)
    server = tcp_server(server_handle)
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port, timeout=60)
    assert rep == 0

    def client_send() -> None:
        for chunk in stream(1, total):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=client_send)
    sender.start()
    digest = hashlib.sha256()
    while data := sock.recv(MIB):
        digest.update(data)
    sender.join()
    sock.close()

    assert digest.hexdigest() == expected_down
    line = daemon.access(timeout=30)
    assert server_done.wait(30)
    assert received_by_server["up"] == expected_up
    assert (line["status"], line["bytes_up"], line["bytes_down"]) == ("ok", total, total)


def test_half_close_client_still_gets_reply(start_daemon, tcp_server, relay_kind):
    """The client shuts down its write side; the target sees EOF and its answer still arrives."""
    daemon = start_daemon(relay_kind)
    server = tcp_server(count_then_answer)
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    with sock:
        assert rep == 0
        sock.sendall(b"x" * 100_000)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while data := sock.recv(65536):
            reply += data
    assert reply == b"got 100000 bytes"
    line = daemon.access()
    assert (line["status"], line["bytes_up"], line["bytes_down"]) == ("ok", 100_000, 16)


def test_http_connect_half_close(start_daemon, tcp_server, relay_kind):
    daemon = start_daemon(relay_kind)
    server = tcp_server(count_then_answer)
    with socket.create_connection(daemon.address, timeout=10) as sock:
        target = f"127.0.0.1:{server.port}"
        # the first tunnel bytes ride in the same segment as the request head
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + b"abc")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200")
        sock.sendall(b"defg")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b"got 7 bytes"
    assert daemon.access()["bytes_up"] == 7


def test_idle_timeout_closes_quiet_tunnel_only(start_daemon, tcp_server, relay_kind):
    daemon = start_daemon(relay_kind + "[timeouts]\nidle = 1\n")
    server = tcp_server()
    quiet, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    busy, rep2, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    assert rep == rep2 == 0
    with quiet, busy:
        quiet.settimeout(10)
        started = time.monotonic()
        # the busy tunnel exchanges a byte every 0.3 s; only the quiet one is cut
        for _ in range(6):
            busy.sendall(b"k")
            assert recv_exact(busy, 1) == b"k"
            time.sleep(0.3)
        assert quiet.recv(1) == b""
        assert 0.9 < time.monotonic() - started < 5
        busy.sendall(b"still")
        assert recv_exact(busy, 5) == b"still"
    line = daemon.access(lambda e: e["status"] == "idle_timeout")
    assert line["bytes_up"] == 0


def test_handshake_timeout_silent_and_trickling(start_daemon):
    daemon = start_daemon("[timeouts]\nhandshake = 1\n")
    silent = socket.create_connection(daemon.address, timeout=10)
    trickle = socket.create_connection(daemon.address, timeout=10)
    started = time.monotonic()
    with silent, trickle:
        # a byte every 0.25 s of a greeting that declares 255 methods never completes
        message = b"\x05\xff" + bytes(range(255))
        closed = False
        for byte in message:
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.25)
            if time.monotonic() - started > 4:
                break
        assert silent.recv(1) == b""
        assert closed or trickle.recv(1) == b""
        assert time.monotonic() - started < 4
    lines = [daemon.access(lambda e, i=i: e["conn_id"] == i) for i in (1, 2)]
    assert [line["status"] for line in lines] == ["handshake_timeout"] * 2


def test_unknown_first_byte_closed_and_next_client_served(start_daemon, tcp_server):
    daemon = start_daemon()
    with socket.create_connection(daemon.address, timeout=5) as sock:
        sock.sendall(b"\x00\x01\x02garbage")
        assert sock.recv(10) == b""
    line = daemon.access()
    assert line["status"] == "bad_request" and line["protocol"] is None
    server = tcp_server()
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    with sock:
        assert rep == 0
