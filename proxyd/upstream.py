"""The upstream side: resolve the target without blocking the loop and connect to it.

`timeouts.connect` covers DNS and every connect attempt together. Failures come
back as UpstreamError subclasses that carry the SOCKS reply and HTTP status.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
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


class Resolver:
    """getaddrinfo in threads of our own, off the event loop.

    A pool of its own, larger than the loop's default (uvloop's has 4 threads),
    so a few lookups stuck on a slow DNS server do not stall every other name.
    """

    def __init__(self, threads: int = 32) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="proxyd-dns")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def resolve(self, host: str, port: int) -> list[AddrInfo]:
        """Addresses for host:port; IP literals skip the resolver."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            if ip.version == 4:
                return [(socket.AF_INET, (host, port))]
            return [(socket.AF_INET6, (host, port, 0, 0))]
        loop = asyncio.get_running_loop()
        infos = await loop.run_in_executor(
            self._executor,
            socket.getaddrinfo,
            host,
            port,
            0,
            socket.SOCK_STREAM,
            socket.IPPROTO_TCP,
        )
        return [(family, addr) for family, _type, _proto, _name, addr in infos]


async def connect(
    host: str, port: int, *, resolver: Resolver, timeout: float, buffers: BuffersConfig
) -> socket.socket:
    """A connected non-blocking socket to host:port, trying each address in turn."""
    target = format_hostport(host, port)
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    try:
        async with asyncio.timeout(timeout):
            for family, addr in await resolver.resolve(host, port):
                try:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                except OSError as exc:  # e.g. no IPv6 on this host: try the next address
                    last = exc
                    continue
                try:
                    sock.setblocking(False)
                    tune_socket(sock, buffers)
                    await loop.sock_connect(sock, addr)
                except OSError as exc:
                    sock.close()
                    last = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                return sock
    except OSError as exc:  # TimeoutError and gaierror included
        raise classify(exc, target) from exc
    except UnicodeError as exc:  # a name IDNA cannot encode; parsers should catch it first
        raise HostUnreachable(f"cannot resolve {target}: invalid name") from exc
    if last is None:
        raise HostUnreachable(f"{target} has no address")
    raise classify(last, target) from last
