"""One client connection, driven from accept to its access line.

The session reads the client during the handshake (a PROXY header from a trusted
balancer, TLS, then the protocol its first bytes show), hands what it reads to
that protocol's handler (proxyd.handlers), and does what the handler asks: the
gate decides (proxyd.gate), the dial connects (proxyd.dial), the relay moves the
bytes (proxyd.relay), or forwarding and UDP take the connection over in a task of
their own. Its phases and every transition between them are in one table below.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from proxyd import access, gate
from proxyd.context import Conn, Context
from proxyd.errors import (
    CUT_OFF,
    ClientClosed,
    Denied,
    HandshakeTimeout,
    LocalProtocolError,
    ProtocolError,
    SessionError,
    Status,
)
from proxyd.forward import Forwarder
from proxyd.handlers import Answer, Front, Handler, Worker
from proxyd.metrics import Meter
from proxyd.poller import poller
from proxyd.protocols import http as http_proto
from proxyd.protocols.common import Credentials, format_hostport
from proxyd.relay import abort, send_reply
from proxyd.tls import Bridge
from proxyd.tunnel import Tunnel
from proxyd.udp import Association

# Handshake reads are small: a request is at most a few KiB, and what a client
# sends beyond it stays in the kernel until the relay reads it.
HANDSHAKE_READ: Final = 4096


class Phase(enum.IntEnum):  # (an int's hash: the table below is read on every step)
    HANDSHAKE = enum.auto()  # reading the client's request (and a PROXY header first)
    TLS = enum.auto()  # the TLS handshake, which the bridge reads for
    AUTH = enum.auto()  # a password derivation is running
    CONNECT = enum.auto()  # the gate decides, then the target is reached (or BIND's peer)
    RELAY = enum.auto()
    FORWARD = enum.auto()  # plain HTTP requests, served by a task
    UDP = enum.auto()  # a UDP association, served by a task
    DONE = enum.auto()


# Every phase may end (DONE); anything else not listed here is a bug, and raises.
_NEXT: Final = {
    Phase.HANDSHAKE: {Phase.TLS, Phase.AUTH, Phase.CONNECT, Phase.FORWARD, Phase.UDP},
    Phase.TLS: {Phase.HANDSHAKE},
    Phase.AUTH: {Phase.HANDSHAKE},
    Phase.CONNECT: {Phase.RELAY},
    Phase.RELAY: set(),
    Phase.FORWARD: set(),
    Phase.UDP: set(),
}


class Session:
    """One client connection as a chain of loop callbacks, from accept to the access line.

    No task per connection: a task, its futures and `asyncio.timeout` cost more
    than everything else in a short connection (measured: 50 us of 150). Only a
    password derivation, slow and rare, runs as a task, and forwarding and UDP,
    which live long, in one of their own.
    """

    __slots__ = (
        "_admission",
        "_auth",
        "_handler",
        "_meter",
        "_on_close",
        "_poller",
        "_reading",
        "_timer",
        "_tls",
        "_worker",
        "command",
        "conn",
        "ctx",
        "fd",
        "loop",
        "phase",
        "sock",
        "target",
        "task",
    )

    def __init__(
        self,
        ctx: Context,
        sock: socket.socket,
        peer: tuple[Any, ...],
        conn_id: int,
        *,
        on_close: Callable[[Session], object],
        refusal: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.sock = sock  # the client (under TLS, the plaintext end of the bridge)
        self.fd = sock.fileno()
        self.loop = loop = asyncio.get_running_loop()
        self._poller = poller(loop)
        self.conn = conn = Conn(conn_id, peer, sock)
        self._admission = admission = gate.Admission(ctx, conn, refusal)
        self._handler: Handler | None = Front(self, conn, admission)
        self.command: str | None = None  # the request, for the access line
        self.target: str | None = None
        self.phase = Phase.HANDSHAKE
        self._on_close = on_close
        self._reading: Phase | None = None  # the phase the client's reader is for
        self._timer: asyncio.TimerHandle | None = None
        self._auth: asyncio.Task[None] | None = None
        self._tls: Bridge | None = None  # TLS for this client, once it started with it
        self._worker: Worker | None = None  # what took over after the request
        self.task: asyncio.Task[Status] | None = None  # the worker's, for forwarding and UDP
        self._meter: Meter | None = None  # in the metrics, once its protocol is known

    def start(self) -> None:
        handshake = self.ctx.config.timeouts.handshake
        self._timer = self.loop.call_later(handshake, self._on_handshake_timeout)
        # The request is often here already: read before asking the loop to watch.
        self._on_readable()

    @property
    def between_requests(self) -> bool:
        """A forwarding connection kept alive, waiting for its next request."""
        return self._worker is not None and self._worker.between_requests

    def abort(self) -> None:
        """End now (the daemon is stopping)."""
        if self.task is not None:
            self.task.cancel()  # it ends the session once it has stopped using the sockets
        else:
            self._end(Status.SHUTDOWN, None)

    # -- what handlers ask (handlers.Driver) ---------------------------------------------

    def detected(self, handler: Handler) -> None:
        self._handler = handler
        self.conn.protocol = handler.protocol
        if (metrics := self.ctx.metrics) is not None:
            self._meter = Meter(metrics, handler.protocol, self.conn)

    def send(self, data: bytes) -> None:
        send_reply(self.sock, data)

    def authenticate(self, credentials: Credentials | None, then: Callable[[], None]) -> None:
        derivation = gate.authenticate(self.ctx, self.conn, self._admission, credentials)
        if derivation is None:
            then()
            return
        self._enter(Phase.AUTH)
        self._auth = self.loop.create_task(derivation)
        self._auth.add_done_callback(lambda task: self.step(self._on_verified, task, then))

    def requested(self, command: str, host: str | None, port: int) -> None:
        self.command = command
        self.target = None if host is None else format_hostport(host, port)

    def connect(self, host: str, port: int) -> None:
        self._open().connect(host, port)

    def bind(self, host: str, port: int, listening: Answer) -> None:
        self._open().bind(host, port, listening)

    def associate(self, host: str, port: int, reply: Answer) -> None:
        self._request_complete()
        gate.check_association(self.ctx, self.conn, host, port)
        worker = Association(self.ctx, self.conn, self.sock, port, reply)
        self._hand_over(Phase.UDP, worker, worker.run())

    def forward(self, parser: http_proto.HttpProxyServer) -> None:
        self._request_complete()
        worker = Forwarder(self.ctx, self.conn, self.sock, parser, self._admission)
        self._hand_over(Phase.FORWARD, worker, worker.run())

    # -- from the request on -------------------------------------------------------------

    def _request_complete(self) -> None:
        """The client's request is whole: the handshake timer stops, and a client over
        a limit is refused now that it can be answered properly."""
        if self._timer is not None:
            self._timer.cancel()
        if self._meter is not None:
            self._meter.handshake_done(time.monotonic() - self.conn.started)
        self._admission.request_complete(self.conn.user)

    def _open(self) -> Tunnel:
        """A tunnel for a CONNECT or BIND request."""
        self._request_complete()
        self._enter(Phase.CONNECT)
        assert self._handler is not None
        tunnel = Tunnel(self.ctx, self.conn, self.sock, self, self._handler.said_more())
        self._worker = tunnel
        return tunnel

    def established(self, bound: tuple[str, int]) -> bytes:
        """The tunnel is up: the handler answers, and hands over what came after the request."""
        assert self._handler is not None
        first = self._handler.established(bound)
        self._handler = None  # the handshake is over: an idle tunnel keeps no parser
        self._enter(Phase.RELAY)
        return first

    def _hand_over(self, phase: Phase, worker: Worker, run: Coroutine[Any, Any, Status]) -> None:
        """Forwarding or UDP serves the connection from now on, in a task."""
        self._enter(phase)
        self._worker = worker
        self.task = self.loop.create_task(run)
        self.task.add_done_callback(self._on_worker_done)

    def _on_worker_done(self, task: asyncio.Task[Status]) -> None:
        self.task = None
        status, error = Status.SHUTDOWN, None
        if not task.cancelled():
            exc = task.exception()
            if exc is None:
                status = task.result()
            elif isinstance(exc, SessionError) and not (self._worker and self._worker.answered):
                self._refuse(exc)  # the request is answered with the failure
                return
            elif isinstance(exc, SessionError):
                status, error = exc.status, str(exc)
            else:
                what = f"{type(exc).__name__}: {exc}"
                self.ctx.log.error("session_error", conn_id=self.conn.conn_id, error=what)
                status, error = Status.ERROR, f"internal error: {type(exc).__name__}"
        self._end(status, error)

    # -- reading the handshake -----------------------------------------------------------

    def step(self, step: Callable[..., None], *args: Any) -> None:
        """Run one step; an error ends the session with the refusal it calls for."""
        if self.phase is Phase.DONE:
            return  # a callback that was already on its way when the session ended
        try:
            step(*args)
        except SessionError as exc:
            self._refuse(exc)
        except Exception as exc:
            self.ctx.log.exception("session_error", conn_id=self.conn.conn_id)
            self._end(Status.ERROR, f"internal error: {type(exc).__name__}")
        else:
            self._watch_client()

    def _enter(self, phase: Phase) -> None:
        if phase not in _NEXT[self.phase]:
            raise LocalProtocolError(f"session cannot go from {self.phase.name} to {phase.name}")
        self.phase = phase
        if phase is not Phase.CONNECT:  # (its step watches as it ends, if still connecting)
            self._watch_client()

    def _watch_client(self) -> None:
        """Read the client while the handshake waits for it, and while its request is
        under way (the lookup, the connect): a client that goes away then ends the
        session at once, and with it the lookup and the connect. Not otherwise: the
        relay, forwarding, UDP and TLS read it themselves."""
        phase = self.phase
        wanted = phase if phase is Phase.HANDSHAKE or phase is Phase.CONNECT else None
        if wanted is not self._reading:
            if wanted is Phase.HANDSHAKE:
                self._poller.add_reader(self.fd, self._on_readable)
            elif wanted is Phase.CONNECT:  # (replaces the handshake's reader)
                assert isinstance(self._worker, Tunnel)
                self._poller.add_reader(self.fd, self.step, self._worker.on_client_readable)
            elif phase is not Phase.RELAY:  # (the relay takes the watch over as it starts)
                self._poller.remove_reader(self.fd)
            self._reading = wanted

    def _on_readable(self) -> None:
        # Read on while reads fill the buffer (a shorter one took all there was: the
        # poller reports the rest, or a reset behind it)
        while True:
            try:
                data = self.sock.recv(HANDSHAKE_READ)
            except (BlockingIOError, InterruptedError):
                self.step(_nothing)
                return
            except OSError as exc:
                self._end(Status.CLIENT_CLOSED, exc.strerror or type(exc).__name__)
                return
            self.step(self._received, data)
            if self.phase is not Phase.HANDSHAKE or len(data) < HANDSHAKE_READ:
                return

    def _received(self, data: bytes) -> None:
        if not data:
            raise ClientClosed("client closed the connection during the handshake")
        assert self._handler is not None
        self._handler.received(data)

    def start_tls(self, first: bytes) -> None:
        """The bridge reads the client from now on, and once the TLS handshake is done
        this session reads the plaintext (`_on_tls_ready`)."""
        assert self.ctx.tls is not None
        self._enter(Phase.TLS)
        self._tls = Bridge(
            self.sock,
            self.ctx.tls,
            ready=lambda plain: self.step(self._on_tls_ready, plain),
            failed=lambda reason: self._refuse(ProtocolError(reason)),
        )
        self._tls.start(first)

    def _on_tls_ready(self, plain: socket.socket) -> None:
        assert self._tls is not None
        self._tls.broken = self._on_tls_broken
        self.conn.in_tls(self._tls.version)
        self.sock, self.fd = plain, plain.fileno()
        self._enter(Phase.HANDSHAKE)

    def _on_tls_broken(self, exc: OSError) -> None:
        """A TLS client's reset, which the pair cannot show: a tunnel passes it on."""
        if isinstance(self._worker, Tunnel):
            self._worker.fail(exc)

    def _on_verified(self, task: asyncio.Task[None], then: Callable[[], None]) -> None:
        self._auth = None
        if task.cancelled():
            return  # the session ended first
        task.result()  # AuthFailed, LockedOut or OverLimit raise here
        self._enter(Phase.HANDSHAKE)
        then()

    def _on_handshake_timeout(self) -> None:
        self._timer = None
        timeout = self.ctx.config.timeouts.handshake
        self._refuse(HandshakeTimeout(f"no complete request within {timeout:g} s"))

    # -- the end ----------------------------------------------------------------------

    def meter(self) -> None:
        """Tell the metrics what was relayed since the last time (at the end, and
        every few seconds while open, so a long tunnel shows while it runs)."""
        if self._meter is not None and self._worker is not None:
            self._meter.update(self._worker.usage())

    def _refuse(self, error: SessionError) -> None:
        answer = self._handler.refusal(error) if self._handler is not None else None
        extra = error.fields() if isinstance(error, Denied) else {}
        if answer:
            # a few bytes into an idle socket: one send, never a wait
            try:
                sent = self.sock.send(answer)
            except OSError:
                sent = 0
            if self.conn.protocol == "http":  # (None: the client was gone)
                extra["http_status"] = error.http_status if sent else None
        self._end(error.status, str(error), extra)

    def ended(self, status: Status, error: str | None) -> None:
        self._end(status, error)

    def _end(self, status: Status, error: str | None, extra: dict[str, Any] | None = None) -> None:
        """Release everything and write the access line (unless the worker wrote its own)."""
        if self.phase is Phase.DONE:
            return
        self.phase = Phase.DONE
        for pending in (self._timer, self._auth):
            if pending is not None:
                pending.cancel()
        self._poller.remove_reader(self.fd)  # (or the relay's, if it has not ended)
        self._reading = None
        worker = self._worker
        # a stream cut off on one side (a reset, an answer broken off) is reset on the
        # other: it must not look whole
        cut = status in CUT_OFF or (worker is not None and worker.cut)
        if isinstance(worker, Tunnel):
            worker.close(cut)
        if self._tls is not None:
            self._tls.session_ended(reset=cut)  # before the close: it may watch this socket
        elif cut:
            abort(self.sock)
        self.sock.close()
        if (metrics := self.ctx.metrics) is not None:
            with contextlib.suppress(OSError):  # metrics files on a full disk: still end
                self.meter()
                metrics.closed(self.conn.protocol, status, active=self._meter is not None)
        self._admission.release()
        if not (worker is not None and worker.logged):
            fields = {**(worker.fields() if worker is not None else {}), **(extra or {})}
            if self._tls is not None and self.conn.tls is None:
                fields["tls"] = None  # (it started TLS, but the handshake never finished)
            if self.conn.protocol == "http":  # our answer: a CONNECT's 200, or a refusal's
                answered = worker is not None and worker.answered
                fields.setdefault("http_status", 200 if answered else None)
            command, target = self.command, self.target
            write = self.ctx.config.log.access
            access.record(
                self.conn,
                status,
                command=command,
                target=target,
                error=error,
                write=write,
                **fields,
            )
        self._on_close(self)
        # no links back to this session are left: it is freed at once, without a gc pass
        self._handler = self._worker = self._auth = self.task = self._tls = None


def _nothing() -> None:
    """A readiness callback that found nothing to read."""
