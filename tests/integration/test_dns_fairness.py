"""DNS is fair: one client address has at most dns.per_client names looked up at once
(each counted until its resolver thread returns), a name in the hosts file resolves
however busy the threads are, and a client that goes away while its request is
under way ends it at once (status client_closed), its lookup and connect with it.

Names come from a hosts file and from a DNS server of the test's own on loopback
that answers some names at once and never answers the others; the daemon's
resolver waits STALL seconds for those (resolv.conf), far longer than any bound
asserted here."""

from __future__ import annotations

import select
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from conftest import listening_socket, local_names, silent_listener
from integration import socks5client
from integration.socks5client import recv_exact
from integration.test_udp import associate, header, udp_client
from integration.test_upstream_faults import dns_server

STALL = 10  # seconds the daemon's resolver waits for a name the DNS server ignores
CONFIG = "[timeouts]\nconnect = 60\nhandshake = 60\n"
PROMPT = 4.0  # seconds: generous, yet far below STALL
HOSTS = "127.0.0.1 known.test\n"


def names_prefix(workdir: Path, nameserver: str) -> list[str]:
    """conftest.local_names, with a resolver that waits STALL s for an answer."""
    hosts = workdir / "hosts"
    workdir.mkdir(parents=True, exist_ok=True)
    hosts.write_text(HOSTS)
    return local_names(workdir, hosts, nameserver, STALL)


def request(daemon, host: str, port: int, source: str) -> socket.socket:
    """A SOCKS5 CONNECT sent whole; the method chosen is read, the reply is not."""
    sock = socket.create_connection(daemon.address, timeout=PROMPT, source_address=(source, 0))
    sock.sendall(b"\x05\x01\x00\x05\x01\x00" + socks5client.address(host, port))
    assert recv_exact(sock, 2) == b"\x05\x00"
    return sock


def answered(socks: list[socket.socket], count: int, limit: float) -> dict[socket.socket, int]:
    """Wait (at most `limit` s) until `count` of these have their SOCKS5 reply: REP of each."""
    replies: dict[socket.socket, int] = {}
    deadline = time.monotonic() + limit
    while len(replies) < count and (left := deadline - time.monotonic()) > 0:
        waiting = [s for s in socks if s not in replies]
        for sock in select.select(waiting, [], [], min(left, 0.5))[0]:
            replies[sock] = socks5client.read_reply(sock)[0]
    return replies


def try_connect(daemon, host: str, port: int, source: str) -> int:
    sock, rep, _, _ = socks5client.connect(daemon.address, host, port, source=source)
    sock.close()
    return rep


def test_one_client_cannot_take_every_lookup(start_daemon, tmp_path):
    """130 never-answered names from one address: 16 (dns.per_client) are looked up,
    the others fail at once. Two more addresses with 16 each keep every one of the
    32 threads busy, and a name in the hosts file still resolves for a fourth. The
    first client's connections, closed, end at once (client_closed); its lookups
    still count until their threads return, then its names resolve again."""
    target = listening_socket()
    port = target.getsockname()[1]
    first: list[socket.socket] = []
    others: list[socket.socket] = []
    with target, dns_server(stall_unknown=True, names={"fast.test": "127.0.0.1"}) as nameserver:
        prefix = names_prefix(tmp_path / "names", nameserver)
        daemon = start_daemon(CONFIG, prefix=prefix)
        try:
            for n in range(130):
                first.append(request(daemon, f"stall{n}.test", port, "127.0.0.1"))
            replies = answered(first, 130 - 16, PROMPT)
            assert len(replies) == 130 - 16
            assert set(replies.values()) == {0x04}  # host unreachable
            daemon.wait_for(lambda _e: len(daemon.access_events()) >= 130 - 16)
            busy = [e for e in daemon.access_events() if "dns.per_client" in e.get("error", "")]
            assert len(busy) == 130 - 16
            assert {e["status"] for e in busy} == {"unreachable"}
            pending = [s for s in first if s not in replies]
            assert not answered(pending, 1, 0.5)  # the 16 still wait for their names
            for source in ("127.0.0.3", "127.0.0.4"):  # every thread busy now
                for n in range(16):
                    others.append(request(daemon, f"{source}-{n}.test", port, source))
            time.sleep(0.5)
            started = time.monotonic()
            assert try_connect(daemon, "known.test", port, "127.0.0.2") == 0
            assert time.monotonic() - started < PROMPT
            # counted before any of these closes: their lines may come at once
            before = len(daemon.access_events())
            for sock in others:
                sock.close()
            # the first client goes away: its requests end now, not when the names do
            closed_at = time.monotonic()
            for sock in pending:
                sock.close()
            daemon.wait_for(
                lambda _e: len(daemon.access_events()) >= before + 16 + len(others), PROMPT
            )
            gone = [
                e for e in daemon.access_events()[before:] if e["client"].startswith("127.0.0.1:")
            ]
            assert len(gone) == 16 and {e["status"] for e in gone} == {"client_closed"}
            assert all(e["duration_ms"] < STALL * 1000 / 2 for e in gone)
            assert time.monotonic() - closed_at < PROMPT
            # its 16 threads still wait for the DNS server: no new name for it yet
            assert try_connect(daemon, "fast.test", port, "127.0.0.1") == 0x04
            line = daemon.access(lambda e: e["target"] == f"fast.test:{port}")
            assert "dns.per_client" in line["error"]
            # once they returned, its names resolve again
            assert resolves_again(daemon, port)
        finally:
            for sock in first + others:
                sock.close()
    assert "Traceback" not in daemon.output()


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("pending", ["lookup", "connect"])
@pytest.mark.parametrize("front", ["socks5", "connect", "forward"])
def test_a_client_gone_while_its_request_is_under_way_ends_it(
    start_daemon, tmp_path, pending, how, front
):
    """The client closes (or resets) while its name is being looked up, or while the
    target does not answer the connect: the access line says client_closed at once,
    long before the lookup (STALL s) or the connect (60 s) would end."""
    with dns_server(stall_unknown=True, names={}) as nameserver, silent_listener() as silent_port:
        prefix = names_prefix(tmp_path / "names", nameserver)
        daemon = start_daemon(CONFIG, prefix=prefix)
        host, port = ("never.test", 80) if pending == "lookup" else ("127.0.0.1", silent_port)
        sock = socket.create_connection(daemon.address, timeout=PROMPT)
        target = f"{host}:{port}"
        if front == "socks5":
            sock.sendall(b"\x05\x01\x00\x05\x01\x00" + socks5client.address(host, port))
            assert recv_exact(sock, 2) == b"\x05\x00"
        elif front == "connect":
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        else:
            sock.sendall(f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        time.sleep(0.5)  # the lookup or the connect is under way
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        closed_at = time.monotonic()
        sock.close()
        line = daemon.access(timeout=PROMPT)
        assert time.monotonic() - closed_at < PROMPT
    assert (line["status"], line["target"]) == ("client_closed", target)
    assert line["duration_ms"] < PROMPT * 1000


def test_bytes_sent_while_connecting_reach_the_target(start_daemon, tmp_path, tcp_server):
    """Watching the client while its name is looked up reads what it sends early: those
    bytes go to the target first, in order."""
    server = tcp_server()
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    with dns_server({"slow.test": "127.0.0.1"}, 0.5) as nameserver:
        daemon = start_daemon(CONFIG, hosts=hosts, nameserver=nameserver)
        with socket.create_connection(daemon.address, timeout=PROMPT) as sock:
            request = b"\x05\x01\x00\x05\x01\x00" + socks5client.address("slow.test", server.port)
            sock.sendall(request + b"early ")
            time.sleep(0.2)
            sock.sendall(b"and more")
            assert recv_exact(sock, 2) == b"\x05\x00"
            assert socks5client.read_reply(sock)[0] == 0
            assert recv_exact(sock, 14) == b"early and more"
            sock.sendall(b"!")
            assert recv_exact(sock, 1) == b"!"
    assert daemon.access()["status"] == "ok"


def test_a_half_close_after_early_bytes_is_passed_on(start_daemon, tmp_path, tcp_server):
    """A client that sends its request, its data and then its EOF (`nc -N`, a
    script piping a file) while the name is looked up is half-closed, not gone: the
    data reaches the target, the EOF after it, and the answer comes back. A reset
    after early bytes ends the request at once."""
    server = tcp_server()
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    with dns_server({"slow.test": "127.0.0.1"}, 0.5) as nameserver:
        daemon = start_daemon(CONFIG, hosts=hosts, nameserver=nameserver)
        request = b"\x05\x01\x00\x05\x01\x00" + socks5client.address("slow.test", server.port)
        with socket.create_connection(daemon.address, timeout=PROMPT) as sock:
            sock.sendall(request + b"ping")
            sock.shutdown(socket.SHUT_WR)
            assert recv_exact(sock, 2) == b"\x05\x00"
            assert socks5client.read_reply(sock)[0] == 0
            assert recv_exact(sock, 4) == b"ping"  # the echo target got it, then the EOF
            assert sock.recv(1) == b""
        assert daemon.access()["status"] == "ok"
        with socket.create_connection(daemon.address, timeout=PROMPT) as sock:
            sock.sendall(request.replace(b"slow", b"slo2") + b"ping")
            time.sleep(0.1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        line = daemon.access(lambda e: (e["target"] or "").startswith("slo2.test"))
        assert line["status"] == "client_closed" and line["duration_ms"] < 400


def test_udp_lookups_count_against_their_client(start_daemon, tmp_path):
    """Datagrams to 20 never-answered names: 16 lookups are under way for the client's
    address, so its next name fails at once; another address's does not; they still
    count once the association ended, until the threads return."""
    target = listening_socket()
    port = target.getsockname()[1]
    names = {"fast.test": "127.0.0.1", "other.test": "127.0.0.1"}
    with target, dns_server(stall_unknown=True, names=names) as nameserver:
        prefix = names_prefix(tmp_path / "names", nameserver)
        daemon = start_daemon(CONFIG, prefix=prefix)
        control, relay = associate(daemon)
        with control, udp_client() as client:
            for n in range(20):
                client.sendto(header(f"udp{n}.test", 53) + b"q", relay)
            time.sleep(1)  # the datagrams are in, their lookups under way
            assert try_connect(daemon, "fast.test", port, "127.0.0.1") == 0x04
            line = daemon.access(lambda e: e["target"] == f"fast.test:{port}")
            assert "dns.per_client" in line["error"]
            assert try_connect(daemon, "other.test", port, "127.0.0.2") == 0
        # the association is gone, its lookups still hold their threads
        assert try_connect(daemon, "fast.test", port, "127.0.0.1") == 0x04
        assert resolves_again(daemon, port)


def resolves_again(daemon, port: int) -> bool:
    """Whether 127.0.0.1's names resolve again once its stalled lookups' threads have
    returned (tried every second, for up to three stalls)."""
    deadline = time.monotonic() + STALL * 3
    while time.monotonic() < deadline:
        time.sleep(1)
        if try_connect(daemon, "fast.test", port, "127.0.0.1") == 0:
            return True
    return False


def test_a_lookup_that_never_ends_does_not_hold_the_daemon_s_exit(start_daemon, tmp_path):
    """SIGTERM while a resolver thread waits for a DNS server that never answers: the
    daemon stops (exit 0, its last lines written) without waiting STALL s for it."""
    with dns_server(stall_unknown=True, names={}) as nameserver:
        prefix = names_prefix(tmp_path / "names", nameserver)
        daemon = start_daemon(CONFIG + "[server]\nshutdown_grace = 0\n", prefix=prefix)
        with socket.create_connection(daemon.address, timeout=PROMPT) as sock:
            sock.sendall(b"\x05\x01\x00\x05\x01\x00" + socks5client.address("never.test", 80))
            assert recv_exact(sock, 2) == b"\x05\x00"
            time.sleep(0.3)  # the lookup is under way in its thread
            stopping = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(timeout=STALL) == 0
        assert time.monotonic() - stopping < STALL / 2
        daemon.wait_for(lambda e: e.get("event") == "stopped")
        line = daemon.access()
        assert (line["status"], line["target"]) == ("shutdown", "never.test:80")
