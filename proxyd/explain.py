"""`proxyd explain`: what the daemon would do with one request, and why.

Nothing here decides: the request goes through proxyd.gate with a Context built
from the config as the daemon builds its own (context.build, context.guard), and
the answer (a Route, or the SessionError the daemon would refuse with) is only
described: the deciding rule with its lines from the config file, or the default
that decided; the addresses the name resolves to and those the dial would use
(the route's own check, as the dial applies it); the route; the limits and the
credentials that apply to the client and user.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from proxyd import accounting, books, context, gate
from proxyd.context import Conn, Context
from proxyd.dial import Route
from proxyd.egress import NoEgress
from proxyd.errors import AuthFailed, ConfigError, Denied, SessionError, UpstreamError
from proxyd.protocols.common import canonical_host, format_hostport, ipv6_text
from proxyd.settings import Settings

COMMANDS: Final = {
    "socks5": ("connect", "bind", "udp_associate"),
    "socks4": ("connect", "bind"),
    "http": ("connect",),  # or a method: a forwarded request
}
# the `[[rules]]` header, and any table header (the end of a rule's lines)
_RULES_HEADER: Final = re.compile(r"\s*\[\[\s*rules\s*\]\]\s*(#.*)?$")
_ANY_HEADER: Final = re.compile(r"\s*\[")


@dataclass(frozen=True, slots=True)
class Query:
    """The request to explain, as the daemon would see it once its handshake is read."""

    client: str
    user: str | None
    protocol: str
    command: str  # connect, bind, udp_associate, or an HTTP method (forwarding)
    host: str  # canonical, as the parsers give it
    port: int

    @property
    def target(self) -> str:
        return format_hostport(self.host, self.port)


def parse_target(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 address in brackets) as the parsers would give it: a name
    canonical, an address in its usual text form; ValueError says what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{text!r} is not HOST:PORT")
    port = int(port_text)
    if port > 65535:  # (0: a BIND's port, any)
        raise ValueError(f"{text!r}: port {port} is out of range")
    if host.startswith("[") and host.endswith("]"):
        try:
            return ipv6_text(ipaddress.IPv6Address(host[1:-1]).packed), port  # as SOCKS5's
        except ValueError:
            raise ValueError(f"{text!r}: {host} is not an IPv6 address") from None
    try:
        return str(ipaddress.IPv4Address(host)), port
    except ValueError:
        pass
    try:
        return canonical_host(host), port
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def command_of(protocol: str, command: str) -> str:
    """The command as the access line writes it; ValueError when `protocol` has none
    such (an HTTP client's other commands are the methods it forwards)."""
    lower = command.lower()
    if lower in COMMANDS[protocol]:
        return lower
    if protocol == "http" and command.isascii() and command.isalpha():
        return command.upper()
    known = ", ".join(COMMANDS[protocol]) + (" or an HTTP method" if protocol == "http" else "")
    raise ValueError(f"{protocol} has no command {command!r} ({known})")


def rule_spans(text: str) -> list[tuple[int, int]]:
    """The lines (first, last; counted from 1) of each `[[rules]]` table of a TOML
    text: its header to the line before the next table header, without the blank
    and comment lines that end it (they mostly introduce the next table)."""
    lines = text.splitlines()
    spans = []
    for index, line in enumerate(lines):
        if not _RULES_HEADER.match(line):
            continue
        end = index + 1
        while end < len(lines) and not _ANY_HEADER.match(lines[end]):
            end += 1
        while end > index + 1 and lines[end - 1].strip()[:1] in ("", "#"):
            end -= 1
        spans.append((index + 1, end))
    return spans


def rule_source(path: Path | None, rule: int, count: int) -> dict[str, Any] | None:
    """`rules[rule]` (of `count` rules) as written in the config file, or None when
    its lines cannot be told: the `[[rules]]` headers are not one a rule (rules
    written as an inline array), the file changed or is gone since."""
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    spans = rule_spans(text)
    if len(spans) != count:
        return None
    first, last = spans[rule]
    lines = text.splitlines()[first - 1 : last]
    return {"path": str(path), "first_line": first, "last_line": last, "lines": lines}


def explain(settings: Settings, path: Path | None, query: Query, log: Any) -> dict[str, Any]:
    """What the daemon would do with `query`, as the JSON object README documents."""
    return asyncio.run(_explain(settings, path, query, log))


async def _explain(settings: Settings, path: Path | None, query: Query, log: Any) -> dict[str, Any]:
    config = settings.config
    ctx = context.build(settings, log)
    # no listener runs here: the configured ones are the daemon's own (a port 0 is
    # chosen at the start, so it cannot be told)
    own = [a.port for a in config.server.listen]
    if config.metrics.listen is not None:
        own.append(config.metrics.listen.port)
    context.guard(ctx, [p for p in own if p], config.exposed)
    conn = Conn(0, (query.client, 0))
    conn.protocol = query.protocol
    state = _counted(ctx, config)
    # a user counts only where credentials are asked for, and SOCKS4 carries none
    required = ctx.auth.required
    if required and query.protocol != "socks4":
        conn.user = query.user
    try:
        route: Route | None = None
        error: SessionError | None = None
        addresses: list[str] = []
        lookup_error: UpstreamError | None = None
        try:
            _credentials(ctx, conn, settings)
            route = await _route(ctx, conn, query)
        except SessionError as exc:
            error = exc
        try:
            found = await ctx.resolver.resolve(
                query.host, query.port, config.timeouts.connect, query.client
            )
            addresses = _unique(addr[0] for _family, addr in found)
        except UpstreamError as exc:
            lookup_error = exc
        dialable: list[str] | None = None
        if route is not None:
            dialable, error = _dialable(route, query.command, addresses, lookup_error)
    finally:
        ctx.upstreams.close()
        ctx.resolver.close()
    result = _result(
        ctx, settings, path, query, conn, route, error, addresses, lookup_error, dialable
    )
    result["quota"] = _quota(ctx, conn, state)
    return result


def _counted(ctx: Context, config: Any) -> str | None:
    """What the state file says users used this period, in the ledger the gate reads
    (as a daemon's workers learn it from the books); the state file's path, or None
    when traffic is not counted."""
    if ctx.ledger is None or not config.accounting.enabled:
        return None
    path = books.state_path(config.accounting.state_file)
    try:
        state = books.read_state(path)
    except (FileNotFoundError, ConfigError):
        return str(path)
    if state["start"] == ctx.ledger.start:
        users = {user: (up, down) for user, (up, down) in state["users"].items()}
        ctx.ledger.learn(accounting.Totals(0, ctx.ledger.start, users))
    return str(path)


def _quota(ctx: Context, conn: Conn, state: str | None) -> dict[str, Any] | None:
    """The user's quota and its use this period, as last saved."""
    account = gate.account_for(ctx, conn.user) if state is not None else None
    if account is None or account.limit is None or ctx.ledger is None:
        return None
    limit = account.limit
    until = books.until(ctx.ledger.end)
    return {
        "quota": limit.index,
        "limit": limit.describe(),
        "bytes_up": account.used[0],
        "bytes_down": account.used[1],
        "exceeded": account.exhausted,
        "period": ctx.ledger.period.spec,
        "until": until,
        "state_file": state,
    }


def _credentials(ctx: Context, conn: Conn, settings: Settings) -> None:
    """The credentials step as the gate takes it, with the password taken as right:
    AuthFailed when none are given (or SOCKS4 may not come), or the user is unknown."""
    if conn.user is None:
        gate.authenticate(ctx, conn, None, None)  # raises when credentials are required
    elif conn.user not in settings.users:
        raise AuthFailed(f"no user {conn.user!r} in auth.users_file")


async def _route(ctx: Context, conn: Conn, query: Query) -> Route:
    """`gate.route` for the command, with the arguments the daemon's handlers pass."""
    if query.command == "udp_associate":  # the association, then a datagram to the target
        gate.check_association(ctx, conn, "0.0.0.0", 0)
        return await gate.route(
            ctx, conn, "udp_associate", query.host, query.port, need_addresses=True
        )
    need = query.command == "bind"  # BIND's peer comes from an address
    return await gate.route(ctx, conn, query.command, query.host, query.port, need_addresses=need)


def _dialable(
    route: Route, command: str, resolved: list[str], lookup_error: UpstreamError | None
) -> tuple[list[str] | None, SessionError | None]:
    """The addresses a direct dial of `route` would try (a BIND's peer: may come from),
    and the error the dial would end with when there is none: the route's own check
    on each address, as proxyd.direct applies it. None: a parent's choice, or any
    BIND peer (each is checked as it connects)."""
    if route.via is not None:
        return ([a[1][0] for a in route.addresses] if route.addresses else None), None
    if command == "bind" and route.host in ("0.0.0.0", "::"):
        return None, None
    if route.addresses is not None:
        candidates = [a[1][0] for a in route.addresses]
    elif lookup_error is not None:
        return [], lookup_error  # what the dial's own lookup would end with
    else:
        candidates = resolved
    allowed, refused = [], None
    for ip in candidates:
        denied = route.refuse(ip, route.port) if route.refuse is not None else None
        if denied is None:
            allowed.append(ip)
        else:
            refused = refused or denied
    if not allowed and refused is not None:
        return [], refused
    return _unique(allowed), None


def _unique(items: Any) -> list[str]:
    return list(dict.fromkeys(items))


def _egress(ctx: Context, route: Route | None, dialable: list[str] | None) -> Any:
    """Where a direct connection would leave from: the egress that applies (the
    deciding rule's, else the server's), and, when sticky, the address this user or
    client keeps for the first address that may be dialled; None without one."""
    way_out = route.egress if route is not None else None
    if way_out is None:
        return None
    address = None
    if way_out.pick == "sticky" and dialable and route is not None:
        family = socket.AF_INET6 if ":" in dialable[0] else socket.AF_INET
        with contextlib.suppress(NoEgress):
            found = way_out.source(family, route.sticky_key)
            address = found[0] if found is not None else None
    return {
        "networks": [str(n) for n in (*way_out.v4, *way_out.v6)],
        "interface": way_out.interface,
        "pick": way_out.pick,
        "address": address,
    }


def _reason(route: Route | None, error: SessionError | None) -> tuple[int | None, str]:
    """The deciding rule and what kind of thing decided."""
    if isinstance(error, Denied):
        if error.code is not None:
            return None, error.code
        return error.rule, "rule" if error.rule is not None else "default_action"
    if isinstance(error, AuthFailed):
        return None, "credentials"
    if error is not None:
        return None, str(error.status)
    assert route is not None
    return route.rule, "rule" if route.rule is not None else "default_action"


def _result(
    ctx: Context,
    settings: Settings,
    path: Path | None,
    query: Query,
    conn: Conn,
    route: Route | None,
    error: SessionError | None,
    addresses: list[str],
    lookup_error: UpstreamError | None,
    dialable: list[str] | None,
) -> dict[str, Any]:
    config = settings.config
    rule, reason = _reason(route, error)
    via = route.via if route is not None and error is None else None
    group = config.upstream(via) if via is not None else None
    users_file = config.auth.users_file
    lim, auth = config.limits, config.auth
    return {
        "config": str(path) if path is not None else None,
        "request": {
            "client": query.client,
            "user": query.user,
            "protocol": query.protocol,
            "command": query.command,
            "target": query.target,
        },
        "allowed": error is None,
        "status": "ok" if error is None else str(error.status),
        "rule": rule,
        "reason": reason,
        "error": str(error) if error is not None else None,
        "rule_source": rule_source(path, rule, len(config.rules)) if rule is not None else None,
        "default_action": config.server.default_action,
        "private_destinations": "denied" if ctx.destinations.deny_private else "allowed",
        "own_ports": sorted(ctx.destinations.own_ports),
        "addresses": addresses,
        "lookup_error": str(lookup_error) if lookup_error is not None else None,
        "dialable": dialable if error is None else [],
        "route": {
            "via": via,
            "strategy": group.strategy if group is not None else None,
            "servers": [str(s) for s in group.servers] if group is not None else [],
            "egress": _egress(ctx, route, dialable) if via is None and error is None else None,
        },
        "credentials": {
            "required": ctx.auth.required,
            "users_file": str(users_file) if users_file is not None else None,
            "user": conn.user,  # the user the rules see
            "user_exists": (query.user in settings.users) if query.user is not None else None,
            "allow_socks4": auth.allow_socks4,
        },
        "limits": {
            "server.max_connections": config.server.max_connections,
            "limits.per_client": lim.per_client,
            "limits.per_user": lim.per_user,
            "limits.per_user_rate": lim.per_user_rate,
            "dns.per_client": config.dns.per_client,
            "auth.max_failures": auth.max_failures,
            "auth.failure_window": auth.failure_window,
            "auth.lockout": auth.lockout,
            "auth.max_user_failures": auth.max_user_failures,
            "auth.ipv6_prefix": auth.ipv6_prefix,
        },
    }


# -- the human form ------------------------------------------------------------------


def human(result: dict[str, Any]) -> str:
    """Short aligned `key: value` lines."""
    request = result["request"]
    who = f"from {request['client']}" + (f", user {request['user']}" if request["user"] else "")
    rows: list[tuple[str, str]] = [
        ("request", f"{request['protocol']} {request['command']} {request['target']} {who}"),
        ("decision", "allowed" if result["allowed"] else f"refused ({result['status']})"),
        ("decided by", _decider(result)),
    ]
    if result["error"]:
        rows.append(("why", result["error"]))
    source = result["rule_source"]
    if source is not None:
        where = f"{source['path']}, lines {source['first_line']}-{source['last_line']}"
        rows.append(("rule", where))
        rows += [("", line) for line in source["lines"]]
    if result["lookup_error"]:
        rows.append(("resolves to", f"nothing ({result['lookup_error']})"))
    else:
        rows.append(("resolves to", ", ".join(result["addresses"]) or "-"))
    dialable = result["dialable"]
    if dialable is None:
        anyone = "any peer, each checked as it connects"
        rows.append(("may dial", "the parent's choice" if result["route"]["via"] else anyone))
    else:
        rows.append(("may dial", ", ".join(dialable) or "none"))
    route = result["route"]
    if route["via"] is None:
        rows.append(("route", "direct" if result["allowed"] else "-"))
        if (way_out := route["egress"]) is not None:
            where = ", ".join(way_out["networks"]) or "-"
            if way_out["interface"] is not None:
                where += f" on {way_out['interface']}"
            picked = f"; kept: {way_out['address']}" if way_out["address"] else ""
            rows.append(("egress", f"{where} ({way_out['pick']}{picked})"))
    else:
        servers = ", ".join(route["servers"])
        rows.append(("route", f"via {route['via']} ({route['strategy']}): {servers}"))
    rows.append(("credentials", _credentials_text(result["credentials"])))
    if (quota := result["quota"]) is not None:
        use = accounting.format_size(quota["bytes_up"] + quota["bytes_down"])
        state = "used up" if quota["exceeded"] else "used"
        rows.append(
            (
                "quota",
                f"quotas[{quota['quota']}]: {use} of {quota['limit']} {state} this "
                f"{quota['period']}, until {quota['until']}",
            )
        )
    limits = result["limits"]
    rows.append(("limits", _pairs(limits, ("server.max_connections", "limits.per_client"))))
    rows.append(("user limits", _pairs(limits, ("limits.per_user", "limits.per_user_rate"))))
    rows.append(("dns", _pairs(limits, ("dns.per_client",))))
    rows.append(("lockout", _pairs(limits, ("auth.max_failures", "auth.failure_window"))))
    more = ("auth.lockout", "auth.max_user_failures", "auth.ipv6_prefix")
    rows.append(("", _pairs(limits, more)))
    width = max(len(key) for key, _ in rows) + 2
    return "\n".join(
        (f"{key}:".ljust(width) if key else " " * width) + value for key, value in rows
    )


def _decider(result: dict[str, Any]) -> str:
    reason = result["reason"]
    if reason == "rule":
        return f"rules[{result['rule']}]"
    if reason == "default_action":
        return f'server.default_action = "{result["default_action"]}"'
    if reason == "private_destination":
        return "server.private_destinations (private destinations are denied)"
    if reason == "own_listener":
        ports = ", ".join(str(p) for p in result["own_ports"])
        return f"the daemon's own listener (ports {ports})"
    if reason == "credentials":
        return "credentials (auth.users_file)"
    if reason == "quota_exceeded":
        return f"quotas[{result['quota']['quota']}] (used up)" if result["quota"] else reason
    return str(reason)


def _credentials_text(found: dict[str, Any]) -> str:
    if not found["required"]:
        ignored = "; no user is asked for, so the rules see none" if found["user"] else ""
        return "not required (no auth.users_file)" + ignored
    text = f"required (auth.users_file {found['users_file']})"
    if found["user_exists"] is not None:
        text += "; the user exists" if found["user_exists"] else "; no such user"
    return text


def _pairs(values: dict[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{key} {_number(values[key])}" for key in keys)


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value}" + (" (off)" if value == 0 else "")
