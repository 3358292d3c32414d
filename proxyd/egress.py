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

import bisect
import hashlib
import ipaddress
import itertools
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    # each family's usable addresses counted up network by network, for the pick
    _sums: dict[int, list[int]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for family, networks in ((socket.AF_INET, self.v4), (socket.AF_INET6, self.v6)):
            self._sums[family] = list(itertools.accumulate(_usable(n) for n in networks))

    def __hash__(self) -> int:
        return hash((self.v4, self.v6, self.interface, self.pick))

    @property
    def addressed(self) -> bool:
        """Whether it names addresses (else only a device)."""
        return bool(self.v4 or self.v6)

    def serves(self, family: int) -> bool:
        """Whether a connection of `family` may leave this way."""
        return not self.addressed or bool(self.v6 if family == socket.AF_INET6 else self.v4)

    def source(self, family: int, key: str) -> tuple[str, bool] | None:
        """The address a connection of `family` leaves from, and whether it is one of
        a CIDR (bound with FREEBIND); None: the kernel's choice (no address named at
        all). NoEgress when the family has none."""
        networks: Sequence[IPNetwork] = self.v6 if family == socket.AF_INET6 else self.v4
        if not networks:
            if self.addressed:
                kind = "IPv6" if family == socket.AF_INET6 else "IPv4"
                raise NoEgress(f"no {kind} egress address")
            return None
        sums = self._sums[family]
        if self.pick == "sticky":
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
            index = int.from_bytes(digest, "big") % sums[-1]
        else:
            index = random.randrange(sums[-1])
        at = bisect.bisect_right(sums, index)
        network = networks[at]
        address = _nth(network, index - (sums[at - 1] if at else 0))
        return str(address), network.num_addresses > 1

    def bind(self, sock: socket.socket, family: int, key: str) -> str | None:
        """Bind `sock` (not yet connected) where it leaves from; the address, or None
        when the kernel picks it. NoEgress when the family has none, EgressError when
        the host will not send from it (a fixed address it does not have, a device
        it does not know)."""
        if self.interface is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
            except OSError as exc:
                raise EgressError(f"egress_interface {self.interface}: {exc.strerror}") from None
        found = self.source(family, key)
        if found is None:
            return None
        address, free = found
        try:
            if free:  # an address of a CIDR: the prefix is routed here, not configured
                level = socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.IPPROTO_IP
                sock.setsockopt(
                    level, IPV6_FREEBIND if family == socket.AF_INET6 else IP_FREEBIND, 1
                )
            sock.bind((address, 0))
        except OSError as exc:
            raise EgressError(f"egress {address}: {exc.strerror}") from None
        return address


class EgressError(Exception):
    """A connection cannot leave the way the egress says."""


class NoEgress(EgressError):
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
    A CIDR must be well-formed (no bits set beyond its prefix), and each must be
    something a connection can come from: not the unspecified address, a multicast
    or broadcast one, an IPv4-mapped IPv6 one (name the IPv4 address) or a /0."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("must name at least one address or CIDR")
    networks: list[IPNetwork] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"must be an address or CIDR string, or a list of them, not {item!r}")
        try:
            network = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            raise ValueError(f"{item!r}: {exc}") from None
        if why := _unfit(network):
            raise ValueError(f"{item!r}: {why}")
        if any(network.overlaps(other) for other in networks):  # (same version only)
            raise ValueError(f"{item!r} overlaps another entry")
        networks.append(network)
    return tuple(networks)


def _unfit(network: IPNetwork) -> str | None:
    first = network.network_address
    if network.prefixlen == 0:
        return "a /0 is every address, not a way out"
    if first.is_unspecified:
        return "the unspecified address is no source"
    if first.is_multicast or str(first) == "255.255.255.255":
        return "a multicast or broadcast address is no source"
    if isinstance(first, ipaddress.IPv6Address) and first.ipv4_mapped is not None:
        return "an IPv4-mapped address: name the IPv4 address itself"
    return None


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
