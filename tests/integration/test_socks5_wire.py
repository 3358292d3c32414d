"""SOCKS5 on the wire, byte for byte, against the real daemon."""

from __future__ import annotations

import socket

import pytest
from python_socks.sync import Proxy

from conftest import PASSWORD, USER, closed_port
from integration import socks5client
from integration.socks5client import recv_exact


@pytest.fixture
def daemon(start_daemon):
    return start_daemon()


@pytest.fixture
def auth_daemon(start_daemon, users_file):
    return start_daemon(f'[auth]\nusers_file = "{users_file}"\n')


def test_connect_ipv4_reply_has_upstream_local_address(daemon, tcp_server):
    server = tcp_server()
    sock, rep, bnd_host, bnd_port = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    with sock:
        assert rep == 0
        sock.sendall(b"ping")
        assert recv_exact(sock, 4) == b"ping"
    # BND is the upstream socket's own address: the one the target saw as its peer.
    assert server.peers[-1][:2] == (bnd_host, bnd_port)


def test_connect_domain_name(daemon, tcp_server):
    server = tcp_server()
    sock, rep, _, _ = socks5client.connect(daemon.address, "localhost", server.port)
    with sock:
        assert rep == 0
        sock.sendall(b"hello")
        assert recv_exact(sock, 5) == b"hello"
    assert daemon.access()["target"] == f"localhost:{server.port}"


def test_connect_ipv6(daemon, tcp_server):
    try:
        server = tcp_server(host="::1")
    except OSError:
        pytest.fail("IPv6 loopback is not available on this machine")
    sock, rep, bnd_host, _ = socks5client.connect(daemon.address, "::1", server.port)
    with sock:
        assert rep == 0
        assert bnd_host == "::1"
        sock.sendall(b"six")
        assert recv_exact(sock, 3) == b"six"
    assert daemon.access()["target"] == f"[::1]:{server.port}"


def test_refused_target_gives_0x05(daemon):
    port = closed_port()
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", port)
    with sock:
        assert rep == 0x05
        assert sock.recv(1) == b""  # closed after the reply
    assert daemon.access()["status"] == "refused"


def test_unknown_command_and_address_type(daemon):
    with socket.create_connection(daemon.address, timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50")
        assert recv_exact(sock, 2) == b"\x05\x07"
    with socket.create_connection(daemon.address, timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x07\x7f\x00\x00\x01\x00\x50")
        assert recv_exact(sock, 2) == b"\x05\x08"


def test_no_acceptable_method_with_auth(auth_daemon):
    with socket.create_connection(auth_daemon.address, timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")  # offers only "no authentication"
        assert recv_exact(sock, 2) == b"\x05\xff"
        assert sock.recv(1) == b""
    assert auth_daemon.access()["status"] == "auth_failed"


def test_wrong_password_gets_rfc1929_failure(auth_daemon, tcp_server):
    server = tcp_server()
    sock, rep, _, _ = socks5client.connect(
        auth_daemon.address, "127.0.0.1", server.port, auth=(USER, "wrong")
    )
    with sock:
        assert rep == -1  # the sub-negotiation status was not 0x00
        assert sock.recv(1) == b""
    line = auth_daemon.access()
    assert (line["status"], line["user"]) == ("auth_failed", USER)


def test_right_password_with_python_socks(auth_daemon, tcp_server):
    server = tcp_server()
    proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{auth_daemon.port}")
    sock = proxy.connect("127.0.0.1", server.port, timeout=10)
    with sock:
        sock.sendall(b"library client")
        assert recv_exact(sock, 14) == b"library client"
    line = auth_daemon.access()
    assert (line["status"], line["user"]) == ("ok", USER)


def test_repeat_logins_all_succeed(auth_daemon, tcp_server):
    """The verification cache must not change the answer for later connections."""
    server = tcp_server()
    for _ in range(5):
        sock, rep, _, _ = socks5client.connect(
            auth_daemon.address, "127.0.0.1", server.port, auth=(USER, PASSWORD)
        )
        sock.close()
        assert rep == 0
    sock, rep, _, _ = socks5client.connect(
        auth_daemon.address, "127.0.0.1", server.port, auth=(USER, PASSWORD + "x")
    )
    sock.close()
    assert rep == -1


def test_pipelined_request_and_payload(daemon, tcp_server):
    """Greeting, request and first payload in one segment: the payload reaches the target."""
    server = tcp_server()
    with socket.create_connection(daemon.address, timeout=5) as sock:
        sock.sendall(
            b"\x05\x01\x00"
            + b"\x05\x01\x00"
            + socks5client.address("127.0.0.1", server.port)
            + b"early bytes"
        )
        assert recv_exact(sock, 2) == b"\x05\x00"
        rep, _, _ = socks5client.read_reply(sock)
        assert rep == 0
        assert recv_exact(sock, 11) == b"early bytes"
