"""proxyd.destinations: the private-address classifier against `ipaddress`, the
unwrapping of IPv4 in IPv6, and the host's addresses as the kernel lists them."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from proxyd.destinations import Destinations, host_addresses, is_private, parse

# The list, written out again here: the test does not read the module's own.
REFERENCE = [
    ipaddress.ip_network(n)
    for n in [
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
    ]
]


def reference(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address in ipaddress.ip_network("64:ff9b::/96"):
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return any(address in network for network in REFERENCE if network.version == address.version)


# addresses anywhere, IPv4 in IPv6 both ways, and near every boundary of the list
v4 = st.integers(0, (1 << 32) - 1).map(ipaddress.IPv4Address)
v6 = st.integers(0, (1 << 128) - 1).map(ipaddress.IPv6Address)
mapped = v4.map(lambda a: ipaddress.IPv6Address((0xFFFF << 32) | int(a)))
nat64 = v4.map(lambda a: ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(a)))
near = st.sampled_from(REFERENCE).flatmap(
    lambda n: st.integers(-3, 3).map(
        lambda d, n=n: ipaddress.ip_address(
            (int(n.broadcast_address if d > 0 else n.network_address) + d) % (1 << n.max_prefixlen)
        )
    )
)
addresses = (
    v4
    | v6
    | mapped
    | nat64
    | near
    | near.map(lambda a: ipaddress.IPv6Address((0xFFFF << 32) | int(a)) if a.version == 4 else a)
)


@given(addresses)
def test_the_classifier_agrees_with_ipaddress(address) -> None:
    unwrapped = parse(str(address))
    assert unwrapped is not None
    assert is_private(unwrapped) == reference(address), address


@given(v4)
def test_ipv4_in_ipv6_is_judged_as_its_ipv4_address(address) -> None:
    for form in (f"::ffff:{address}", f"64:ff9b::{address}", f"::FFFF:{address}"):
        assert parse(form) == address, form
    assert parse("fe80::1%eth0") == ipaddress.ip_address("fe80::1")


def test_a_name_is_not_an_address() -> None:
    assert parse("localhost") is None and parse("127.0.0.1.nip.io") is None


def test_the_host_addresses_are_the_kernels() -> None:
    found = host_addresses()
    assert ipaddress.ip_address("127.0.0.1") in found
    # every IPv6 address the kernel lists in /proc is there too
    inet6 = Path("/proc/net/if_inet6")
    if inet6.exists():
        for line in inet6.read_text().split():
            if len(line) == 32:
                assert ipaddress.IPv6Address(int(line, 16)) in found, line


def test_own_needs_one_of_our_ports_and_this_host() -> None:
    guard = Destinations(own_ports=[1080])
    assert guard.own("127.0.0.1", 1080) is not None
    assert guard.own("127.0.0.1", 1081) is None
    assert guard.own("203.0.113.9", 1080) is None
    assert guard.private("10.0.0.1", 80) is None  # not denied unless deny_private
    guard.deny_private = True
    denied = guard.private("10.0.0.1", 80)
    assert denied is not None and denied.code == "private_destination"
