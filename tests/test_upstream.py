"""proxyd.upstream without sockets: address ordering for happy eyeballs (RFC 8305)."""

from __future__ import annotations

import socket

import pytest

from proxyd.upstream import interleave, literal_addresses

V6, V4 = socket.AF_INET6, socket.AF_INET


def addr(family: int, ip: str) -> tuple[int, tuple[object, ...]]:
    return (family, (ip, 80, 0, 0)) if family == V6 else (family, (ip, 80))


def test_families_alternate_starting_with_the_first() -> None:
    a6, b6, c6 = addr(V6, "2001:db8::a"), addr(V6, "2001:db8::b"), addr(V6, "2001:db8::c")
    a4, b4 = addr(V4, "192.0.2.1"), addr(V4, "192.0.2.2")
    assert interleave([a6, b6, c6, a4, b4]) == [a6, a4, b6, b4, c6]
    assert interleave([a4, a6, b6]) == [a4, a6, b6]
    assert interleave([a4, b4]) == [a4, b4]
    assert interleave([]) == []


def test_literals_need_no_lookup() -> None:
    assert literal_addresses("127.0.0.1", 8080) == [(V4, ("127.0.0.1", 8080))]
    assert literal_addresses("::1", 8080) == [(V6, ("::1", 8080, 0, 0))]
    assert literal_addresses("localhost", 8080) is None
    assert literal_addresses("1.2.3", 8080) is None  # not shorthand for 1.2.0.3


def test_a_name_idna_cannot_encode_is_no_such_name() -> None:
    """Every caller of the resolver handles it as any failed lookup (IDNA fails before
    any query is sent)."""
    from proxyd.upstream import _getaddrinfo

    with pytest.raises(socket.gaierror) as info:
        _getaddrinfo("a" * 70 + ".invalid")
    assert info.value.errno == socket.EAI_NONAME
