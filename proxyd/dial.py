"""One way out: a target the gate has checked (a Route), connected directly by happy
eyeballs or through a parent proxy of the upstream group its route names.

Tunnels, forwarded requests and UDP associations all reach their targets here,
with `Dial` (loop callbacks, no task) or `dial` (its awaitable face). A failure
is the UpstreamError that says what to answer.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Final

from proxyd.chain import ChainConnector, Lease, Pool
from proxyd.context import Context
from proxyd.direct import Connector
from proxyd.dns import AddrInfo
from proxyd.errors import SessionError
from proxyd.parents import Parent
from proxyd.protocols import socks5

Refuse = Callable[[str, int], bool]
Dialled = Callable[[socket.socket | None, SessionError | None], object]


class Route:
    """Where a request may go, as the gate decided: host:port, the addresses that
    may be dialled (None: whatever the resolver finds, less those `refuse` names),
    and the upstream group to go through (None: direct)."""

    __slots__ = ("addresses", "deadline", "host", "port", "refuse", "rule", "via")

    def __init__(
        self,
        host: str,
        port: int,
        addresses: list[AddrInfo] | None,
        via: str | None,
        refuse: Refuse | None,
        deadline: float,
        rule: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.addresses = addresses
        self.via = via
        self.refuse = refuse
        self.deadline = deadline  # loop time by which a direct connection must be made
        self.rule = rule  # the deciding rule's index, if a rule decided


CONNECT: Final = socks5.Command.CONNECT


class Dial:
    """Connects one Route: `done(sock, None)` or `done(None, error)` exactly once,
    unless `cancel()` comes first; the socket then belongs to the caller.

    A direct connection has what is left of `timeouts.connect` after the gate's
    lookup (they are bounded together); one through a parent has the whole of it,
    since the pool counts a parent short of time as failed, and the lookup that took
    some was ours, not the parent's doing. After success `lease` holds the parent
    used (None: direct), `trailing` the target's bytes that came with the parent's
    answer, `bound` the parent's bound address (its UDP relay for UDP ASSOCIATE),
    and `proxy` an HTTP parent that is to be sent plain requests themselves.
    """

    __slots__ = (
        "_connector",
        "_ctx",
        "_done",
        "_started",
        "bound",
        "lease",
        "pool",
        "proxy",
        "route",
        "trailing",
    )

    def __init__(self, ctx: Context, route: Route, done: Dialled) -> None:
        self._ctx = ctx
        self.route = route
        self._done: Dialled | None = done
        self._connector: Connector | ChainConnector | None = None
        self._started = 0.0
        self.lease: Lease | None = None
        self.pool: Pool | None = None
        self.trailing = b""
        self.bound: tuple[str, int] = ("0.0.0.0", 0)
        self.proxy: Parent | None = None

    def start(
        self,
        command: socks5.Command = CONNECT,
        *,
        plain_http: bool = False,
        hash_key: str | None = None,
    ) -> None:
        """`plain_http`: for forwarding plain HTTP requests (an HTTP parent is then only
        connected to, and sent the requests themselves); `hash_key`: what the hash
        strategy hashes, when not the target's host."""
        ctx, route = self._ctx, self.route
        loop = asyncio.get_running_loop()
        self._started = loop.time()
        if route.via is not None:
            self.pool = ctx.upstreams.pool(route.via)
            chained = ChainConnector(
                self.pool, ctx.config.timeouts.connect, self._on_dialled, refuse=route.refuse
            )
            self._connector = chained
            chained.start(
                route.host,
                route.port,
                route.addresses,
                command,
                plain_http=plain_http,
                hash_key=hash_key,
            )
            return
        timeout = max(route.deadline - self._started, 0.0)
        direct = Connector(
            ctx.resolver, ctx.config.buffers, timeout, self._on_dialled, refuse=route.refuse
        )
        self._connector = direct
        direct.start(route.host, route.port, route.addresses)

    def cancel(self) -> None:
        self._done = None
        if self._connector is not None:
            self._connector.cancel()

    def _on_dialled(self, sock: socket.socket | None, error: SessionError | None) -> None:
        done, self._done = self._done, None
        connector = self._connector
        if isinstance(connector, ChainConnector) and sock is not None:
            self.lease, self.trailing, self.bound = (
                connector.lease,
                connector.trailing,
                connector.bound,
            )
            if connector.plain and self.lease is not None:
                self.proxy = self.lease.parent
        if done is None:
            if sock is not None:
                sock.close()
            return
        if sock is not None and (metrics := self._ctx.metrics) is not None:
            metrics.connected(asyncio.get_running_loop().time() - self._started)
        done(sock, error)


async def dial(
    ctx: Context, route: Route, *, plain_http: bool = False
) -> tuple[socket.socket, Dial]:
    """`Dial`, awaited: the connected socket and what the dial found out."""
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

    attempt = Dial(ctx, route, dialled)
    attempt.start(plain_http=plain_http)
    try:
        return await connected, attempt
    except asyncio.CancelledError:
        attempt.cancel()
        # connected in the same loop pass as the cancellation: the socket is ours
        if connected.done() and not connected.cancelled() and connected.exception() is None:
            connected.result().close()
        raise
