"""Peers that misbehave: resets with data in flight, odd names, broken stdout, signals mid-tunnel."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from conftest import ROOT, closed_port
from integration import socks5client
from integration.socks5client import recv_exact


def reset(conn: socket.socket) -> None:
    """Close with RST instead of FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


@pytest.mark.parametrize(
    ("first", "partial"),
    [
        (b"\x05\x01\x00", b"\x05\x01\x00\x03\x20half"),  # SOCKS5: half a request
        (b"CONNECT 127.0.0.1:80 HTTP/1.1\r\n", b"Host: 127.0.0.1:80\r\n"),  # half a head
    ],
    ids=["socks5", "http"],
)
def test_a_reset_after_part_of_a_request_ends_the_handshake_at_once(start_daemon, first, partial):
    """Part of a request, read by the daemon; then more of it with a reset right
    behind: the connection ends as client_closed at once, not at timeouts.handshake
    (under uvloop the bytes before a reset used to hide it)."""
    daemon = start_daemon("[timeouts]\nhandshake = 10\n")
    for n in range(1, 21):
        conn = socket.create_connection(daemon.address, timeout=10)
        conn.sendall(first)
        if first.startswith(b"\x05"):
            assert recv_exact(conn, 2) == b"\x05\x00"
        else:
            time.sleep(0.05)  # read by the daemon, which waits for the rest
        conn.sendall(partial)
        reset(conn)
        deadline = time.monotonic() + 2.0
        while len(daemon.access_events()) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        lines = daemon.access_events()
        assert len(lines) == n, f"connection {n}: no line within 2 s"
        assert lines[-1]["status"] == "client_closed"


@pytest.mark.parametrize("side", ["target", "client"])
def test_reset_with_unread_data_ends_tunnel_at_once(start_daemon, tcp_server, side, relay_kind):
    """A reset while the daemon still has bytes to read ends the tunnel, not the idle timer."""

    def send_then_reset(conn: socket.socket) -> None:
        conn.sendall(b"d" * 200_000)
        time.sleep(0.2)
        reset(conn)

    def sink(conn: socket.socket) -> None:
        while conn.recv(65536):
            pass

    daemon = start_daemon(relay_kind + "[timeouts]\nidle = 60\n")
    for i in range(1, 6):
        server = tcp_server(send_then_reset if side == "target" else sink)
        sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
        assert rep == 0
        if side == "target":
            time.sleep(0.4)  # the reset arrives while data is still queued for us
            sock.close()
        else:
            sock.sendall(b"u" * 200_000)
            reset(sock)
        line = daemon.access(lambda e, i=i: e["conn_id"] == i, timeout=20)
        assert line["status"] in ("reset", "ok")
        assert line["duration_ms"] < 20_000  # far below the 60 s idle timeout


def test_counts_kept_when_shutdown_cuts_a_tunnel(start_daemon, tcp_server, relay_kind):
    server = tcp_server()
    daemon = start_daemon(relay_kind + "[server]\nshutdown_grace = 0\n")
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    with sock:
        assert rep == 0
        sock.sendall(b"q" * 100_000)
        assert recv_exact(sock, 100_000) == b"q" * 100_000
        assert daemon.stop() == 0
    line = daemon.access()
    assert (line["status"], line["bytes_up"], line["bytes_down"]) == ("shutdown", 100_000, 100_000)


def test_access_lines_at_log_level_warning(start_daemon, tcp_server):
    server = tcp_server()
    daemon = start_daemon("", "--log-level", "warning", wait=False)
    # "listening" is an info event and hidden at this level: find the port with ss
    deadline = time.monotonic() + 15
    port = None
    while port is None and time.monotonic() < deadline:
        out = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if f"pid={daemon.proc.pid}," in line:
                port = int(line.split()[3].rpartition(":")[2])
        time.sleep(0.05)
    assert port is not None
    sock, rep, _, _ = socks5client.connect(("127.0.0.1", port), "127.0.0.1", server.port)
    sock.close()
    assert rep == 0
    assert daemon.access()["status"] == "ok"
    assert not [e for e in daemon.events if e.get("event") == "listening"]


def test_bad_names_refused_cleanly(start_daemon):
    daemon = start_daemon()
    for name in ("127.0.0.1\x00.blocked.example", "a..b", "x" * 64 + ".example"):
        sock, rep, _, _ = socks5client.connect(daemon.address, name, 80)
        sock.close()
        assert rep == 0x04
    for raw in (
        b"GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT a..b:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        with socket.create_connection(daemon.address, timeout=5) as sock:
            sock.sendall(raw)
            assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
    for i in range(1, 6):
        line = daemon.access(lambda e, i=i: e["conn_id"] == i)
        assert line["status"] == "bad_request"
    assert not [e for e in daemon.events if e.get("event") == "session_error"]


def test_forward_request_logged_as_host_port(start_daemon):
    daemon = start_daemon()
    port = closed_port()
    with socket.create_connection(daemon.address, timeout=5) as sock:
        sock.sendall(
            f"GET http://u:pw@127.0.0.1:{port}/login?session=SECRET HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 502 ")
    line = daemon.access()
    assert (line["command"], line["target"]) == ("GET", f"127.0.0.1:{port}")
    assert "SECRET" not in daemon.output()
    assert "pw@" not in daemon.output()


def test_sigterm_with_stdout_gone(tmp_path):
    """Nobody reads stdout any more: SIGTERM still stops the daemon, exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxyd", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        assert b"listening" in proc.stdout.readline()
        proc.stdout.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_later_request_head_has_the_first_ones_limit(start_daemon, origin):
    """Every request head on a kept-alive connection is held to the same 16 KiB, not
    only the first: a later one of 40 KiB sent in one piece is refused (431)."""
    daemon = start_daemon()
    request = f"GET {origin.url} HTTP/1.1\r\nHost: x\r\n".encode()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(request + b"\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += recv_exact(sock, 1)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert recv_exact(sock, len(origin.body)) == origin.body
        sock.sendall(request + b"X-Filler: " + b"f" * 40_000 + b"\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    daemon.access(lambda e: e["status"] == "bad_request")
    assert [line["status"] for line in daemon.access_events()] == ["ok", "bad_request"]


def test_a_pipelined_head_has_the_limit_too(start_daemon, tcp_server):
    """A head that comes whole behind a request body, in the same read, is measured
    as well: a POST with a 70,000-byte body and a GET with a 40 KiB header sent at
    once get the POST's answer, then 431."""

    def take_upload(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngot!")
        conn.recv(1)  # until the daemon closes

    daemon = start_daemon()
    server = tcp_server(take_upload)
    url = f"http://127.0.0.1:{server.port}/"
    post = f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n"
    get = f"GET {url} HTTP/1.1\r\nHost: x\r\nX-Filler: {'f' * 40_000}\r\n\r\n"
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(post.encode() + b"p" * 70_000 + get.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b"got!HTTP/1.1 431 " in answer
    daemon.access(lambda e: e["status"] == "bad_request")
