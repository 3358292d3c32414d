"""proxyd.dns without sockets: literals need no lookup, and names IDNA refuses fail like any lookup."""

from __future__ import annotations

import socket

import pytest

from proxyd.dns import _getaddrinfo, literal_addresses

V6, V4 = socket.AF_INET6, socket.AF_INET


def test_literals_need_no_lookup() -> None:
    assert literal_addresses("127.0.0.1", 8080) == [(V4, ("127.0.0.1", 8080))]
    assert literal_addresses("::1", 8080) == [(V6, ("::1", 8080, 0, 0))]
    assert literal_addresses("localhost", 8080) is None
    assert literal_addresses("1.2.3", 8080) is None  # not shorthand for 1.2.0.3


def test_a_name_idna_cannot_encode_is_no_such_name() -> None:
    """Every caller of the resolver handles it as any failed lookup (IDNA fails before
    any query is sent)."""
    with pytest.raises(socket.gaierror) as info:
        _getaddrinfo("a" * 70 + ".invalid")
    assert info.value.errno == socket.EAI_NONAME
