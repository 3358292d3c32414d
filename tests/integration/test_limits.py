"""server.max_connections and [limits]: new clients are refused cleanly, open tunnels
are unharmed."""

from __future__ import annotations

import socket
import time

from conftest import PASSWORD, USER
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
        extra, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
        extra.close()
        assert rep == 0x01
        line = daemon.access()
        assert line["status"] == "limit" and "limits.per_client" in line["error"]
        with socket.create_connection(daemon.address, timeout=5) as s:
            s.sendall(f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 503 ")
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
