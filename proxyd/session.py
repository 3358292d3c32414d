"""One client connection: detect its protocol, drive the handshake, connect, relay, log once.

The protocol handlers turn what their sans-I/O parser reports into calls on
the session (send a reply, check credentials, open the target); everything
common (reading, timeouts, refusal on error, the relay, the access event)
lives in Session, so every protocol behaves alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxyd import chain, upstream
from proxyd.auth import Authenticator, PasswordHash
from proxyd.config import Config
from proxyd.errors import (
    REP_COMMAND_NOT_SUPPORTED,
    REP_SUCCEEDED,
    AuthFailed,
    Denied,
    OverLimit,
    ProtocolError,
    SessionError,
    UpstreamTimeout,
)
from proxyd.forward import Forwarder
from proxyd.log import access
from proxyd.metrics import Metrics
from proxyd.protocols import http as http_proto
from proxyd.protocols import proxy_protocol, socks4, socks5
from proxyd.protocols.common import NEED_DATA, Credentials, format_hostport
from proxyd.protocols.detect import Kind, sniff
from proxyd.relay import RESET, Bucket, Tunnel, abort
from proxyd.rules import Request, Rules, allowed_addresses, in_networks
from proxyd.tls import Bridge
from proxyd.udp import Association

# Handshake reads are small: a request is at most a few KiB, and what a client
# sends beyond it stays in the kernel until the relay reads it.
HANDSHAKE_READ = 4096


class ClientClosed(SessionError):
    status = "client_closed"


class HandshakeTimeout(SessionError):
    status = "handshake_timeout"
    http_status = 408


@dataclass(slots=True)
class Context:
    """What every session of one daemon shares."""

    config: Config
    auth: Authenticator
    resolver: upstream.Resolver
    log: Any
    rules: Rules = field(default_factory=Rules)
    listening: list[tuple[str, int]] = field(default_factory=list)  # our own listeners
    # open sessions per client address and per user, for `[limits]`
    per_client: dict[str, int] = field(default_factory=dict)
    per_user: dict[str, int] = field(default_factory=dict)
    tls: ssl.SSLContext | None = None  # `[tls]`: clients starting with a TLS handshake get TLS
    # each user's rate limit (limits.per_user_rate): one bucket per direction, (up, down)
    rates: dict[str, tuple[Bucket, Bucket]] = field(default_factory=dict)
    draining: bool = False  # the daemon is stopping: no new request on a kept-alive connection
    metrics: Metrics | None = None  # `[metrics]`: what connections record
    upstreams: chain.Upstreams | None = None  # `[[upstreams]]`: parent proxies to go through

    def __post_init__(self) -> None:
        if self.upstreams is None:
            self.upstreams = chain.Upstreams(self.resolver, self.log)
        self.upstreams.configure(self.config)

    def reconfigure(
        self,
        config: Config,
        users: dict[str, PasswordHash],
        rules: Rules,
        tls: ssl.SSLContext | None,
    ) -> None:
        """A reload: new connections get these; open ones keep what they started with
        (their relay's timeouts and buckets), and the counts behind [limits] go on."""
        if config.limits.per_user_rate != self.config.limits.per_user_rate:
            self.rates.clear()
        a, dns = config.auth, config.dns
        self.auth.replace_users(users)
        self.auth.throttle.configure(a.max_failures, a.failure_window, a.lockout)
        self.resolver.configure(
            size=dns.cache_size, ttl=dns.cache_ttl, negative_ttl=dns.negative_ttl
        )
        self.config, self.rules, self.tls = config, rules, tls
        assert self.upstreams is not None
        self.upstreams.configure(config)

    def proxy_protocol_from(self, ip: str) -> bool:
        """Whether a connection from `ip` must start with a PROXY protocol header."""
        networks = self.config.server.proxy_protocol_from
        return bool(networks) and in_networks(ip, networks)

    def rate_for(self, user: str | None) -> tuple[Bucket, Bucket] | None:
        """The buckets every transfer of this user shares, when its rate is limited.
        Only authenticated users have one, so the table holds at most the users file."""
        rate = self.config.limits.per_user_rate
        if not rate or user is None:
            return None
        buckets = self.rates.get(user)
        if buckets is None:
            buckets = self.rates[user] = (Bucket(rate), Bucket(rate))
        return buckets

    def is_own_listener(self, ip: str, port: int, client: Session) -> bool:
        """Whether ip:port is one of this daemon's listeners, which a client must not
        make it connect to (a loop through itself). A wildcard listener is reached
        on loopback, on the unspecified address, and on the address the client used."""
        for host, own_port in self.listening:
            if own_port != port:
                continue
            if ip == host:
                return True
            if host in ("0.0.0.0", "::"):
                if ip in ("0.0.0.0", "::") or ipaddress.ip_address(ip).is_loopback:
                    return True
                with contextlib.suppress(OSError):
                    if ip == client.local_address()[0]:
                        return True
        return False


class Handler(Protocol):
    """Turns one protocol's handshake into calls on the session (see Socks5Handler)."""

    protocol: str

    def received(self, data: bytes) -> None: ...
    def established(self, bound: tuple[str, int]) -> bytes: ...
    def refusal(self, error: SessionError) -> bytes | None: ...


class Phase(enum.Enum):
    HANDSHAKE = enum.auto()  # reading the client's request
    TLS = enum.auto()  # the TLS handshake, which the bridge reads for
    AUTH = enum.auto()  # a password derivation is running
    CONNECT = enum.auto()  # reaching the target
    RELAY = enum.auto()
    FORWARD = enum.auto()  # plain HTTP requests, served by a task
    UDP = enum.auto()  # a UDP association, served by a task
    DONE = enum.auto()


class Session:
    """One client connection as a chain of loop callbacks, from accept to the access line.

    No task per connection: a task, its futures and `asyncio.timeout` cost more
    than everything else in a short connection (measured: 50 us of 150). Only a
    password derivation, slow and rare, runs as a task.
    """

    __slots__ = (
        "_association",
        "_auth",
        "_binder",
        "_client_counted",
        "_connector",
        "_forwarder",
        "_handler",
        "_lease",
        "_local",
        "_lookup",
        "_metered",
        "_on_close",
        "_proxy_header",
        "_reading",
        "_remote",
        "_task",
        "_timer",
        "_tls",
        "_tunnel",
        "_user_counted",
        "client",
        "command",
        "conn_id",
        "ctx",
        "fd",
        "loop",
        "over_limit",
        "peer_ip",
        "phase",
        "protocol",
        "proxied_by",
        "sock",
        "started",
        "target",
        "user",
        "via",
    )

    def __init__(
        self,
        ctx: Context,
        sock: socket.socket,
        peer: tuple[Any, ...],
        conn_id: int,
        *,
        on_close: Callable[[Session], object],
        over_limit: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.conn_id = conn_id
        self.peer_ip: str = peer[0]
        self.client = format_hostport(peer[0], peer[1])
        # why this client is refused once its request is read, if it is
        self.over_limit = over_limit
        self._client_counted = False
        # a load balancer's connection starts with a PROXY header naming the client
        self._proxy_header: proxy_protocol.ProxyHeaderParser | None = None
        # the trusted balancer this connection came through (the access line's proxied_by)
        self.proxied_by: str | None = None
        if ctx.proxy_protocol_from(self.peer_ip):
            self._proxy_header = proxy_protocol.ProxyHeaderParser()
        else:
            self._count_client()
        self._user_counted = False
        self.user: str | None = None
        self.protocol: str | None = None
        self.command: str | None = None
        self.target: str | None = None
        self.phase = Phase.HANDSHAKE
        self._on_close = on_close
        self._handler: Handler | None = None
        self._reading = False
        self._timer: asyncio.TimerHandle | None = None
        self._auth: asyncio.Task[None] | None = None
        self._task: asyncio.Task[Any] | None = None
        self._association: Association | None = None
        self._forwarder: Forwarder | None = None
        self._binder: upstream.Binder | None = None
        self._lookup: asyncio.Future[list[upstream.AddrInfo]] | None = None  # BIND's peer name
        self._connector: upstream.Connector | chain.ChainConnector | None = None
        self._lease: chain.Lease | None = None  # the parent proxy this tunnel goes through
        self.via: str | None = None  # its upstream group, for the access line
        self._remote: socket.socket | None = None
        self._tunnel: Tunnel | None = None
        self._tls: Bridge | None = None  # TLS for this client, once it started with it
        self._local: tuple[Any, ...] | None = None  # where the client reached us, under TLS
        self._metered: Usage | None = None  # what the metrics have of it; None: not counted

    def _count_client(self) -> None:
        """One session more for the client's address (`limits.per_client`)."""
        ctx = self.ctx
        count = ctx.per_client.get(self.peer_ip, 0)
        ctx.per_client[self.peer_ip] = count + 1
        self._client_counted = True
        per_client = ctx.config.limits.per_client
        if self.over_limit is None and per_client and count >= per_client:
            self.over_limit = f"limits.per_client ({per_client}) reached for {self.peer_ip}"

    def start(self) -> None:
        self._timer = self.loop.call_at(
            self.started + self.ctx.config.timeouts.handshake, self._on_handshake_timeout
        )
        # The request is often here already: read before asking the loop to watch.
        self._on_readable()

    @property
    def between_requests(self) -> bool:
        """A forwarding connection kept alive, waiting for its next request."""
        return self._forwarder is not None and self._forwarder.between_requests

    @property
    def task(self) -> asyncio.Task[Any] | None:
        """The task serving a forwarding connection or a UDP association, if any."""
        return self._task

    def abort(self) -> None:
        """End now (the daemon is stopping)."""
        if self._task is not None:
            self._task.cancel()  # it ends the session once it has stopped using the sockets
        else:
            self._end("shutdown", None)

    # -- what handlers call ---------------------------------------------------------

    def send(self, data: bytes) -> None:
        """A handshake reply: a few bytes into a socket with nothing queued, so one
        send takes them all; a client that has not let it is not reading at all."""
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise ClientClosed(f"client connection failed: {exc.strerror}") from None
        if sent < len(data):
            raise ProtocolError("client does not read the handshake replies")

    def check_credentials(self, credentials: Credentials | None, then: Callable[[], None]) -> None:
        """Require valid credentials when users are configured, then go on with `then`."""
        auth = self.ctx.auth
        if not auth.required:
            then()
            return
        if credentials is None:
            raise AuthFailed("credentials required")
        self.user = credentials.username
        auth.check_lockout(self.peer_ip)
        # over the limit: refused after the request anyway, so spend no derivation on it
        if self.over_limit or auth.cached(credentials):
            then()
            return
        self._enter(Phase.AUTH)
        self._auth = self.loop.create_task(auth.verify(credentials, self.peer_ip))
        self._auth.add_done_callback(lambda task: self._step(self._on_verified, task, then))

    def _request_complete(self) -> None:
        """The client's request is whole: the handshake timer stops, and a client over
        a limit is refused now that it can be answered properly."""
        if self._timer is not None:
            self._timer.cancel()
        metrics = self.ctx.metrics
        if metrics is not None and self.protocol is not None:
            metrics.handshake_done(self.protocol, self.loop.time() - self.started)
        if self.over_limit:
            raise OverLimit(self.over_limit)
        per_user = self.ctx.config.limits.per_user
        if per_user and self.user is not None:
            count = self.ctx.per_user.get(self.user, 0)
            if count >= per_user:
                raise OverLimit(f"limits.per_user ({per_user}) reached for {self.user}")
            self.ctx.per_user[self.user] = count + 1
            self._user_counted = True

    def forward(self, parser: http_proto.HttpProxyServer) -> None:
        """A plain HTTP request: from now on a task forwards this connection's requests,
        each of which writes its own access line."""
        self._request_complete()
        self._enter(Phase.FORWARD)
        self._forwarder = Forwarder(self, parser)
        self._task = self.loop.create_task(self._forwarder.run(parser.request))
        self._task.add_done_callback(self._on_forward_done)

    def associate(self, host: str, client_port: int, reply: Callable[[str, int], None]) -> None:
        """A UDP ASSOCIATE request: a task relays the datagrams until the control
        connection closes; `reply` answers the request with the relay's address."""
        self._request_complete()
        rules = self.ctx.rules
        if not rules.trivial:  # who may associate; each datagram's destination is checked too
            rules.check_without_destination(self.request_for(host, client_port))
        self._enter(Phase.UDP)
        self._association = Association(self, client_port, reply)
        self._task = self.loop.create_task(self._association.run())
        self._task.add_done_callback(self._on_association_done)

    def bind(self, host: str, port: int, listening: Callable[[str, int], None]) -> None:
        """A BIND request: listen for the peer `host` names (0.0.0.0 or :: for any),
        tell the client where (`listening`), and relay once that peer connects."""
        self._request_complete()
        self._enter(Phase.CONNECT)
        rules = self.ctx.rules
        # the peer by its address (or name) as the request gives it
        if not rules.trivial and rules.check(self.request_for(host, port)).via is not None:
            raise ProtocolError(
                "BIND is not chained through upstream proxies (a rule routes it via one)",
                socks_reply=REP_COMMAND_NOT_SUPPORTED,
                status="not_supported",
            )
        if host in ("0.0.0.0", "::"):
            self._listen(None, listening)
        elif upstream.literal_addresses(host, port) is not None:
            self._listen({host}, listening)
        else:
            self._resolve(
                host, port, lambda found: self._listen({a[0] for _f, a in found}, listening)
            )

    def _listen(self, expected: set[str] | None, listening: Callable[[str, int], None]) -> None:
        cfg = self.ctx.config
        try:
            self._binder = upstream.Binder(
                self.local_address()[0],
                expected,
                cfg.timeouts.connect,
                cfg.buffers,
                lambda sock, error: self._step(self._on_connected, sock, error, True),
            )
        except OSError as exc:
            raise SessionError(f"cannot listen for the peer: {exc.strerror}") from None
        listening(*self._binder.address)

    def open(self, host: str, port: int) -> None:
        """The handshake is complete: check the rules, connect to the target, relay."""
        self._request_complete()
        self._enter(Phase.CONNECT)
        # timeouts.connect bounds the lookup for address rules and a direct connect
        # together (through a parent, the connect has the whole of it)
        deadline = self.loop.time() + self.ctx.config.timeouts.connect
        self._authorize(
            host,
            port,
            lambda addresses, via: self._connect(host, port, addresses, via, deadline),
        )

    def _connect(
        self,
        host: str,
        port: int,
        addresses: list[upstream.AddrInfo] | None,
        via: str | None,
        deadline: float,
    ) -> None:
        cfg = self.ctx.config
        started = self.loop.time()
        timeout = max(deadline - started, 0.0)
        if via is not None:
            assert self.ctx.upstreams is not None
            self.via = via
            connector = chain.ChainConnector(
                self.ctx.upstreams.pool(via),
                # the whole of it: the pool counts a parent short of time as failed,
                # and the lookup that took some is ours, not the parent's doing
                cfg.timeouts.connect,
                lambda sock, error: self._step(self._on_connected, sock, error, False, started),
                refuse=self.is_own_listener,
            )
            self._connector = connector
            connector.start(host, port, addresses)
            return
        self._connector = upstream.Connector(
            self.ctx.resolver,
            cfg.buffers,
            timeout,
            lambda sock, error: self._step(self._on_connected, sock, error, False, started),
            refuse=self.is_own_listener,
        )
        if addresses is None:
            self._connector.start(host, port)
        else:
            self._connector.start_resolved(host, port, addresses)

    def is_own_listener(self, ip: str, port: int) -> bool:
        return self.ctx.is_own_listener(ip, port, self)

    def local_address(self) -> tuple[Any, ...]:
        """The listener address the client connected to (under TLS, `sock` is the
        plaintext end of a socket pair, which has none)."""
        return self._local if self._local is not None else self.sock.getsockname()

    @property
    def tls_version(self) -> str | None:
        """ "TLSv1.3" and the like for a client in TLS, else None."""
        return self._tls.version if self._tls is not None else None

    def request_for(self, host: str, port: int) -> Request:
        """This session's request to host:port, as the access rules see it."""
        return Request(self.peer_ip, self.user, self.protocol or "", self.command or "", host, port)

    def _authorize(
        self,
        host: str,
        port: int,
        then: Callable[[list[upstream.AddrInfo] | None, str | None], None],
    ) -> None:
        """Check the rules for host:port; go on with `then(addresses, via)`: the
        addresses that were allowed when a name had to be resolved for address rules
        (connect to those, not to a fresh lookup), else None; and the upstream group
        the deciding rule routes through (None: direct)."""
        rules = self.ctx.rules
        if rules.trivial:
            then(None, None)
            return
        request = self.request_for(host, port)
        decision = rules.check_before_lookup(request)
        if decision is not None:
            then(None, decision.via)
            return
        self._resolve(host, port, lambda found: then(*allowed_addresses(rules, request, found)))

    def _resolve(
        self, host: str, port: int, then: Callable[[list[upstream.AddrInfo]], None]
    ) -> None:
        """The addresses of a name, from the cache or a lookup bounded by
        `timeouts.connect`, handed to `then`; a failure refuses the request."""
        target = format_hostport(host, port)
        cached = self.ctx.resolver.cached(host, port)
        if isinstance(cached, OSError):
            raise upstream.classify(cached, target)
        if cached is not None:
            then(cached)
            return
        lookup = self._lookup = self.ctx.resolver.lookup(host, port)
        lookup.add_done_callback(lambda f: self._step(self._on_resolved, f, target, then))
        timeout = UpstreamTimeout(f"resolving {target} timed out")
        self._timer = self.loop.call_later(self.ctx.config.timeouts.connect, self._refuse, timeout)

    def _on_resolved(
        self,
        lookup: asyncio.Future[list[upstream.AddrInfo]],
        target: str,
        then: Callable[[list[upstream.AddrInfo]], None],
    ) -> None:
        self._lookup = None
        if self._timer is not None:
            self._timer.cancel()
        if lookup.cancelled():
            return
        exc = lookup.exception()
        if isinstance(exc, OSError):
            raise upstream.classify(exc, target)
        if exc is not None:
            raise exc
        then(lookup.result())

    # -- loop callbacks -------------------------------------------------------------

    def _step(self, step: Callable[..., None], *args: Any) -> None:
        """Run one step; an error ends the session with the refusal it calls for."""
        if self.phase is Phase.DONE:
            return  # a callback that was already on its way when the session ended
        try:
            step(*args)
        except SessionError as exc:
            self._refuse(exc)
        except Exception as exc:
            self.ctx.log.exception("session_error", conn_id=self.conn_id)
            self._end("error", f"internal error: {type(exc).__name__}")
        else:
            self._watch_client(self.phase is Phase.HANDSHAKE)

    def _enter(self, phase: Phase) -> None:
        self.phase = phase
        self._watch_client(phase is Phase.HANDSHAKE)

    def _watch_client(self, wanted: bool) -> None:
        """Read the client while (and only while) the handshake waits for it; changed
        at once, as a step may already have handed the socket to the relay."""
        if wanted != self._reading:
            if wanted:
                self.loop.add_reader(self.fd, self._on_readable)
            else:
                self.loop.remove_reader(self.fd)
            self._reading = wanted

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(HANDSHAKE_READ)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError as exc:
            self._end("client_closed", exc.strerror or type(exc).__name__)
            return
        if data is None:
            self._step(_nothing)
        else:
            self._step(self._received, data)

    def _received(self, data: bytes) -> None:
        if not data:
            raise ClientClosed("client closed the connection during the handshake")
        if self._proxy_header is not None:
            data = self._read_proxy_header(self._proxy_header, data)
            if not data:
                return
        if self._handler is None and self._tls is None and proxy_protocol.starts_like_header(data):
            raise ProtocolError(
                f"a PROXY protocol header from {self.peer_ip}, "
                "which server.proxy_protocol_from does not trust"
                if self.proxied_by is None
                else "a second PROXY protocol header"
            )
        if self._handler is None:
            if self.ctx.tls is not None and self._tls is None and sniff(data) is Kind.TLS:
                self._start_tls(self.ctx.tls, data)
                return
            self._handler = self._handler_for(data)
            self.protocol = self._handler.protocol
            if (metrics := self.ctx.metrics) is not None:
                metrics.opened(self.protocol)
                self._metered = _NOTHING_YET
        self._handler.received(data)

    def _read_proxy_header(self, parser: proxy_protocol.ProxyHeaderParser, data: bytes) -> bytes:
        """The header a trusted load balancer sends first; once whole, the client it
        names is this session's client. The bytes that came after it are returned."""
        if self.proxied_by is None:  # the first bytes: they must start a header
            self.proxied_by = self.client
            if proxy_protocol.starts_like_header(data) is False:
                raise ProtocolError(
                    f"no PROXY protocol header from {self.peer_ip} "
                    "(server.proxy_protocol_from requires one)"
                )
        parser.receive_data(data)
        header = parser.next_event()
        if header is NEED_DATA:
            return b""
        assert isinstance(header, proxy_protocol.ProxyHeader)
        self._proxy_header = None
        if header.source is not None:
            ip = ipaddress.ip_address(header.source[0])
            # an IPv4 client a dual-stack balancer names as ::ffff:a.b.c.d is that
            # IPv4 address to the logs, the limits and the UDP relay
            mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
            self.peer_ip = str(mapped or ip)
            self.client = format_hostport(self.peer_ip, header.source[1])
        self._count_client()
        return parser.trailing_data

    def _start_tls(self, context: ssl.SSLContext, first: bytes) -> None:
        """The client starts with TLS: the bridge reads its socket from now on, and once
        the handshake is done this session reads the plaintext (`_on_tls_ready`)."""
        self._enter(Phase.TLS)
        self._tls = Bridge(
            self.sock,
            context,
            ready=lambda plain: self._step(self._on_tls_ready, plain),
            failed=lambda reason: self._refuse(ProtocolError(reason)),
        )
        self._tls.start(first)

    def _on_tls_ready(self, plain: socket.socket) -> None:
        assert self._tls is not None
        self._tls.broken = self._on_tls_broken
        self._local = self.sock.getsockname()
        self.sock, self.fd = plain, plain.fileno()
        self._enter(Phase.HANDSHAKE)

    def _handler_for(self, first: bytes) -> Handler:
        kind = sniff(first)
        if kind is Kind.SOCKS5:
            return Socks5Handler(self)
        if kind is Kind.HTTP:
            return HttpHandler(self)
        if kind is Kind.SOCKS4:
            return Socks4Handler(self)
        if kind is Kind.TLS:
            raise ProtocolError(
                "a TLS handshake inside TLS" if self._tls else "TLS, but no [tls] certificate"
            )
        raise ProtocolError(f"unknown protocol (first byte {first[0]:#04x})")

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

    def _on_connected(
        self,
        remote: socket.socket | None,
        error: SessionError | None,
        bind: bool = False,
        started: float | None = None,
    ) -> None:
        """The target is connected (or, for BIND, the peer has connected to us)."""
        connector, self._connector, self._binder = self._connector, None, None
        if error is not None:
            raise error
        first_down = b""
        if isinstance(connector, chain.ChainConnector):
            self._lease, first_down = connector.lease, connector.trailing
        if started is not None and (metrics := self.ctx.metrics) is not None:
            metrics.connected(self.loop.time() - started)
        assert remote is not None and self._handler is not None
        self._remote = remote
        # CONNECT replies with our end of the connection, BIND with the peer's address
        bound = remote.getpeername() if bind else remote.getsockname()
        first_up = self._handler.established(bound[:2])
        self._handler = None  # the handshake is over: an idle tunnel keeps no parser
        cfg = self.ctx.config
        self._tunnel = Tunnel(
            self.sock,
            remote,
            read_size=cfg.buffers.read_size,
            idle=cfg.timeouts.idle,
            splice=cfg.buffers.splice,
            on_end=self._on_tunnel_end,
            rate=self.ctx.rate_for(self.user),
        )
        self._enter(Phase.RELAY)
        self._tunnel.start(first_up, first_down)

    def _on_forward_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.ctx.log.error(
                "session_error", conn_id=self.conn_id, error=f"{type(exc).__name__}: {exc}"
            )
        # the requests wrote their lines; stopped before the first, the connection writes one
        logged = self._forwarder is not None and self._forwarder.lines > 0
        self._end("shutdown" if task.cancelled() else "ok", None, logged=logged)

    def _on_association_done(self, task: asyncio.Task[str]) -> None:
        self._task = None
        association = self._association
        assert association is not None
        status, error = "shutdown", None
        if not task.cancelled():
            exc = task.exception()
            if exc is None:
                status = task.result()
            elif isinstance(exc, SessionError) and not association.established:
                self._refuse(exc)  # the request is answered with the failure
                return
            elif isinstance(exc, SessionError):
                status, error = exc.status, str(exc)
            else:
                self.ctx.log.error(
                    "session_error", conn_id=self.conn_id, error=f"{type(exc).__name__}: {exc}"
                )
                status, error = "error", f"internal error: {type(exc).__name__}"
        self._end(status, error, extra=association.counts())

    def _on_tls_broken(self, exc: OSError) -> None:
        """The TLS client's connection failed: a tunnel passes the reset on (without
        one, the end of the pair is enough: a handshake or an answer just stops)."""
        if self._tunnel is not None:
            self._tunnel.fail(exc)

    def _on_tunnel_end(self) -> None:
        assert self._tunnel is not None
        self._end(self._tunnel.status, self._tunnel.error)

    # -- metrics ------------------------------------------------------------------------

    def usage(self) -> Usage:
        """Bytes up and down, datagrams up and down, relayed so far."""
        if (tunnel := self._tunnel) is not None:
            return (tunnel.bytes_up, tunnel.bytes_down, 0, 0)
        if (association := self._association) is not None:
            a = association
            return (a.bytes_up, a.bytes_down, a.datagrams_up, a.datagrams_down)
        return _NOTHING_YET  # forwarded requests count their own bytes

    def meter(self) -> None:
        """Tell the metrics what was relayed since the last time (at the end, and
        every few seconds while open, so a long tunnel shows while it runs)."""
        before, metrics = self._metered, self.ctx.metrics
        if before is None or metrics is None:
            return
        now = self.usage()
        if now != before:
            metrics.relayed(*(n - b for n, b in zip(now, before, strict=True)))
            self._metered = now

    # -- the end ----------------------------------------------------------------------

    def _refuse(self, error: SessionError) -> None:
        answer = self._handler.refusal(error) if self._handler is not None else None
        if answer:
            # a few bytes into an idle socket: one send, never a wait
            with contextlib.suppress(OSError):
                self.sock.send(answer)
        extra = {"rule": error.rule} if isinstance(error, Denied) else None
        self._end(error.status, str(error), extra=extra)

    def _end(
        self,
        status: str,
        error: str | None,
        *,
        logged: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Release everything and write the access line (unless the requests of a
        forwarding connection wrote theirs); once."""
        if self.phase is Phase.DONE:
            return
        self.phase = Phase.DONE
        if self._timer is not None:
            self._timer.cancel()
        if self._reading:
            self.loop.remove_reader(self.fd)
            self._reading = False
        if self._auth is not None:
            self._auth.cancel()
        if self._connector is not None:
            self._connector.cancel()
        if self._binder is not None:
            self._binder.cancel()
        if self._lookup is not None:
            self._lookup.cancel()
        tunnel = self._tunnel
        # a tunnel reset on one side is reset on the other, as a cut-off stream must be
        # (and so is a client whose forwarded answer an origin broke off)
        forwarder = self._forwarder
        cut = (tunnel is not None and status == RESET) or (forwarder is not None and forwarder.cut)
        if tunnel is not None:
            tunnel.stop()
        if self._tls is not None:
            # before the close: it may be watching this socket
            self._tls.session_ended(reset=cut)
        elif cut:
            abort(self.sock)
        self.sock.close()
        if self._remote is not None:
            if cut:
                abort(self._remote)
            self._remote.close()
        if self._lease is not None:
            self._lease.release()
        if (metrics := self.ctx.metrics) is not None:
            with contextlib.suppress(OSError):  # metrics files on a full disk: still end
                self.meter()
                metrics.closed(self.protocol, status, active=self._metered is not None)
        if self._client_counted:
            _release(self.ctx.per_client, self.peer_ip)
        if self._user_counted and self.user is not None:
            _release(self.ctx.per_user, self.user)
        if self.ctx.config.log.access and not logged:
            fields: dict[str, Any] = {
                "bytes_up": tunnel.bytes_up if tunnel else 0,
                "bytes_down": tunnel.bytes_down if tunnel else 0,
                **(extra or {}),
            }
            if error:
                fields["error"] = error
            if self._tls is not None:
                fields["tls"] = self._tls.version
            if self.proxied_by is not None:
                fields["proxied_by"] = self.proxied_by
            if self.via is not None:
                fields["via"] = self.via
                if self._lease is not None:
                    fields["upstream"] = str(self._lease.parent)
            access(
                conn_id=self.conn_id,
                client=self.client,
                user=self.user,
                protocol=self.protocol,
                command=self.command,
                target=self.target,
                status=status,
                duration_ms=round((self.loop.time() - self.started) * 1000, 1),
                **fields,
            )
        self._on_close(self)
        # Drop the links back to this session (handler, relay, connector callbacks):
        # without cycles it is freed at once, not by a garbage collection pass.
        self._handler = self._tunnel = self._connector = self._auth = self._task = None
        self._association = self._binder = self._lookup = self._forwarder = self._tls = None


Usage = tuple[int, int, int, int]
_NOTHING_YET: Usage = (0, 0, 0, 0)


def _release(counts: dict[str, int], key: str) -> None:
    """One open session fewer for `key`; gone at zero, so the table stays small."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _nothing() -> None:
    """A readiness callback that found nothing to read."""


class Socks5Handler:
    __slots__ = ("parser", "session")
    protocol = "socks5"

    def __init__(self, session: Session) -> None:
        self.session = session
        self.parser = socks5.Socks5Server()

    def received(self, data: bytes) -> None:
        self.parser.receive_data(data)
        self._advance()

    def _advance(self) -> None:
        """Act on each complete message the client has sent, until one needs a wait."""
        while (event := self.parser.next_event()) is not NEED_DATA:
            if isinstance(event, socks5.Greeting):
                self._greeting(event)
            elif isinstance(event, Credentials):
                self.session.check_credentials(event, self._authenticated)
                return
            else:
                assert isinstance(event, socks5.Request)
                self._request(event)
                return

    def _greeting(self, greeting: socks5.Greeting) -> None:
        session, parser = self.session, self.parser
        required = session.ctx.auth.required
        wanted = socks5.METHOD_USERNAME_PASSWORD if required else socks5.METHOD_NO_AUTH
        method = wanted if wanted in greeting.methods else socks5.METHOD_NO_ACCEPTABLE
        session.send(parser.choose_method(method))
        if method == socks5.METHOD_NO_ACCEPTABLE:
            if required:
                raise AuthFailed("client offered no username/password method")
            raise ProtocolError("client did not offer the no-authentication method")

    def _authenticated(self) -> None:
        self.session.send(self.parser.auth_result(True))
        self._advance()  # the request may have come along with the credentials

    def _request(self, request: socks5.Request) -> None:
        session = self.session
        session.command = request.command.name.lower()
        session.target = format_hostport(request.host, request.port)
        if request.command is socks5.Command.UDP_ASSOCIATE:
            session.associate(request.host, request.port, self._udp_reply)
            return
        if request.command is socks5.Command.BIND:
            session.bind(request.host, request.port, self._listening)
            return
        session.open(request.host, request.port)

    def _listening(self, host: str, port: int) -> None:
        self.session.send(self.parser.bind_listening(host, port))

    def _udp_reply(self, host: str, port: int) -> None:
        self.session.send(self.parser.reply(REP_SUCCEEDED, host, port))

    def established(self, bound: tuple[str, int]) -> bytes:
        self.session.send(self.parser.reply(REP_SUCCEEDED, *bound))
        return self.parser.trailing_data

    def refusal(self, error: SessionError) -> bytes | None:
        state = self.parser.state
        if state is socks5.State.CHECK_AUTH:  # RFC 1929: a failure status, then close
            return self.parser.auth_result(False)
        if state in (socks5.State.AWAIT_REQUEST, socks5.State.REPLY):
            return self.parser.reply(error.socks_reply)
        return None


class Socks4Handler:
    """SOCKS4 and 4a: one request, one reply. There is no password to check, so with
    users configured the request is refused unless `auth.allow_socks4` says otherwise."""

    __slots__ = ("parser", "session")
    protocol = "socks4"

    def __init__(self, session: Session) -> None:
        self.session = session
        self.parser = socks4.Socks4Server()

    def received(self, data: bytes) -> None:
        session = self.session
        self.parser.receive_data(data)
        request = self.parser.next_event()
        if request is NEED_DATA:
            return
        assert isinstance(request, socks4.Request)
        session.command = request.command.name.lower()
        session.target = format_hostport(request.host, request.port)
        cfg = session.ctx.config
        if session.ctx.auth.required and not cfg.auth.allow_socks4:
            raise AuthFailed("SOCKS4 has no password; users are configured (auth.allow_socks4)")
        if request.command is socks4.Command.BIND:
            parser = self.parser
            session.bind(
                request.host,
                request.port,
                lambda host, port: session.send(parser.bind_listening(host, port)),
            )
            return
        session.open(request.host, request.port)

    def established(self, bound: tuple[str, int]) -> bytes:
        self.session.send(self.parser.reply(True, *bound))
        return self.parser.trailing_data

    def refusal(self, error: SessionError) -> bytes | None:
        if self.parser.state in (socks4.State.AWAIT_REQUEST, socks4.State.REPLY):
            return self.parser.reply(False)
        return None


class HttpHandler:
    __slots__ = ("parser", "session")
    protocol = "http"

    def __init__(self, session: Session) -> None:
        self.session = session
        self.parser = http_proto.HttpProxyServer()

    def received(self, data: bytes) -> None:
        session, parser = self.session, self.parser
        parser.receive_data(data)
        event = parser.next_event()
        if event is NEED_DATA:
            return
        assert isinstance(event, http_proto.ConnectRequest | http_proto.ForwardRequest)
        if isinstance(event, http_proto.ConnectRequest):
            session.command = "connect"
            session.target = format_hostport(event.host, event.port)
            connect = event
            session.check_credentials(
                event.credentials, lambda: session.open(connect.host, connect.port)
            )
            return
        session.command = event.method
        origin = http_proto.absolute_origin(event.target)
        session.target = format_hostport(*origin) if origin is not None else None
        session.forward(self.parser)  # it checks credentials, and reads bodies, itself

    def established(self, bound: tuple[str, int]) -> bytes:
        self.session.send(self.parser.established())
        return self.parser.trailing_data

    def refusal(self, error: SessionError) -> bytes | None:
        if isinstance(error, ClientClosed):
            return None
        return self.parser.error_response(error.http_status, str(error))
