"""SOCKS5 UDP ASSOCIATE against the real daemon, with UDP echo servers on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import socks  # PySocks: a SOCKS5 client library that speaks UDP ASSOCIATE

from conftest import PASSWORD, USER
from integration import socks5client

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
