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


def test_the_route_refuses_our_own_listeners() -> None:
    ctx = context()
    ctx.listening.append(("0.0.0.0", 1080))
    route, _ = decide(ctx, ("example.test", 80))
    assert route is not None and route.refuse is not None
    assert route.refuse("127.0.0.1", 1080) and route.refuse("0.0.0.0", 1080)
    assert not route.refuse("127.0.0.1", 1081)


def test_limits_count_a_client_until_it_ends() -> None:
    ctx = context({"limits": {"per_client": 1, "per_user": 1}})
    first, second = conn(), conn()
    one = gate.Admission(ctx, first, None)
    two = gate.Admission(ctx, second, None)
    assert one.refusal is None and two.refusal is not None and "per_client" in two.refusal
    with pytest.raises(OverLimit):
        two.request_complete(None)
    two.release()
    one.request_complete("alice")
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
