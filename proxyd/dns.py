"""Names to addresses without blocking the loop: getaddrinfo in threads of our own,
a bounded cache, and one way to ask (`Resolver.find`, with `resolve` as its async face).

A failure comes back as the UpstreamError that says what to answer (a name that
does not exist: host unreachable; no answer in time: a timeout).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from proxyd.errors import UpstreamError, UpstreamTimeout, classify
from proxyd.protocols.common import format_hostport

AddrInfo = tuple[int, tuple[Any, ...]]  # (family, sockaddr), as getaddrinfo gives them
# find's callback: the addresses, or the error that says what to answer
Found = Callable[[list[AddrInfo] | None, UpstreamError | None], object]


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

    def known(self, host: str, port: int) -> list[AddrInfo] | socket.gaierror | None:
        """What is known of host:port without asking: an IP literal as itself, a name's
        cached answer; None when it must be looked up."""
        addresses = literal_addresses(host, port)
        return addresses if addresses is not None else self.cached(host, port)

    def find(self, host: str, port: int, timeout: float, done: Found) -> Lookup | None:
        """The addresses of host:port: what is `known`, or a name looked up within
        `timeout`. `done(addresses, None)` or `done(None, error)` is called exactly
        once, unless the returned lookup is cancelled first; at once (and None
        returned) when no lookup is needed."""
        addresses = self.known(host, port)
        if isinstance(addresses, OSError):
            done(None, classify(addresses, format_hostport(host, port)))
            return None
        if addresses is not None:
            done(addresses, None)
            return None
        return Lookup(self.lookup(host, port), format_hostport(host, port), timeout, done)

    async def resolve(self, host: str, port: int, timeout: float) -> list[AddrInfo]:
        """`find`, awaited: the addresses, or the UpstreamError raised."""
        answer: asyncio.Future[list[AddrInfo]] = asyncio.get_running_loop().create_future()

        def found(addresses: list[AddrInfo] | None, error: UpstreamError | None) -> None:
            if answer.done():  # the caller was cancelled as the answer came
                return
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(addresses or [])

        lookup = self.find(host, port, timeout, found)
        try:
            return await answer
        finally:
            if lookup is not None:
                lookup.cancel()

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


class Lookup:
    """One caller's wait for a name, bounded by its own timer; `cancel()` drops the
    wait (the query itself goes on while others wait for it, see Resolver.lookup)."""

    __slots__ = ("_done", "_future", "_target", "_timer")

    def __init__(
        self, future: asyncio.Future[list[AddrInfo]], target: str, timeout: float, done: Found
    ) -> None:
        self._future = future
        self._target = target
        self._done: Found | None = done
        self._timer = asyncio.get_running_loop().call_later(timeout, self._on_timeout)
        future.add_done_callback(self._on_answer)

    def cancel(self) -> None:
        self._done = None
        self._timer.cancel()
        self._future.cancel()

    def _on_answer(self, future: asyncio.Future[list[AddrInfo]]) -> None:
        done, self._done = self._done, None
        self._timer.cancel()
        if done is None or future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, OSError):  # gaierror
            done(None, classify(exc, self._target))
        elif exc is not None:  # (a bug): the caller must still hear of the end
            done(None, UpstreamError(f"lookup failed: {type(exc).__name__}"))
        else:
            done(future.result(), None)

    def _on_timeout(self) -> None:
        done, self._done = self._done, None
        self._future.cancel()
        if done is not None:
            done(None, UpstreamTimeout(f"resolving {self._target} timed out"))


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
