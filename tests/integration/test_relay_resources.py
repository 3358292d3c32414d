"""Relay resources: socket buffers applied, backpressure instead of buffering, connect timeout."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time

from conftest import silent_listener
from integration import socks5client
from integration.socks5client import recv_exact

MIB = 1024 * 1024


def daemon_socket_memory(pid: int) -> list[tuple[int, int]]:
    """(rcvbuf, sndbuf) of each established TCP socket of `pid`, as `ss` reports them."""
    out = subprocess.run(
        ["ss", "-tnmp", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    result = []
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if f"pid={pid}," in line and i + 1 < len(lines):
            match = re.search(r"rb(\d+),t\d+,tb(\d+)", lines[i + 1])
            if match:
                result.append((int(match[1]), int(match[2])))
    return result


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_buffers_applied_to_both_sockets(start_daemon, tcp_server):
    daemon = start_daemon("[buffers]\nso_rcvbuf = 200000\nso_sndbuf = 300000\nread_size = 1024\n")
    server = tcp_server()
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    with sock:
        assert rep == 0
        payload = bytes(range(256)) * 40  # several relay reads of 1 KiB each
        sock.sendall(payload)
        assert recv_exact(sock, len(payload)) == payload
        memory = daemon_socket_memory(daemon.proc.pid)
    # client side and upstream side; Linux reports twice the requested size
    assert memory == [(400000, 600000)] * 2


def test_slow_reader_slows_the_writer(start_daemon, tcp_server, relay_kind):
    """A client that does not read stops the target's sends; the daemon does not buffer."""
    total = 256 * MIB
    progress = {"sent": 0}
    done = threading.Event()

    def flood(conn: socket.socket) -> None:
        chunk = b"z" * MIB
        conn.settimeout(30)
        try:
            while progress["sent"] < total:
                progress["sent"] += conn.send(chunk)
        finally:
            done.set()

    daemon = start_daemon(relay_kind)
    server = tcp_server(flood)
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port, timeout=30)
    with sock:
        assert rep == 0
        baseline = rss_kib(daemon.proc.pid)
        time.sleep(1.5)  # the client reads nothing
        stalled_at = progress["sent"]
        time.sleep(0.5)
        # kernel buffers fill up and then nothing moves: the writer is held back
        assert progress["sent"] == stalled_at
        assert stalled_at < 64 * MIB
        assert rss_kib(daemon.proc.pid) - baseline < 16 * 1024
        received = 0
        buf = bytearray(MIB)
        while received < total:
            n = sock.recv_into(buf)
            assert n
            received += n
    assert done.wait(10)
    assert received == total


def test_connect_timeout_gives_0x04_and_504(start_daemon):
    """A target whose accept queue is full never completes the handshake: connect times out."""
    with silent_listener() as port:
        daemon = start_daemon("[timeouts]\nconnect = 1\n")
        started = time.monotonic()
        sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", port)
        sock.close()
        assert rep == 0x04
        assert 0.9 < time.monotonic() - started < 5
        assert daemon.access()["status"] == "timeout"
        with socket.create_connection(daemon.address, timeout=10) as s:
            s.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 504 ")


def pipes_of(pid: int) -> int:
    return sum(
        os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
        for fd in os.listdir(f"/proc/{pid}/fd")
    )


def test_splice_relay_uses_pipes_and_reuses_them(start_daemon, tcp_server, relay_kind):
    """The zero-copy relay is the one running when chosen; pipes are kept for reuse, not leaked."""
    splice = "true" in relay_kind
    daemon = start_daemon(relay_kind)
    pid = daemon.proc.pid
    before = pipes_of(pid)
    server = tcp_server()
    for round_ in range(1, 4):
        sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
        with sock:
            assert rep == 0
            if round_ == 1:
                assert pipes_of(pid) == before  # an idle tunnel holds no pipe
            sock.sendall(b"p" * 300_000)
            assert recv_exact(sock, 300_000) == b"p" * 300_000
            # the splice relay made pipes (a direction holds one while bytes sit in it)
            extra = pipes_of(pid) - before
            assert (0 < extra <= 4) if splice else extra == 0
            if round_ == 1:
                first_extra = extra
        daemon.access(lambda e, r=round_: e["conn_id"] == r)
        # empty pipes are reused by the next tunnel: the count stays put
        assert pipes_of(pid) - before == first_extra


def test_short_exchanges_are_copied_without_a_pipe(start_daemon, tcp_server, relay_kind):
    """A request and its answer, smaller than one read, go through the shared buffer:
    the splice relay takes a pipe only once a read fills the buffer (bulk data)."""
    daemon = start_daemon(relay_kind)
    pid = daemon.proc.pid
    before = pipes_of(pid)
    server = tcp_server()
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    with sock:
        assert rep == 0
        for size in (1, 100, 4000):
            sock.sendall(b"s" * size)
            assert recv_exact(sock, size) == b"s" * size
            assert pipes_of(pid) == before
    assert daemon.access(lambda e: e["conn_id"] == 1)["bytes_up"] == 4101


def test_idle_tunnels_after_traffic_hold_no_pipes(start_daemon, tcp_server, relay_kind):
    """Pipes are held only while bytes sit in them: ten quiet tunnels cost sockets only."""
    daemon = start_daemon(relay_kind)
    pid = daemon.proc.pid
    server = tcp_server()
    tunnels = []
    try:
        for _ in range(10):
            sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
            tunnels.append(sock)
            assert rep == 0
            sock.sendall(b"t" * 200_000)
            assert recv_exact(sock, 200_000) == b"t" * 200_000
        # at most the pool's few empty pipes, not two per tunnel
        assert pipes_of(pid) <= 4 * 2
    finally:
        for sock in tunnels:
            sock.close()
