"""proxyd.rules without sockets: matching, order, defaults, address filtering."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from proxyd.errors import Denied
from proxyd.rules import Request, Rule, Rules, allowed_addresses, naming, parse_rules


def rules(*tables: dict[str, object], default_allow: bool = True) -> Rules:
    problems: list[str] = []
    parsed = parse_rules(list(tables), problems)
    assert problems == []
    return Rules(parsed, default_allow)


def request(**changes: object) -> Request:
    base: dict[str, object] = {
        "client": "192.0.2.10",
        "user": None,
        "protocol": "socks5",
        "command": "connect",
        "host": "www.example.com",
        "port": 443,
    }
    base.update(changes)
    return Request(**base)  # type: ignore[arg-type]


def verdict(r: Rules, address: str | None = None, **changes: object) -> tuple[bool, int | None]:
    d = r.decide(request(**changes), r.address_of(address) if address else None)
    return d.allowed, d.rule


def test_no_rules_allow_and_the_default_can_deny() -> None:
    assert rules().trivial
    assert verdict(rules()) == (True, None)
    assert verdict(rules(default_allow=False)) == (False, None)


def test_first_match_wins() -> None:
    r = rules(
        {"action": "deny", "ports": [25]},
        {"action": "allow", "ports": ["1-1024"]},
        default_allow=False,
    )
    assert verdict(r, port=25) == (False, 0)
    assert verdict(r, port=80) == (True, 1)
    assert verdict(r, port=8080) == (False, None)


@pytest.mark.parametrize(
    ("table", "matching", "other"),
    [
        ({"clients": ["192.0.2.0/24"]}, {}, {"client": "198.51.100.1"}),
        ({"clients": ["2001:db8::/32"]}, {"client": "2001:db8::5"}, {}),
        ({"users": ["alice"]}, {"user": "alice"}, {"user": "bob"}),
        ({"users": ["alice"]}, {"user": "alice"}, {"user": None}),
        ({"protocols": ["http"]}, {"protocol": "http"}, {}),
        ({"commands": ["GET", "udp_associate"]}, {"command": "get"}, {"command": "POST"}),
        ({"commands": ["connect"]}, {}, {"command": "bind"}),
        (  # a name in a rule is made canonical at load, as the parsers make targets
            {"destinations": ["WWW.Example.COM."]},
            {"host": "www.example.com"},
            {"host": "example.com"},
        ),
        ({"destinations": ["*.example.com"]}, {"host": "a.b.example.com"}, {"host": "example.com"}),
        ({"destinations": ["*.example.com"]}, {}, {"host": "badexample.com"}),
        ({"ports": [443, "8000-8999"]}, {"port": 8500}, {"port": 9000}),
    ],
)
def test_each_key(
    table: dict[str, object], matching: dict[str, object], other: dict[str, object]
) -> None:
    r = rules({"action": "deny", **table})
    assert verdict(r, **matching) == (False, 0)
    assert verdict(r, **other) == (True, None)


def test_destination_cidrs_need_the_address() -> None:
    r = rules({"action": "deny", "destinations": ["10.0.0.0/8", "fd00::/8"]})
    assert r.need_addresses
    assert verdict(r, "10.1.2.3", host="internal.example") == (False, 0)
    assert verdict(r, "::ffff:10.1.2.3", host="mapped.example") == (False, 0)
    assert verdict(r, "fd12::1", host="v6.example") == (False, 0)
    assert verdict(r, "192.0.2.1", host="public.example") == (True, None)
    assert verdict(r, None, host="unresolved.example") == (True, None)


def test_only_allowed_addresses_are_kept() -> None:
    r = rules({"action": "deny", "destinations": ["127.0.0.2/32"]})
    resolved = [
        (socket.AF_INET, ("127.0.0.2", 80)),
        (socket.AF_INET, ("127.0.0.1", 80)),
    ]
    assert allowed_addresses(r, request(host="mixed.test", port=80), resolved) == (
        [(socket.AF_INET, ("127.0.0.1", 80))],
        None,
        None,  # the default action allowed it
    )
    with pytest.raises(Denied) as info:
        allowed_addresses(r, request(host="mixed.test", port=80), resolved[:1])
    assert info.value.rule == 0
    assert info.value.socks_reply == 0x02 and info.value.http_status == 403


def test_an_association_meets_only_the_rules_without_destinations() -> None:
    """UDP ASSOCIATE names the client's own address, not a destination: destination
    and port rules are for its datagrams, the others decide about the association."""
    association = Request("192.0.2.9", "bob", "socks5", "udp_associate", "0.0.0.0", 0)
    rules = Rules(
        [
            Rule(allow=False, networks=(ipaddress.ip_network("0.0.0.0/8"),)),
            Rule(allow=True, ports=((53, 53),)),
        ],
        default_allow=False,
    )
    rules.check_without_destination(association)  # neither rule is about who asks
    with pytest.raises(Denied):
        rules.check(association)  # what judging the request's own DST would have done
    by_user = Rules([Rule(allow=False, users=frozenset({"bob"}))])
    with pytest.raises(Denied) as denied:
        by_user.check_without_destination(association)
    assert denied.value.rule == 0
    allowed_first = Rules(
        [Rule(allow=True, clients=(ipaddress.ip_network("192.0.2.0/24"),)), Rule(allow=False)]
    )
    allowed_first.check_without_destination(association)


def test_the_deciding_rule_routes() -> None:
    r = rules(
        {"action": "allow", "destinations": ["*.internal"], "via": "direct"},
        {"action": "allow", "ports": [443], "via": "parents"},
        {"action": "deny", "destinations": ["10.0.0.0/8"]},
    )
    assert r.check(request(host="db.internal")).via is None
    assert r.check(request(host="www.example.com", port=443)).via == "parents"
    assert r.check(request(host="www.example.com", port=80)).via is None  # the default
    # a name meets the address rules once resolved, unless a rule before them decides
    # whatever its addresses; an address at once
    assert r.check_before_lookup(request(host="www.example.com", port=80)) is None
    decision = r.check_before_lookup(request(host="www.example.com", port=443))
    assert decision is not None and decision.via == "parents" and decision.rule == 1
    decision = r.check_before_lookup(request(host="192.0.2.1", port=443))
    assert decision is not None and decision.via == "parents"


def test_resolved_addresses_keep_the_first_allowed_route() -> None:
    r = rules(
        {"action": "deny", "destinations": ["127.0.0.2/32"]},
        {"action": "allow", "destinations": ["127.0.0.3/32"], "via": "parents"},
    )
    resolved = [
        (socket.AF_INET, ("127.0.0.2", 80)),  # denied
        (socket.AF_INET, ("127.0.0.3", 80)),  # allowed, via parents: decides the route
        (socket.AF_INET, ("127.0.0.1", 80)),  # allowed, direct: another route, left out
    ]
    assert allowed_addresses(r, request(host="mixed.test", port=80), resolved) == (
        [(socket.AF_INET, ("127.0.0.3", 80))],
        "parents",
        1,
    )


@pytest.mark.parametrize(
    "table, problem",
    [
        ({"action": "allow", "via": 3}, 'rules[0].via: must be an [[upstreams]] name or "direct"'),
        ({"action": "allow", "via": ""}, "rules[0].via: must be"),
        ({"action": "deny", "via": "parents"}, "rules[0].via: only an allow rule routes"),
    ],
)
def test_bad_via(table: dict[str, object], problem: str) -> None:
    problems: list[str] = []
    parse_rules([table], problems)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_names_in_rules_are_made_canonical_at_load() -> None:
    """A rule names a destination in the one form the parsers give every target
    (UTS #46: folded width and case, ideographic dots, no trailing dot, ASCII)."""
    (rule,) = parse_rules(
        [
            {
                "action": "deny",
                "destinations": [
                    "ＬＯＣＡＬＨＯＳＴ",  # noqa: RUF001 (the look-alike is the point)
                    "metadata\u3002google\uff0einternal.",
                    "*.ＩＮＴＥＲＮＡＬ",  # noqa: RUF001
                    "Bücher.Example",
                ],
            }
        ],
        [],
    )
    assert rule.names == {"localhost", "metadata.google.internal", "xn--bcher-kva.example"}
    assert rule.suffixes == (".internal",)


@pytest.mark.parametrize("name", ["a..b", "*", "*.", "a.*.b", "a b", "evil\\x", "xn--localhost-"])
def test_a_name_that_cannot_be_mapped_is_a_config_problem(name: str) -> None:
    problems: list[str] = []
    parse_rules([{"action": "deny", "destinations": [name]}], problems)
    assert len(problems) == 1 and problems[0].startswith("rules[0].destinations[0]: "), problems


@pytest.mark.parametrize(
    ("cidr", "names"),
    [
        ("10.0.0.0/8", True),  # inside a private network
        ("169.254.169.254/32", True),
        ("fc00::/7", True),
        ("203.0.113.7/32", True),  # narrow: the host's own public address
        ("2001:db8:1::/48", True),
        ("0.0.0.0/0", False),  # "anywhere" covers private networks without naming them
        ("::/0", False),
        ("0.0.0.0/1", False),
        ("8.0.0.0/5", False),
        ("2001:db8::/32", False),
    ],
)
def test_only_a_private_or_narrow_cidr_names_private_destinations(cidr: str, names: bool) -> None:
    assert naming(ipaddress.ip_network(cidr)) is names
