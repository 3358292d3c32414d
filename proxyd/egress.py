"""Where a connection to a target leaves from: `egress` (addresses and CIDRs) and
`egress_interface`, in `[server]` as the default and in an allow rule for what it
allows.

A CIDR gives an address from it per connection, bound with IP_FREEBIND, so that a
routed IPv6 prefix works without every address configured on the host;
`egress_pick` says which: "random", or "sticky" (the same user, or client address
when there is no user, keeps the same one, by a hash that is the same in every
worker and after a restart). An address of the target's family is used; a
target of a family with no egress address is not connected to at all (never from
an address the operator did not name).
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PICKS: Final = ("random", "sticky")
# Linux's values: the socket module names neither on Python 3.11
IP_FREEBIND: Final = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND: Final = getattr(socket, "IPV6_FREEBIND", 78)
IFNAMSIZ: Final = 16  # a device name's bytes, its terminating zero included


@dataclass(frozen=True, slots=True)
class Egress:
    """One way out: the networks an address is taken from (a single address is a
    /32 or /128), by family, the device to send through, and how to pick."""

    v4: tuple[ipaddress.IPv4Network, ...] = ()
    v6: tuple[ipaddress.IPv6Network, ...] = ()
    interface: str | None = None
    pick: str = "random"

    @property
    def addressed(self) -> bool:
        """Whether it names addresses (else only a device)."""
        return bool(self.v4 or self.v6)

    def source(self, family: int, key: str) -> str | None:
        """The address a connection of `family` leaves from (None: the kernel's
        choice, when no address is named at all); NoEgress when the family has none."""
        networks: Sequence[IPNetwork] = self.v6 if family == socket.AF_INET6 else self.v4
        if not networks:
            if self.addressed:
                kind = "IPv6" if family == socket.AF_INET6 else "IPv4"
                raise NoEgress(f"no {kind} egress address")
            return None
        total = sum(_usable(n) for n in networks)
        if self.pick == "sticky":
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
            index = int.from_bytes(digest, "big") % total
        else:
            index = random.randrange(total)
        for network in networks:
            count = _usable(network)
            if index < count:
                return str(_nth(network, index))
            index -= count
        raise AssertionError("unreachable")  # (index < total)

    def bind(self, sock: socket.socket, family: int, key: str) -> str | None:
        """Bind `sock` (not yet connected) where it leaves from; the address, or None
        when the kernel picks it. NoEgress when the family has none."""
        if self.interface is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
        address = self.source(family, key)
        if address is None:
            return None
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((address, 0))
        return address


class NoEgress(Exception):
    """The target's family has no egress address."""


def _usable(network: IPNetwork) -> int:
    """Addresses a connection may leave from: an IPv4 network's own address and its
    broadcast address are left out (but for a /31 and a /32)."""
    if network.version == 4 and network.prefixlen < 31:
        return network.num_addresses - 2
    return network.num_addresses


def _nth(network: IPNetwork, index: int) -> Any:
    skip = 1 if network.version == 4 and network.prefixlen < 31 else 0
    return network.network_address + skip + index


def parse(value: Any) -> tuple[IPNetwork, ...]:
    """`egress`: an address, a CIDR, or a list of them; ValueError says what is wrong.
    A CIDR must be well-formed: no bits set beyond its prefix."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("must name at least one address or CIDR")
    networks = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"must be an address or CIDR string, or a list of them, not {item!r}")
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise ValueError(f"{item!r}: {exc}") from None
    return tuple(networks)


def parse_interface(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value.encode()) >= IFNAMSIZ:
        raise ValueError(f"must be a network device name (at most 15 bytes), not {value!r}")
    if "/" in value or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not a network device name")
    return value


def absent(networks: Sequence[IPNetwork], interface: str | None) -> list[tuple[str, str]]:
    """What of these is not on this host now: each fixed address that cannot be
    bound (a CIDR is bound with IP_FREEBIND, so it need not be), and the device when
    the kernel knows no such one. They may appear later: a warning, not an error.
    (key, what) pairs: `egress` or `egress_interface`, and what is wrong."""
    found = []
    for network in networks:
        if network.num_addresses != 1:
            continue
        family = socket.AF_INET6 if network.version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((str(network.network_address), 0))
            except OSError as exc:
                found.append(("egress", f"{network.network_address}: {exc.strerror}"))
    if interface is not None:
        try:
            socket.if_nametoindex(interface)
        except OSError:
            found.append(("egress_interface", f"{interface}: no such network device"))
    return found


def make(networks: Sequence[IPNetwork], interface: str | None, pick: str) -> Egress | None:
    """The Egress for these settings; None when they name nothing."""
    if not networks and interface is None:
        return None
    v4 = tuple(n for n in networks if isinstance(n, ipaddress.IPv4Network))
    v6 = tuple(n for n in networks if isinstance(n, ipaddress.IPv6Network))
    return Egress(v4, v6, interface, pick)
