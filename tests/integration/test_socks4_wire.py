"""SOCKS4/4a on the wire: raw request bytes, the reply, what the access log says."""

from __future__ import annotations

import socket
import struct

from conftest import closed_port
from integration.socks5client import recv_exact


def ask(address, request: bytes) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(address, timeout=10)
    sock.sendall(request)
    return sock, recv_exact(sock, 8)


def test_connect_then_tunnel_with_early_data(start_daemon, tcp_server):
    daemon = start_daemon()
    server = tcp_server()  # echoes
    request = b"\x04\x01" + struct.pack("!H", server.port) + bytes((127, 0, 0, 1)) + b"me\0"
    sock, reply = ask(daemon.address, request + b"early")
    with sock:
        assert reply[:2] == b"\x00\x5a"
        assert reply[4:] == bytes((127, 0, 0, 1))  # the upstream socket's local address
        assert recv_exact(sock, 5) == b"early"
    assert daemon.access()["user"] is None  # a SOCKS4 user id proves nothing


def test_refused_target_is_0x5b(start_daemon):
    daemon = start_daemon()
    request = b"\x04\x01" + struct.pack("!H", closed_port()) + bytes((127, 0, 0, 1)) + b"\0"
    sock, reply = ask(daemon.address, request)
    with sock:
        assert reply == b"\x00\x5b" + bytes(6)
        assert sock.recv(1) == b""
    assert daemon.access()["status"] == "refused"


def test_unknown_command_is_0x5b(start_daemon):
    daemon = start_daemon()
    sock, reply = ask(daemon.address, b"\x04\x07\x00\x15" + bytes(4) + b"\0")
    sock.close()
    assert reply[1] == 0x5B
    assert daemon.access()["status"] == "unsupported"
