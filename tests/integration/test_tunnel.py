"""The relay and the timeouts, observed from real sockets through the real daemon."""

from __future__ import annotations

import functools
import hashlib
import random
import socket
import threading
import time

import pytest

from integration import socks5client
from integration.socks5client import recv_exact
from integration.test_upstream_faults import SUCCESS, ask

MIB = 1024 * 1024
GIB = 1024 * MIB
CHUNK = 256 * 1024


def stream(seed: int, total: int = GIB):
    """`total` bytes in chunks of 256 KiB: one random block, each chunk numbered, so a
    chunk lost, repeated or out of place changes the digest."""
    block = random.Random(seed).randbytes(CHUNK)
    for index in range(total // CHUNK):
        yield index.to_bytes(8, "big") + block[8:]


@functools.cache
def digest_of(seed: int) -> bytes:
    digest = hashlib.sha256()
    for chunk in stream(seed):
        digest.update(chunk)
    return digest.digest()


def count_then_answer(conn: socket.socket) -> None:
    """Read to EOF, then say how much arrived: only works if half-close is propagated."""
    n = 0
    while data := conn.recv(65536):
        n += len(data)
    conn.sendall(f"got {n} bytes".encode())


def open_tunnel(front: str, daemon, port: int) -> socket.socket:
    sock, code = ask(front, daemon, "127.0.0.1", port, timeout=120)
    assert code == SUCCESS[front]
    return sock


def send_all_then_shut(sock: socket.socket, seed: int) -> threading.Thread:
    def send() -> None:
        for chunk in stream(seed):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    return sender


@pytest.mark.parametrize("front", ["socks5", "connect"])
def test_one_gib_each_way_intact_then_half_close(start_daemon, tcp_server, front, relay_kind):
    """1 GiB up and 1 GiB down at once, checked by SHA-256. The client then shuts down
    its side; the target, once it has read to that EOF, answers with the digest of
    what it got and closes: an answer after a half-close arrives, and so does the end."""
    up, down = digest_of(1), digest_of(2)
    target_got: list[bytes] = []

    def target(conn: socket.socket) -> None:
        conn.settimeout(120)

        def send() -> None:
            for chunk in stream(2):
                conn.sendall(chunk)

        sender = threading.Thread(target=send)
        sender.start()
        digest = hashlib.sha256()
        while data := conn.recv(MIB):
            digest.update(data)
        target_got.append(digest.digest())
        sender.join()
        conn.sendall(digest.digest())  # after the client's EOF; then the target closes

    daemon = start_daemon(relay_kind)
    server = tcp_server(target)
    sock = open_tunnel(front, daemon, server.port)
    with sock:
        sender = send_all_then_shut(sock, 1)
        digest = hashlib.sha256()
        received = 0
        while received < GIB:
            data = sock.recv(min(MIB, GIB - received))
            assert data, f"closed after {received} bytes"
            digest.update(data)
            received += len(data)
        assert recv_exact(sock, 32) == up  # the target's answer to the half-close
        assert sock.recv(1) == b""  # and then its end
        sender.join()
    assert digest.digest() == down
    assert target_got == [up]
    line = daemon.access(timeout=30)
    assert (line["status"], line["bytes_up"], line["bytes_down"]) == ("ok", GIB, GIB + 32)


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
