"""Chaining: reaching a target through a parent proxy of an `[[upstreams]]` group.

A Pool per group keeps each parent's health and picks the order in which the
parents are tried for one request (its `strategy`). A ChainConnector connects
to the first parent, speaks the parent's protocol (the sans-I/O clients in
proxyd.protocols) and, when the parent itself fails, goes on to the next one,
all within `timeouts.connect`. A failure the parent reports about the target
(refused, unreachable) is final: another parent would most likely say the same.

Each attempt may spend on reaching the parent and its greeting at most an equal
share of the time left, so a parent that never answers leaves time for the
others; once the request for the target is sent, the attempt may use all of it.

`max_fails` failures of one parent within `fail_window` take it out for
`down_time`; then a probe (a connect and, for SOCKS5, the greeting and login)
must succeed before requests go to it again.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import random
import socket
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final

from proxyd.config import BuffersConfig, Config
from proxyd.direct import Connector, Refuse
from proxyd.dns import AddrInfo, Resolver, literal_addresses
from proxyd.errors import (
    REP_CONNECTION_REFUSED,
    REP_HOST_UNREACHABLE,
    REP_NETWORK_UNREACHABLE,
    REP_NOT_ALLOWED,
    REP_TTL_EXPIRED,
    AddressNotSupported,
    HostUnreachable,
    NetworkUnreachable,
    ParentDenied,
    ParentError,
    ParentProtocolError,
    SessionError,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
)
from proxyd.metrics import Metrics
from proxyd.parents import Parent, UpstreamGroup
from proxyd.protocols import socks5
from proxyd.protocols.clients import (
    ConnectClient,
    Established,
    ParentClient,
    Refused,
    Send,
    Socks4Client,
    Socks5Client,
)
from proxyd.protocols.common import NEED_DATA, format_hostport

# Points per parent on the consistent-hash ring: enough for an even split of
# names between a handful of parents, few enough to build at every reload.
RING_POINTS: Final = 160
PROBE_TIMEOUT: Final = 5.0  # at most, for a probe (timeouts.connect when shorter)
HANDSHAKE_READ: Final = 4096


class ParentState:
    """One parent as this process sees it: open connections, recent failures, and
    whether it is out (down) until a probe reaches it."""

    __slots__ = ("active", "down", "failures", "parent", "probe", "retired")

    def __init__(self, parent: Parent) -> None:
        self.parent = parent
        self.active = 0  # connections through it now (least_connections)
        self.failures: deque[float] = deque()  # loop times of recent failures
        self.down = False
        self.probe: asyncio.TimerHandle | asyncio.Task[None] | None = None
        # a reload removed it: attempts still under way must not mark it down or probe it
        self.retired = False

    def retire(self) -> None:
        self.retired = True
        if self.probe is not None:
            self.probe.cancel()
            self.probe = None

    def __str__(self) -> str:
        return str(self.parent)


class Lease:
    """One connection's hold on a parent (counted by least_connections and the
    metrics); released once."""

    __slots__ = ("metered", "parent", "pool", "state")

    def __init__(self, pool: Pool, state: ParentState) -> None:
        self.parent = state.parent
        self.pool = pool
        self.state: ParentState | None = state
        state.active += 1
        self.metered = pool.report_connections(state, 1)

    def release(self) -> None:
        if self.state is not None:
            if self.metered:  # (not when [metrics] came on after it began)
                self.pool.report_connections(self.state, -1)
            self.state.active -= 1
            self.state = None


class Pool:
    """The parents of one group, their health, and the order to try them in."""

    def __init__(
        self,
        group: UpstreamGroup,
        dialer: Dialer,
        log: Any,
        known: dict[Parent, ParentState] | None = None,
    ) -> None:
        self.group = group
        self.name = group.name
        self.dialer = dialer
        self.log = log
        known = known or {}
        self.states = [known.get(p) or ParentState(p) for p in group.servers]
        self._turn = 0  # round_robin's next start
        self._ring = _ring(self.states) if group.strategy == "hash" else []
        self.metrics: Metrics | None = None

    def watch(self, metrics: Metrics | None) -> None:
        """Record into `metrics` from now on (each parent's state at once)."""
        self.metrics = metrics
        if metrics is not None:
            for state in self.states:
                metrics.parent_state(self.name, str(state), not state.down)

    def report_connections(self, state: ParentState, change: int) -> bool:
        """Tell the metrics of a connection more or fewer; whether they were told."""
        if self.metrics is None:
            return False
        self.metrics.parent_connections(self.name, str(state), change)
        return True

    def forget(self, state: ParentState) -> None:
        """A reload removed this parent: it is retired, and its state series goes."""
        state.retire()
        if self.metrics is not None:
            self.metrics.parent_gone(self.name, str(state))

    def close(self) -> None:
        """The group is gone (a reload, the end): its parents are no longer watched."""
        for state in self.states:
            self.forget(state)

    def candidates(self, host: str) -> list[ParentState]:
        """The parents that are up, in the order to try them for a request to `host`."""
        strategy = self.group.strategy
        if strategy == "hash":
            return [s for s in _walk(self._ring, host) if not s.down]
        up = [s for s in self.states if not s.down]
        if not up:
            return up
        if strategy == "random":
            random.shuffle(up)
            return up
        start = self._turn % len(up)
        self._turn += 1
        up = up[start:] + up[:start]
        if strategy == "least_connections":  # ties in round-robin order (the sort is stable)
            up.sort(key=lambda s: s.active)
        return up

    def failed(self, state: ParentState, error: SessionError) -> None:
        """A connection to or through this parent failed because of the parent."""
        group = self.group
        self.log.info("upstream_failed", group=self.name, server=str(state), error=str(error))
        if self.metrics is not None:
            self.metrics.parent_failed(self.name, str(state))
        if group.max_fails == 0 or state.down or state.retired:
            return
        now = asyncio.get_running_loop().time()
        failures = state.failures
        failures.append(now)
        while failures and failures[0] <= now - group.fail_window:
            failures.popleft()
        if len(failures) < group.max_fails:
            return
        failures.clear()
        state.down = True
        if self.metrics is not None:
            self.metrics.parent_state(self.name, str(state), False)
        self.log.warning(
            "upstream_down",
            group=self.name,
            server=str(state),
            error=str(error),
            failures=group.max_fails,
            seconds=group.down_time,
        )
        self._probe_later(state)

    def _probe_later(self, state: ParentState) -> None:
        loop = asyncio.get_running_loop()
        state.probe = loop.call_later(self.group.down_time, self._start_probe, state)

    def _start_probe(self, state: ParentState) -> None:
        state.probe = asyncio.get_running_loop().create_task(self._probe(state))

    async def _probe(self, state: ParentState) -> None:
        try:
            await self.dialer.probe(state.parent)
        except SessionError as exc:
            if state.retired:
                return
            self.log.info(
                "upstream_probe_failed", group=self.name, server=str(state), error=str(exc)
            )
            self._probe_later(state)
            return
        state.probe = None
        state.down = False
        if self.metrics is not None:
            self.metrics.parent_state(self.name, str(state), True)
        self.log.info("upstream_up", group=self.name, server=str(state))


def _point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _ring(states: list[ParentState]) -> list[tuple[int, ParentState]]:
    """Each parent at RING_POINTS places fixed by its address alone, so adding or
    removing a parent moves only the names whose nearest point was its."""
    ring = [
        (_point(f"{state.parent.address}#{i}"), state)
        for state in states
        for i in range(RING_POINTS)
    ]
    ring.sort(key=lambda item: item[0])
    return ring


def _walk(ring: list[tuple[int, ParentState]], host: str) -> Iterable[ParentState]:
    """The parents clockwise from the host's point, each once: the first owns the host,
    the next ones take over while it is down."""
    if not ring:
        return []
    start = bisect.bisect_left(ring, _point(host.rstrip(".").lower()), key=lambda item: item[0])
    seen: dict[ParentState, None] = {}
    for i in range(len(ring)):
        state = ring[(start + i) % len(ring)][1]
        seen.setdefault(state)
    return seen.keys()


class Upstreams:
    """Every group's Pool; a reload replaces the groups and keeps what is known of
    parents that stay (health, open connections)."""

    def __init__(self, resolver: Resolver, log: Any) -> None:
        self.resolver = resolver
        self.log = log
        self.dialer = Dialer(resolver, BuffersConfig(), 10.0)
        self.pools: dict[str, Pool] = {}
        self.metrics: Metrics | None = None

    def watch(self, metrics: Metrics | None) -> None:
        """`[metrics]` turned on (or off): the pools record into it."""
        self.metrics = metrics
        for pool in self.pools.values():
            pool.watch(metrics)

    def configure(self, config: Config) -> None:
        self.dialer.buffers = config.buffers
        self.dialer.timeout = config.timeouts.connect
        old, self.pools = self.pools, {}
        for group in config.upstreams:
            previous = old.pop(group.name, None)
            known = {s.parent: s for s in previous.states} if previous else {}
            pool = Pool(group, self.dialer, self.log, known)
            pool.watch(self.metrics)
            for parent, state in known.items():  # parents the group no longer has
                if parent not in group.servers and previous is not None:
                    previous.forget(state)
            self.pools[group.name] = pool
        for pool in old.values():
            pool.close()

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    def pool(self, name: str) -> Pool:
        """The group a rule routes through; ParentError when a reload removed it while
        the request was being judged (by the rules of before)."""
        pool = self.pools.get(name)
        if pool is None:
            raise ParentError(f"upstream group {name!r} is no longer configured")
        return pool


class Dialer:
    """Connections to parent proxies and the handshake with them."""

    def __init__(self, resolver: Resolver, buffers: BuffersConfig, timeout: float) -> None:
        self.resolver = resolver
        self.buffers = buffers
        self.timeout = timeout

    async def connect(self, parent: Parent, refuse: Refuse | None = None) -> socket.socket:
        """A TCP connection to the parent (its name resolved, happy eyeballs); a
        ParentError when it cannot be reached. The caller bounds the time.
        `refuse(ip, port)`: addresses never to connect to (our own listeners)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[socket.socket] = loop.create_future()

        def connected(sock: socket.socket | None, error: SessionError | None) -> None:
            if done.done():
                if sock is not None:
                    sock.close()
            elif error is not None:
                done.set_exception(error)
            else:
                done.set_result(sock)  # type: ignore[arg-type]

        # its own timer never fires first: the caller's deadline is shorter
        connector = Connector(
            self.resolver, self.buffers, self.timeout * 2, connected, refuse=refuse
        )
        connector.start(parent.host, parent.port)
        try:
            return await done
        except SessionError as exc:  # unreachable, or one of our own listeners
            raise ParentError(f"cannot reach the parent proxy {parent}: {exc}") from None
        except asyncio.CancelledError:
            connector.cancel()
            # connected in the same loop pass as the cancellation: the socket is ours
            if done.done() and not done.cancelled() and done.exception() is None:
                done.result().close()
            raise

    async def probe(self, parent: Parent) -> None:
        """Whether the parent answers: a connection and, for SOCKS5, the greeting and
        login up to (not including) a request. ParentError when it does not."""
        async with _deadline(min(self.timeout, PROBE_TIMEOUT), parent):
            sock = await self.connect(parent)
            with sock:
                if parent.scheme.startswith("socks5"):
                    client = client_for(parent, socks5.Command.CONNECT, "0.0.0.0", 0)
                    await Handshake(sock, client).run(until_request=True)


@contextlib.asynccontextmanager
async def _deadline(seconds: float, parent: Parent) -> Any:
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise ParentError(f"the parent proxy {parent} did not answer in time") from None


def client_for(parent: Parent, command: socks5.Command, host: str, port: int) -> ParentClient:
    """The sans-I/O client that asks `parent` for host:port. A target the parent's
    protocol cannot carry (an IPv6 address for SOCKS4, a name too long once
    IDNA-encoded: a ValueError of the client) is AddressNotSupported, the fault of
    neither the target nor the parent."""
    try:
        if parent.scheme.startswith("socks5"):
            return Socks5Client(command, host, port, parent.credentials)
        if parent.scheme == "socks4a":
            user = parent.credentials.username if parent.credentials else ""
            return Socks4Client(host, port, user)
        return ConnectClient(host, port, parent.credentials)
    except ValueError as exc:
        raise AddressNotSupported(
            f"the parent proxy {parent} cannot be asked for it: {exc}"
        ) from None


# the error for each failure a parent reports about the target, answered as if we
# had connected ourselves; any other code is a plain UpstreamError
_TARGET_FAILURES: Final[dict[int, type[UpstreamError]]] = {
    REP_CONNECTION_REFUSED: UpstreamRefused,
    REP_NETWORK_UNREACHABLE: NetworkUnreachable,
    REP_HOST_UNREACHABLE: HostUnreachable,
    REP_TTL_EXPIRED: UpstreamTimeout,
    REP_NOT_ALLOWED: ParentDenied,
}


def _target_failure(code: int, message: str) -> UpstreamError:
    """The error for a client's Refused: what the SOCKS5 reply `code` says happened."""
    return _TARGET_FAILURES.get(code, UpstreamError)(message)


class Handshake:
    """Drives one parent client over its socket; `heard` says whether the parent has
    sent anything yet (a silent parent is a failed one)."""

    __slots__ = ("client", "heard", "sock")

    def __init__(self, sock: socket.socket, client: ParentClient) -> None:
        self.sock = sock
        self.client = client
        self.heard = False

    async def run(
        self, *, first_answer_by: float | None = None, until_request: bool = False
    ) -> Established | None:
        """Until the parent grants the request, or with `until_request` until the
        request would be sent (a probe). Waiting for the parent's first answer past
        `first_answer_by` (a loop time) is the parent's failure, as is a broken
        connection or protocol (ParentError); the parent's refusal is the target's
        failure (UpstreamError)."""
        loop = asyncio.get_running_loop()
        client, sock = self.client, self.sock
        try:
            await loop.sock_sendall(sock, client.start())
            while True:
                event = client.next_event()
                if event is NEED_DATA:
                    data = await self._receive(None if self.heard else first_answer_by)
                    if not data:
                        client.connection_closed()
                    self.heard = True
                    client.receive_data(data)
                elif isinstance(event, Send):
                    if until_request and client.request_sent:
                        return None
                    await loop.sock_sendall(sock, event.data)
                elif isinstance(event, Refused):
                    raise _target_failure(event.code, event.message)
                else:
                    assert isinstance(event, Established)
                    return event
        except ParentProtocolError as exc:
            raise ParentError(str(exc)) from exc
        except OSError as exc:
            raise ParentError(
                f"the connection to the parent proxy failed: {exc.strerror}"
            ) from None

    async def _receive(self, by: float | None) -> bytes:
        loop = asyncio.get_running_loop()
        if by is None:
            return await loop.sock_recv(self.sock, HANDSHAKE_READ)
        try:
            async with asyncio.timeout_at(by):
                return await loop.sock_recv(self.sock, HANDSHAKE_READ)
        except TimeoutError:
            raise ParentError("the parent proxy did not answer in time") from None


ChainDone = Callable[[socket.socket | None, SessionError | None], object]


class ChainConnector:
    """Like direct.Connector, through a parent of `pool`: `done(sock, None)` or
    `done(None, error)` exactly once unless `cancel()` comes first. After success,
    `lease` holds the parent used, `trailing` the target's bytes that came with the
    parent's answer, and `bound` the parent's bound address (a UDP relay for
    UDP ASSOCIATE)."""

    __slots__ = (
        "_done",
        "_task",
        "bound",
        "lease",
        "plain",
        "pool",
        "refuse",
        "timeout",
        "trailing",
    )

    def __init__(
        self, pool: Pool, timeout: float, done: ChainDone, refuse: Refuse | None = None
    ) -> None:
        """`refuse(ip, port)`: addresses never to connect to (our own listeners: a
        parent that is this proxy would be a loop)."""
        self.pool = pool
        self.timeout = timeout
        self.refuse = refuse
        self._done: ChainDone | None = done
        self._task: asyncio.Task[socket.socket] | None = None
        self.lease: Lease | None = None
        self.trailing = b""
        self.bound: tuple[str, int] = ("0.0.0.0", 0)
        self.plain = False  # connected to an HTTP parent to send it plain requests

    def start(
        self,
        host: str,
        port: int,
        addresses: list[AddrInfo] | None = None,
        command: socks5.Command = socks5.Command.CONNECT,
        *,
        plain_http: bool = False,
        hash_key: str | None = None,
        client: str | None = None,
    ) -> None:
        """`addresses`: the target's addresses, already resolved and allowed by the rules.
        `plain_http`: for forwarding plain HTTP requests; an HTTP parent is then only
        connected to (it is sent the requests themselves), SOCKS parents tunnel.
        `hash_key`: what the hash strategy hashes, when not `host`. `client`: whose
        request it is, which a lookup of the target's name counts against."""
        self._task = asyncio.get_running_loop().create_task(
            self._run(host, port, addresses, command, plain_http, hash_key or host, client)
        )
        self._task.add_done_callback(self._finished)

    def cancel(self) -> None:
        self._done = None
        if self._task is not None:
            self._task.cancel()
        if self.lease is not None:
            self.lease.release()

    def _finished(self, task: asyncio.Task[socket.socket]) -> None:
        done, self._done = self._done, None
        if task.cancelled():
            return
        error = task.exception()
        if done is None:  # cancelled after it had finished
            if error is None:
                task.result().close()
            return
        if error is None:
            done(task.result(), None)
        elif isinstance(error, SessionError):
            done(None, error)
        else:  # a bug: the session still ends, answered and logged
            self.pool.log.error(
                "chain_error", group=self.pool.name, error=f"{type(error).__name__}: {error}"
            )
            done(None, SessionError(f"internal error: {type(error).__name__}"))

    async def _run(
        self,
        host: str,
        port: int,
        addresses: list[AddrInfo] | None,
        command: socks5.Command,
        plain_http: bool,
        hash_key: str,
        requester: str | None,
    ) -> socket.socket:
        pool, loop = self.pool, asyncio.get_running_loop()
        target = format_hostport(host, port)
        deadline = loop.time() + self.timeout
        candidates = pool.candidates(hash_key)
        if not candidates:
            raise ParentError(f"every parent proxy of {pool.name!r} is down")
        if command is socks5.Command.UDP_ASSOCIATE:
            candidates = [state for state in candidates if state.parent.carries_udp]
            if not candidates:
                raise ParentError(f"no parent proxy of {pool.name!r} relays UDP (socks5, socks5h)")
        address: str | None = None  # the target's address, for parents that do not resolve
        if addresses:
            address = addresses[0][1][0]
        elif literal_addresses(host, port) is not None:
            address = host
        last: SessionError | None = None
        trying: ParentState | None = None  # the parent being reached or asked
        handshake: Handshake | None = None
        try:
            async with asyncio.timeout_at(deadline):
                for i, state in enumerate(candidates):
                    trying = handshake = None
                    parent = state.parent
                    if not parent.resolves_names and address is None:
                        found = await pool.dialer.resolver.resolve(
                            host, port, self.timeout, requester
                        )
                        address = found[0][1][0]
                    trying = state
                    asked = host if parent.resolves_names else address
                    assert asked is not None
                    # Reaching the parent, and its first answer, may take an equal share
                    # of the time left while other parents remain; the last one has all.
                    left = len(candidates) - i
                    share = (deadline - loop.time()) / left
                    answer_by = loop.time() + share if left > 1 else None
                    plain = plain_http and parent.scheme == "http"  # sent the requests
                    client = None if plain else client_for(parent, command, asked, port)
                    lease = Lease(pool, state)
                    try:
                        async with _deadline(share, parent):
                            sock = await pool.dialer.connect(parent, self.refuse)
                        self.plain = plain
                        if client is not None:
                            handshake = Handshake(sock, client)
                            try:
                                established = await handshake.run(first_answer_by=answer_by)
                            except BaseException:
                                sock.close()
                                raise
                            assert established is not None
                            self.bound = (established.host, established.port)
                            self.trailing = client.trailing_data
                    except ParentError as exc:
                        lease.release()
                        pool.failed(state, exc)
                        last = exc
                        continue
                    except BaseException:
                        lease.release()
                        raise
                    self.lease = lease
                    return sock
        except TimeoutError:
            if trying is not None and (handshake is None or not handshake.heard):
                # the last parent never answered (or was never reached): its failure
                pool.failed(trying, ParentError(f"the parent proxy {trying} did not answer"))
            raise UpstreamTimeout(
                f"connecting to {target} through {pool.name!r} timed out"
            ) from None
        assert last is not None
        raise last
