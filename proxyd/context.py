"""What the code handling a connection may know: the daemon's shared `Context`, and
the facts of one client connection (`Conn`).

Both are plain state. Who may go where is decided from them in proxyd.gate; the
session, forwarding and UDP take them (never the session itself), so that each
can be read without the others.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from proxyd import egress
from proxyd.accounting import Ledger
from proxyd.auth import Authenticator, PasswordHash, Throttle
from proxyd.chain import Upstreams
from proxyd.config import Config
from proxyd.destinations import Destinations
from proxyd.dns import Resolver
from proxyd.metrics import Metrics
from proxyd.protocols.common import format_hostport
from proxyd.relay import Bucket
from proxyd.rules import Rules
from proxyd.settings import Settings

Rate = tuple[Bucket, Bucket]  # one user's limits.per_user_rate: (up, down)


@dataclass(slots=True)
class Context:
    """What every connection of one daemon shares; a reload replaces its settings,
    and connections already open keep what they started with."""

    config: Config
    auth: Authenticator
    resolver: Resolver
    log: Any
    upstreams: Upstreams  # `[[upstreams]]`: the parent proxies rules route through
    rules: Rules = field(default_factory=Rules)
    tls: ssl.SSLContext | None = None  # `[tls]`: clients starting with a TLS handshake get TLS
    metrics: Metrics | None = None  # `[metrics]`: what connections record
    # the daemon itself, the host's addresses and private networks, as destinations
    destinations: Destinations = field(default_factory=Destinations)
    # open connections per client address and per user, for `[limits]`
    per_client: dict[str, int] = field(default_factory=dict)
    per_user: dict[str, int] = field(default_factory=dict)
    # each user's rate limit (limits.per_user_rate), shared by all of their traffic
    rates: dict[str, Rate] = field(default_factory=dict)
    # each user's traffic this period (`[accounting]`, `[metrics] per_user`), else None
    ledger: Ledger | None = None
    draining: bool = False  # the daemon is stopping: no new request on a kept-alive connection

    def __post_init__(self) -> None:
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
        self.auth.user_throttle.configure(a.max_user_failures, a.failure_window, a.lockout)
        self.auth.configure(a.ipv6_prefix)
        self.resolver.configure(
            size=dns.cache_size,
            ttl=dns.cache_ttl,
            negative_ttl=dns.negative_ttl,
            per_client=dns.per_client,
        )
        self.config, self.rules, self.tls = config, rules, tls
        if self.ledger is not None:
            self.ledger.configure(config.quotas)
        self.upstreams.configure(config)


def build(settings: Settings, log: Any) -> Context:
    """The Context a daemon judges and serves with, from its settings: the daemon's
    own at its start, and `proxyd explain`'s, so that both decide alike."""
    config = settings.config
    dns, limits = config.dns, config.auth
    resolver = Resolver(
        size=dns.cache_size,
        ttl=dns.cache_ttl,
        negative_ttl=dns.negative_ttl,
        per_client=dns.per_client,
    )
    authenticator = Authenticator(
        settings.users,
        throttle=Throttle(limits.max_failures, limits.failure_window, limits.lockout),
        user_throttle=Throttle(limits.max_user_failures, limits.failure_window, limits.lockout),
        ipv6_prefix=limits.ipv6_prefix,
        log=log,
    )
    upstreams = Upstreams(resolver, log)
    counted = config.accounting.enabled or config.metrics.per_user
    return Context(
        config,
        authenticator,
        resolver,
        log,
        upstreams,
        rules_of(config),
        tls=settings.tls,
        ledger=(
            Ledger(config.accounting.every, config.quotas, shares=config.server.workers)
            if counted
            else None
        ),
    )


def rules_of(config: Config) -> Rules:
    server = config.server
    way_out = egress.make(server.egress, server.egress_interface, server.egress_pick)
    return Rules(config.rules, server.default_action == "allow", way_out)


def guard(ctx: Context, own_ports: Iterable[int], exposed: bool) -> None:
    """Tell the gate what no client may reach through us (proxyd.destinations): the
    ports this daemon listens on (the metrics listener's included), and the private
    networks when `server.private_destinations` says so: "auto" denies them whenever
    clients from beyond this host reach the daemon (`exposed`)."""
    mode = ctx.config.server.private_destinations
    destinations = ctx.destinations
    destinations.own_ports = frozenset(own_ports)
    destinations.deny_private = mode == "deny" or (mode == "auto" and exposed)


class Conn:
    """The facts of one client connection: who (after a PROXY header, the client the
    load balancer names), where it reached us, over what, and as which user."""

    __slots__ = (
        "_local",
        "_sock",
        "client",
        "conn_id",
        "metered",
        "peer_ip",
        "protocol",
        "proxied_by",
        "started",
        "tls",
        "user",
    )

    def __init__(
        self, conn_id: int, peer: tuple[Any, ...], sock: socket.socket | None = None
    ) -> None:
        self.conn_id = conn_id
        self.peer_ip: str = peer[0]
        self.client = format_hostport(peer[0], peer[1])
        self.started = time.monotonic()
        self._sock = sock  # the accepted socket, asked for the local address when needed
        self._local: tuple[Any, ...] | None = None
        self.protocol: str | None = None  # once detected: "socks5", "socks4", "http"
        self.user: str | None = None  # as the credentials name it (forwarding: this request's)
        self.tls: str | None = None  # "TLSv1.3" and the like, for a client in TLS
        self.proxied_by: str | None = None  # the trusted balancer it came through
        # bytes up and down, datagrams up and down, the metrics were told (proxyd.metrics.Meter)
        self.metered: tuple[int, int, int, int] = (0, 0, 0, 0)

    def local_address(self) -> tuple[Any, ...]:
        """The listener address the client connected to."""
        if self._local is None:
            assert self._sock is not None
            self._local = self._sock.getsockname()
        return self._local

    def named(self, ip: str, port: int) -> None:
        """The client is the one a trusted balancer's PROXY header names."""
        self.peer_ip = ip
        self.client = format_hostport(ip, port)

    def in_tls(self, version: str | None) -> None:
        """TLS is up: the local address is the raw socket's, asked now (the session
        reads a socket pair's end from here on)."""
        self.local_address()
        self.tls = version
