"""One way out: a target the gate has checked (a Route), connected directly by happy
eyeballs or through a parent proxy of the upstream group its route names.

Tunnels, forwarded requests and UDP associations all reach their targets here,
with `dial` (loop callbacks, no task) or `connect` (its awaitable face). A
failure is the UpstreamError that says what to answer.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Final

from proxyd.chain import ChainConnector
from proxyd.context import Context
from proxyd.direct import Connector, Refuse
from proxyd.dns import AddrInfo
from proxyd.egress import Egress
from proxyd.errors import SessionError
from proxyd.metrics import Metrics
from proxyd.protocols import socks5

Dialled = Callable[[socket.socket | None, SessionError | None], object]
Connecting = Connector | ChainConnector
CONNECT: Final = socks5.Command.CONNECT


class Route:
    """Where a request may go, as the gate decided: host:port, the addresses that
    may be dialled (None: whatever the resolver finds), `refuse`, which says of each
    address about to be dialled directly whether it must not be (the daemon itself,
    a private destination), and the upstream group to go through (None: direct).
    `client`: the address whose request it is, which a lookup the dial makes counts
    against (dns.per_client); `user`: whose request it is (with `client`, what a
    sticky egress keeps one address for). `egress`: where a direct connection leaves
    from, as the deciding rule or the server said when the gate decided (a reload
    since changes nothing for it); None for a route through a parent."""

    __slots__ = (
        "addresses",
        "client",
        "deadline",
        "egress",
        "host",
        "port",
        "refuse",
        "rule",
        "user",
        "via",
    )

    def __init__(
        self,
        host: str,
        port: int,
        addresses: list[AddrInfo] | None,
        via: str | None,
        refuse: Refuse | None,
        deadline: float | None = None,
        rule: int | None = None,
        client: str | None = None,
        user: str | None = None,
        egress: Egress | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.addresses = addresses
        self.via = via
        self.refuse = refuse
        # the loop time by which a direct connection must be made, when the gate's
        # lookup took part of timeouts.connect (None: the dial has all of it)
        self.deadline = deadline
        self.rule = rule  # the deciding rule's index, if a rule decided
        self.client = client
        self.user = user
        self.egress = egress if via is None else None

    @property
    def sticky_key(self) -> str:
        """What a sticky egress keeps one address for: the user, else the client."""
        return self.user or self.client or ""


def dial(
    ctx: Context,
    route: Route,
    done: Dialled,
    *,
    command: socks5.Command = CONNECT,
    plain_http: bool = False,
    hash_key: str | None = None,
    timed: bool = True,
) -> Connecting:
    """Start connecting `route`; `done(sock, None)` or `done(None, error)` exactly once
    (perhaps before this returns), unless the connector returned is cancelled first.
    The socket then belongs to the caller; through a parent, the ChainConnector says
    which (`lease`), what the target sent with the parent's answer (`trailing`), the
    parent's bound address (`bound`: its relay, for UDP ASSOCIATE) and whether it is
    an HTTP parent to be sent the requests themselves (`plain`).

    A direct connection has what is left of `timeouts.connect` after the gate's lookup
    (they are bounded together); one through a parent has the whole of it, since the
    pool counts a parent short of time as failed, and the lookup that took some was
    ours, not the parent's doing. `plain_http`: for forwarding plain requests;
    `hash_key`: what the hash strategy hashes, when not the target's host.
    """
    if timed and (metrics := ctx.metrics) is not None:
        done = _timed(done, metrics)
    timeout = ctx.config.timeouts.connect
    if route.via is not None:
        pool = ctx.upstreams.pool(route.via)
        # a parent is the operator's choice, wherever it is: only never this daemon
        chained = ChainConnector(pool, timeout, done, refuse=ctx.destinations.own)
        chained.start(
            route.host,
            route.port,
            route.addresses,
            command,
            plain_http=plain_http,
            hash_key=hash_key,
            client=route.client,
        )
        return chained
    if route.deadline is not None:
        timeout = max(route.deadline - asyncio.get_running_loop().time(), 0.0)
    egress = route.egress
    direct = Connector(
        ctx.resolver,
        ctx.config.buffers,
        timeout,
        done,
        refuse=route.refuse,
        client=route.client,
        egress=egress,
        sticky_key=route.sticky_key if egress is not None else "",
    )
    direct.start(route.host, route.port, route.addresses)
    return direct


def _timed(done: Dialled, metrics: Metrics) -> Dialled:
    """`done`, recording how long a successful dial took (lookup included)."""
    loop = asyncio.get_running_loop()
    started = loop.time()

    def timed(sock: socket.socket | None, error: SessionError | None) -> None:
        if sock is not None:
            metrics.connected(loop.time() - started)
        done(sock, error)

    return timed


async def connect(
    ctx: Context, route: Route, *, plain_http: bool = False
) -> tuple[socket.socket, Connecting]:
    """`dial`, awaited: the connected socket, and the connector that made it."""
    connected: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()

    def dialled(sock: socket.socket | None, error: SessionError | None) -> None:
        if connected.done():  # cancelled meanwhile
            if sock is not None:
                sock.close()
        elif error is not None:
            connected.set_exception(error)
        else:
            assert sock is not None
            connected.set_result(sock)

    connector = dial(ctx, route, dialled, plain_http=plain_http)
    try:
        return await connected, connector
    except asyncio.CancelledError:
        connector.cancel()
        # connected in the same loop pass as the cancellation: the socket is ours
        if connected.done() and not connected.cancelled() and connected.exception() is None:
            connected.result().close()
        raise
