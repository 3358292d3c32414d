"""proxyd.protocols.proxy_protocol without sockets: PROXY protocol v1 and v2 headers, byte for byte."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.errors import LocalProtocolError, ProtocolError
from proxyd.protocols.common import NEED_DATA
from proxyd.protocols.proxy_protocol import (
    SIGNATURE_V2,
    V1_MAX,
    ProxyHeader,
    ProxyHeaderParser,
    starts_like_header,
)

# --- wire bytes written out by hand, independent of the code under test ------

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # spec section 2.2, byte by byte
assert SIGNATURE_V2 == SIG

PROXY, LOCAL = 0x21, 0x20  # version 2 in the high nibble, the command in the low one
TCP4, TCP6, UNIX_STREAM, UNSPEC = 0x11, 0x21, 0x31, 0x00


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    """A v2 header; `length` overrides the length field for malformed ones."""
    length = len(body) if length is None else length
    return SIG + bytes((ver_cmd, fam)) + struct.pack("!H", length) + body


def ip_block(source: str, destination: str, source_port: int, dest_port: int) -> bytes:
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    return src.packed + dst.packed + struct.pack("!HH", source_port, dest_port)


def tlv(tlv_type: int, value: bytes) -> bytes:
    return bytes((tlv_type,)) + struct.pack("!H", len(value)) + value


UNIX_PATHS = b"/run/client.sock".ljust(108, b"\0") + b"/run/proxyd.sock".ljust(108, b"\0")
LONGEST_V6 = ":".join(["ffff"] * 8)  # 39 characters

V1_TCP4 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"  # the spec's own example
V2_TCP4 = (  # the same connection in v2, every byte spelled out
    b"\r\n\r\n\x00\r\nQUIT\n"
    b"\x21"  # version 2, PROXY
    b"\x11"  # AF_INET, STREAM
    b"\x00\x0c"  # 12 address bytes
    b"\xc0\xa8\x00\x01"  # 192.168.0.1
    b"\xc0\xa8\x00\x0b"  # 192.168.0.11
    b"\xdc\x04"  # 56324
    b"\x01\xbb"  # 443
)
SPEC_EXAMPLE = ProxyHeader(1, ("192.168.0.1", 56324), ("192.168.0.11", 443))

HEADERS = {
    "v1 tcp4": (V1_TCP4, SPEC_EXAMPLE),
    "v1 tcp4 extremes": (
        b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
        ProxyHeader(1, ("0.0.0.0", 0), ("255.255.255.255", 65535)),
    ),
    "v1 tcp6": (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 443\r\n",
        ProxyHeader(1, ("2001:db8::1", 1234), ("2001:db8::2", 443)),
    ),
    "v1 tcp6 written out in full, upper case": (
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 ::1 1 2\r\n",
        ProxyHeader(1, ("2001:db8::1", 1), ("::1", 2)),
    ),
    "v1 tcp6 longest": (
        f"PROXY TCP6 {LONGEST_V6} {LONGEST_V6} 65535 65535\r\n".encode(),
        ProxyHeader(1, (LONGEST_V6, 65535), (LONGEST_V6, 65535)),
    ),
    "v1 unknown, short form": (b"PROXY UNKNOWN\r\n", ProxyHeader(1, None, None)),
    "v1 unknown with addresses": (
        b"PROXY UNKNOWN 192.168.0.1 192.168.0.11 56324 443\r\n",
        ProxyHeader(1, None, None),
    ),
    "v1 unknown, worst case 107 bytes": (
        f"PROXY UNKNOWN {LONGEST_V6} {LONGEST_V6} 65535 65535\r\n".encode(),
        ProxyHeader(1, None, None),
    ),
    "v1 unknown, junk ignored": (b"PROXY UNKNOWN what ever  \r\n", ProxyHeader(1, None, None)),
    "v2 tcp4": (V2_TCP4, ProxyHeader(2, ("192.168.0.1", 56324), ("192.168.0.11", 443))),
    "v2 tcp6": (
        v2(PROXY, TCP6, ip_block("2001:db8::1", "2001:db8::2", 1234, 443)),
        ProxyHeader(2, ("2001:db8::1", 1234), ("2001:db8::2", 443)),
    ),
    "v2 tcp6 written out": (
        SIG
        + b"\x21\x21\x00\x24"
        + b"\x20\x01\x0d\xb8"
        + bytes(11)
        + b"\x01"
        + bytes(15)
        + b"\x01"
        + b"\x00\x50\xff\xff",
        ProxyHeader(2, ("2001:db8::1", 80), ("::1", 65535)),
    ),
    "v2 local": (v2(LOCAL, UNSPEC, b""), ProxyHeader(2, None, None)),
    "v2 local ignores addresses and all after them": (
        v2(LOCAL, TCP4, ip_block("10.0.0.1", "10.0.0.2", 1, 2) + b"\x04\x00"),
        ProxyHeader(2, None, None),
    ),
    "v2 local ignores the transport": (v2(LOCAL, 0x12, b""), ProxyHeader(2, None, None)),
    "v2 proxy unspec family": (v2(PROXY, UNSPEC, b"whatever"), ProxyHeader(2, None, None)),
    # an UNSPEC transport says to ignore the address information (spec section 2.2)
    "v2 proxy inet, unspec transport": (v2(PROXY, 0x10, bytes(12)), ProxyHeader(2, None, None)),
    "v2 unix stream": (v2(PROXY, UNIX_STREAM, UNIX_PATHS), ProxyHeader(2, None, None)),
    "v2 unix stream with tlv": (
        v2(PROXY, UNIX_STREAM, UNIX_PATHS + tlv(0x05, b"id-1")),
        ProxyHeader(2, None, None, ((0x05, b"id-1"),)),
    ),
    "v2 tcp4 with tlvs": (
        v2(
            PROXY,
            TCP4,
            ip_block("203.0.113.7", "198.51.100.1", 40000, 1080)
            + tlv(0x01, b"h2")  # ALPN
            + tlv(0x02, b"proxy.example")  # authority
            + tlv(0x04, bytes(5))  # NOOP, padding
            + tlv(0xEA, b""),  # a vendor's type, empty
        ),
        ProxyHeader(
            2,
            ("203.0.113.7", 40000),
            ("198.51.100.1", 1080),
            ((0x01, b"h2"), (0x02, b"proxy.example"), (0x04, bytes(5)), (0xEA, b"")),
        ),
    ),
    "v2 tcp4 with crc32c not checked": (
        v2(PROXY, TCP4, ip_block("1.2.3.4", "5.6.7.8", 1, 2) + b"\x03\x00\x04\xde\xad\xbe\xef"),
        ProxyHeader(2, ("1.2.3.4", 1), ("5.6.7.8", 2), ((0x03, b"\xde\xad\xbe\xef"),)),
    ),
    "v2 tcp6 with ssl tlv": (
        v2(PROXY, TCP6, ip_block("::1", "::2", 3, 4) + tlv(0x20, b"\x01" + bytes(4))),
        ProxyHeader(2, ("::1", 3), ("::2", 4), ((0x20, b"\x01\x00\x00\x00\x00"),)),
    ),
    "v2 tcp4 mapped v6": (
        v2(PROXY, TCP6, ip_block("::ffff:10.1.2.3", "::ffff:10.1.2.4", 5, 6)),
        ProxyHeader(
            2,
            (str(ipaddress.IPv6Address("::ffff:10.1.2.3")), 5),
            (str(ipaddress.IPv6Address("::ffff:10.1.2.4")), 6),
        ),
    ),
    "v2 longest": (
        v2(PROXY, TCP4, ip_block("1.1.1.1", "2.2.2.2", 7, 8) + tlv(0x04, bytes(0xFFFF - 15))),
        ProxyHeader(2, ("1.1.1.1", 7), ("2.2.2.2", 8), ((0x04, bytes(0xFFFF - 15)),)),
    ),
}
assert len(HEADERS["v1 unknown, worst case 107 bytes"][0]) == V1_MAX == 107
assert len(HEADERS["v2 longest"][0]) == 16 + 0xFFFF


def feed(chunks: Iterable[bytes]) -> tuple[ProxyHeaderParser, ProxyHeader | None]:
    """What the session does: feed each chunk, ask for the header until it comes."""
    parser = ProxyHeaderParser()
    header = None
    for chunk in chunks:
        parser.receive_data(chunk)
        if header is None:
            event = parser.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, ProxyHeader)
                header = event
    return parser, header


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# --- whole headers ------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), HEADERS.values(), ids=HEADERS.keys())
def test_header(data: bytes, expected: ProxyHeader) -> None:
    parser = ProxyHeaderParser()
    parser.receive_data(data)
    header = parser.next_event()
    assert header == expected
    assert isinstance(header, ProxyHeader)
    assert header.local is (expected.source is None)
    assert parser.trailing_data == b""


@pytest.mark.parametrize(("data", "expected"), HEADERS.values(), ids=HEADERS.keys())
def test_trickle(data: bytes, expected: ProxyHeader) -> None:
    parser = ProxyHeaderParser()
    for byte in data[:-1]:
        parser.receive_data(bytes((byte,)))
        assert parser.next_event() is NEED_DATA
    parser.receive_data(data[-1:])
    assert parser.next_event() == expected
    assert parser.trailing_data == b""


def test_longest_v2_in_pieces() -> None:
    data, expected = HEADERS["v2 longest"]
    parser, header = feed(split(data, range(0, len(data), 997)))
    assert header == expected
    assert parser.trailing_data == b""


def test_local_property() -> None:
    assert ProxyHeader(1, None, None).local
    assert ProxyHeader(2, None, None, ((0x04, b""),)).local
    assert not SPEC_EXAMPLE.local


# --- what follows the header ----------------------------------------------------

SOCKS5_GREETING = b"\x05\x01\x00"
HTTP_GET = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
TLS_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
# bytes that look like another header must not be read as one
TRAILERS = [SOCKS5_GREETING, HTTP_GET, TLS_START, b"\r\n", V1_TCP4, V2_TCP4, bytes(70000)]


@pytest.mark.parametrize("trailer", TRAILERS)
@pytest.mark.parametrize("name", ["v1 tcp4", "v1 unknown, short form", "v2 tcp4", "v2 local"])
def test_trailing_data_in_the_same_chunk(name: str, trailer: bytes) -> None:
    data, expected = HEADERS[name]
    parser = ProxyHeaderParser()
    parser.receive_data(data + trailer)
    assert parser.next_event() == expected
    assert parser.trailing_data == trailer


@pytest.mark.parametrize("name", ["v1 tcp4", "v2 tcp4 with tlvs"])
def test_trailing_data_trickled(name: str) -> None:
    data, expected = HEADERS[name]
    parser, header = feed(bytes((b,)) for b in data + HTTP_GET)
    assert header == expected
    assert parser.trailing_data == HTTP_GET


def test_data_after_the_header_is_appended() -> None:
    parser = ProxyHeaderParser()
    parser.receive_data(V2_TCP4 + b"\x05")
    assert parser.next_event() == HEADERS["v2 tcp4"][1]
    parser.receive_data(b"\x01")
    parser.receive_data(b"\x00")
    assert parser.trailing_data == SOCKS5_GREETING


def test_next_event_after_the_header_is_our_bug() -> None:
    parser = ProxyHeaderParser()
    parser.receive_data(V1_TCP4 + V1_TCP4)
    assert parser.next_event() == SPEC_EXAMPLE
    with pytest.raises(LocalProtocolError):
        parser.next_event()
    assert parser.trailing_data == V1_TCP4


@pytest.mark.parametrize("data", [b"", b"PROXY TCP4 1.2.3.4", V2_TCP4[:-1]])
def test_trailing_data_before_the_header_is_our_bug(data: bytes) -> None:
    parser = ProxyHeaderParser()
    parser.receive_data(data)
    assert parser.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        _ = parser.trailing_data


# --- telling a header from other protocols --------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", None),
        (b"P", None),
        (b"PRO", None),
        (b"PROXY", None),
        (b"PROXY ", True),
        (b"PROXY TCP4 1.2.3.4", True),
        (V1_TCP4, True),
        (b"PROXY\r\n", False),
        (b"PROXYTCP4", False),
        (b"PROXZ ", False),
        (b"PROXZ", False),
        (b"proxy ", False),
        (b"\r", None),
        (b"\r\n\r", None),
        (b"\r\n\r\n\x00\r\nQUIT", None),
        (SIG, True),
        (V2_TCP4, True),
        (SIG + b"\xff", True),  # a bad version is the parser's to refuse
        (b"\r\n\r\n\x00\r\nQUIX\n", False),
        (b"\r\n\r\n\x01", False),
        (b"\r\nPROXY ", False),
        (b"\n", False),
        (b"\x05", False),  # SOCKS5
        (b"\x05\x01\x00", False),
        (b"\x04\x01\x00\x50", False),  # SOCKS4
        (b"\x16\x03\x01", False),  # TLS
        (b"GET ", False),
        (b"GET / HTTP/1.1\r\n", False),
        (b"CONNECT example.com:443 HTTP/1.1\r\n", False),
        (b"POST ", False),  # shares the P
        (b"PUT / HTTP/1.1\r\n", False),
        (b"\x00", False),
    ],
)
def test_starts_like_header(data: bytes, expected: bool | None) -> None:
    assert starts_like_header(data) is expected


@given(data=st.binary(max_size=20))
def test_starts_like_header_agrees_with_the_prefixes(data: bytes) -> None:
    full = data.startswith(b"PROXY ") or data.startswith(SIG)
    partial = b"PROXY ".startswith(data) or SIG.startswith(data)
    assert starts_like_header(data) is (True if full else None if partial else False)


# --- malformed headers ------------------------------------------------------------

V4_BLOCK = ip_block("10.0.0.1", "10.0.0.2", 1000, 80)
MALFORMED = {
    "not a header at all": (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
    "socks5": (b"\x05\x01\x00", "not a PROXY protocol header"),
    "lower case": (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
    "no space after PROXY": (b"PROXY\r\n", "not a PROXY protocol header"),
    "v2 signature off by a byte": (
        b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x00",
        "not a PROXY protocol header",
    ),
    # v1
    "no CRLF within 107 bytes": (b"PROXY TCP4 " + b"1" * 96, "no CRLF within 107 bytes"),
    "CRLF as bytes 108 and 109": (
        b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n",
        "no CRLF within 107 bytes",
    ),
    "bare LF": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "stray CR or LF"),
    "bare LF then CRLF": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\nX\r\n", "stray CR or LF"),
    "bare CR": (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "stray CR or LF"),
    "CR CR LF": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "stray CR or LF"),
    "bad family word": (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "bad protocol family"),
    "lower case family": (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "bad protocol family"),
    "UDP4": (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad protocol family"),
    "UNKNOWN run on": (b"PROXY UNKNOWNX\r\n", "bad protocol family"),
    "no family": (b"PROXY \r\n", "empty field"),
    "bad source ip": (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad source address"),
    "octet over 255": (b"PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n", "bad destination address"),
    "leading zero octet": (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "bad source address"),
    "host name": (b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "bad source address"),
    "ipv6 under TCP4": (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad source address"),
    "ipv4 under TCP6": (b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n", "bad destination address"),
    "ipv6 with scope": (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad source address"),
    "ipv6 two double colons": (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "bad source address"),
    "port 65536": (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad source port"),
    "port 99999": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "bad destination port"),
    "leading zero port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n", "bad destination port"),
    "port 00": (b"PROXY TCP4 1.2.3.4 5.6.7.8 00 2\r\n", "bad source port"),
    "signed port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "bad source port"),
    "negative port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "bad destination port"),
    "hex port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n", "bad source port"),
    "missing field": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "5 fields, expected 6"),
    "extra field": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "7 fields, expected 6"),
    "double space": (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "empty field"),
    "double space after PROXY": (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "empty field"),
    "trailing space": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "empty field"),
    "tab": (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "5 fields, expected 6"),
    "non-ASCII byte": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xff\r\n", "not ASCII"),
    "non-ASCII digit": ("PROXY TCP4 1.2.3.4 5.6.7.8 1 ٨\r\n".encode(), "not ASCII"),
    "non-ASCII after UNKNOWN": ("PROXY UNKNOWN é\r\n".encode(), "not ASCII"),
    # v2
    "v2 version 1": (SIG + b"\x11\x11\x00\x0c" + V4_BLOCK, "version 1, expected 2"),
    "v2 version 0": (SIG + b"\x01", "version 0, expected 2"),
    "v2 version 3": (SIG + b"\x31", "version 3, expected 2"),
    "v2 command 2": (v2(0x22, TCP4, V4_BLOCK), "unknown command 2"),
    "v2 command 15": (SIG + b"\x2f", "unknown command 15"),
    "v2 dgram over ipv4": (v2(PROXY, 0x12, V4_BLOCK), "not a stream connection"),
    "v2 dgram over ipv6": (v2(PROXY, 0x22, bytes(36)), "not a stream connection"),
    "v2 unix dgram": (v2(PROXY, 0x32, UNIX_PATHS), "not a stream connection"),
    "v2 unknown family": (v2(PROXY, 0x41, V4_BLOCK), "unknown address family 4"),
    "v2 unknown family with local": (v2(LOCAL, 0xF0, b""), "unknown address family 15"),
    "v2 unknown transport": (v2(PROXY, 0x13, V4_BLOCK), "unknown transport 3"),
    "v2 ipv4 length 11": (v2(PROXY, TCP4, V4_BLOCK[:11]), "length 11 too short"),
    "v2 ipv4 length 0": (v2(PROXY, TCP4, b""), "length 0 too short"),
    "v2 ipv6 length 12": (v2(PROXY, TCP6, V4_BLOCK), "length 12 too short"),
    "v2 unix length 36": (v2(PROXY, UNIX_STREAM, bytes(36)), "length 36 too short"),
    "v2 tlv overrun": (v2(PROXY, TCP4, V4_BLOCK + b"\x01\x00\x05h2"), "TLV overruns"),
    "v2 tlv overrun after a good one": (
        v2(PROXY, TCP4, V4_BLOCK + tlv(0x04, b"") + b"\x02\xff\xff"),
        "TLV overruns",
    ),
    "v2 tlv head cut at 1 byte": (v2(PROXY, TCP4, V4_BLOCK + b"\x01"), "TLV overruns"),
    "v2 tlv head cut at 2 bytes": (v2(PROXY, TCP4, V4_BLOCK + b"\x01\x00"), "TLV overruns"),
}


@pytest.mark.parametrize(("data", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed(data: bytes, message: str) -> None:
    parser = ProxyHeaderParser()
    parser.receive_data(data)
    with pytest.raises(ProtocolError, match=message) as info:
        parser.next_event()
    assert info.value.status == "bad_request"
    assert len(str(info.value)) < 80


@pytest.mark.parametrize(("data", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_trickle(data: bytes, message: str) -> None:
    """Byte at a time, the same error, at the latest with the last byte."""
    parser = ProxyHeaderParser()
    with pytest.raises(ProtocolError, match=message):
        for byte in data:
            parser.receive_data(bytes((byte,)))
            parser.next_event()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (SIG + b"\x11", "version 1"),  # before the family, length or body
        (SIG + b"\x21\x12", "not a stream connection"),  # before the length
        (SIG + b"\x21\x11\x00\x0b", "too short"),  # before the body
        (b"PROXY TCP4 1.2.3.4\n", "stray CR or LF"),  # before 107 bytes
        (b"PRX", "not a PROXY protocol header"),
    ],
)
def test_errors_are_raised_early(data: bytes, message: str) -> None:
    parser = ProxyHeaderParser()
    parser.receive_data(data)
    with pytest.raises(ProtocolError, match=message):
        parser.next_event()


# --- buffering is bounded ----------------------------------------------------------


def test_v1_waits_up_to_107_bytes() -> None:
    parser = ProxyHeaderParser()
    parser.receive_data(b"PROXY UNKNOWN " + b"x" * 91 + b"\r")  # 106 bytes
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"\n")
    assert parser.next_event() == ProxyHeader(1, None, None)


def test_v1_refused_at_107_bytes_without_crlf() -> None:
    parser = ProxyHeaderParser()
    parser.receive_data(b"PROXY UNKNOWN " + b"x" * 92)  # 106 bytes
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"\r")
    with pytest.raises(ProtocolError, match="no CRLF"):
        parser.next_event()


def test_v1_refused_in_one_large_chunk() -> None:
    parser = ProxyHeaderParser()
    parser.receive_data(b"PROXY " + b"x" * 1_000_000 + b"\r\n")
    with pytest.raises(ProtocolError, match="no CRLF"):
        parser.next_event()


def test_v2_waits_for_its_length_and_no_more() -> None:
    parser = ProxyHeaderParser()
    parser.receive_data(v2(LOCAL, UNSPEC, b"", length=0xFFFF))
    for _ in range(0xFFFF - 1):
        assert parser.next_event() is NEED_DATA
        parser.receive_data(b"\0")
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"\0after")
    assert parser.next_event() == ProxyHeader(2, None, None)
    assert parser.trailing_data == b"after"


# --- hypothesis: random input and valid headers -------------------------------------

ports = st.integers(0, 65535)


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid v1 line, built by hand, with the header it must give."""
    version = draw(st.sampled_from([4, 6, 0]))
    if version == 0:
        line = b"PROXY UNKNOWN"
        if draw(st.booleans()):  # anything printable may follow, up to the 107-byte limit
            rest = draw(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
            line += b" " + rest.encode()[: V1_MAX - len(line) - 3]
        return line + b"\r\n", ProxyHeader(1, None, None)
    source, destination = draw(st.ip_addresses(v=version)), draw(st.ip_addresses(v=version))
    source_port, dest_port = draw(ports), draw(ports)

    def spell(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        forms = [str(address), address.exploded, address.exploded.upper()]
        return draw(st.sampled_from(forms))

    line = f"PROXY TCP{version} {spell(source)} {spell(destination)} {source_port} {dest_port}"
    expected = ProxyHeader(1, (str(source), source_port), (str(destination), dest_port))
    return line.encode() + b"\r\n", expected


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid v2 header, built by hand, with the header it must give."""
    kind = draw(st.sampled_from(["ipv4", "ipv6", "unix", "local", "unspec"]))
    tlvs = tuple(draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)))))
    tlv_bytes = b"".join(tlv(t, value) for t, value in tlvs)
    if kind in ("local", "unspec"):
        body = draw(st.binary(max_size=300))
        command = LOCAL if kind == "local" else PROXY
        fam = draw(st.sampled_from([0x00, 0x11, 0x21, 0x31])) if kind == "local" else 0x00
        return v2(command, fam, body), ProxyHeader(2, None, None)
    if kind == "unix":
        paths = draw(st.binary(min_size=216, max_size=216))
        return v2(PROXY, UNIX_STREAM, paths + tlv_bytes), ProxyHeader(2, None, None, tlvs)
    version = 4 if kind == "ipv4" else 6
    source, destination = draw(st.ip_addresses(v=version)), draw(st.ip_addresses(v=version))
    source_port, dest_port = draw(ports), draw(ports)
    block = source.packed + destination.packed + struct.pack("!HH", source_port, dest_port)
    header = v2(PROXY, TCP4 if version == 4 else TCP6, block + tlv_bytes)
    expected = ProxyHeader(2, (str(source), source_port), (str(destination), dest_port), tlvs)
    return header, expected


headers = st.one_of(v1_headers(), v2_headers())


@settings(max_examples=300, deadline=None)
@given(
    header=headers,
    trailer=st.one_of(st.binary(max_size=64), st.sampled_from(TRAILERS[:-1])),
    cuts=st.lists(st.integers(1, 2000), max_size=20),
)
def test_valid_headers_parse_back(
    header: tuple[bytes, ProxyHeader], trailer: bytes, cuts: list[int]
) -> None:
    data, expected = header
    parser, got = feed(split(data + trailer, cuts))
    assert got == expected
    assert parser.trailing_data == trailer


@st.composite
def garbled(draw: st.DrawFn) -> bytes:
    """A valid header with a few bytes changed, cut off anywhere, then anything.

    Mostly valid input reaches every field and length check, which purely random
    bytes (refused at their first byte) never do.
    """
    data = bytearray(draw(headers)[0])
    for _ in range(draw(st.integers(0, 3))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data) + draw(st.binary(max_size=40))


@settings(max_examples=500, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: b"PROXY " + b),
        st.binary(max_size=300).map(lambda b: SIG + b),
        garbled(),
    ),
    cuts=st.lists(st.integers(1, 400), max_size=30),
)
def test_random_bytes_give_a_header_need_data_or_protocol_error(
    data: bytes, cuts: list[int]
) -> None:
    parser = ProxyHeaderParser()
    fed = b""
    for chunk in split(data, cuts):
        parser.receive_data(chunk)
        fed += chunk
        try:
            event = parser.next_event()
        except ProtocolError as exc:
            assert str(exc).startswith(("malformed PROXY v", "not a PROXY protocol header"))
            return
        if event is NEED_DATA:
            # nothing is consumed before the header is whole, and that stays bounded
            assert parser._buffer == fed
            assert len(fed) <= max(V1_MAX, 16 + 65535)
            if fed.startswith(b"PROXY "):
                assert len(fed) < V1_MAX
            elif len(fed) >= 16:
                assert len(fed) < 16 + struct.unpack("!H", fed[14:16])[0]
            continue
        assert isinstance(event, ProxyHeader)
        header_length = len(fed) - len(parser.trailing_data)
        assert fed[header_length:] == parser.trailing_data
        if event.version == 1:
            assert fed[header_length - 2 : header_length] == b"\r\n"
            assert header_length <= V1_MAX
        else:
            assert header_length == 16 + struct.unpack("!H", fed[14:16])[0]
        return
