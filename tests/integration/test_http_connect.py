"""HTTP CONNECT on the wire: status codes, auth challenge, tunnel."""

from __future__ import annotations

import socket

import pytest

from conftest import PASSWORD, USER, basic_token, closed_port, request_head


def request(address, head: bytes) -> tuple[bytes, bytes]:
    """Send a request head; return (response head, body) read until the daemon closes."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_out, _, body = data.partition(b"\r\n\r\n")
    return head_out, body


def connect_head(target: str, auth: tuple[str, str] | None = None) -> bytes:
    if auth is None:
        return request_head("CONNECT", target)
    return request_head("CONNECT", target, user=auth[0], password=auth[1])


@pytest.fixture
def auth_daemon(start_daemon, users_file):
    return start_daemon(f'[auth]\nusers_file = "{users_file}"\n')


def test_tunnel_established(start_daemon, tcp_server):
    daemon = start_daemon()
    server = tcp_server()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(connect_head(f"127.0.0.1:{server.port}"))
        head = sock.recv(4096)
        assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
        sock.sendall(b"echo me")
        assert sock.recv(100) == b"echo me"
    line = daemon.access()
    assert (line["protocol"], line["command"], line["status"]) == ("http", "connect", "ok")


@pytest.mark.parametrize("auth", [None, (USER, "bad-password"), ("mallory", PASSWORD)])
def test_missing_or_wrong_credentials_get_407(auth_daemon, tcp_server, auth):
    server = tcp_server()
    head, _ = request(auth_daemon.address, connect_head(f"127.0.0.1:{server.port}", auth))
    assert head.startswith(b"HTTP/1.1 407 ")
    assert b'\r\nProxy-Authenticate: Basic realm="proxyd", charset="UTF-8"' in head
    line = auth_daemon.access()
    assert line["status"] == "auth_failed"
    assert not server.peers  # nothing reached the target


def test_right_credentials_tunnel(auth_daemon, tcp_server):
    server = tcp_server()
    with socket.create_connection(auth_daemon.address, timeout=10) as sock:
        sock.sendall(connect_head(f"127.0.0.1:{server.port}", (USER, PASSWORD)))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    line = auth_daemon.access()
    assert (line["user"], line["status"]) == (USER, "ok")
    token = basic_token()
    output = auth_daemon.output()
    assert token not in output and PASSWORD not in output


def test_refused_gives_502(start_daemon):
    daemon = start_daemon()
    head, body = request(daemon.address, connect_head(f"127.0.0.1:{closed_port()}"))
    assert head.startswith(b"HTTP/1.1 502 ")
    assert b"refused" in body
    assert daemon.access()["status"] == "refused"


@pytest.mark.parametrize(
    "raw",
    [
        b"CONNECT nohostport HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT 127.0.0.1:99999 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_malformed_gives_400(start_daemon, raw):
    daemon = start_daemon()
    head, _ = request(daemon.address, raw)
    assert head.startswith(b"HTTP/1.1 400 ")
    assert daemon.access()["status"] == "bad_request"


def test_oversized_head_is_refused(start_daemon):
    daemon = start_daemon()
    raw = b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n"
    with socket.create_connection(daemon.address, timeout=10) as sock:
        try:
            sock.sendall(raw)
        except OSError:
            pass  # the daemon may close before it has read everything
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    assert data.startswith(b"HTTP/1.1 431 ") or data.startswith(b"HTTP/1.1 400 ")
    assert daemon.access()["status"] == "bad_request"
