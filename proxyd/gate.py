"""Who may go where: the one place that decides it, for every protocol.

A request meets the same steps in the same order, whatever carried it: the
limits (connections per daemon, per client address, per user), the credentials,
the access rules, and, when address rules need it, a lookup whose allowed
addresses are then the only ones that may be dialled. The answer is a Route
(direct, or through an upstream group) or the error to refuse with. A SOCKS or
HTTP CONNECT, a BIND, every forwarded HTTP request and every UDP datagram pass
here, so a fix made here is made for all of them.

Each step is one implementation with a callback face, for the session's
handshake (which runs without a task), and an awaitable face, for forwarding.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

from proxyd.accounting import Account
from proxyd.books import until
from proxyd.context import Conn, Context, Rate
from proxyd.destinations import private_denial
from proxyd.dial import Route
from proxyd.dns import AddrInfo, Lookup
from proxyd.errors import (
    REP_COMMAND_NOT_SUPPORTED,
    AuthFailed,
    OverLimit,
    ProtocolError,
    QuotaExceeded,
    SessionError,
    Status,
    UpstreamError,
)
from proxyd.protocols.common import Credentials, format_hostport
from proxyd.relay import Bucket
from proxyd.rules import Request, allowed_addresses, in_networks

# Clients beyond server.max_connections that still get a polite refusal; past them,
# a new connection is closed at once.
OVERLOAD_SLACK = 256

Decided = Callable[[Route | None, SessionError | None], object]


# -- the limits ----------------------------------------------------------------------


def capacity(ctx: Context, active: int) -> str | None:
    """`server.max_connections` for a new client, with `active` open: None when it may
    come in, else why it is refused once its request is read, or DROP when it is so
    far over that it is closed unanswered."""
    limit = ctx.config.server.max_connections
    if active < limit:
        return None
    return DROP if active >= limit + OVERLOAD_SLACK else f"server.max_connections ({limit}) reached"


DROP: Final = "server.max_connections reached"  # (beyond the slack)


def over_per_client(ctx: Context, ip: str) -> bool:
    """A new connection from `ip` is over `limits.per_client`: it is closed at accept,
    unanswered and uncounted, so that silent connections from one address hold no
    slot of `server.max_connections`. A trusted balancer's connections are counted
    for the client its PROXY header names instead (`Admission.count_client`)."""
    per_client = ctx.config.limits.per_client
    if not per_client or ctx.per_client.get(ip, 0) < per_client:
        return False
    balancers = ctx.config.server.proxy_protocol_from
    return not (balancers and in_networks(ip, balancers))


class Admission:
    """One connection's place in `[limits]`: counted for its client address once that
    is known (at once, or after the PROXY header a trusted load balancer must send
    first, the one it names: OverLimit then when that client is over
    `limits.per_client`), and for its user once its request is complete; `refusal`
    says why it is over a limit (`server.max_connections`), if it is."""

    __slots__ = ("_client", "_ctx", "_user", "awaits_header", "refusal")

    def __init__(self, ctx: Context, conn: Conn, refusal: str | None) -> None:
        self._ctx = ctx
        self.refusal = refusal
        self._client: str | None = None
        self._user: str | None = None
        # the client is to be named by a PROXY header before it is counted
        balancers = ctx.config.server.proxy_protocol_from
        self.awaits_header = bool(balancers) and in_networks(conn.peer_ip, balancers)
        if not self.awaits_header:
            self.count_client(conn.peer_ip)

    def count_client(self, ip: str) -> None:
        self.awaits_header = False
        ctx = self._ctx
        count = ctx.per_client.get(ip, 0)
        per_client = ctx.config.limits.per_client
        if per_client and count >= per_client:
            # (a client a balancer names: the others are refused at accept)
            raise OverLimit(f"limits.per_client ({per_client}) reached for {ip}")
        ctx.per_client[ip] = count + 1
        self._client = ip

    def request_complete(self, user: str | None) -> None:
        """The request is whole: refuse it if over a limit, else count its user."""
        if self.refusal:
            raise OverLimit(self.refusal)
        self.count_user(user)

    def count_user(self, user: str | None) -> None:
        """Count the connection for `user` (OverLimit past `limits.per_user`): at its
        request, or when a forwarded request turns it into a tunnel (a WebSocket)."""
        per_user = self._ctx.config.limits.per_user
        if per_user and user is not None and self._user is None:
            count = self._ctx.per_user.get(user, 0)
            if count >= per_user:
                raise OverLimit(f"limits.per_user ({per_user}) reached for {user}")
            self._ctx.per_user[user] = count + 1
            self._user = user

    def release(self) -> None:
        """The connection ended: it counts no more (once)."""
        if (client := self._client) is not None:
            self._client = None
            counts = self._ctx.per_client
            if (left := counts.get(client, 0) - 1) > 0:
                counts[client] = left
            else:
                counts.pop(client, None)
        if self._user is not None:
            _release(self._ctx.per_user, self._user)
            self._user = None


def _release(counts: dict[str, int], key: str) -> None:
    """One open connection fewer for `key`; gone at zero, so the table stays small."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def rate_for(ctx: Context, user: str | None) -> Rate | None:
    """The buckets every transfer of this user shares (limits.per_user_rate), when its
    rate is limited. Only authenticated users have one, so the table holds at most
    the users file."""
    rate = ctx.config.limits.per_user_rate
    if not rate or user is None:
        return None
    buckets = ctx.rates.get(user)
    if buckets is None:
        buckets = ctx.rates[user] = (Bucket(rate), Bucket(rate))
    return buckets


def account_for(ctx: Context, user: str | None) -> Account | None:
    """The user's traffic this period, which every transfer of theirs is charged to,
    when traffic is counted (`[accounting]`, `[metrics] per_user`)."""
    ledger = ctx.ledger
    return None if ledger is None or user is None else ledger.account(user)


def check_quota(ctx: Context, conn: Conn) -> None:
    """A user whose quota is used up (`[[quotas]]`) gets nothing more this period."""
    account = account_for(ctx, conn.user)
    if account is not None and account.exhausted:
        assert ctx.ledger is not None and account.limit is not None
        ends = until(ctx.ledger.end)
        raise QuotaExceeded(
            f"the traffic quota of user {conn.user} ({account.limit.describe()} a "
            f"{ctx.ledger.period.spec}) is used up until {ends}"
        )


# -- the credentials ---------------------------------------------------------------


def credentials_required(ctx: Context) -> bool:
    return ctx.auth.required


def authenticate(
    ctx: Context, conn: Conn, admission: Admission | None, credentials: Credentials | None
) -> Coroutine[Any, Any, None] | None:
    """Check the credentials a request carries, when users are configured: None when
    they are accepted at once, a derivation to await when they must be verified (it
    raises AuthFailed, LockedOut or OverLimit); AuthFailed or LockedOut at once when
    they are refused. SOCKS4 carries none: it passes only with `auth.allow_socks4`,
    and never from a client address that is locked out."""
    auth = ctx.auth
    if not auth.required:
        return None
    if credentials is None:
        if conn.protocol == "socks4":
            if ctx.config.auth.allow_socks4:
                auth.check_lockout(conn.peer_ip)
                return None  # its unverified user id is ignored
            raise AuthFailed("SOCKS4 has no password; users are configured (auth.allow_socks4)")
        raise AuthFailed("credentials required")
    conn.user = credentials.username
    if auth.accepted_at_once(credentials, conn.peer_ip):
        return None
    # over a limit: refused after the request anyway, so spend no derivation on it
    if admission is not None and admission.refusal:
        return None
    return auth.verify(credentials, conn.peer_ip)


async def verify(
    ctx: Context, conn: Conn, admission: Admission | None, credentials: Credentials | None
) -> None:
    """`authenticate`, awaited."""
    derivation = authenticate(ctx, conn, admission, credentials)
    if derivation is not None:
        await derivation


# -- the rules, the lookup they need, and the addresses that may be dialled ---------


def decide(
    ctx: Context,
    conn: Conn,
    command: str,
    host: str,
    port: int,
    done: Decided,
    *,
    need_addresses: bool = False,
) -> Route | Lookup:
    """Judge a request for host:port by the rules, and say where it may go: the Route
    when that is decided at once (the error that refuses it is raised), else the
    lookup under way, whose end calls `done(route, None)` or `done(None, error)`
    (unless the lookup is cancelled first).

    A name is resolved first when address rules need it, each of its addresses is
    judged on its own, and the route then holds only the allowed ones, so the name
    cannot be re-resolved into a denied address between check and connect (within
    `timeouts.connect`, which the connect that follows shares). `need_addresses`:
    the caller sends to an address, not a name (a datagram, a BIND's peer), so a
    direct route always comes resolved.

    Never itself, and no private destination unless a rule names it: a direct route
    carries the check (proxyd.destinations) that the dial applies to each address it
    is about to connect to, the addresses the gate found already screened by it. A
    route through a parent is judged the same way on what is known here: an address
    given in the request, or those a name resolved to for address rules (a name the
    parent resolves, it judges).
    """
    check_quota(ctx, conn)
    rules = ctx.rules
    guard = ctx.destinations
    # what the dial must refuse: the daemon itself always; private destinations too
    # when they are denied and no rule names this one
    screened = guard.deny_private
    refuse = guard.private if screened else guard.own
    request: Request | None = None
    rule: int | None = None  # the deciding rule, for the route (None: the default action)
    if not rules.trivial:
        request = Request(conn.peer_ip, conn.user, conn.protocol or "", command, host, port)
        decision = rules.check_before_lookup(request)  # Denied raises
        if decision is not None:
            request = None  # decided: a lookup below only finds the addresses
            rule = decision.rule
            if decision.explicit:  # a rule names this destination
                screened, refuse = False, guard.own
            if decision.via is not None and (denied := refuse(host, port)) is not None:
                raise denied  # an address given through a parent: judged here, as direct
            if decision.via is not None or not need_addresses:
                route = Route(
                    host,
                    port,
                    None,
                    decision.via,
                    refuse,
                    None,
                    decision.rule,
                    conn.peer_ip,
                    conn.user,
                    rules.egress_for(decision.rule),
                )
                return _settled(command, route)
    elif not need_addresses:
        way_out = rules.default_egress
        return Route(host, port, None, None, refuse, None, None, conn.peer_ip, conn.user, way_out)
    # for BIND, 0.0.0.0 or :: asks for any peer, each then screened as it connects
    screen = screened and not (command == "bind" and host in ("0.0.0.0", "::"))
    timeout = ctx.config.timeouts.connect
    deadline = asyncio.get_running_loop().time() + timeout
    at_once: list[Route | SessionError] = []  # what the resolver knew without asking

    def found(addresses: list[AddrInfo] | None, error: UpstreamError | None) -> None:
        outcome: Route | SessionError
        try:
            if error is not None:
                if request is not None:  # a denial stands whether the name exists or not
                    rules.check_unresolved(request)
                raise error
            via, decided_by = None, rule
            addresses = addresses or []
            if request is not None:  # address rules: each address on its own
                addresses, via, decided_by = allowed_addresses(
                    rules, request, addresses, guard.screens if screen else None
                )
            elif screen:
                addresses = [a for a in addresses if not guard.screens(a[1][0])]
            if screen and not addresses and via is None:
                raise private_denial(format_hostport(host, port))
            for _family, addr in addresses if via is not None else ():
                if (denied := guard.own(addr[0], port)) is not None:
                    raise denied  # a parent on this host would come back to us
            checked = guard.own if screen else refuse  # (a BIND for any peer: each peer)
            way_out = rules.egress_for(decided_by)  # (the rules decided with, if reloaded since)
            route = Route(
                host,
                port,
                addresses,
                via,
                checked,
                deadline,
                decided_by,
                conn.peer_ip,
                conn.user,
                way_out,
            )
            outcome = _settled(command, route)
        except SessionError as exc:
            outcome = exc
        except Exception as exc:  # a bug: the request still ends, answered and logged
            ctx.log.exception("gate_error", conn_id=conn.conn_id)
            outcome = SessionError(f"internal error: {type(exc).__name__}")
        if lookup is None:
            at_once.append(outcome)
        elif isinstance(outcome, Route):
            done(outcome, None)
        else:
            done(None, outcome)

    lookup: Lookup | None = None
    lookup = ctx.resolver.find(host, port, timeout, found, conn.peer_ip)
    if lookup is not None:
        return lookup
    if isinstance(at_once[0], SessionError):
        raise at_once[0]
    return at_once[0]


def _settled(command: str, route: Route) -> Route:
    if command == "bind" and route.via is not None:
        raise ProtocolError(
            "BIND is not chained through upstream proxies (a rule routes it via one)",
            socks_reply=REP_COMMAND_NOT_SUPPORTED,
            status=Status.UNSUPPORTED,
        )
    return route


async def route(
    ctx: Context,
    conn: Conn,
    command: str,
    host: str,
    port: int,
    *,
    need_addresses: bool = False,
    watch: Callable[[Awaitable[Route]], Awaitable[Route]] | None = None,
) -> Route:
    """`decide`, awaited: the route, or the error raised. `watch` wraps the wait when
    there is one (a lookup): forwarding watches its client meanwhile."""
    decided: asyncio.Future[Route] = asyncio.get_running_loop().create_future()

    def settled(found: Route | None, error: SessionError | None) -> None:
        if decided.done():  # the caller was cancelled as the answer came
            return
        if error is not None:
            decided.set_exception(error)
        else:
            assert found is not None
            decided.set_result(found)

    outcome = decide(ctx, conn, command, host, port, settled, need_addresses=need_addresses)
    if isinstance(outcome, Route):
        return outcome
    try:
        return await (decided if watch is None else watch(decided))
    finally:
        outcome.cancel()


def check_association(ctx: Context, conn: Conn, host: str, port: int) -> None:
    """Who may open a UDP association (Denied if not): it names no destination of its
    own, so only the rules without destinations and ports can refuse it; each of its
    datagrams then meets all the rules through `decide`."""
    check_quota(ctx, conn)
    rules = ctx.rules
    if not rules.trivial:
        request = Request(conn.peer_ip, conn.user, conn.protocol or "", "udp_associate", host, port)
        rules.check_without_destination(request)
