"""The upstream side: resolve the target without blocking the loop and connect to it.

`timeouts.connect` covers DNS and every connect attempt together. Failures come
back as UpstreamError subclasses that carry the SOCKS reply and HTTP status.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from proxyd.config import BuffersConfig
from proxyd.errors import (
    Denied,
    HostUnreachable,
    NetworkUnreachable,
    SessionError,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
)
from proxyd.protocols.common import format_hostport

AddrInfo = tuple[int, tuple[Any, ...]]


def tune_socket(sock: socket.socket, buffers: BuffersConfig) -> None:
    """Apply `[buffers]` to a TCP socket (before connect, so window scaling sees SO_RCVBUF)."""
    if buffers.so_rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers.so_rcvbuf)
    if buffers.so_sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers.so_sndbuf)
    if buffers.tcp_nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def classify(exc: OSError, target: str) -> UpstreamError:
    """Map a connect or resolve failure to the error that says what to answer."""
    if isinstance(exc, socket.gaierror):
        return HostUnreachable(f"cannot resolve {target}: {exc.strerror}")
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamRefused(f"{target} refused the connection")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"connecting to {target} timed out")
    if exc.errno in (errno.ENETUNREACH, errno.ENETDOWN):
        return NetworkUnreachable(f"network of {target} is unreachable")
    if exc.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
        return HostUnreachable(f"{target} is unreachable")
    return UpstreamError(f"connecting to {target} failed: {exc.strerror or exc}")


def literal_addresses(host: str, port: int) -> list[AddrInfo] | None:
    """The address of an IP literal, which needs no lookup; None for a name."""
    try:
        socket.inet_pton(socket.AF_INET, host)
        return [(socket.AF_INET, (host, port))]
    except OSError:
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host)
        return [(socket.AF_INET6, (host, port, 0, 0))]
    except OSError:
        return None


class Resolver:
    """getaddrinfo in threads of our own, off the event loop, with a bounded cache.

    A pool of its own, larger than the loop's default (uvloop's has 4 threads),
    so a few lookups stuck on a slow DNS server do not stall every other name.
    getaddrinfo tells no TTL, so answers are kept for `ttl` seconds, and names
    that do not exist for `negative_ttl`; concurrent lookups of one name share
    one query. The cache holds at most `size` names, least recently used out.

    A dead or slow DNS server must not queue lookups without end: at most
    PENDING_PER_THREAD names a thread wait or run at once (beyond, a lookup fails
    at once), and a name nobody waits for any more leaves the queue before it runs.
    """

    def __init__(
        self, threads: int = 32, *, size: int = 1024, ttl: float = 60.0, negative_ttl: float = 5.0
    ) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="proxyd-dns")
        self._size = size
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._cache: OrderedDict[str, tuple[float, list[AddrInfo] | socket.gaierror]] = (
            OrderedDict()
        )
        self._pending: dict[str, _Query] = {}
        self._max_pending = threads * PENDING_PER_THREAD

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def configure(self, *, size: int, ttl: float, negative_ttl: float) -> None:
        """New cache limits (a reload); answers cached so far keep their expiry."""
        self._size, self._ttl, self._negative_ttl = size, ttl, negative_ttl
        while len(self._cache) > size:
            self._cache.popitem(last=False)

    def cached(self, host: str, port: int) -> list[AddrInfo] | socket.gaierror | None:
        """A fresh cached answer for `host` (addresses, or the error that it does not
        exist), or None when it must be looked up."""
        entry = self._cache.get(host)
        if entry is None:
            return None
        expires, answer = entry
        if expires <= time.monotonic():
            del self._cache[host]
            return None
        self._cache.move_to_end(host)
        if isinstance(answer, socket.gaierror):
            return answer
        return [(family, (addr[0], port, *addr[2:])) for family, addr in answer]

    def lookup(self, host: str, port: int) -> asyncio.Future[list[AddrInfo]]:
        """The addresses of a name, as a future the loop completes; cancel it when the
        answer is no longer wanted (the query goes on while others wait for it)."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[list[AddrInfo]] = loop.create_future()
        query = self._pending.get(host)
        if query is None:
            if len(self._pending) >= self._max_pending:
                result.set_exception(
                    socket.gaierror(
                        socket.EAI_AGAIN,
                        f"{len(self._pending)} names are being looked up already "
                        "(is the DNS server slow?)",
                    )
                )
                return result
            work = self._executor.submit(_getaddrinfo, host)
            query = _Query(work, asyncio.wrap_future(work, loop=loop))
            self._pending[host] = query
            query.future.add_done_callback(lambda future: self._store(host, query, future))
        pending = query.future
        query.waiters += 1

        def given_up(_result: asyncio.Future[list[AddrInfo]]) -> None:
            query.waiters -= 1
            # nobody waits any more: a query not started yet leaves the pool's queue
            # (and the count) now; one under way runs on, to be cached, and counts
            if query.waiters == 0 and query.work.cancel() and self._pending.get(host) is query:
                del self._pending[host]

        result.add_done_callback(given_up)

        def deliver(future: asyncio.Future[list[AddrInfo]]) -> None:
            if result.done():
                return
            if future.cancelled():  # (dropped unstarted, or the daemon is stopping)
                result.set_exception(socket.gaierror(socket.EAI_AGAIN, "lookup abandoned"))
            elif (exc := future.exception()) is not None:
                result.set_exception(exc)
            else:
                result.set_result([(f, (a[0], port, *a[2:])) for f, a in future.result()])

        pending.add_done_callback(deliver)
        return result

    async def resolve(self, host: str, port: int, timeout: float) -> list[AddrInfo]:
        """The addresses of a name, cached or looked up within `timeout`; a failure
        raises the UpstreamError that says what to answer."""
        target = format_hostport(host, port)
        cached = self.cached(host, port)
        if isinstance(cached, OSError):
            raise classify(cached, target)
        if cached is not None:
            return cached
        try:
            async with asyncio.timeout(timeout):
                return await self.lookup(host, port)
        except OSError as exc:  # TimeoutError and gaierror
            raise classify(exc, target) from None

    def _store(self, host: str, query: _Query, future: asyncio.Future[list[AddrInfo]]) -> None:
        if self._pending.get(host) is query:
            del self._pending[host]
        if future.cancelled() or self._size == 0:
            return
        exc = future.exception()
        if exc is None:
            self._remember(host, future.result(), self._ttl)
        elif isinstance(exc, socket.gaierror) and exc.errno in _NO_SUCH_NAME:
            self._remember(host, exc, self._negative_ttl)

    def _remember(self, host: str, answer: list[AddrInfo] | socket.gaierror, ttl: float) -> None:
        if ttl <= 0:
            return
        self._cache[host] = (time.monotonic() + ttl, answer)
        self._cache.move_to_end(host)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)


class _Query:
    """One name's lookup (the pool's work, and the loop's future of it) and how many
    still wait for it."""

    __slots__ = ("future", "waiters", "work")

    def __init__(
        self,
        work: concurrent.futures.Future[list[AddrInfo]],
        future: asyncio.Future[list[AddrInfo]],
    ) -> None:
        self.work = work
        self.future = future
        self.waiters = 0


# Names a resolver thread may have waiting or running at once (see Resolver).
PENDING_PER_THREAD: Final = 4

# Answers that say the name does not exist (cached), as opposed to a failure to ask.
_NO_SUCH_NAME: Final = {
    getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name)
}


def _getaddrinfo(host: str) -> list[AddrInfo]:
    try:
        infos = socket.getaddrinfo(host, 0, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except UnicodeError:  # a name IDNA cannot encode (parsers check first): no such name
        raise socket.gaierror(socket.EAI_NONAME, "invalid name") from None
    return [(family, addr) for family, _type, _proto, _name, addr in infos]


def interleave(addresses: list[AddrInfo]) -> list[AddrInfo]:
    """RFC 8305 section 4: alternate address families, starting with the family the
    resolver put first, each family keeping its own order."""
    families: dict[int, list[AddrInfo]] = {}
    for info in addresses:
        families.setdefault(info[0], []).append(info)
    queues = list(families.values())
    ordered: list[AddrInfo] = []
    while queues:
        for queue in list(queues):
            ordered.append(queue.pop(0))
            if not queue:
                queues.remove(queue)
    return ordered


# RFC 8305 section 5: the pause before starting the next attempt while one is pending
ATTEMPT_DELAY: Final = 0.25

ConnectDone = Callable[[socket.socket | None, SessionError | None], object]


class Connector:
    """Connects to host:port with loop callbacks, no task, by happy eyeballs
    (RFC 8305): names are resolved in the resolver's threads (or its cache), the
    addresses are tried alternating families, a new attempt starts every 250 ms
    while earlier ones are pending (at once when one fails), and the first to
    connect wins. `timeout` covers the lookup and every attempt.

    `done(sock, None)` or `done(None, error)` is called exactly once, unless
    `cancel()` comes first; the socket then belongs to the caller.
    """

    __slots__ = (
        "_addresses",
        "_attempts",
        "_buffers",
        "_delay",
        "_done",
        "_last",
        "_lookup",
        "_loop",
        "_refuse",
        "_refused",
        "_resolver",
        "_target",
        "_timeout",
        "_timer",
    )

    def __init__(
        self,
        resolver: Resolver,
        buffers: BuffersConfig,
        timeout: float,
        done: ConnectDone,
        refuse: Callable[[str, int], bool] | None = None,
    ) -> None:
        """`refuse(ip, port)`: addresses never to connect to (the proxy's own listeners)."""
        self._refuse = refuse
        self._refused = False
        self._loop = asyncio.get_running_loop()
        self._resolver = resolver
        self._buffers = buffers
        self._timeout = timeout
        self._done: ConnectDone | None = done
        self._target = ""
        self._timer: asyncio.TimerHandle | None = None
        self._delay: asyncio.TimerHandle | None = None  # starts the next attempt
        self._lookup: asyncio.Future[list[AddrInfo]] | None = None
        self._addresses: list[AddrInfo] = []
        self._attempts: list[socket.socket] = []  # connects in progress
        self._last: OSError | None = None

    def start(self, host: str, port: int) -> None:
        self._target = format_hostport(host, port)
        self._timer = self._loop.call_later(self._timeout, self._on_timeout)
        addresses = literal_addresses(host, port)
        if addresses is None:
            cached = self._resolver.cached(host, port)
            if isinstance(cached, socket.gaierror):
                self._finish(None, classify(cached, self._target))
                return
            addresses = cached
        if addresses is not None:
            self._addresses = interleave(addresses)
            self._next_attempt()
        else:
            self._lookup = self._resolver.lookup(host, port)
            self._lookup.add_done_callback(self._on_resolved)

    def start_resolved(self, host: str, port: int, addresses: list[AddrInfo]) -> None:
        """Connect to these addresses of host:port (already resolved and checked)."""
        self._target = format_hostport(host, port)
        self._timer = self._loop.call_later(self._timeout, self._on_timeout)
        self._addresses = interleave(addresses)
        self._next_attempt()

    def cancel(self) -> None:
        self._done = None
        for timer in (self._timer, self._delay):
            if timer is not None:
                timer.cancel()
        if self._lookup is not None:
            self._lookup.cancel()
        for sock in self._attempts:
            self._loop.remove_writer(sock.fileno())
            sock.close()
        self._attempts.clear()

    def _on_resolved(self, lookup: asyncio.Future[list[AddrInfo]]) -> None:
        self._lookup = None
        if self._done is None or lookup.cancelled():
            return
        exc = lookup.exception()
        if isinstance(exc, OSError):  # gaierror included
            self._finish(None, classify(exc, self._target))
        elif exc is not None:
            raise exc
        else:
            self._addresses = interleave(lookup.result())
            self._next_attempt()

    def _next_attempt(self) -> None:
        """Start connecting to the next address; when none is left and nothing is in
        progress, fail with what the last attempt said."""
        self._delay = None
        while self._addresses:
            family, addr = self._addresses.pop(0)
            if self._refuse is not None and self._refuse(addr[0], addr[1]):
                self._refused = True
                continue
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:  # e.g. no IPv6 on this host: try the next address
                self._last = exc
                continue
            try:
                sock.setblocking(False)
                tune_socket(sock, self._buffers)
                err = sock.connect_ex(addr)
            except OSError as exc:
                sock.close()
                self._last = exc
                continue
            if err == errno.EINPROGRESS:
                try:
                    # a near target (loopback, the same host) has often answered
                    # within the call: then skip a round through the loop
                    sock.getpeername()
                except OSError:
                    self._attempts.append(sock)
                    self._loop.add_writer(sock.fileno(), self._on_connected, sock)
                    if self._addresses:
                        self._delay = self._loop.call_later(ATTEMPT_DELAY, self._next_attempt)
                    return
                err = 0
            if err == 0:
                self._finish(sock, None)
                return
            sock.close()
            self._last = OSError(err, os.strerror(err))
        if not self._attempts:
            if self._last is None and self._refused:
                self._finish(None, Denied(None, f"{self._target} is this proxy's own listener"))
            elif self._last is None:
                self._finish(None, HostUnreachable(f"{self._target} has no address"))
            else:
                self._finish(None, classify(self._last, self._target))

    def _on_connected(self, sock: socket.socket) -> None:
        self._loop.remove_writer(sock.fileno())
        self._attempts.remove(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._finish(sock, None)
            return
        sock.close()
        self._last = OSError(err, os.strerror(err))
        if self._delay is not None:  # a failure starts the next attempt at once
            self._delay.cancel()
        self._next_attempt()

    def _on_timeout(self) -> None:
        self._timer = None
        done = self._done
        self.cancel()
        if done is not None:
            done(None, classify(TimeoutError(), self._target))

    def _finish(self, sock: socket.socket | None, error: SessionError | None) -> None:
        done = self._done
        self.cancel()  # the other attempts, the timers
        if done is None:
            if sock is not None:
                sock.close()
            return
        done(sock, error)


class Binder:
    """SOCKS BIND: a fresh listening socket on `local_host` that waits for one
    connection from the expected peer; connections from any other address are
    closed, and the wait goes on. `timeout` bounds the whole wait.

    `done(sock, None)` or `done(None, error)` is called exactly once, unless
    `cancel()` comes first; the accepted socket then belongs to the caller.
    """

    __slots__ = ("_done", "_expected", "_listener", "_loop", "_timer", "refused")

    def __init__(
        self,
        local_host: str,
        expected: set[str] | None,
        timeout: float,
        buffers: BuffersConfig,
        done: ConnectDone,
    ) -> None:
        """`expected`: the peer's possible addresses; None accepts any peer."""
        self._loop = asyncio.get_running_loop()
        self._expected = expected
        self._done: ConnectDone | None = done
        self.refused = 0  # connections from other addresses
        family = socket.AF_INET6 if ":" in local_host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setblocking(False)
            tune_socket(self._listener, buffers)
            self._listener.bind((local_host, 0))
            self._listener.listen(8)
        except BaseException:
            self._listener.close()
            raise
        self._loop.add_reader(self._listener.fileno(), self._on_acceptable)
        self._timer = self._loop.call_later(timeout, self._on_timeout, timeout)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    def cancel(self) -> None:
        self._done = None
        self._timer.cancel()
        if self._listener.fileno() >= 0:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()

    def _on_acceptable(self) -> None:
        while self._done is not None:
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # that peer is gone already
                # out of descriptors or memory: the peer would stay queued and this
                # loop spin, so the BIND fails instead
                done = self._done
                self.cancel()
                done(None, UpstreamError(f"cannot accept the peer: {exc.strerror}"))
                return
            if self._expected is not None and peer[0] not in self._expected:
                sock.close()
                self.refused += 1
                continue
            sock.setblocking(False)
            done = self._done
            self.cancel()
            done(sock, None)

    def _on_timeout(self, timeout: float) -> None:
        done = self._done
        self.cancel()
        if done is not None:
            done(None, UpstreamTimeout(f"no connection from the peer within {timeout:g} s"))
