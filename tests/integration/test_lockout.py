"""Brute-force throttling: too many failed logins from one address lock it out, in
every protocol, and it may try again once the lockout is over."""

from __future__ import annotations

import socket
import time

from conftest import PASSWORD, USER, request_head
from integration import socks5client


def http_connect(address: tuple[str, int], target: str, password: str) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(request_head("CONNECT", target, password=password))
        return sock.recv(4096)


def socks5_rep(daemon, port: int, password: str, source: str | None = None) -> int:
    sock, rep, _, _ = socks5client.connect(
        daemon.address, "127.0.0.1", port, auth=(USER, password), source=source
    )
    sock.close()
    return rep


def test_lockout_after_failures_and_recovery(start_daemon, users_file, tcp_server, origin):
    lockout = 2.0
    daemon = start_daemon(
        f'[auth]\nusers_file = "{users_file}"\n'
        f"max_failures = 3\nfailure_window = 30\nlockout = {lockout}\n"
    )
    server = tcp_server()
    target = f"127.0.0.1:{server.port}"
    # three wrong guesses, over two protocols: each is an ordinary auth failure
    assert socks5_rep(daemon, server.port, "guess-1") == -1
    assert http_connect(daemon.address, target, "guess-2").startswith(b"HTTP/1.1 407 ")
    assert socks5_rep(daemon, server.port, "guess-3") == -1
    locked_at = time.monotonic()
    statuses = [daemon.access(lambda e, i=i: e["conn_id"] == i)["status"] for i in (1, 2, 3)]
    assert statuses == ["auth_failed"] * 3

    # now even the right password is refused, in every protocol, without being checked
    assert socks5_rep(daemon, server.port, PASSWORD) == -1
    assert http_connect(daemon.address, target, PASSWORD).startswith(b"HTTP/1.1 429 ")
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(request_head("GET", origin.url, host="127.0.0.1", password=PASSWORD))
        assert sock.recv(4096).startswith(b"HTTP/1.1 429 ")
    for conn_id in (4, 5, 6):
        line = daemon.access(lambda e, i=conn_id: e["conn_id"] == i)
        assert line["status"] == "locked_out", line
        assert line["bytes_up"] == 0
    assert not server.peers  # nothing reached the target

    # another client address is not locked out
    assert socks5_rep(daemon, server.port, PASSWORD, source="127.0.0.2") == 0

    # one lockout, one warning line, naming the address and never a password
    lockouts = [e for e in list(daemon.events) if e.get("event") == "auth_lockout"]
    assert len(lockouts) == 1
    assert lockouts[0]["client"] == "127.0.0.1"
    assert lockouts[0]["level"] == "warning"

    # once the lockout is over, the right password works again
    time.sleep(max(0.0, locked_at + lockout + 0.2 - time.monotonic()))
    assert socks5_rep(daemon, server.port, PASSWORD) == 0
    assert http_connect(daemon.address, target, PASSWORD).startswith(b"HTTP/1.1 200 ")
    assert "guess-" not in daemon.output()
