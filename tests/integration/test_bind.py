"""SOCKS5 and SOCKS4 BIND: the daemon listens for the peer the client names, replies
twice, then relays; any other peer is turned away; the wait is bounded."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from integration import socks5client
from integration.socks5client import read_reply, recv_exact

BIND = 2


def peer_from(source: str, address: tuple[str, int]) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(address)
    return sock


@pytest.mark.parametrize(
    ("named", "peer_ip"),
    [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.3")],  # 0.0.0.0: any peer at all
    ids=["expected_peer", "any_peer"],
)
def test_socks5_bind_relays_the_peer(start_daemon, named, peer_ip):
    daemon = start_daemon()
    control, rep, host, port = socks5client.connect(daemon.address, named, 0, command=BIND)
    with control:
        assert (rep, host) == (0, "127.0.0.1")  # first reply: where the peer should connect
        with peer_from(peer_ip, (host, port)) as peer:
            rep, peer_host, peer_port = read_reply(control)  # second reply: who connected
            assert rep == 0
            assert (peer_host, peer_port) == peer.getsockname()
            peer.sendall(b"from the peer")
            assert recv_exact(control, 13) == b"from the peer"
            control.sendall(b"from the client")
            assert recv_exact(peer, 15) == b"from the client"
    line = daemon.access()
    assert (line["command"], line["status"]) == ("bind", "ok")
    assert (line["bytes_up"], line["bytes_down"]) == (15, 13)


def test_socks5_bind_turns_away_other_peers(start_daemon):
    daemon = start_daemon()
    control, rep, host, port = socks5client.connect(daemon.address, "127.0.0.2", 0, command=BIND)
    with control:
        assert rep == 0
        with peer_from("127.0.0.1", (host, port)) as stranger:
            try:
                assert stranger.recv(1) == b""  # closed by the daemon
            except ConnectionResetError:
                pass
        with peer_from("127.0.0.2", (host, port)) as peer:
            rep, peer_host, _ = read_reply(control)
            assert (rep, peer_host) == (0, "127.0.0.2")
            peer.sendall(b"ok")
            assert recv_exact(control, 2) == b"ok"


def test_socks5_bind_gives_up_after_the_connect_timeout(start_daemon):
    daemon = start_daemon("[timeouts]\nconnect = 1\n")
    control, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", 0, command=BIND)
    with control:
        assert rep == 0
        rep, _, _ = read_reply(control)  # nobody came
        assert rep == 0x04
    assert daemon.access()["status"] == "timeout"


def test_socks4_bind(start_daemon):
    daemon = start_daemon()
    control = socket.create_connection(daemon.address, timeout=10)
    with control:
        control.sendall(b"\x04\x02\x00\x15" + bytes((127, 0, 0, 1)) + b"ftp\0")
        first = recv_exact(control, 8)
        assert first[:2] == b"\x00\x5a"
        port = struct.unpack("!H", first[2:4])[0]
        assert first[4:] == bytes((127, 0, 0, 1))
        with peer_from("127.0.0.1", ("127.0.0.1", port)) as peer:
            second = recv_exact(control, 8)
            assert second[:2] == b"\x00\x5a"
            assert struct.unpack("!H", second[2:4])[0] == peer.getsockname()[1]
            peer.sendall(b"data")
            assert recv_exact(control, 4) == b"data"
    line = daemon.access()
    assert (line["protocol"], line["command"], line["status"]) == ("socks4", "bind", "ok")


@pytest.mark.parametrize("request_port", [0, 21])
def test_socks4_bind_with_dstport_0_is_granted_like_any_port(start_daemon, request_port):
    """The port of a BIND request only says where the peer will connect from (RFC
    1928 BIND accepts 0 too): SOCKS4 grants 0, listens and relays the peer."""
    daemon = start_daemon()
    control = socket.create_connection(daemon.address, timeout=10)
    with control:
        control.sendall(
            b"\x04\x02" + struct.pack("!H", request_port) + bytes((127, 0, 0, 1)) + b"\0"
        )
        first = recv_exact(control, 8)
        assert first[:2] == b"\x00\x5a"  # 90: granted, listening
        port = struct.unpack("!H", first[2:4])[0]
        assert port != 0
        with peer_from("127.0.0.1", ("127.0.0.1", port)) as peer:
            second = recv_exact(control, 8)
            assert second[:2] == b"\x00\x5a"
            assert struct.unpack("!H", second[2:4])[0] == peer.getsockname()[1]
            peer.sendall(b"from the peer")
            assert recv_exact(control, 13) == b"from the peer"
            control.sendall(b"from the client")
            assert recv_exact(peer, 15) == b"from the client"
    line = daemon.access()
    assert (line["protocol"], line["command"], line["status"]) == ("socks4", "bind", "ok")
    assert line["target"] == f"127.0.0.1:{request_port}"
    assert (line["bytes_up"], line["bytes_down"]) == (15, 13)


def test_socks4_connect_to_port_0_is_still_refused(start_daemon):
    daemon = start_daemon()
    control = socket.create_connection(daemon.address, timeout=10)
    with control:
        control.sendall(b"\x04\x01\x00\x00" + bytes((127, 0, 0, 1)) + b"\0")
        assert recv_exact(control, 8)[:2] == b"\x00\x5b"  # 91
    assert daemon.access()["status"] == "bad_request"


def test_socks4_bind_gives_up_after_the_connect_timeout(start_daemon):
    daemon = start_daemon("[timeouts]\nconnect = 1\n")
    control = socket.create_connection(daemon.address, timeout=10)
    with control:
        control.sendall(b"\x04\x02\x00\x15" + bytes((127, 0, 0, 1)) + b"ftp\0")
        first = recv_exact(control, 8)
        assert first[:2] == b"\x00\x5a"  # listening
        assert struct.unpack("!H", first[2:4])[0] != 0
        waited = time.monotonic()
        second = recv_exact(control, 8)  # nobody came
        waited = time.monotonic() - waited
        assert second[:2] == b"\x00\x5b"  # 91: rejected or failed
        assert 0.7 <= waited <= 3.0, waited
        assert control.recv(1) == b""  # and the connection ends
    line = daemon.access()
    assert (line["protocol"], line["command"], line["status"]) == ("socks4", "bind", "timeout")


def test_a_bind_peer_named_by_a_name_meets_address_rules_and_no_wildcard(start_daemon, tmp_path):
    """A named peer is resolved and judged address by address like any target, and a
    name that resolves to 0.0.0.0 (a DNS sinkhole's answer) waits for that address, not
    for anyone: only a request for 0.0.0.0 itself takes any peer."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.2 peer.test\n127.0.0.9 blocked.test\n0.0.0.0 sink.test\n")
    daemon = start_daemon(
        '[timeouts]\nconnect = 2\n[[rules]]\naction = "deny"\ndestinations = ["127.0.0.9/32"]\n',
        hosts=hosts,
    )
    control, rep, _, _ = socks5client.connect(daemon.address, "blocked.test", 0, command=BIND)
    control.close()
    assert rep == 0x02
    assert daemon.access()["status"] == "denied"

    control, rep, host, port = socks5client.connect(daemon.address, "sink.test", 0, command=BIND)
    with control:
        assert rep == 0
        with peer_from("127.0.0.1", (host, port)) as stranger:
            try:
                assert stranger.recv(1) == b""  # turned away: it is not 0.0.0.0
            except ConnectionResetError:
                pass
        rep, _, _ = read_reply(control)
        assert rep == 0x04  # nobody allowed came within timeouts.connect
