"""The upstream side: resolve the target without blocking the loop and connect to it.

`timeouts.connect` covers DNS and every connect attempt together. Failures come
back as UpstreamError subclasses that carry the SOCKS reply and HTTP status.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from proxyd.config import BuffersConfig
from proxyd.errors import (
    HostUnreachable,
    NetworkUnreachable,
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
    """getaddrinfo in threads of our own, off the event loop.

    A pool of its own, larger than the loop's default (uvloop's has 4 threads),
    so a few lookups stuck on a slow DNS server do not stall every other name.
    """

    def __init__(self, threads: int = 32) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="proxyd-dns")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def lookup(self, host: str, port: int) -> asyncio.Future[list[AddrInfo]]:
        """The addresses of a name, as a future the loop completes."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, _getaddrinfo, host, port)


def _getaddrinfo(host: str, port: int) -> list[AddrInfo]:
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    return [(family, addr) for family, _type, _proto, _name, addr in infos]


ConnectDone = Callable[[socket.socket | None, UpstreamError | None], object]


class Connector:
    """Connects to host:port with loop callbacks, no task: names are resolved in
    the resolver's threads, then each address is tried in turn with a
    non-blocking connect. `timeout` covers the lookup and every attempt.

    `done(sock, None)` or `done(None, error)` is called exactly once, unless
    `cancel()` comes first; the socket then belongs to the caller.
    """

    __slots__ = (
        "_addresses",
        "_buffers",
        "_done",
        "_last",
        "_lookup",
        "_loop",
        "_resolver",
        "_sock",
        "_target",
        "_timeout",
        "_timer",
    )

    def __init__(
        self, resolver: Resolver, buffers: BuffersConfig, timeout: float, done: ConnectDone
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._resolver = resolver
        self._buffers = buffers
        self._timeout = timeout
        self._done: ConnectDone | None = done
        self._target = ""
        self._timer: asyncio.TimerHandle | None = None
        self._lookup: asyncio.Future[list[AddrInfo]] | None = None
        self._addresses: Iterator[AddrInfo] = iter(())
        self._sock: socket.socket | None = None  # the attempt in progress
        self._last: OSError | None = None

    def start(self, host: str, port: int) -> None:
        self._target = format_hostport(host, port)
        self._timer = self._loop.call_later(self._timeout, self._on_timeout)
        addresses = literal_addresses(host, port)
        if addresses is not None:
            self._addresses = iter(addresses)
            self._try_next()
        else:
            self._lookup = self._resolver.lookup(host, port)
            self._lookup.add_done_callback(self._on_resolved)

    def cancel(self) -> None:
        self._done = None
        if self._timer is not None:
            self._timer.cancel()
        if self._lookup is not None:
            self._lookup.cancel()
        if self._sock is not None:
            self._loop.remove_writer(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _on_resolved(self, lookup: asyncio.Future[list[AddrInfo]]) -> None:
        self._lookup = None
        if self._done is None or lookup.cancelled():
            return
        exc = lookup.exception()
        if isinstance(exc, OSError):  # gaierror included
            self._finish(None, classify(exc, self._target))
        elif isinstance(exc, UnicodeError):  # a name IDNA cannot encode; parsers check first
            self._finish(None, HostUnreachable(f"cannot resolve {self._target}: invalid name"))
        elif exc is not None:
            raise exc
        else:
            self._addresses = iter(lookup.result())
            self._try_next()

    def _try_next(self) -> None:
        for family, addr in self._addresses:
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
            if err == 0:
                self._finish(sock, None)
                return
            if err == errno.EINPROGRESS:
                try:
                    # a near target (loopback, the same host) has often answered
                    # within the call: then skip a round through the loop
                    sock.getpeername()
                except OSError:
                    self._sock = sock
                    self._loop.add_writer(sock.fileno(), self._on_connected)
                    return
                self._finish(sock, None)
                return
            sock.close()
            self._last = OSError(err, os.strerror(err))
        if self._last is None:
            self._finish(None, HostUnreachable(f"{self._target} has no address"))
        else:
            self._finish(None, classify(self._last, self._target))

    def _on_connected(self) -> None:
        sock = self._sock
        if sock is None:
            return
        self._loop.remove_writer(sock.fileno())
        self._sock = None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._finish(sock, None)
            return
        sock.close()
        self._last = OSError(err, os.strerror(err))
        self._try_next()

    def _on_timeout(self) -> None:
        self._timer = None
        done = self._done
        self.cancel()
        if done is not None:
            done(None, classify(TimeoutError(), self._target))

    def _finish(self, sock: socket.socket | None, error: UpstreamError | None) -> None:
        done = self._done
        self.cancel()
        if done is None:
            if sock is not None:
                sock.close()
            return
        done(sock, error)
