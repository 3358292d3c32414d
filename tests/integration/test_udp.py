"""SOCKS5 UDP ASSOCIATE against the real daemon, with UDP echo servers on loopback."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial

import pytest
import socks  # PySocks: a SOCKS5 client library that speaks UDP ASSOCIATE

from conftest import PASSWORD, USER
from integration import socks5client
from integration.socks5client import recv_exact

UDP_ASSOCIATE = 3


class UdpEcho:
    """Echoes every datagram back to its sender, prefixed with b"echo:"."""

    def __init__(self, family: int = socket.AF_INET, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.host = host
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, sender = self.sock.recvfrom(65535)
                self.sock.sendto(b"echo:" + data, sender)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def udp_echo() -> Iterator[UdpEcho]:
    server = UdpEcho()
    yield server
    server.close()


def header(host: str, port: int, frag: int = 0) -> bytes:
    return b"\0\0" + bytes((frag,)) + socks5client.address(host, port)


def associate(daemon, client_port: int = 0) -> tuple[socket.socket, tuple[str, int]]:
    control, rep, host, port = socks5client.connect(
        daemon.address, "0.0.0.0", client_port, command=UDP_ASSOCIATE
    )
    assert rep == 0
    return control, (host, port)


def udp_client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    return sock


def no_datagram(sock: socket.socket, wait: float = 0.5) -> bool:
    sock.settimeout(wait)
    try:
        sock.recvfrom(65535)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)
    return False


def test_datagrams_go_out_and_replies_come_back_wrapped(start_daemon, udp_echo):
    daemon = start_daemon()
    control, relay = associate(daemon)
    assert relay[0] == "127.0.0.1"  # the control connection's local address, not 0.0.0.0
    with control, udp_client() as client:
        for i, host in enumerate(["127.0.0.1", "localhost", "127.0.0.1"]):
            payload = f"ping {i}".encode()
            client.sendto(header(host, udp_echo.port) + payload, relay)
            data, sender = client.recvfrom(65535)
            assert sender == relay
            assert data == header("127.0.0.1", udp_echo.port) + b"echo:" + payload
    line = daemon.access()
    assert (line["command"], line["status"]) == ("udp_associate", "ok")
    assert (line["datagrams_up"], line["datagrams_down"]) == (3, 3)
    assert line["bytes_up"] == 3 * len(b"ping 0")
    assert line["bytes_down"] == 3 * len(b"echo:ping 0")


def test_an_ipv6_target_from_an_ipv4_control_connection(start_daemon):
    echo6 = UdpEcho(socket.AF_INET6, "::1")
    try:
        daemon = start_daemon()
        control, relay = associate(daemon)
        with control, udp_client() as client:
            client.sendto(header("::1", echo6.port) + b"six", relay)
            data, _ = client.recvfrom(65535)
            assert data == header("::1", echo6.port) + b"echo:six"
    finally:
        echo6.close()


def test_strangers_fragments_and_garbage_are_dropped(start_daemon, udp_echo):
    daemon = start_daemon()
    control, relay = associate(daemon)
    with control, udp_client() as client, udp_client() as other:
        client.sendto(header("127.0.0.1", udp_echo.port) + b"first", relay)
        assert client.recvfrom(65535)[0].endswith(b"echo:first")
        # the client's port is now fixed: the same IP from another port is a stranger
        other.sendto(header("127.0.0.1", udp_echo.port) + b"intruder", relay)
        assert no_datagram(other)
        # fragments are not reassembled, and a header must be whole
        client.sendto(header("127.0.0.1", udp_echo.port, frag=1) + b"frag", relay)
        client.sendto(b"\0\0\0\x01\x7f", relay)
        assert no_datagram(client)
        # a host the client never sent to cannot reach it through the relay
        other.sendto(b"unsolicited", relay)
        assert no_datagram(client)
    line = daemon.access()
    assert (line["datagrams_up"], line["datagrams_down"]) == (1, 1)
    assert line["datagrams_dropped"] == 4


def test_a_named_client_port_is_the_only_one_accepted(start_daemon, udp_echo):
    daemon = start_daemon()
    with udp_client() as client, udp_client() as other:
        control, relay = associate(daemon, client_port=client.getsockname()[1])
        with control:
            other.sendto(header("127.0.0.1", udp_echo.port) + b"first from elsewhere", relay)
            assert no_datagram(other)
            client.sendto(header("127.0.0.1", udp_echo.port) + b"mine", relay)
            assert client.recvfrom(65535)[0].endswith(b"echo:mine")


def test_the_association_ends_with_its_control_connection(start_daemon, udp_echo):
    daemon = start_daemon()
    control, relay = associate(daemon)
    control.close()
    line = daemon.access()
    assert line["status"] == "ok"
    # the relay socket is gone: its port can be bound again
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with probe:
        probe.bind(relay)


GREETING = b"\x05\x01\x00"  # SOCKS5, no authentication
ASSOCIATE_REQUEST = b"\x05\x03\x00\x01" + bytes(6)  # UDP ASSOCIATE 0.0.0.0:0
REPLY = 10  # the reply's length, with an IPv4 BND.ADDR


def udp_sockets(pid: int) -> int:
    """How many UDP sockets (IPv4 and IPv6) process `pid` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    count = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as lines:
            next(lines)  # the heading
            count += sum(line.split()[9] in inodes for line in lines)
    return count


def random_going(rng: random.Random) -> tuple[bool, bytes, bool, str, float]:
    """How one client asks and goes: greeting and request in one write or two; the
    bytes it sends after its request (none, a few, or more than the daemon reads in
    one go during the handshake); whether it reads the reply first; how it closes
    (about 30 % reset with SO_LINGER 0; a plain close with the reply unread resets
    too); and how long it waits before."""
    trailing = rng.choice(
        [b"", b"x", rng.randbytes(rng.randint(2, 300)), rng.randbytes(rng.randint(5000, 20000))]
    )
    how = "reset" if rng.random() < 0.3 else rng.choice(["close", "shutdown"])
    pause = rng.choice([0.0, 0.0, 0.001, rng.uniform(0, 0.02)])
    return rng.random() < 0.5, trailing, rng.random() < 0.7, how, pause


def associate_and_go(
    proxy: tuple[str, int], going: tuple[bool, bytes, bool, str, float]
) -> tuple[str, float]:
    """One client by `going`: its address as the access line names it, and when it
    closed (wall clock, as the line's ts)."""
    pipelined, trailing, reply_first, how, pause = going
    with socket.create_connection(proxy, timeout=10) as sock:
        client = "{}:{}".format(*sock.getsockname())
        with contextlib.suppress(OSError):  # the daemon may have gone first: fine
            if pipelined:
                sock.sendall(GREETING + ASSOCIATE_REQUEST + trailing)
            else:
                sock.sendall(GREETING)
                recv_exact(sock, 2)
                sock.sendall(ASSOCIATE_REQUEST + trailing)
            if reply_first:
                reply = recv_exact(sock, REPLY + 2 * pipelined)
                assert reply[-REPLY:][:2] == b"\x05\x00"
            time.sleep(pause)
            if how == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif how == "shutdown":
                sock.shutdown(socket.SHUT_WR)
        closed = time.time()
    return client, closed


def test_no_association_outlives_its_control_connection(start_daemon):
    """Issue 17: 2,000 UDP ASSOCIATE requests, 200 at a time from 32 clients at once,
    each sending bytes after its request and going its own way (before or after the
    reply; a close, a half-close, a reset). Every association's access line comes
    within 2 s of its client's close (with udp_idle at 60 s, one that outlived its
    connection would have none), and at the end the daemon holds no UDP socket."""
    daemon = start_daemon()
    rng = random.Random(17)
    with ThreadPoolExecutor(32) as pool:
        for _batch in range(10):
            before = len(daemon.access_events())
            clients = list(
                pool.map(
                    partial(associate_and_go, daemon.address),
                    [random_going(rng) for _ in range(200)],
                )
            )
            deadline = time.monotonic() + 2.0  # after the batch's last close
            while len(daemon.access_events()) < before + len(clients):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            lines = daemon.access_events()[before:]
            seen = Counter(line["client"] for line in lines)
            wanted = Counter(client for client, _ in clients)
            assert seen == wanted, f"no line for {sorted((wanted - seen).elements())[:10]}"
            # (a port the kernel gave twice in a batch leaves its two lines unmatched)
            closed = {client: at for client, at in clients if wanted[client] == 1}
            for line in lines:
                # (None: reset before the daemon had answered the greeting)
                assert line["command"] in ("udp_associate", None), str(line)
                if line["client"] in closed:
                    ended = datetime.fromisoformat(line["ts"]).timestamp()
                    assert ended - closed[line["client"]] <= 2.0, line
    deadline = time.monotonic() + 2.0
    while (left := udp_sockets(daemon.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == 0


def test_udp_idle_ends_a_quiet_association(start_daemon, udp_echo):
    daemon = start_daemon("[timeouts]\nudp_idle = 1\n")
    control, _ = associate(daemon)
    with control:
        control.settimeout(10)
        assert control.recv(1) == b""  # the daemon closed the control connection
    assert daemon.access()["status"] == "idle_timeout"


def test_udp_advertise_is_the_address_in_the_reply(start_daemon):
    daemon = start_daemon('[server]\nudp_advertise = "192.0.2.10"\n')
    control, relay = associate(daemon)
    control.close()
    assert relay[0] == "192.0.2.10"


def test_udp_associate_with_a_user(start_daemon, users_file, udp_echo):
    daemon = start_daemon(f'[auth]\nusers_file = "{users_file}"\n')
    control, rep, host, port = socks5client.connect(
        daemon.address, "0.0.0.0", 0, auth=(USER, PASSWORD), command=UDP_ASSOCIATE
    )
    assert rep == 0
    with control, udp_client() as client:
        client.sendto(header("127.0.0.1", udp_echo.port) + b"hello", (host, port))
        assert client.recvfrom(65535)[0].endswith(b"echo:hello")
    assert daemon.access()["user"] == USER


def test_sigterm_ends_the_association_with_its_line_before_stopped(start_daemon):
    daemon = start_daemon("[server]\nshutdown_grace = 0\n")
    control, _ = associate(daemon)
    with control:
        assert daemon.stop() == 0
    line = daemon.access()
    assert (line["command"], line["status"]) == ("udp_associate", "shutdown")
    daemon.wait_for(lambda e: e.get("event") == "stopped")
    events = [e.get("event") for e in daemon.events]
    assert events.index("access") < events.index("stopped")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_pysocks_udp_client_to_echo_servers_on_127_0_0_1_and_ipv6(start_daemon, family):
    """A UDP client library (PySocks) through UDP ASSOCIATE, to 127.0.0.1 and ::1."""
    echo = UdpEcho(family, "127.0.0.1" if family == socket.AF_INET else "::1")
    try:
        daemon = start_daemon()
        client = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
        client.set_proxy(socks.SOCKS5, *daemon.address)
        client.settimeout(5)
        with client:
            for i in range(3):
                client.sendto(f"datagram {i}".encode(), (echo.host, echo.port))
                data, sender = client.recvfrom(65535)
                assert data == f"echo:datagram {i}".encode()
                assert sender[:2] == (echo.host, echo.port)
        line = daemon.access()
        assert (line["command"], line["datagrams_up"], line["datagrams_down"]) == (
            "udp_associate",
            3,
            3,
        )
    finally:
        echo.close()


def test_a_datagram_from_another_address_is_dropped(start_daemon, udp_echo):
    daemon = start_daemon()
    control, relay = associate(daemon)
    elsewhere = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    elsewhere.bind(("127.0.0.2", 0))  # not the control connection's address
    with control, elsewhere:
        elsewhere.settimeout(5)
        elsewhere.sendto(header("127.0.0.1", udp_echo.port) + b"not the client", relay)
        assert no_datagram(elsewhere)
    line = daemon.access()
    assert (line["datagrams_up"], line["datagrams_dropped"]) == (0, 1)


def test_traffic_keeps_an_association_past_udp_idle_then_it_ends_by_itself(start_daemon, udp_echo):
    """Datagrams every 0.3 s keep an association with udp_idle = 1 open for 2.5 s;
    once they stop, it ends about 1 s after the last one, control connection and all."""
    daemon = start_daemon("[timeouts]\nudp_idle = 1\n")
    control, relay = associate(daemon)
    with control, udp_client() as client:
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < 2.5:
            payload = f"beat {sent}".encode()
            client.sendto(header("127.0.0.1", udp_echo.port) + payload, relay)
            data, _ = client.recvfrom(65535)  # each one answered: the relay is still there
            assert data == header("127.0.0.1", udp_echo.port) + b"echo:" + payload
            sent += 1
            last = time.monotonic()
            time.sleep(0.3)
        assert sent >= 7
        assert daemon.access_events() == []  # still open, well past udp_idle
        control.settimeout(5)
        assert control.recv(1) == b""  # then the daemon ends it by itself...
        quiet = time.monotonic() - last
        assert 0.7 <= quiet <= 3.0, quiet  # ...udp_idle after the last datagram
        client.sendto(header("127.0.0.1", udp_echo.port) + b"too late", relay)
        assert no_datagram(client)
    line = daemon.access()
    assert (line["command"], line["status"]) == ("udp_associate", "idle_timeout")
    assert (line["datagrams_up"], line["datagrams_down"]) == (sent, sent)
    assert line["duration_ms"] >= 2500
