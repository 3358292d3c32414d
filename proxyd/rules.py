"""Access rules: `[[rules]]` tables in order, the first that matches decides, else
`server.default_action`. Pure functions of a request and the target's addresses.

Destinations are matched by name (exact, or `*.example.com` for the names below
it) and by address (CIDRs). A name is resolved before the address rules are
checked, each of its addresses is judged on its own, and the connection may go
only to the addresses that were allowed: a name cannot be re-resolved into a
denied address between check and connect.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from proxyd import egress
from proxyd.destinations import PRIVATE_NETWORKS
from proxyd.errors import Denied
from proxyd.protocols.common import canonical_host

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ACTIONS: Final = ("allow", "deny")
PROTOCOLS: Final = ("socks5", "socks4", "http")
KEYS: Final = (
    "action",
    "clients",
    "users",
    "protocols",
    "commands",
    "destinations",
    "ports",
    "via",
    "egress",
    "egress_interface",
    "egress_pick",
)
DIRECT: Final = "direct"  # `via = "direct"`: connect to the target ourselves (the default)


@dataclass(frozen=True, slots=True)
class Request:
    """What a rule looks at; `command` as the access log writes it (connect, bind,
    udp_associate, or the HTTP method)."""

    client: str
    user: str | None
    protocol: str
    command: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Rule:
    allow: bool
    clients: tuple[IPNetwork, ...] | None = None
    users: frozenset[str] | None = None
    protocols: frozenset[str] | None = None
    commands: frozenset[str] | None = None  # lower case
    names: frozenset[str] | None = None  # exact destination names, lower case
    suffixes: tuple[str, ...] | None = None  # ".example.com" for "*.example.com"
    networks: tuple[IPNetwork, ...] | None = None  # destination CIDRs
    # the CIDRs among them that name what they hold (see `naming`): only these let a
    # private destination through
    naming: tuple[IPNetwork, ...] = ()
    ports: tuple[tuple[int, int], ...] | None = None
    via: str | None = None  # the [[upstreams]] group an allowed request goes through; None: direct
    # where what it allows leaves from (proxyd.egress); None: the server's egress
    egress: tuple[IPNetwork, ...] | None = None
    egress_interface: str | None = None
    egress_pick: str | None = None  # None: server.egress_pick

    @property
    def has_destinations(self) -> bool:
        return self.names is not None or self.suffixes is not None or self.networks is not None

    def matches(self, request: Request, address: IPAddress | None) -> bool:
        """Whether every key this rule sets matches; `address` is the target's IP (the
        host itself when it is one, else the resolved address under judgement)."""
        if not self.matches_beside_destination(request):
            return False
        if self.has_destinations:
            name = request.host  # canonical: the parsers map every name once
            by_name = (self.names is not None and name in self.names) or (
                self.suffixes is not None and name.endswith(self.suffixes)
            )
            by_address = (
                self.networks is not None
                and address is not None
                and _in_any(address, self.networks)
            )
            if not (by_name or by_address):
                return False
        return True

    def names_target(self, host: str, address: IPAddress | None) -> bool:
        """Whether this rule's destinations name the target, which a private one must
        be to be allowed: by a name or pattern, or by a CIDR that is no catch-all
        (see `naming`)."""
        return (
            (self.names is not None and host in self.names)
            or (self.suffixes is not None and host.endswith(self.suffixes))
            or (address is not None and _in_any(address, self.naming))
        )

    def matches_beside_destination(self, request: Request) -> bool:
        """Whether every key but `destinations` matches."""
        if self.clients is not None and not _in_any(_ip(request.client), self.clients):
            return False
        if self.users is not None and request.user not in self.users:
            return False
        if self.protocols is not None and request.protocol not in self.protocols:
            return False
        if self.commands is not None and request.command.lower() not in self.commands:
            return False
        return self.ports is None or any(low <= request.port <= high for low, high in self.ports)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: int | None  # index of the deciding rule; None: the default action
    via: str | None = None  # the upstream group to go through; None: direct
    # allowed by a rule that names the destination (a name, or a CIDR that is no
    # catch-all), which alone lets a private destination through
    explicit: bool = False


class Rules:
    def __init__(
        self,
        rules: Sequence[Rule] = (),
        default_allow: bool = True,
        default_egress: egress.Egress | None = None,
    ) -> None:
        self.rules = tuple(rules)
        self.default_allow = default_allow
        # where each rule's requests leave from: each of its egress keys it does not
        # set is the server's
        self.default_egress = default_egress
        self.egresses = tuple(_way_out(r, default_egress) for r in self.rules)
        # only address rules need a name resolved before the decision
        self.need_addresses = any(r.networks is not None for r in self.rules)

    def egress_for(self, rule: int | None) -> egress.Egress | None:
        """Where what `rule` (None: the default action) allows leaves from."""
        return self.default_egress if rule is None else self.egresses[rule]

    @property
    def trivial(self) -> bool:
        """No rules and allow by default: nothing to check."""
        return not self.rules and self.default_allow

    def decide(self, request: Request, address: IPAddress | None = None) -> Decision:
        for index, rule in enumerate(self.rules):
            if rule.matches(request, address):
                explicit = rule.allow and rule.names_target(request.host, address)
                return Decision(rule.allow, index, rule.via, explicit)
        return Decision(self.default_allow, None)

    def check(self, request: Request) -> Decision:
        """Judge the request by its host as given (a name is not resolved); Denied
        when the rules refuse it, else the decision (which says the route)."""
        decision = self.decide(request, self.address_of(request.host))
        if not decision.allowed:
            raise Denied(decision.rule)
        return decision

    def check_before_lookup(self, request: Request) -> Decision | None:
        """Decide what needs no lookup: Denied when refused, the decision when allowed,
        None when the host is a name whose addresses decide (an address rule could
        match it before any rule that matches it whatever its addresses)."""
        if self.need_addresses and self.address_of(request.host) is None:
            for rule in self.rules:
                if rule.matches(request, None):
                    break  # decided by the name, whatever it resolves to
                if rule.networks is not None and rule.matches_beside_destination(request):
                    return None
        return self.check(request)

    def check_unresolved(self, request: Request) -> None:
        """A name that did not resolve is judged without an address: Denied when the
        rules refuse it so, so that whether a denied name exists never shows."""
        decision = self.decide(request, None)
        if not decision.allowed:
            raise Denied(decision.rule)

    def check_without_destination(self, request: Request) -> None:
        """Judge a request that names no destination of its own (a UDP association,
        whose datagrams are each judged by `check`): only the rules that set neither
        destinations nor ports can refuse it, and when none of them matches it is
        allowed, its datagrams then meet the rest of the rules and the default."""
        for index, rule in enumerate(self.rules):
            if rule.has_destinations or rule.ports is not None:
                continue
            if rule.matches(request, None):
                if not rule.allow:
                    raise Denied(index)
                return

    @staticmethod
    def address_of(host: str) -> IPAddress | None:
        """The host as an address, when it is one."""
        return _ip(host)


AddrInfo = tuple[int, tuple[Any, ...]]  # (family, sockaddr), as upstream resolves them


def allowed_addresses(
    rules: Rules,
    request: Request,
    addresses: list[AddrInfo],
    screen: Callable[[str], bool] | None = None,
) -> tuple[list[AddrInfo], str | None, int | None]:
    """The addresses of a resolved name that the rules allow, each judged on its own,
    the route (`via`) of the first allowed one, which the others must share to be
    used (and its way out, `egress`), and the rule that allowed that one (None: the
    default action); Denied (with the first address's rule) when none is allowed.

    `screen(ip)`: addresses that only an allow rule naming them (`Decision.explicit`)
    lets through, directly or through a parent; when they were all that was
    allowed, the list is empty."""
    allowed: list[AddrInfo] = []
    first: Decision | None = None
    route: Decision | None = None
    screened = False
    for family, addr in addresses:
        decision = rules.decide(request, rules.address_of(addr[0]))
        first = first or decision
        if not decision.allowed:
            continue
        if not decision.explicit and screen is not None and screen(addr[0]):
            screened = True
            continue
        route = route or decision
        # only the addresses that go the same way: through the same parent, or
        # directly from the same egress
        same = rules.egress_for(decision.rule) == rules.egress_for(route.rule)
        if decision.via == route.via and same:
            allowed.append((family, addr))
    if route is None:
        if screened:
            return [], None, None
        raise Denied(first.rule if first is not None else None)
    return allowed, route.via, route.rule


def in_networks(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether the address `ip` is in any of `networks`."""
    return _in_any(_ip(ip), networks)


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _in_any(address: IPAddress | None, networks: tuple[IPNetwork, ...]) -> bool:
    if address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 to an IPv4 rule
    return any(address.version == n.version and address in n for n in networks)


# --- from the configuration -------------------------------------------------------


def parse_rules(value: Any, problems: list[str]) -> tuple[Rule, ...]:
    """`[[rules]]` into Rules; each problem is appended with its key path."""
    if not isinstance(value, list):
        problems.append("rules: must be an array of tables ([[rules]])")
        return ()
    rules = []
    for index, table in enumerate(value):
        rule = _parse_rule(table, f"rules[{index}]", problems)
        if rule is not None:
            rules.append(rule)
    return tuple(rules)


def _parse_rule(table: Any, path: str, problems: list[str]) -> Rule | None:
    if not isinstance(table, Mapping):
        problems.append(f"{path}: must be a table")
        return None
    before = len(problems)
    for key in table:
        if key not in KEYS:
            problems.append(f"{path}.{key}: unknown key (known: {', '.join(KEYS)})")
    action = table.get("action")
    if action not in ACTIONS:
        problems.append(f'{path}.action: must be "allow" or "deny", not {action!r}')
    clients = _list(table, "clients", path, problems, parse_network)
    users = _list(table, "users", path, problems, _text)
    protocols = _list(table, "protocols", path, problems, _protocol)
    commands = _list(table, "commands", path, problems, _command)
    destinations = _list(table, "destinations", path, problems, _destination)
    ports = _list(table, "ports", path, problems, _port_range)
    via = table.get("via")
    if via is not None and (not isinstance(via, str) or not via):
        problems.append(f'{path}.via: must be an [[upstreams]] name or "direct", not {via!r}')
    elif via is not None and action == "deny" and via != DIRECT:
        problems.append(f"{path}.via: only an allow rule routes; a denied request goes nowhere")
    ways_out = _egress_keys(table, path, problems)
    ways = ("egress", "egress_interface", "egress_pick")
    if action == "deny" and any(key in table for key in ways):
        problems.append(f"{path}.egress: only an allow rule says where a request leaves from")
    elif via not in (None, DIRECT) and any(key in table for key in ways):
        problems.append(
            f"{path}.egress: egress is where a direct connection leaves from; "
            "this rule routes through a parent proxy"
        )
    if len(problems) > before:
        return None
    names = suffixes = networks = None
    if destinations is not None:
        found_networks = [d for d in destinations if not isinstance(d, str)]
        found_names = [d for d in destinations if isinstance(d, str) and not d.startswith(".")]
        found_suffixes = [d for d in destinations if isinstance(d, str) and d.startswith(".")]
        names = frozenset(found_names) if found_names else None
        suffixes = tuple(found_suffixes) if found_suffixes else None
        networks = tuple(found_networks) if found_networks else None
    return Rule(
        allow=action == "allow",
        clients=tuple(clients) if clients is not None else None,
        users=frozenset(users) if users is not None else None,
        protocols=frozenset(protocols) if protocols is not None else None,
        commands=frozenset(commands) if commands is not None else None,
        names=names,
        suffixes=suffixes,
        networks=networks,
        naming=tuple(n for n in networks or () if naming(n)),
        ports=tuple(ports) if ports is not None else None,
        via=None if via in (None, DIRECT) else via,
        egress=ways_out[0],
        egress_interface=ways_out[1],
        egress_pick=ways_out[2],
    )


def _way_out(rule: Rule, server: egress.Egress | None) -> egress.Egress | None:
    if rule.egress is None and rule.egress_interface is None and rule.egress_pick is None:
        return server
    networks = rule.egress
    if networks is None:
        networks = (*server.v4, *server.v6) if server is not None else ()
    interface = rule.egress_interface
    if interface is None and server is not None:
        interface = server.interface
    pick = rule.egress_pick or (server.pick if server is not None else "random")
    return egress.make(networks, interface, pick)


def _egress_keys(
    table: Mapping[str, Any], path: str, problems: list[str]
) -> tuple[tuple[IPNetwork, ...] | None, str | None, str | None]:
    """A rule's `egress`, `egress_interface` and `egress_pick` (None where unset)."""
    found: list[Any] = [None, None, None]
    for index, (key, parse) in enumerate(
        (("egress", egress.parse), ("egress_interface", egress.parse_interface))
    ):
        if key in table:
            try:
                found[index] = parse(table[key])
            except ValueError as exc:
                problems.append(f"{path}.{key}: {exc}")
    pick = table.get("egress_pick")
    if pick is not None:
        if isinstance(pick, str) and pick.lower() in egress.PICKS:
            found[2] = pick.lower()
        else:
            problems.append(f"{path}.egress_pick: must be one of {', '.join(egress.PICKS)}")
    return found[0], found[1], found[2]


def _list(
    table: Mapping[str, Any], key: str, path: str, problems: list[str], parse: Any
) -> list[Any] | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, list) or not value:
        problems.append(f"{path}.{key}: must be a non-empty list")
        return None
    items = []
    for i, item in enumerate(value):
        try:
            items.append(parse(item))
        except ValueError as exc:
            problems.append(f"{path}.{key}[{i}]: {exc}")
    return items


def naming(network: IPNetwork) -> bool:
    """Whether a destination CIDR names the private addresses it holds: one that lies
    inside a private network (10.1.0.0/16, 169.254.169.254/32, fc00::/7), or a
    narrow one (an IPv4 /16 or an IPv6 /48 and narrower: the host's own public
    address, a DMZ). A wide one (0.0.0.0/0, ::/0, 0.0.0.0/1) merely covers them, as
    an "anywhere" rule for ports 80 and 443 does, and lets none through."""
    start = int(network.network_address)
    for private in PRIVATE_NETWORKS:
        if (
            private.version == network.version
            and private.prefixlen <= network.prefixlen
            and start & int(private.netmask) == int(private.network_address)
        ):
            return True
    return network.prefixlen >= (16 if network.version == 4 else 48)


def parse_network(item: Any) -> IPNetwork:
    if not isinstance(item, str):
        raise ValueError(f"must be a CIDR string, not {item!r}")
    try:
        return ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise ValueError(f"{item!r} is not an IP address or CIDR") from None


def _text(item: Any) -> str:
    if not isinstance(item, str) or not item:
        raise ValueError(f"must be a non-empty string, not {item!r}")
    return item


def _protocol(item: Any) -> str:
    if item not in PROTOCOLS:
        raise ValueError(f"must be one of {', '.join(PROTOCOLS)}, not {item!r}")
    return str(item)


def _command(item: Any) -> str:
    if not isinstance(item, str) or not item.replace("_", "").isalpha():
        raise ValueError(f"must be connect, bind, udp_associate or an HTTP method, not {item!r}")
    return item.lower()


def _destination(item: Any) -> IPNetwork | str:
    """A CIDR, an exact name, or `*.example.com` (returned as ".example.com")."""
    if not isinstance(item, str) or not item:
        raise ValueError(f"must be a CIDR, a name or *.name, not {item!r}")
    try:
        return ipaddress.ip_network(item, strict=False)
    except ValueError:
        pass
    wildcard = item.startswith("*.")
    try:  # the one form the parsers give every target name (UTS #46, ASCII)
        name = canonical_host(item[2:] if wildcard else item)
    except ValueError:
        raise ValueError(f"{item!r} is not a CIDR, a host name or a *.name pattern") from None
    return "." + name if wildcard else name


def _port_range(item: Any) -> tuple[int, int]:
    if type(item) is int:
        low = high = item
    elif isinstance(item, str) and item.strip().isdigit():
        low = high = int(item)
    elif isinstance(item, str) and item.count("-") == 1:
        low_text, high_text = item.split("-")
        if not (low_text.strip().isdigit() and high_text.strip().isdigit()):
            raise ValueError(f"{item!r} is not a port or a range like 8000-8999")
        low, high = int(low_text), int(high_text)
    else:
        raise ValueError(f"{item!r} is not a port or a range like 8000-8999")
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{item!r}: ports are 1-65535, the low end first")
    return low, high
