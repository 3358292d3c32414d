"""proxyd.direct without sockets: address ordering for happy eyeballs (RFC 8305)."""

from __future__ import annotations

import socket

from proxyd.direct import interleave

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
