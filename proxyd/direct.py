"""Connecting to a target ourselves: happy eyeballs (RFC 8305) with loop callbacks,
within one timeout, and the socket options both sides of a tunnel get.

The addresses come from the resolver (or the gate, already checked); `refuse`
says which of them never to connect to, as the gate decided (proxyd.destinations).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Final

from proxyd.config import BuffersConfig
from proxyd.dns import AddrInfo, Lookup, Resolver, literal_addresses
from proxyd.egress import Egress, EgressError
from proxyd.errors import Denied, HostUnreachable, SessionError, UpstreamError, classify
from proxyd.poller import poller
from proxyd.protocols.common import format_hostport


def tune_socket(
    sock: socket.socket, buffers: BuffersConfig, *, sizes: bool = True, nodelay: bool = True
) -> None:
    """Apply `[buffers]` to a TCP socket, either side of a tunnel: the sizes before
    connect or listen, so that window scaling sees SO_RCVBUF (an accepted socket
    inherits its listener's), and TCP_NODELAY."""
    if sizes and buffers.so_rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers.so_rcvbuf)
    if sizes and buffers.so_sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers.so_sndbuf)
    if nodelay and buffers.tcp_nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
Refuse = Callable[[str, int], Denied | None]  # (ip, port): why not to connect there, if so


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
        "_client",
        "_deadline",
        "_delay",
        "_done",
        "_egress",
        "_key",
        "_last",
        "_lookup",
        "_loop",
        "_no_egress",
        "_poller",
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
        refuse: Refuse | None = None,
        client: str | None = None,
        egress: Egress | None = None,
        sticky_key: str = "",
    ) -> None:
        """`refuse(ip, port)`: addresses never to connect to, and why (the proxy itself,
        a private destination); `client`: whose request it is, which a lookup counts
        against (dns.per_client); `egress`: where the connection leaves from (an
        address of the family of each attempt; one with none is not attempted),
        `sticky_key` what a sticky one keeps an address for."""
        self._egress = egress
        self._key = sticky_key
        self._no_egress: EgressError | None = None
        self._refuse = refuse
        self._client = client
        self._refused: Denied | None = None
        self._loop = loop = asyncio.get_running_loop()
        self._poller = poller(loop)
        self._resolver = resolver
        self._buffers = buffers
        self._timeout = timeout
        self._done: ConnectDone | None = done
        self._target = ""
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # when the whole of it (lookup and attempts) times out
        self._delay: asyncio.TimerHandle | None = None  # starts the next attempt
        self._lookup: Lookup | None = None
        self._addresses: list[AddrInfo] = []
        self._attempts: list[socket.socket] = []  # connects in progress
        self._last: OSError | None = None

    def start(self, host: str, port: int, addresses: list[AddrInfo] | None = None) -> None:
        """Connect to host:port: to `addresses` when given (already resolved and
        checked), else to what the resolver finds for it."""
        self._target = format_hostport(host, port)
        self._deadline = self._loop.time() + self._timeout
        if addresses is None:
            addresses = literal_addresses(host, port)  # (most targets: no lookup to start)
        if addresses is not None:
            self._addresses = interleave(addresses)
            self._next_attempt()
        else:
            self._arm()
            self._lookup = self._resolver.find(
                host, port, self._timeout, self._on_found, self._client
            )

    def _arm(self) -> None:
        """The timeout, once something is to be waited for (a near target often
        answers within the connect call: then no timer is made at all)."""
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._on_timeout)

    def cancel(self) -> None:
        self._done = None
        for timer in (self._timer, self._delay):
            if timer is not None:
                timer.cancel()
        if self._lookup is not None:
            self._lookup.cancel()
        for sock in self._attempts:
            self._poller.remove_writer(sock.fileno())
            sock.close()
        self._attempts.clear()

    def _on_found(self, addresses: list[AddrInfo] | None, error: UpstreamError | None) -> None:
        self._lookup = None
        if error is not None:
            self._finish(None, error)
        elif self._done is not None:
            self._addresses = interleave(addresses or [])
            self._next_attempt()

    def _next_attempt(self) -> None:
        """Start connecting to the next address; when none is left and nothing is in
        progress, fail with what the last attempt said."""
        self._delay = None
        while self._addresses:
            family, addr = self._addresses.pop(0)
            if self._egress is not None and family == socket.AF_INET6:
                # an IPv4-mapped target is an IPv4 one: it leaves from an IPv4 address
                mapped = ipaddress.IPv6Address(addr[0].partition("%")[0]).ipv4_mapped
                if mapped is not None:
                    family, addr = socket.AF_INET, (str(mapped), addr[1])
            if self._refuse is not None and (denied := self._refuse(addr[0], addr[1])):
                self._refused = denied
                continue
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:  # e.g. no IPv6 on this host: try the next address
                self._last = exc
                continue
            try:
                if self._egress is not None:
                    self._egress.bind(sock, family, self._key)
                sock.setblocking(False)
                tune_socket(sock, self._buffers)
                err = sock.connect_ex(addr)
            except EgressError as exc:  # never from an address the operator did not name
                sock.close()
                self._no_egress = exc
                continue
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
                    self._poller.add_writer(sock.fileno(), self._on_connected, sock)
                    self._arm()
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
            if self._last is None and self._refused is not None:
                self._finish(None, self._refused)
            elif self._last is None and self._no_egress is not None:
                why = f"{self._target}: {self._no_egress} (egress)"
                self._finish(None, HostUnreachable(why))
            elif self._last is None:
                self._finish(None, HostUnreachable(f"{self._target} has no address"))
            else:
                self._finish(None, classify(self._last, self._target))

    def _on_connected(self, sock: socket.socket) -> None:
        self._poller.remove_writer(sock.fileno())
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
