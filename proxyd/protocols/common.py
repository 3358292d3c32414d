"""Types shared by the protocol parsers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


class NeedData:
    """Sentinel: more bytes are needed before the next event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # keep the password out of any traceback or log
        return f"Credentials(username={self.username!r}, password=<hidden>)"


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes for the driver to send to the parent next."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Established:
    """The parent granted the request; its bound address (BND.ADDR/PORT; for SOCKS5
    UDP ASSOCIATE the relay to send datagrams to; ("0.0.0.0", 0) where the protocol gives none)."""

    host: str
    port: int


def format_hostport(host: str, port: int) -> str:
    """`host:port`, with IPv6 addresses in brackets as URLs and logs write them."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


MAX_NAME_LENGTH: Final = 255  # what SOCKS5 can carry; the resolver refuses beyond 253


def check_hostname(host: str) -> str:
    """`host` if a resolver can be asked for it, else ValueError.

    The resolver would stop at a NUL (and so look up another name than the one
    logged and checked), and IDNA encoding fails on empty or over-long labels.
    """
    if not host or len(host.rstrip(".")) > MAX_NAME_LENGTH:
        raise ValueError("host name is empty or longer than 255 characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in host):
        raise ValueError("host name contains spaces or control characters")
    try:
        host.encode("idna")
    except UnicodeError:
        raise ValueError("host name has an empty or over-long label") from None
    return host
