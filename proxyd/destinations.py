"""The host's own network as a destination: the daemon itself, the host's addresses
and the private ranges, always judged on parsed addresses, never on their text.

An address is judged as what it reaches: `::ffff:127.0.0.1` (IPv4-mapped) and
`64:ff9b::7f00:1` (NAT64) are 127.0.0.1. The host's addresses come from the
kernel's list (netlink), read again when older than a few seconds, so an address
that DHCP or an operator adds later is the host's too.

The gate asks here, on every address it or the dial is about to connect to; only
the gate decides when a private address may pass (an allow rule naming it).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Iterable
from typing import Final

from proxyd.errors import Denied
from proxyd.protocols.common import format_hostport

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Never a destination for clients of an exposed daemon, unless a rule names them:
# this host, its networks, and what is not a host on the Internet.
PRIVATE_NETWORKS: Final = tuple(
    ipaddress.ip_network(text)
    for text in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the host itself
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local: cloud metadata (169.254.169.254)
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
        "::/128",
        "::1/128",
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "ff00::/8",  # multicast
    )
)
NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: IPv4 in IPv6, translated

_V4: Final = tuple(
    (int(n.network_address), int(n.netmask)) for n in PRIVATE_NETWORKS if n.version == 4
)
_V6: Final = tuple(
    (int(n.network_address), int(n.netmask)) for n in PRIVATE_NETWORKS if n.version == 6
)
_NAT64: Final = (int(NAT64.network_address), int(NAT64.netmask))
_MAPPED: Final = 0xFFFF << 32  # ::ffff:0:0/96
REFRESH: Final = 5.0  # seconds the host's address list is trusted before it is read again


def parse(text: str) -> IPAddress | None:
    """The address `text` names (a zone index such as %eth0 dropped), as what it
    reaches: IPv4-mapped and NAT64 IPv6 addresses as their IPv4 address. None for a
    name."""
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    return unwrap(address)


def unwrap(address: IPAddress) -> IPAddress:
    """An IPv4-mapped or NAT64 IPv6 address as its IPv4 address; any other unchanged."""
    if address.version == 6:
        value = int(address)
        if value >> 32 == 0xFFFF or value & _NAT64[1] == _NAT64[0]:
            return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return address


def is_private(address: IPAddress) -> bool:
    """Whether the (unwrapped) address is in PRIVATE_NETWORKS."""
    value = int(address)
    ranges = _V4 if address.version == 4 else _V6
    return any(value & mask == network for network, mask in ranges)


def host_addresses() -> frozenset[IPAddress]:
    """Every address of this host's interfaces, as the kernel lists them (an
    RTM_GETADDR dump over netlink; the standard library has no call for it). Empty
    when netlink is not there: loopback and the unspecified addresses are judged
    without it."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
            sock.settimeout(1.0)
            sock.bind((0, 0))
            # nlmsghdr (length, type, flags, seq, pid) + ifaddrmsg for every family
            request = struct.pack("=IHHII", 24, _RTM_GETADDR, _NLM_F_DUMP_REQUEST, 1, 0)
            sock.send(request + struct.pack("=BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0))
            found: set[IPAddress] = set()
            while True:
                data = sock.recv(1 << 16)
                if not data or not _parse_addresses(data, found):
                    return frozenset(found)
    except OSError:
        return frozenset()


_RTM_NEWADDR: Final = 20
_RTM_GETADDR: Final = 22
_NLM_F_DUMP_REQUEST: Final = 0x1 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
_NLMSG_DONE: Final = 3
_NLMSG_ERROR: Final = 2
_IFA_ADDRESS: Final = 1
_IFA_LOCAL: Final = 2  # on a point-to-point link IFA_ADDRESS is the peer's; this is ours


def _parse_addresses(data: bytes, found: set[IPAddress]) -> bool:
    """Add the addresses of one netlink read to `found`; False once the dump is over."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16 or kind in (_NLMSG_DONE, _NLMSG_ERROR):
            return False
        if kind == _RTM_NEWADDR:
            attributes: dict[int, bytes] = {}
            at, end = offset + 24, offset + length  # past nlmsghdr (16) and ifaddrmsg (8)
            while at + 4 <= end:
                size, attribute = struct.unpack_from("=HH", data, at)
                if size < 4:
                    break
                attributes[attribute] = data[at + 4 : at + size]
                at += (size + 3) & ~3
            raw = attributes.get(_IFA_LOCAL) or attributes.get(_IFA_ADDRESS)
            if raw is not None and len(raw) in (4, 16):
                found.add(ipaddress.ip_address(raw))
        offset += (length + 3) & ~3
    return True


class Destinations:
    """What no client may make the daemon connect to on its own: the daemon itself
    (any address of this host at a port one of its listeners or the metrics listener
    has), and, when `deny_private`, the private networks and the host's addresses at
    any port. The gate hands one of its two checks to each route: `own` where a rule
    names the destination (or private ones are allowed), `private` otherwise."""

    __slots__ = ("_host", "_read_at", "deny_private", "own_ports")

    def __init__(self, deny_private: bool = False, own_ports: Iterable[int] = ()) -> None:
        self.deny_private = deny_private
        self.own_ports = frozenset(own_ports)
        self._host: frozenset[IPAddress] = frozenset()
        self._read_at = -REFRESH

    def host(self) -> frozenset[IPAddress]:
        """The host's addresses, read again when older than REFRESH seconds."""
        now = time.monotonic()
        if now - self._read_at >= REFRESH:
            self._host = frozenset(unwrap(a) for a in host_addresses())
            self._read_at = now
        return self._host

    def is_host(self, address: IPAddress) -> bool:
        """Whether the (unwrapped) address reaches this host."""
        return address.is_loopback or address.is_unspecified or address in self.host()

    def own(self, ip: str, port: int) -> Denied | None:
        """Denied when ip:port is this daemon (a loop through itself), else None."""
        if port in self.own_ports:
            address = parse(ip)
            if address is not None and self.is_host(address):
                why = f"{format_hostport(ip, port)} is this proxy's own listener"
                return Denied(None, why, code="own_listener")
        return None

    def private(self, ip: str, port: int) -> Denied | None:
        """`own`, and when private destinations are denied, Denied for them too."""
        if port in self.own_ports and (denied := self.own(ip, port)) is not None:
            return denied
        if self.deny_private and self.screens(ip):
            return private_denial(format_hostport(ip, port))
        return None

    def screens(self, ip: str) -> bool:
        """Whether `ip` is an address only a rule naming it may let through."""
        address = parse(ip)
        return address is not None and (is_private(address) or address in self.host())


def private_denial(target: str) -> Denied:
    return Denied(
        None,
        f"{target} is a private destination (server.private_destinations; "
        "an allow rule naming it in destinations lets it through)",
        code="private_destination",
    )
