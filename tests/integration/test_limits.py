"""server.max_connections: new clients are refused cleanly, open tunnels are unharmed."""

from __future__ import annotations

import socket
import time

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
