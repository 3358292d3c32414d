"""proxyd.protocols.detect: the first byte decides the protocol."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyd.protocols.detect import Kind, sniff


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", Kind.NEED_DATA),
        (b"\x05", Kind.SOCKS5),
        (b"\x05\x01\x00", Kind.SOCKS5),
        (b"\x04", Kind.SOCKS4),
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", Kind.SOCKS4),
        (b"\x16", Kind.TLS),
        (b"\x16\x03\x01\x02\x00", Kind.TLS),
        (b"C", Kind.HTTP),
        (b"CONNECT example.com:443 HTTP/1.1\r\n", Kind.HTTP),
        (b"GET http://example.com/ HTTP/1.1\r\n", Kind.HTTP),
        (b"A", Kind.HTTP),
        (b"Z", Kind.HTTP),
        (b"a", Kind.HTTP),
        (b"z", Kind.HTTP),
        (b"0", Kind.UNKNOWN),
        (b"9", Kind.UNKNOWN),
        (b"1.1", Kind.UNKNOWN),
        (b"\x00", Kind.UNKNOWN),
        (b"\xff", Kind.UNKNOWN),
        (b"\x01", Kind.UNKNOWN),
        (b"\x06", Kind.UNKNOWN),
        (b"\x15", Kind.UNKNOWN),
        (b"\x17", Kind.UNKNOWN),
        # The characters just outside A-Z and a-z.
        (b"@", Kind.UNKNOWN),
        (b"[", Kind.UNKNOWN),
        (b"`", Kind.UNKNOWN),
        (b"{", Kind.UNKNOWN),
        (b" ", Kind.UNKNOWN),
        (b"\r\n", Kind.UNKNOWN),
        (b"\xc3\x89", Kind.UNKNOWN),  # a non-ASCII letter is not an HTTP method
    ],
)
def test_sniff(data: bytes, kind: Kind) -> None:
    assert sniff(data) is kind


@given(first=st.integers(0, 255), rest=st.binary(max_size=32))
def test_only_the_first_byte_counts(first: int, rest: bytes) -> None:
    assert sniff(bytes([first]) + rest) is sniff(bytes([first]))


@given(first=st.integers(0, 255))
def test_every_first_byte_is_classified(first: int) -> None:
    kind = sniff(bytes([first]))
    assert kind is not Kind.NEED_DATA
    expected = {0x05: Kind.SOCKS5, 0x04: Kind.SOCKS4, 0x16: Kind.TLS}.get(first)
    if expected is None:
        expected = Kind.HTTP if chr(first).isascii() and chr(first).isalpha() else Kind.UNKNOWN
    assert kind is expected
