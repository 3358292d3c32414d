"""Tell the client's protocol from the first byte it sends."""

from __future__ import annotations

import enum


class Kind(enum.Enum):
    SOCKS5 = "socks5"
    SOCKS4 = "socks4"
    TLS = "tls"
    HTTP = "http"
    UNKNOWN = "unknown"
    NEED_DATA = "need_data"


_TLS_HANDSHAKE = 0x16


def sniff(data: bytes) -> Kind:
    """Classify a connection by its first byte; an HTTP method starts with an ASCII letter."""
    if not data:
        return Kind.NEED_DATA
    first = data[0]
    if first == 0x05:
        return Kind.SOCKS5
    if first == 0x04:
        return Kind.SOCKS4
    if first == _TLS_HANDSHAKE:
        return Kind.TLS
    if 0x41 <= first <= 0x5A or 0x61 <= first <= 0x7A:
        return Kind.HTTP
    return Kind.UNKNOWN
