"""Types and helpers shared by the protocol parsers."""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Final

import idna


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


# One form of a target host, made where it is parsed: what the rules match, what is
# looked up, what a parent is sent and what the log shows. Without it a rule for
# `localhost` would take it in full-width letters, or ending in U+3002, for another
# name, which the resolver then folds to the very one denied. Names go through
# UTS #46 (the `idna` package: the stdlib codec, which the resolver call uses, is
# IDNA 2003), so width and case fold, ideographic full stops are dots and the result
# is ASCII (punycode). Labels that stay ASCII keep what hosts files and DNS carry
# beyond IDNA 2008: letters, digits, `-` and `_`.
_ASCII_LABEL: Final = r"[a-z0-9_-]{1,63}"
_ASCII_NAME: Final = re.compile(rf"(?:{_ASCII_LABEL}\.)*{_ASCII_LABEL}")
_ACE_PREFIX: Final = "xn--"


def canonical_host(host: str) -> str:
    """The canonical form of a target host: an IP literal as it is, a name mapped by
    UTS #46 to lower-case ASCII (punycode) without a trailing dot; ValueError for a
    name that cannot be mapped (invalid IDNA, an empty or over-long label, a space,
    a control character, anything beyond letters, digits, `-` and `_`, longer than
    255 characters)."""
    if host.isascii():
        # the common case, without the idna package: already ASCII, maybe in capitals
        name = host.lower()
        if name.endswith("."):
            name = name[:-1]
        if (
            len(name) <= MAX_NAME_LENGTH
            and _ASCII_NAME.fullmatch(name) is not None
            and _ACE_PREFIX not in name
        ):
            return name
    if packed_ip(host) is not None:
        return host
    return _mapped_name(host)


def _mapped_name(host: str) -> str:
    """UTS #46 processing (non-transitional, without the STD3 rules: `_` stays) of a
    name that the fast path did not take."""
    try:
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
    except (idna.IDNAError, UnicodeError):
        raise ValueError("host name has a character IDNA does not allow") from None
    if mapped.endswith("."):
        mapped = mapped[:-1]
    labels = []
    for label in mapped.split("."):
        if not label.isascii():
            try:
                label = idna.alabel(label).decode("ascii")
            except (idna.IDNAError, UnicodeError):
                raise ValueError("host name has a label IDNA does not allow") from None
        elif _ASCII_NAME.fullmatch(label) is None:
            raise ValueError(_label_problem(label))
        elif label.startswith(_ACE_PREFIX) and not _canonical_alabel(label):
            raise ValueError("host name has an invalid punycode (xn--) label")
        labels.append(label)
    name = ".".join(labels)
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError("host name is longer than 255 characters")
    return name  # (full-width digits may have made it an IP literal: so be it)


def _label_problem(label: str) -> str:
    """What is wrong with an ASCII label the pattern refused, for the log."""
    if not label:
        return "host name is empty or has an empty label"
    if len(label) > 63:
        return "host name has a label longer than 63 characters"
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in label):
        return "host name contains spaces or control characters"
    return "host name has a character beyond letters, digits, '-' and '_'"


def _canonical_alabel(label: str) -> bool:
    """Whether an `xn--` label is valid punycode of a valid name, in the one form
    UTS #46 would give it (so that no second spelling of a name gets through)."""
    try:
        return idna.alabel(idna.ulabel(label)).decode("ascii") == label
    except (idna.IDNAError, UnicodeError):
        return False
