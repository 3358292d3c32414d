"""Types and helpers shared by the protocol parsers."""

from __future__ import annotations

import functools
import ipaddress
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


def format_hostport(host: str, port: int) -> str:
    """`host:port`, with IPv6 addresses in brackets as URLs and logs write them."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Addresses as text and bytes without the socket module, yet exactly as inet_pton reads
# and glibc's inet_ntop writes them. Parsing and IPv6 text take 1 to 5 us in Python
# where those took 0.2, and the same addresses recur (our bound addresses, the
# parents', busy targets and peers): those two are cached.


@functools.lru_cache(maxsize=1024)
def packed_ip(host: str) -> bytes | None:
    """The 4 or 16 bytes of an IPv4 or IPv6 literal, or None for anything else (a name).

    Exactly the texts inet_pton reads: ipaddress would also take an IPv6 zone
    (`fe80::1%eth0`) and drop it, so such a text stays a name.
    """
    parts = host.split(".")
    if len(parts) == 4:
        try:
            packed = bytes([int(part) for part in parts])
        except ValueError:
            pass
        else:
            # int() also reads " 1", "+1", "1_0", "01" and other scripts' digits: only
            # a text written back the same is a dotted quad (ipaddress takes 1.7 us)
            return packed if ipv4_text(packed) == host else None
    if ":" in host and "%" not in host:
        try:
            return ipaddress.IPv6Address(host).packed
        except ValueError:
            pass
    return None


def ipv4_text(packed: bytes | bytearray, offset: int = 0) -> str:
    """The dotted quad of the 4 bytes at `offset`."""
    return f"{packed[offset]}.{packed[offset + 1]}.{packed[offset + 2]}.{packed[offset + 3]}"


_TEN_ZEROS: Final = bytes(10)


@functools.lru_cache(maxsize=1024)
def ipv6_text(packed: bytes) -> str:
    """The text of 16 bytes as glibc's inet_ntop writes it: ipaddress's RFC 5952 text,
    but with IPv4-mapped and IPv4-compatible addresses ending in dotted form, which
    ipaddress (before Python 3.13) writes in hex (::ffff:102:304)."""
    if packed[:10] == _TEN_ZEROS:
        if packed[10:12] == b"\xff\xff":
            return "::ffff:" + ipv4_text(packed, 12)
        if packed[10:12] == b"\0\0" and packed[12:14] != b"\0\0":
            return "::" + ipv4_text(packed, 12)
    return str(ipaddress.IPv6Address(packed))


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
