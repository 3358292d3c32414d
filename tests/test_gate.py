"""proxyd.gate without a network: the limits, the credentials and the rules as every
protocol meets them, and the route (addresses that may be dialled, the group) they
give. Names come from the resolver's own cache, filled here, so no lookup is made."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from proxyd import gate
from proxyd.auth import Authenticator, PasswordHash, hash_password
from proxyd.chain import Upstreams
from proxyd.config import Config, from_mapping
from proxyd.context import Conn, Context
from proxyd.dial import Route
from proxyd.dns import Resolver
from proxyd.errors import AuthFailed, Denied, OverLimit, ProtocolError, SessionError, Status
from proxyd.log import get_logger
from proxyd.protocols.common import Credentials
from proxyd.rules import Rules

V4 = socket.AF_INET
GROUP = {"name": "p", "servers": ["socks5://127.0.0.1:1"]}


def context(
    data: dict[str, Any] | None = None, users: dict[str, PasswordHash] | None = None
) -> Context:
    config: Config = from_mapping(data or {})
    resolver = Resolver(threads=1)
    log = get_logger()
    rules = Rules(config.rules, default_allow=config.server.default_action == "allow")
    return Context(
        config, Authenticator(users or {}), resolver, log, Upstreams(resolver, log), rules
    )


def conn(protocol: str = "socks5", user: str | None = None) -> Conn:
    c = Conn(1, ("127.0.0.1", 40000))
    c.protocol, c.user = protocol, user
    return c


def decide(
    ctx: Context, target: tuple[str, int], command: str = "connect", **kwargs: Any
) -> tuple[Route | None, SessionError | None]:
    """Run gate.decide inside a loop: what it decided (at once here, without a lookup)."""
    found: list[tuple[Route | None, SessionError | None]] = []

    async def run() -> None:
        who = kwargs.pop("who", None) or conn()
        try:
            outcome = gate.decide(ctx, who, command, *target, lambda r, e: None, **kwargs)
        except SessionError as exc:
            found.append((None, exc))
            return
        assert isinstance(outcome, Route), "decided without a lookup"
        found.append((outcome, None))

    asyncio.run(run())
    assert len(found) == 1
    return found[0]


def remember(ctx: Context, name: str, *ips: str) -> None:
    ctx.resolver._remember(name, [(V4, (ip, 0)) for ip in ips], 60.0)


def test_no_rules_route_direct_and_leave_the_lookup_to_the_dial() -> None:
    route, error = decide(context(), ("example.test", 80))
    assert error is None and route is not None
    assert (route.host, route.port, route.addresses, route.via) == ("example.test", 80, None, None)


def test_a_datagram_comes_resolved_even_without_rules() -> None:
    ctx = context()
    remember(ctx, "dns.test", "127.0.0.53")
    route, _ = decide(ctx, ("dns.test", 53), "udp_associate", need_addresses=True)
    assert route is not None and route.addresses == [(V4, ("127.0.0.53", 53))]


def test_default_deny_names_no_rule_and_an_allow_rule_its_index() -> None:
    ctx = context(
        {
            "server": {"default_action": "deny"},
            "rules": [
                {"action": "deny", "destinations": ["127.0.0.9"]},
                {"action": "allow", "destinations": ["127.0.0.0/8"]},
            ],
        }
    )
    route, error = decide(ctx, ("127.0.0.1", 80))
    assert error is None and route is not None and route.rule == 1
    _, error = decide(ctx, ("127.0.0.9", 80))
    assert isinstance(error, Denied) and error.rule == 0
    _, error = decide(ctx, ("10.0.0.1", 80))
    assert isinstance(error, Denied) and error.rule is None and error.status is Status.DENIED


def test_address_rules_leave_only_the_allowed_addresses_of_a_name_to_dial() -> None:
    ctx = context({"rules": [{"action": "deny", "destinations": ["10.0.0.0/8"]}]})
    remember(ctx, "both.test", "10.1.2.3", "127.0.0.7")
    route, error = decide(ctx, ("both.test", 443))
    assert error is None and route is not None
    assert route.addresses == [(V4, ("127.0.0.7", 443))]
    remember(ctx, "inside.test", "10.1.2.3")
    _, error = decide(ctx, ("inside.test", 443))
    assert isinstance(error, Denied) and error.rule == 0


def test_a_route_found_by_a_lookup_names_the_rule_that_allowed_it() -> None:
    """What the access line's `rule` and `proxyd explain` read, after address rules
    judged a name's addresses as much as before."""
    ctx = context(
        {
            "rules": [
                {"action": "deny", "destinations": ["10.0.0.0/8"]},
                {"action": "allow", "destinations": ["127.0.0.0/8"], "ports": [443]},
                {"action": "allow", "destinations": ["by.name.test"]},
            ]
        }
    )
    remember(ctx, "both.test", "10.1.2.3", "127.0.0.7")
    route, _ = decide(ctx, ("both.test", 443))
    assert route is not None and route.rule == 1
    route, _ = decide(ctx, ("both.test", 80))  # the default action
    assert route is not None and route.rule is None
    remember(ctx, "by.name.test", "127.0.0.8")
    route, _ = decide(ctx, ("by.name.test", 80), "udp_associate", need_addresses=True)
    assert route is not None and route.rule == 2 and route.addresses is not None


def test_a_name_rule_decides_before_any_lookup() -> None:
    """No cache entry and no resolver answer: it must decide without asking."""
    ctx = context(
        {"rules": [{"action": "deny", "destinations": ["*.blocked.test"]}, {"action": "allow"}]}
    )
    _, error = decide(ctx, ("www.blocked.test", 80))
    assert isinstance(error, Denied) and error.rule == 0


def test_a_rule_routes_through_its_group_and_bind_is_refused_a_group() -> None:
    ctx = context({"upstreams": [GROUP], "rules": [{"action": "allow", "via": "p"}]})
    route, _ = decide(ctx, ("127.0.0.1", 80))
    assert route is not None and route.via == "p"
    _, error = decide(ctx, ("127.0.0.1", 80), "bind", need_addresses=True)
    assert isinstance(error, ProtocolError) and error.status is Status.UNSUPPORTED


def test_rules_see_the_user_protocol_and_command() -> None:
    ctx = context(
        {
            "server": {"default_action": "deny"},
            "rules": [{"action": "allow", "users": ["alice"], "protocols": ["http"]}],
        }
    )
    route, _ = decide(ctx, ("127.0.0.1", 80), "GET", who=conn("http", "alice"))
    assert route is not None
    _, error = decide(ctx, ("127.0.0.1", 80), who=conn("socks5", "alice"))
    assert isinstance(error, Denied)
    _, error = decide(ctx, ("127.0.0.1", 80), "GET", who=conn("http", "bob"))
    assert isinstance(error, Denied)


def test_a_udp_association_is_refused_only_by_rules_without_destinations() -> None:
    ctx = context(
        {
            "rules": [
                {"action": "deny", "destinations": ["127.0.0.0/8"]},
                {"action": "deny", "users": ["mallory"]},
            ]
        }
    )
    gate.check_association(ctx, conn(user="alice"), "0.0.0.0", 0)
    with pytest.raises(Denied):
        gate.check_association(ctx, conn(user="mallory"), "0.0.0.0", 0)


def test_the_route_refuses_this_daemon_in_every_form() -> None:
    ctx = context()
    ctx.destinations.own_ports = frozenset({1080, 9100})  # a listener, the metrics one
    route, _ = decide(ctx, ("example.test", 80))
    assert route is not None and route.refuse is not None
    for ip in (
        "127.0.0.1",
        "127.9.9.9",
        "0.0.0.0",
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:0.0.0.0",
        "64:ff9b::7f00:1",
        "0:0:0:0:0:ffff:7f00:0001",
    ):
        for port in (1080, 9100):
            denied = route.refuse(ip, port)
            assert isinstance(denied, Denied) and denied.code == "own_listener", (ip, port)
            assert "own listener" in str(denied)
    # the host's own addresses, as the kernel lists them, at any of our ports
    for address in ctx.destinations.host():
        assert route.refuse(str(address), 1080) is not None, address
    assert route.refuse("127.0.0.1", 1081) is None  # not our port
    assert route.refuse("192.0.2.1", 1080) is None  # not this host


def exposed(data: dict[str, Any] | None = None) -> Context:
    ctx = context(data)
    ctx.destinations.deny_private = True  # as the server sets it for an exposed daemon
    return ctx


PRIVATE_TARGETS = [
    "127.0.0.1",
    "10.1.2.3",
    "169.254.169.254",
    "::1",
    "fe80::1",
    "::ffff:10.0.0.1",
    "64:ff9b::a9fe:a9fe",
    "100.64.0.1",
    "0.0.0.0",
]


@pytest.mark.parametrize("ip", PRIVATE_TARGETS)
def test_an_exposed_daemon_refuses_private_destinations_as_it_dials(ip: str) -> None:
    route, error = decide(exposed(), (ip, 80))  # decided at once; the dial applies the check
    assert error is None and route is not None and route.refuse is not None
    denied = route.refuse(ip, 80)
    assert isinstance(denied, Denied) and denied.code == "private_destination"
    assert denied.fields() == {"rule": None, "reason": "private_destination"}
    assert route.refuse("192.0.2.10", 80) is None  # a public address passes


def test_a_name_is_judged_by_the_addresses_it_resolves_to() -> None:
    ctx = exposed()
    remember(ctx, "inside.test", "10.0.0.5")
    remember(ctx, "both.test", "10.0.0.5", "192.0.2.7")
    # a datagram (addresses needed): the gate screens what it found
    _, error = decide(ctx, ("inside.test", 53), "udp_associate", need_addresses=True)
    assert isinstance(error, Denied) and error.code == "private_destination"
    route, error = decide(ctx, ("both.test", 53), "udp_associate", need_addresses=True)
    assert error is None and route is not None
    assert [a[1][0] for a in route.addresses or []] == ["192.0.2.7"]


def test_only_a_rule_naming_the_destination_lets_a_private_one_through() -> None:
    ctx = exposed(
        {
            "rules": [
                {"action": "allow", "destinations": ["10.0.0.0/24"]},
                {"action": "allow", "destinations": ["db.test"]},
                {"action": "allow"},  # a catch-all allow does not
            ]
        }
    )
    remember(ctx, "db.test", "10.9.0.1")
    remember(ctx, "other.test", "10.9.0.1", "10.0.0.7")
    route, _ = decide(ctx, ("10.0.0.9", 5432))
    assert route is not None and route.refuse is not None and route.refuse("10.0.0.9", 5432) is None
    route, _ = decide(ctx, ("db.test", 5432))
    assert route is not None and route.refuse is not None and route.refuse("10.9.0.1", 5432) is None
    route, _ = decide(ctx, ("10.1.0.9", 5432))  # by the catch-all: refused as it is dialled
    assert route is not None and route.refuse is not None
    assert route.refuse("10.1.0.9", 5432) is not None
    # a name: each address on its own; only the one a CIDR names is left
    route, error = decide(ctx, ("other.test", 5432))
    assert error is None and route is not None
    assert [a[1][0] for a in route.addresses or []] == ["10.0.0.7"]
    # never the daemon itself, even when a rule names it
    ctx.destinations.own_ports = frozenset({1080})
    route, _ = decide(ctx, ("10.0.0.9", 1080))
    assert route is not None and route.refuse is not None
    assert route.refuse("127.0.0.1", 1080) is not None


def test_a_bind_for_any_peer_screens_each_peer() -> None:
    route, error = decide(exposed(), ("0.0.0.0", 0), "bind", need_addresses=True)
    assert error is None and route is not None and route.refuse is not None
    assert route.refuse("10.0.0.1", 0) is not None and route.refuse("192.0.2.1", 0) is None


def test_a_denial_by_name_does_not_depend_on_whether_the_name_exists() -> None:
    ctx = context(
        {
            "rules": [
                {"action": "allow", "destinations": ["192.0.2.0/24"]},
                {"action": "deny", "destinations": ["*.internal"]},
                {"action": "deny", "destinations": ["203.0.113.0/24"]},
            ]
        }
    )
    ctx.resolver._remember("gone.internal", socket.gaierror(socket.EAI_NONAME, "no"), 60.0)
    ctx.resolver._remember("gone.example", socket.gaierror(socket.EAI_NONAME, "no"), 60.0)
    remember(ctx, "here.internal", "198.51.100.1")
    for name in ("gone.internal", "here.internal"):
        _, error = decide(ctx, (name, 80))
        assert isinstance(error, Denied) and error.rule == 1, name
    _, error = decide(ctx, ("gone.example", 80))  # allowed but for its lookup
    assert error is not None and error.status is Status.UNREACHABLE
    # a name no address rule could allow is denied before any lookup
    ctx = context(
        {
            "server": {"default_action": "deny"},
            "rules": [
                {"action": "deny", "destinations": ["*.internal"]},
                {"action": "allow", "destinations": ["192.0.2.0/24"]},
            ],
        }
    )
    _, error = decide(ctx, ("never.internal", 80))
    assert isinstance(error, Denied) and error.rule == 0


def test_limits_count_a_client_until_it_ends() -> None:
    ctx = context({"limits": {"per_client": 1, "per_user": 1}})
    first, second = conn(), conn()
    assert not gate.over_per_client(ctx, "127.0.0.1")
    one = gate.Admission(ctx, first, None)
    # the next one is closed at accept; a balancer's client over it is refused once named
    assert gate.over_per_client(ctx, "127.0.0.1")
    assert not gate.over_per_client(ctx, "127.0.0.2")
    with pytest.raises(OverLimit, match="per_client"):
        gate.Admission(ctx, second, None)
    assert one.refusal is None
    one.request_complete("alice")
    other = gate.Admission(ctx, Conn(2, ("127.0.0.2", 40000)), None)
    with pytest.raises(OverLimit, match="per_user"):
        other.request_complete("alice")
    other.release()
    assert ctx.per_user == {"alice": 1} and ctx.per_client == {"127.0.0.1": 1}
    one.release()
    one.release()  # once
    assert ctx.per_user == {} and ctx.per_client == {}


def test_a_balancers_client_is_counted_once_its_header_names_it() -> None:
    ctx = context({"server": {"proxy_protocol_from": ["127.0.0.0/8"]}, "auth": {}})
    admission = gate.Admission(ctx, conn(), None)
    assert admission.awaits_header and ctx.per_client == {}


def test_credentials_are_required_by_every_protocol_and_socks4_needs_leave() -> None:
    users = {"alice": PasswordHash.parse(hash_password("secret", log_n=4))}
    ctx = context(users=users)
    with pytest.raises(AuthFailed, match="credentials required"):
        gate.authenticate(ctx, conn("http"), None, None)
    with pytest.raises(AuthFailed, match="allow_socks4"):
        gate.authenticate(ctx, conn("socks4"), None, None)
    ctx.config = from_mapping({"auth": {"allow_socks4": True}})
    assert gate.authenticate(ctx, conn("socks4"), None, None) is None

    async def verify(password: str) -> str | None:
        who = conn("socks5")
        await gate.verify(ctx, who, None, Credentials("alice", password))
        return who.user

    assert asyncio.run(verify("secret")) == "alice"
    with pytest.raises(AuthFailed, match="wrong"):
        asyncio.run(verify("guess"))
    ctx.auth.close()


def test_no_users_no_credentials() -> None:
    assert gate.authenticate(context(), conn(), None, None) is None
