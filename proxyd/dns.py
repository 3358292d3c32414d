"""Names to addresses without blocking the loop: the hosts file read by ourselves,
getaddrinfo in threads of our own, a bounded cache, and one way to ask
(`Resolver.find`, with `resolve` as its async face).

A failure comes back as the UpstreamError that says what to answer (a name that
does not exist: host unreachable; no answer in time: a timeout).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from proxyd.errors import UpstreamError, UpstreamTimeout, classify
from proxyd.protocols.common import format_hostport

# Names a resolver thread may have waiting or running at once (see Resolver).
PENDING_PER_THREAD: Final = 4
HOSTS_FILE: Final = "/etc/hosts"
HOSTS_CHECK: Final = 1.0  # seconds between looks at whether the hosts file changed
HOSTS_MAX: Final = 16 * 1024 * 1024  # bytes of the hosts file read at most

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

    A dead or slow DNS server must not queue lookups without end, nor may one
    client's names take every thread: a client address has at most `per_client`
    names waiting or running at once, counted until the thread that runs one
    returns (a lookup given up still holds its thread); beyond, its lookup fails
    at once. At most PENDING_PER_THREAD names a thread wait or run in all, and a
    name nobody waits for any more leaves the queue before it runs. When no thread
    is free (or the client is at its limit), a name of the hosts file is answered
    from the file, read on the loop: such names resolve however busy the threads
    are. Otherwise getaddrinfo reads the file, as nsswitch.conf says.
    """

    def __init__(
        self,
        threads: int = 32,
        *,
        size: int = 1024,
        ttl: float = 60.0,
        negative_ttl: float = 5.0,
        per_client: int = 16,
        hosts: str | None = HOSTS_FILE,
    ) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="proxyd-dns")
        self._size = size
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._cache: OrderedDict[str, tuple[float, list[AddrInfo] | socket.gaierror]] = (
            OrderedDict()
        )
        self._pending: dict[str, _Query] = {}
        self._threads = threads
        self._max_pending = threads * PENDING_PER_THREAD
        self._per_client = per_client
        self._in_flight: dict[str, int] = {}  # client address: names it has queued or running
        self._hosts = HostsFile(hosts) if hosts is not None else None

    def close(self) -> bool:
        """Stop looking up; True when a lookup still runs in a thread (a DNS server
        that never answers), which the interpreter's exit would wait for."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        return any(query.work.running() for query in self._pending.values())

    def configure(
        self, *, size: int, ttl: float, negative_ttl: float, per_client: int | None = None
    ) -> None:
        """New cache limits (a reload); answers cached so far keep their expiry, and
        lookups under way stay counted."""
        self._size, self._ttl, self._negative_ttl = size, ttl, negative_ttl
        if per_client is not None:
            self._per_client = per_client
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

    def lookup(
        self, host: str, port: int, client: str | None = None
    ) -> asyncio.Future[list[AddrInfo]]:
        """The addresses of a name, as a future the loop completes; cancel it when the
        answer is no longer wanted (the query goes on while others wait for it).
        `client`: the address whose request asks, which a new query counts against
        (dns.per_client); None for names of our own (parent proxies)."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[list[AddrInfo]] = loop.create_future()
        query = self._pending.get(host)
        if query is None:
            busy = None
            if client is not None and self._in_flight.get(client, 0) >= self._per_client:
                busy = (
                    f"{self._per_client} lookups of {client} are under way already "
                    "(dns.per_client; is the DNS server slow?)"
                )
            elif len(self._pending) >= self._max_pending:
                busy = (
                    f"{len(self._pending)} names are being looked up already "
                    "(is the DNS server slow?)"
                )
            if busy is not None:
                result.set_exception(socket.gaierror(socket.EAI_AGAIN, busy))
                return result
            work = self._executor.submit(_getaddrinfo, host)
            query = _Query(work, asyncio.wrap_future(work, loop=loop), client)
            self._pending[host] = query
            if client is not None:
                self._in_flight[client] = self._in_flight.get(client, 0) + 1
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

    def find(
        self, host: str, port: int, timeout: float, done: Found, client: str | None = None
    ) -> Lookup | None:
        """The addresses of host:port: what is `known`, or a name looked up within
        `timeout` (counted against `client`, see `lookup`). `done(addresses, None)` or
        `done(None, error)` is called exactly once, unless the returned lookup is
        cancelled first; at once (and None returned) when no lookup is needed."""
        addresses = self.known(host, port)
        if isinstance(addresses, OSError):
            done(None, classify(addresses, format_hostport(host, port)))
            return None
        if addresses is None and self._hosts is not None and self._saturated(client):
            addresses = self._hosts.get(host, port)  # (a name not of the file waits its turn)
        if addresses is not None:
            done(addresses, None)
            return None
        return Lookup(self.lookup(host, port, client), format_hostport(host, port), timeout, done)

    def _saturated(self, client: str | None) -> bool:
        """A new name would not start at once: no thread is free, or `client` is at
        its limit."""
        if len(self._pending) >= self._threads:  # (a query stays pending while it runs)
            return True
        return client is not None and self._in_flight.get(client, 0) >= self._per_client

    def in_flight(self, client: str) -> int:
        """How many names `client` has queued or running in the threads now."""
        return self._in_flight.get(client, 0)

    async def resolve(
        self, host: str, port: int, timeout: float, client: str | None = None
    ) -> list[AddrInfo]:
        """`find`, awaited: the addresses, or the UpstreamError raised."""
        answer: asyncio.Future[list[AddrInfo]] = asyncio.get_running_loop().create_future()

        def found(addresses: list[AddrInfo] | None, error: UpstreamError | None) -> None:
            if answer.done():  # the caller was cancelled as the answer came
                return
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(addresses or [])

        lookup = self.find(host, port, timeout, found, client)
        try:
            return await answer
        finally:
            if lookup is not None:
                lookup.cancel()

    def _store(self, host: str, query: _Query, future: asyncio.Future[list[AddrInfo]]) -> None:
        """The thread returned (or the query left the queue unstarted): the name is
        no longer in flight, and its answer is cached."""
        if self._pending.get(host) is query:
            del self._pending[host]
        if (client := query.client) is not None:
            left = self._in_flight.get(client, 0) - 1
            if left > 0:
                self._in_flight[client] = left
            else:
                self._in_flight.pop(client, None)
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
    """One name's lookup (the pool's work, and the loop's future of it), how many
    still wait for it, and the client address it counts against."""

    __slots__ = ("client", "future", "waiters", "work")

    def __init__(
        self,
        work: concurrent.futures.Future[list[AddrInfo]],
        future: asyncio.Future[list[AddrInfo]],
        client: str | None,
    ) -> None:
        self.work = work
        self.future = future
        self.waiters = 0
        self.client = client


class HostsFile:
    """The names of the hosts file, read by ourselves: answered on the loop, so that a
    name there resolves even while every thread waits for a slow DNS server. The
    file is looked at again (a stat) at most every HOSTS_CHECK seconds, and read
    again when it changed. Its addresses come in the order of the file."""

    __slots__ = ("_checked", "_names", "_path", "_stamp")

    def __init__(self, path: str) -> None:
        self._path = path
        self._checked = -HOSTS_CHECK
        self._stamp: tuple[int, int, int] | None = None
        self._names: dict[str, list[AddrInfo]] = {}

    def get(self, host: str, port: int) -> list[AddrInfo] | None:
        """The addresses the file gives `host` (with `port`), or None."""
        now = time.monotonic()
        if now - self._checked >= HOSTS_CHECK:
            self._checked = now
            self._refresh()
        found = self._names.get(host.lower())
        if found is None:
            return None
        return [(family, (addr[0], port, *addr[2:])) for family, addr in found]

    def _refresh(self) -> None:
        try:
            info = os.stat(self._path)
        except OSError:
            self._stamp, self._names = None, {}
            return
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            with open(self._path, encoding="utf-8", errors="replace") as file:
                text = file.read(HOSTS_MAX)
        except OSError:
            self._names = {}
            return
        self._names = parse_hosts(text)


def parse_hosts(text: str) -> dict[str, list[AddrInfo]]:
    """hosts(5): an address, then its names, on each line; `#` starts a comment. A
    name on several lines has all their addresses, in the order of the file."""
    names: dict[str, list[AddrInfo]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        ip, aliases = fields[0], fields[1:]
        if "%" in ip:  # a scope: the address as getaddrinfo gives it (numeric: no lookup)
            try:
                info = socket.getaddrinfo(ip, 0, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
            except (OSError, UnicodeError):
                continue
            address: AddrInfo = (info[0][0], info[0][4])
        else:
            found = literal_addresses(ip, 0)
            if found is None:
                continue
            address = found[0]
        for name in aliases:
            entries = names.setdefault(name.lower(), [])
            if address not in entries:
                entries.append(address)
    return names


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
