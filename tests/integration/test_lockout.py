"""Brute-force throttling: too many failed logins from one address (an IPv6 client:
from its /64) lock it out, in every protocol, and it may try again once the lockout
is over; guesses for one user spread over many addresses lock the user name out;
a flood of guesses never holds up another client's login."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import time
from collections.abc import Iterator

from conftest import PASSWORD, USER, request_head
from integration import socks5client
from integration.test_proxy_protocol import LOOPBACK_TARGETS, socks5_tunnel, v1


def http_connect(
    address: tuple[str, int],
    target: str,
    password: str,
    source: str | None = None,
    user: str = USER,
) -> bytes:
    """The head of the answer to an HTTP CONNECT with these credentials."""
    bind = None if source is None else (source, 0)
    with socket.create_connection(address, timeout=30, source_address=bind) as sock:
        sock.sendall(request_head("CONNECT", target, password=password, user=user))
        return sock.recv(4096)


@contextlib.contextmanager
def sent_at_once(daemon, source: str, heads: list[bytes]) -> Iterator[list[socket.socket]]:
    """A connection from `source` for each request head, each sent without waiting for
    any answer; all closed on the way out."""
    socks: list[socket.socket] = []
    try:
        for head in heads:
            sock = socket.create_connection(daemon.address, timeout=30, source_address=(source, 0))
            socks.append(sock)
            sock.sendall(head)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def wait_peers(server, count: int) -> None:
    """Until the target server has accepted `count` connections (its accept thread
    may trail the proxy's reply)."""
    deadline = time.monotonic() + 10
    while len(server.peers) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(server.peers) == count


def retry_after(head: bytes) -> int:
    found = re.search(rb"\r\nRetry-After: (\d+)\r\n", head)
    assert found is not None, head
    return int(found.group(1))


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
    refused = http_connect(daemon.address, target, PASSWORD)
    assert refused.startswith(b"HTTP/1.1 429 ")
    assert 1 <= retry_after(refused) <= lockout + 1  # whole seconds until it ends
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


def test_a_flood_of_guesses_does_not_hold_up_another_login(start_daemon, users_file, tcp_server):
    """300 wrong passwords from one address at once: 18 are queued (the rest refused
    at once, 429), at most max_failures of them are checked, the last of those starts
    the lockout, and a right password from another address is not queued behind
    them (before: 256 checks queued, the rest and everyone else refused with "too
    many password checks in progress")."""
    daemon = start_daemon(f'[auth]\nusers_file = "{users_file}"\n')
    server = tcp_server()
    target = f"127.0.0.1:{server.port}"
    heads = [request_head("CONNECT", target, password=f"guess-{i}") for i in range(300)]
    with sent_at_once(daemon, "127.0.0.2", heads) as flood:
        # the flood is sent: another address logs in
        assert http_connect(daemon.address, target, PASSWORD, source="127.0.0.3").startswith(
            b"HTTP/1.1 200 "
        )
        answers = [sock.recv(4096) for sock in flood]
    statuses = [answer[:12] for answer in answers]
    assert set(statuses) <= {b"HTTP/1.1 407", b"HTTP/1.1 429"}, set(statuses)
    assert statuses.count(b"HTTP/1.1 429") >= 290
    assert all(retry_after(a) >= 1 for a in answers if a.startswith(b"HTTP/1.1 429"))
    daemon.wait_for(lambda e: e.get("event") == "auth_lockout")
    assert [e["client"] for e in daemon.named("auth_lockout")] == ["127.0.0.2"]
    wait_peers(server, 1)  # the right login's tunnel, and nothing else


def test_right_logins_of_many_users_behind_one_address_lock_nothing(
    start_daemon, tmp_path, tcp_server
):
    """Eight users behind one NAT address log in at the same moment, more than
    auth.max_failures (5) of them: all get their tunnel, and no lockout starts."""
    from proxyd.auth import hash_password

    users = tmp_path / "many-users"
    users.write_text("".join(f"u{i}:{hash_password(f'pw{i}', log_n=12)}\n" for i in range(8)))
    users.chmod(0o600)
    daemon = start_daemon(f'[auth]\nusers_file = "{users}"\n')
    server = tcp_server()
    target = f"127.0.0.1:{server.port}"
    heads = [request_head("CONNECT", target, password=f"pw{i}", user=f"u{i}") for i in range(8)]
    with sent_at_once(daemon, "127.0.0.5", heads) as socks:
        answers = [sock.recv(4096)[:12] for sock in socks]
    assert answers == [b"HTTP/1.1 200"] * 8
    assert not daemon.named("auth_lockout")


def test_guesses_spread_over_addresses_lock_the_user(start_daemon, users_file, tcp_server):
    """One guess for alice from each of 20 addresses (no address near its own limit)
    locks the name alice out: once, logged as `user_locked`; an address that logged in
    as alice before still gets in, a new one does not, and other names are untouched."""
    daemon = start_daemon(
        f'[auth]\nusers_file = "{users_file}"\nmax_failures = 5\nmax_user_failures = 20\n'
    )
    server = tcp_server()
    target = f"127.0.0.1:{server.port}"
    assert http_connect(daemon.address, target, PASSWORD, source="127.0.0.9").startswith(
        b"HTTP/1.1 200 "
    )
    for i in range(10, 30):
        answer = http_connect(daemon.address, target, f"guess-{i}", source=f"127.0.0.{i}")
        assert answer.startswith(b"HTTP/1.1 407 "), (i, answer)
    locked = daemon.wait_for(lambda e: e.get("event") == "user_locked")
    assert locked["user"] == USER and locked["failures"] == 20 and locked["level"] == "warning"
    # a right password from an address that never logged in as alice: refused
    refused = http_connect(daemon.address, target, PASSWORD, source="127.0.0.30")
    assert refused.startswith(b"HTTP/1.1 429 ")
    assert retry_after(refused) >= 1
    assert socks5_rep(daemon, server.port, PASSWORD, source="127.0.0.31") == -1
    # the address that logged in earlier still gets in
    assert http_connect(daemon.address, target, PASSWORD, source="127.0.0.9").startswith(
        b"HTTP/1.1 200 "
    )
    # another name is not locked out with alice (it is unknown: a plain failure)
    other = http_connect(daemon.address, target, "x", source="127.0.0.32", user="bob")
    assert other.startswith(b"HTTP/1.1 407 ")
    assert len(daemon.named("user_locked")) == 1
    assert not daemon.named("auth_lockout")
    assert "guess-" not in daemon.output()


def test_ipv6_clients_of_one_64_are_locked_out_together(start_daemon, users_file, tcp_server):
    """Clients named by a balancer's PROXY headers: three guesses from three addresses
    of one /64 lock the whole /64 out; another /64 is not."""
    daemon = start_daemon(
        '[server]\nproxy_protocol_from = ["127.0.0.1/32"]\n'
        f'[auth]\nusers_file = "{users_file}"\nmax_failures = 3\n' + LOOPBACK_TARGETS
    )
    server = tcp_server()
    auth = (USER, PASSWORD)
    for i, source in enumerate(("2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2:c::c")):
        sock, rep = socks5_tunnel(
            daemon, v1(source, 4000 + i), "127.0.0.1", server.port, auth=(USER, f"guess-{i}")
        )
        sock.close()
        assert rep == -1
    lockout = daemon.wait_for(lambda e: e.get("event") == "auth_lockout")
    assert lockout["client"] == "2001:db8:1:2::/64"
    sock, rep = socks5_tunnel(
        daemon, v1("2001:db8:1:2:ffff::1", 4010), "127.0.0.1", server.port, auth=auth
    )
    sock.close()
    assert rep == -1  # the right password, from a fourth address of that /64
    locked = daemon.access(lambda e: e["client"].startswith("[2001:db8:1:2:ffff::1]"))
    assert locked["status"] == "locked_out"
    assert not server.peers
    sock, rep = socks5_tunnel(
        daemon, v1("2001:db8:1:3::1", 4011), "127.0.0.1", server.port, auth=auth
    )
    sock.close()
    assert rep == 0  # the next /64 is someone else
    wait_peers(server, 1)


def socks4_connect(daemon, port: int, source: str) -> int:
    """The reply code (90 granted, 91 refused) of a SOCKS4 CONNECT from `source`."""
    request = b"\x04\x01" + struct.pack("!H", port) + bytes((127, 0, 0, 1)) + b"anyone\0"
    with socket.create_connection(daemon.address, timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(request)
        reply = socks5client.recv_exact(sock, 8)
    assert reply[0] == 0
    return reply[1]


def test_socks4_clients_meet_the_lockout(start_daemon, users_file, tcp_server):
    """auth.allow_socks4 lets SOCKS4 in without a password, but not from an address
    locked out for its failed logins."""
    daemon = start_daemon(
        f'[auth]\nusers_file = "{users_file}"\nallow_socks4 = true\nmax_failures = 2\n'
    )
    server = tcp_server()
    for i in range(2):
        assert socks5_rep(daemon, server.port, f"guess-{i}", source="127.0.0.5") == -1
    daemon.wait_for(lambda e: e.get("event") == "auth_lockout")
    assert socks4_connect(daemon, server.port, "127.0.0.5") == 91
    locked = daemon.access(lambda e: e["protocol"] == "socks4")
    assert locked["status"] == "locked_out"
    assert not server.peers
    assert socks4_connect(daemon, server.port, "127.0.0.6") == 90  # another address
    wait_peers(server, 1)
