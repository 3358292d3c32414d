"""SOCKS5 UDP datagram headers (RFC 1928 section 7) without sockets: pack, unpack,
and any bytes at all giving a datagram or a ProtocolError."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.errors import ProtocolError
from proxyd.protocols.socks5_udp import UdpDatagram, parse_udp, udp_header


@pytest.mark.parametrize(
    "wire, datagram",
    [
        (b"\0\0\0\x01\x7f\x00\x00\x01\x00\x35query", UdpDatagram("127.0.0.1", 53, b"query")),
        (b"\0\0\0\x04" + bytes(15) + b"\x01\x01\xbb", UdpDatagram("::1", 443, b"")),
        (b"\0\0\0\x03\x09localhost\x00\x35x", UdpDatagram("localhost", 53, b"x")),
    ],
)
def test_datagrams_by_hand(wire: bytes, datagram: UdpDatagram) -> None:
    assert parse_udp(wire) == datagram
    assert udp_header(datagram.host, datagram.port) + datagram.payload == wire


@pytest.mark.parametrize(
    "wire, problem",
    [
        (b"", "shorter than a SOCKS5 UDP header"),
        (b"\0\0\0", "shorter than a SOCKS5 UDP header"),
        (b"\0\x01\0\x01\x7f\0\0\x01\0\x35", "reserved bytes"),
        (b"\0\0\x01\x01\x7f\0\0\x01\0\x35", "fragment 1"),
        (b"\0\0\0\x01\x7f\0\0", "cut off inside its address"),
        (b"\0\0\0\x03\x09local", "cut off inside its address"),
        (b"\0\0\0\x02\x7f\0\0\x01\0\x35", "address type"),
    ],
)
def test_malformed_datagrams(wire: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        parse_udp(wire)


hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: str(ipaddress.IPv6Address(a))),
    st.from_regex(r"[a-z0-9]{1,20}(\.[a-z0-9]{1,20}){0,3}", fullmatch=True),
)


@given(host=hosts, port=st.integers(0, 65535), payload=st.binary(max_size=300))
def test_header_round_trip(host: str, port: int, payload: bytes) -> None:
    datagram = parse_udp(udp_header(host, port) + payload)
    assert (datagram.port, datagram.payload) == (port, payload)
    assert _same_host(datagram.host, host)


def _same_host(a: str, b: str) -> bool:
    """The same name, or the same address however written (inet_ntop writes an
    IPv4-mapped address as ::ffff:1.2.3.4, Python's ipaddress as ::ffff:102:304)."""
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


@settings(max_examples=500)
@given(data=st.one_of(st.binary(max_size=300), st.binary(max_size=20).map(lambda b: b"\0\0\0" + b)))
def test_any_bytes_give_a_datagram_or_a_protocol_error(data: bytes) -> None:
    try:
        datagram = parse_udp(data)
    except ProtocolError:
        return
    assert data.endswith(datagram.payload)  # the payload is the datagram's tail, untouched
