"""The PROXY protocol on the listener: trusted balancers name the client, everyone
else is refused a header; and the whole multi-host recipe with HAProxy in front
of two proxyd instances (deploy/haproxy.cfg)."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time

import pytest

from conftest import PASSWORD, USER
from integration import socks5client
from integration.haproxy import Haproxy
from integration.test_udp import UdpEcho, udp_client
from integration.test_udp import header as udp_header

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# a balancer relays clients from anywhere: without users that is an open proxy
TRUST_LOOPBACK = '[server]\nproxy_protocol_from = ["127.0.0.1/32"]\nallow_open_proxy = true\n'
# and the daemon is then exposed: the loopback targets here must be named, as an
# operator names the private networks its clients may reach (last: a rule is a table)
LOOPBACK_TARGETS = '[[rules]]\naction = "allow"\ndestinations = ["127.0.0.0/8", "::1/128"]\n'


def v1(source: str, port: int, dport: int = 1080) -> bytes:
    family, dest = ("TCP6", "::1") if ":" in source else ("TCP4", "127.0.0.1")
    return f"PROXY {family} {source} {dest} {port} {dport}\r\n".encode()


def v2(source: str | None, port: int = 0, dport: int = 1080) -> bytes:
    """PROXY (or, with no source, LOCAL) over TCP, written out field by field."""
    if source is None:
        return SIGNATURE + b"\x20\x00" + struct.pack("!H", 0)
    src = ipaddress.ip_address(source)
    dst = ipaddress.ip_address("::1" if src.version == 6 else "127.0.0.1")
    family = b"\x11" if src.version == 4 else b"\x21"
    body = src.packed + dst.packed + struct.pack("!HH", port, dport)
    return SIGNATURE + b"\x21" + family + struct.pack("!H", len(body)) + body


def socks5_tunnel(
    daemon, header: bytes, host: str, port: int, *, auth: tuple[str, str] | None = None
) -> tuple[socket.socket, int]:
    """A SOCKS5 CONNECT that starts with `header`; (socket, REP) with REP -1 when the
    credentials are refused and -2 when the connection closed without a reply."""
    sock = socket.create_connection(daemon.address, timeout=10)
    greeting = b"\x05\x01\x02" if auth else b"\x05\x01\x00"
    sock.sendall(header + greeting)
    try:
        method = socks5client.recv_exact(sock, 2)
        if auth:
            assert method == b"\x05\x02"
            user, password = (s.encode() for s in auth)
            sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            if socks5client.recv_exact(sock, 2) != b"\x01\x00":
                return sock, -1
        sock.sendall(b"\x05\x01\x00" + socks5client.address(host, port))
        rep, _, _ = socks5client.read_reply(sock)
    except (ConnectionError, OSError):
        return sock, -2
    return sock, rep


def socks5_request(daemon, header: bytes, command: int):
    """A SOCKS5 request of `command` for 0.0.0.0:0 behind `header`: (socket, REP,
    the reply's address)."""
    sock = socket.create_connection(daemon.address, timeout=10)
    sock.sendall(header + b"\x05\x01\x00")
    assert socks5client.recv_exact(sock, 2) == b"\x05\x00"
    sock.sendall(b"\x05" + bytes([command]) + b"\x00" + socks5client.address("0.0.0.0", 0))
    rep, host, port = socks5client.read_reply(sock)
    return sock, rep, (host, port)


def echoes(sock: socket.socket, payload: bytes = b"hello") -> bool:
    sock.sendall(payload)
    return socks5client.recv_exact(sock, len(payload)) == payload


@pytest.mark.parametrize(
    "header, client",
    [
        (v1("198.51.100.7", 40000), "198.51.100.7:40000"),
        (v1("2001:db8::7", 40001), "[2001:db8::7]:40001"),
        (v2("203.0.113.9", 40002), "203.0.113.9:40002"),
        (v2("2001:db8::9", 40003), "[2001:db8::9]:40003"),
    ],
    ids=["v1-ipv4", "v1-ipv6", "v2-ipv4", "v2-ipv6"],
)
def test_a_trusted_balancer_names_the_client(start_daemon, tcp_server, header, client):
    echo = tcp_server()
    daemon = start_daemon(TRUST_LOOPBACK + LOOPBACK_TARGETS)
    sock, rep = socks5_tunnel(daemon, header, "127.0.0.1", echo.port)
    with sock:
        assert rep == 0 and echoes(sock)
    line = daemon.access()
    assert line["client"] == client and line["status"] == "ok"
    assert line["proxied_by"].startswith("127.0.0.1:")
    assert line["bytes_up"] == 5  # the header is not payload


def test_an_ipv4_client_named_in_ipv6_form_is_that_ipv4_client(start_daemon):
    """A dual-stack balancer names IPv4 clients as ::ffff:a.b.c.d: the logs, limits and
    the UDP relay (which sees the datagrams come from a.b.c.d) take it as IPv4."""
    daemon = start_daemon(TRUST_LOOPBACK + LOOPBACK_TARGETS)
    udp_echo = UdpEcho()
    control, rep, relay = socks5_request(daemon, v2("::ffff:127.0.0.1", 4321), 3)
    assert rep == 0
    with udp_client() as client:
        client.sendto(udp_header("127.0.0.1", udp_echo.port) + b"mapped", relay)
        data, _ = client.recvfrom(65535)
    control.close()
    udp_echo.close()
    assert data.endswith(b"echo:mapped")
    line = daemon.access()
    assert line["client"] == "127.0.0.1:4321" and line["datagrams_down"] == 1


def test_a_second_header_in_the_same_read_is_a_bad_request(start_daemon, tcp_server):
    echo = tcp_server()
    daemon = start_daemon(TRUST_LOOPBACK + LOOPBACK_TARGETS)
    sock, rep = socks5_tunnel(
        daemon, v1("192.0.2.1", 1) + v1("192.0.2.2", 2), "127.0.0.1", echo.port
    )
    sock.close()
    assert rep == -2
    line = daemon.access()
    assert line["status"] == "bad_request" and "second PROXY" in line["error"]
    assert line["client"] == "192.0.2.1:1"


def test_a_local_header_keeps_the_balancers_address(start_daemon, tcp_server):
    echo = tcp_server()
    daemon = start_daemon(TRUST_LOOPBACK + LOOPBACK_TARGETS)
    sock, rep = socks5_tunnel(daemon, v2(None), "127.0.0.1", echo.port)
    with sock:
        assert rep == 0 and echoes(sock)
    line = daemon.access()
    assert line["client"] == line["proxied_by"] and line["client"].startswith("127.0.0.1:")


def test_a_header_trickled_byte_by_byte_with_http_behind_it(start_daemon, origin):
    daemon = start_daemon(TRUST_LOOPBACK + LOOPBACK_TARGETS)
    data = v1("192.0.2.44", 5555) + (
        f"GET {origin.url} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    )
    with socket.create_connection(daemon.address, timeout=10) as sock:
        for byte in data:
            sock.send(bytes([byte]))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(origin.body)
    line = daemon.access()  # a forwarded request's own line
    assert (line["command"], line["client"]) == ("GET", "192.0.2.44:5555")
    assert line["proxied_by"].startswith("127.0.0.1:")


@pytest.mark.parametrize("header", [v1("198.51.100.7", 1), v2("198.51.100.7", 1)], ids=["v1", "v2"])
def test_a_header_from_an_untrusted_address_is_a_bad_request(start_daemon, tcp_server, header):
    echo = tcp_server()
    trusting_another = '[server]\nproxy_protocol_from = ["127.0.0.2/32"]\nallow_open_proxy = true\n'
    for config in ("", trusting_another):
        daemon = start_daemon(config + LOOPBACK_TARGETS)
        sock, rep = socks5_tunnel(daemon, header, "127.0.0.1", echo.port)
        sock.close()
        assert rep == -2  # closed, never served
        line = daemon.access()
        assert line["status"] == "bad_request" and line["client"].startswith("127.0.0.1:")
        assert "not trust" in line["error"]
        # and the daemon serves everyone else
        with socks5client.open_tunnel(daemon.address, "127.0.0.1", echo.port) as tunnel:
            assert echoes(tunnel)


def test_no_header_from_a_trusted_balancer_is_an_error(start_daemon, tcp_server):
    echo = tcp_server()
    daemon = start_daemon(TRUST_LOOPBACK + LOOPBACK_TARGETS)
    sock, rep = socks5_tunnel(daemon, b"", "127.0.0.1", echo.port)
    sock.close()
    assert rep == -2
    line = daemon.access()
    assert line["status"] == "bad_request"
    assert "no PROXY protocol header" in line["error"]
    # a malformed one is an error as well
    sock, rep = socks5_tunnel(daemon, b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n", "127.0.0.1", echo.port)
    sock.close()
    assert rep == -2
    assert daemon.access(lambda e: "malformed" in e.get("error", ""))["status"] == "bad_request"


def test_rules_and_limits_see_the_real_client(start_daemon, tcp_server):
    echo = tcp_server()
    config = (
        '[server]\nproxy_protocol_from = ["127.0.0.0/8"]\nallow_open_proxy = true\n'
        "[limits]\nper_client = 1\n"
        '[[rules]]\naction = "deny"\nclients = ["198.51.100.0/24"]\n'
    )
    daemon = start_daemon(config + LOOPBACK_TARGETS)
    sock, rep = socks5_tunnel(daemon, v1("198.51.100.7", 1000), "127.0.0.1", echo.port)
    sock.close()
    assert rep == 2  # denied by rules[0], by the address the header named
    assert daemon.access()["rule"] == 0
    # per_client counts the named clients, not the one balancer they all come through
    first, rep1 = socks5_tunnel(daemon, v1("192.0.2.1", 1001), "127.0.0.1", echo.port)
    other, rep2 = socks5_tunnel(daemon, v1("192.0.2.2", 1002), "127.0.0.1", echo.port)
    again, rep3 = socks5_tunnel(daemon, v1("192.0.2.1", 1003), "127.0.0.1", echo.port)
    for sock in (first, other, again):
        sock.close()
    # over the limit, as a client refused at accept: closed unanswered once named
    assert (rep1, rep2, rep3) == (0, 0, -2)
    over = daemon.access(lambda e: e["status"] == "limit")
    assert over["client"] == "192.0.2.1:1003" and "limits.per_client" in over["error"]


def test_lockout_locks_out_the_real_client_only(start_daemon, tcp_server, users_file):
    echo = tcp_server()
    daemon = start_daemon(
        TRUST_LOOPBACK
        + f'[auth]\nusers_file = "{users_file}"\nmax_failures = 2\n'
        + LOOPBACK_TARGETS
    )
    for port in (1, 2):
        sock, rep = socks5_tunnel(
            daemon, v1("198.51.100.66", port), "127.0.0.1", echo.port, auth=(USER, "wrong")
        )
        sock.close()
        assert rep == -1
    locked = daemon.wait_for(lambda e: e.get("event") == "auth_lockout")
    assert locked["client"] == "198.51.100.66"
    # the same balancer still brings other clients in
    sock, rep = socks5_tunnel(
        daemon, v1("198.51.100.67", 3), "127.0.0.1", echo.port, auth=(USER, PASSWORD)
    )
    with sock:
        assert rep == 0 and echoes(sock)


# --- HAProxy in front of two proxyd instances ---------------------------------------------


def behind_haproxy() -> str:
    return (
        '[server]\nproxy_protocol_from = ["127.0.0.1/32"]\nallow_open_proxy = true\n'
        "shutdown_grace = 5\n"
        '[metrics]\nlisten = "127.0.0.1:0"\n' + LOOPBACK_TARGETS
    )


def admin_port(daemon) -> int:
    event = daemon.wait_for(lambda e: e.get("event") == "metrics_listening")
    return int(event["address"].rpartition(":")[2])


def test_haproxy_in_front_of_two_instances_with_failover(start_daemon, tcp_server, tmp_path):
    echo = tcp_server()
    a, b = start_daemon(behind_haproxy()), start_daemon(behind_haproxy())
    haproxy = Haproxy(
        tmp_path,
        None,
        {"a": (a.host, a.port, admin_port(a)), "b": (b.host, b.port, admin_port(b))},
    ).start()
    try:
        haproxy.wait_for_state("a", "UP")
        haproxy.wait_for_state("b", "UP")
        # clients from their own addresses, through HAProxy, reach the target
        for i in range(6):
            source = f"127.0.0.{10 + i}"
            with socks5client.open_tunnel(
                haproxy.address, "127.0.0.1", echo.port, source=source
            ) as sock:
                assert echoes(sock)
        deadline = time.monotonic() + 10
        while len(lines := [*a.access_events(), *b.access_events()]) < 6:
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        assert sorted(e["client"].rpartition(":")[0] for e in lines) == [
            f"127.0.0.{10 + i}" for i in range(6)
        ]
        # a client keeps connecting while `a` stops: no new connection fails
        failures: list[BaseException] = []
        done = threading.Event()
        count = 0

        def keep_connecting() -> None:
            nonlocal count
            deadline = time.monotonic() + 20
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    with socks5client.open_tunnel(haproxy.address, "127.0.0.1", echo.port) as s:
                        assert echoes(s)
                except (AssertionError, OSError) as exc:
                    failures.append(exc)
                count += 1
                time.sleep(0.02)

        worker = threading.Thread(target=keep_connecting)
        worker.start()
        time.sleep(0.5)
        a.stop()  # returns once `a` has exited: from here on only `b` can serve
        b_at_stop, count_at_stop = len(b.access_events()), count
        haproxy.wait_for_state("a", "DOWN")
        after_down = count
        # ten more connections after the check noticed (bounded: the worker stops at 20 s)
        while count < after_down + 10 and worker.is_alive():
            time.sleep(0.05)
        done.set()
        worker.join(30)
        assert failures == [], failures
        assert count >= after_down + 10, (count, after_down)
        # every connection since `a` exited was served by `b` (one may have been under
        # way at the stop), each with an ok line
        b.wait_for(lambda _e: len(b.access_events()) - b_at_stop >= count - count_at_stop - 1)
        assert all(e["status"] == "ok" for e in b.access_events()[b_at_stop:])
    finally:
        haproxy.stop()
