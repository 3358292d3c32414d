"""A tunnel: one CONNECT (SOCKS5, SOCKS4, HTTP) or BIND request, from the gate's
decision to the end of its relay.

The gate says where the request may go; the dial reaches the target (for BIND, a
listener of its own waits for the peer the request names); the session's handler
answers the client; then the relay moves the bytes until both sides are done.
Everything runs as loop callbacks through the session's `step`, so that an error
anywhere refuses the request the same way.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, Final, Protocol

from proxyd import gate
from proxyd.bind import Binder
from proxyd.chain import ChainConnector, Lease
from proxyd.context import Conn, Context
from proxyd.dial import Connecting, Route, dial
from proxyd.dns import Lookup
from proxyd.errors import SessionError, Status
from proxyd.poller import poller
from proxyd.relay import Relay, abort

Answer = Callable[[str, int], None]
# What a client may send before its tunnel is up that is read and kept for the
# target; the rest waits in the kernel (backpressure), as with any slow target.
EARLY_MAX: Final = 16384


def relay_for(
    ctx: Context,
    conn: Conn,
    client: socket.socket,
    remote: socket.socket,
    on_end: Callable[[Status, str | None], object],
) -> Relay:
    """The relay of a tunnel (and of a WebSocket a forwarded request became): the
    buffers and idle timeout of the settings, the user's rate (which the first
    bytes, read with the request, pay too) and the user's account (its quota)."""
    cfg = ctx.config
    return Relay(
        client,
        remote,
        read_size=cfg.buffers.read_size,
        idle=cfg.timeouts.idle,
        splice=cfg.buffers.splice,
        on_end=on_end,
        rate=gate.rate_for(ctx, conn.user),
        account=gate.account_for(ctx, conn.user),
    )


class Owner(Protocol):
    """The connection a tunnel serves (the session), held as one reference: an idle
    tunnel keeps no callbacks of its own (memory per tunnel counts)."""

    def step(self, step: Callable[..., None], *args: Any) -> None:
        """Run a callback; a SessionError from it refuses the request."""

    def established(self, bound: tuple[str, int]) -> bytes:
        """Answer the client (`bound`: our end, or BIND's peer); what it sent after its
        request, for the target."""

    def ended(self, status: Status, error: str | None) -> None:
        """The relay ended by itself (or the client went away before it began)."""


class Tunnel:
    """One tunnel request and, once it is connected, its relay.

    `close()` releases it all whenever the session ends.
    """

    __slots__ = (
        "_client",
        "_conn",
        "_ctx",
        "_early",
        "_lease",
        "_owner",
        "_pending",
        "_relay",
        "_remote",
        "_said_more",
        "egress",
        "rule",
        "via",
    )

    # what the session asks of whatever took its connection over (handlers.Worker)
    between_requests: Final = False
    logged: Final = False  # the session writes the tunnel's access line
    # a reset on one side is passed on as a reset to the other, as a stream cut off
    # must be: the relay's status (reset) says so, the session reads that
    cut: Final = False

    def __init__(
        self,
        ctx: Context,
        conn: Conn,
        client: socket.socket,
        owner: Owner,
        said_more: bool = False,
    ) -> None:
        self._ctx = ctx
        self._conn = conn
        self._client = client
        self._owner = owner
        self._pending: Lookup | Connecting | Binder | None = None  # what is under way
        self._remote: socket.socket | None = None
        self._relay: Relay | None = None
        self._lease: Lease | None = None  # the parent proxy in use
        self._early = bytearray()  # what the client sent while the tunnel was made
        self._said_more = said_more  # it sent bytes after its request, with it
        self.via: str | None = None  # the upstream group the route goes through
        # where the connection left from, when an egress says (True until connected)
        self.egress: str | bool | None = None
        self.rule: int | None = None  # the rule that allowed it (None: the default action)

    def connect(self, host: str, port: int) -> None:
        self._decide("connect", host, port, self._dial)

    def bind(self, host: str, port: int, listening: Answer) -> None:
        """Listen for the peer `host` names (0.0.0.0 or :: for any), tell the client where
        (`listening`), and relay once that peer connects."""
        self._decide("bind", host, port, lambda route: self._listen(route, listening))

    def _decide(self, command: str, host: str, port: int, then: Callable[[Route], None]) -> None:
        outcome = gate.decide(
            self._ctx,
            self._conn,
            command,
            host,
            port,
            lambda route, error: self._owner.step(self._decided, route, error, then),
            need_addresses=command == "bind",  # the peer comes from an address
        )
        if isinstance(outcome, Route):
            then(outcome)
        else:
            self._pending = outcome

    def _decided(
        self, route: Route | None, error: SessionError | None, then: Callable[[Route], None]
    ) -> None:
        self._pending = None
        if error is not None:
            raise error
        assert route is not None
        then(route)

    def _dial(self, route: Route) -> None:
        self.via, self.rule = route.via, route.rule
        if route.egress is not None:
            self.egress = True
        connector = dial(
            self._ctx, route, lambda sock, error: self._owner.step(self._connected, sock, error)
        )
        if self._remote is None:  # (a near target may have answered at once)
            self._pending = connector

    def _listen(self, route: Route, listening: Answer) -> None:
        self.rule = route.rule
        cfg = self._ctx.config
        # a request for 0.0.0.0 or :: takes any peer; a name resolving to one of them does not
        any_peer = route.host in ("0.0.0.0", "::")
        way_out = route.egress
        binder = Binder(
            self._conn.local_address()[0],
            None if any_peer else route.addresses or [],
            cfg.timeouts.connect,
            cfg.buffers,
            lambda sock, error: self._owner.step(self._connected, sock, error, True),
            route.refuse,
            way_out,
            route.sticky_key,
        )
        if way_out is not None:
            self.egress = binder.address[0]
        self._pending = binder
        listening(*binder.address)

    def _connected(
        self, remote: socket.socket | None, error: SessionError | None, bind: bool = False
    ) -> None:
        """The target is connected (or, for BIND, the peer has connected to us)."""
        pending, self._pending = self._pending, None
        if error is not None:
            raise error
        assert remote is not None
        self._remote = remote
        if self.egress is True:
            self.egress = remote.getsockname()[0]
        first_down = b""
        if isinstance(pending, ChainConnector):  # (through a parent: never at once)
            self._lease, first_down = pending.lease, pending.trailing
        # CONNECT replies with our end of the connection, BIND with the peer's address
        bound = remote.getpeername() if bind else remote.getsockname()
        first_up = self._owner.established(bound[:2]) + self._early
        self._early = bytearray()
        self._relay = relay_for(self._ctx, self._conn, self._client, remote, self._owner.ended)
        self._relay.start(first_up, first_down)

    # -- what the session reads and asks once the request is under way -----------------

    @property
    def answered(self) -> bool:
        return self._relay is not None

    def usage(self) -> tuple[int, int, int, int]:
        relay = self._relay
        return (relay.bytes_up, relay.bytes_down, 0, 0) if relay is not None else (0, 0, 0, 0)

    def fields(self) -> dict[str, Any]:
        relay = self._relay
        fields: dict[str, Any] = (
            {"bytes_up": relay.bytes_up, "bytes_down": relay.bytes_down} if relay else {}
        )
        if self.rule is not None:  # (a denial's line has its rule from Denied)
            fields["rule"] = self.rule
        if isinstance(self.egress, str):
            fields["egress"] = self.egress
        if self.via is not None:
            fields["via"] = self.via
            if self._lease is not None:
                fields["upstream"] = str(self._lease.parent)
        return fields

    def on_client_readable(self) -> None:
        """The client spoke while the tunnel is being made (the session watches it for
        us, through its `step`, until the relay does). What it sends early is kept for
        the target, up to EARLY_MAX (beyond, it waits in the kernel, and the watch
        stops). A reset, or an EOF with nothing sent after the request, ends it now
        (status client_closed), cancelling the lookup and the connect; an EOF after
        early bytes is a half-close, which the relay passes on. Read until nothing is
        left: under uvloop a reset socket's reader is called once and never again."""
        while True:
            room = EARLY_MAX - len(self._early)
            try:
                data = self._client.recv(room) if room else b""
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                why = f"client connection failed while connecting: {exc.strerror}"
                self._owner.ended(Status.CLIENT_CLOSED, why)
                return
            if not data and not (self._early or self._said_more):
                self._owner.ended(Status.CLIENT_CLOSED, "client closed while connecting")
                return
            if not data:  # a half-close after its first bytes, or EARLY_MAX reached
                poller(asyncio.get_running_loop()).remove_reader(self._client.fileno())
                return
            self._early += data

    def fail(self, exc: OSError) -> None:
        """The client's connection failed where the relay cannot see it (under TLS)."""
        if self._relay is not None:
            self._relay.fail(exc)

    def close(self, cut: bool) -> None:
        """Stop whatever is under way, close the target's side (`cut`: with a reset)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._relay is not None:
            self._relay.stop()
        if self._remote is not None:
            if cut:
                abort(self._remote)
            self._remote.close()
        if self._lease is not None:
            self._lease.release()
