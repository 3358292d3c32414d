"""SOCKS BIND: a listening socket of its own per request, for the one peer the
request names (its addresses, or anyone for 0.0.0.0 that the route's check lets
through), within `timeouts.connect`. Addresses are compared parsed, not as text."""

from __future__ import annotations

import asyncio
import errno
import socket

from proxyd.config import BuffersConfig
from proxyd.destinations import parse
from proxyd.direct import ConnectDone, Refuse, tune_socket
from proxyd.dns import AddrInfo
from proxyd.egress import Egress, EgressError
from proxyd.errors import HostUnreachable, UpstreamError, UpstreamTimeout


class Binder:
    """SOCKS BIND: a fresh listening socket on `local_host` that waits for one
    connection from the expected peer; connections from any other address are
    closed, and the wait goes on. `timeout` bounds the whole wait.

    `done(sock, None)` or `done(None, error)` is called exactly once, unless
    `cancel()` comes first; the accepted socket then belongs to the caller.
    """

    __slots__ = ("_done", "_expected", "_listener", "_loop", "_refuse", "_timer", "refused")

    def __init__(
        self,
        local_host: str,
        peers: list[AddrInfo] | None,
        timeout: float,
        buffers: BuffersConfig,
        done: ConnectDone,
        refuse: Refuse | None = None,
        egress: Egress | None = None,
        sticky_key: str = "",
    ) -> None:
        """`peers`: the addresses the peer may come from (the gate's); None accepts any
        peer that `refuse` (the route's check, given the peer's address and port 0) lets
        through. With `egress`, the socket listens on an egress address of the peer's
        family instead of `local_host`. UpstreamError when no socket can listen."""
        self._loop = asyncio.get_running_loop()
        self._expected = None if peers is None else {parse(addr[0]) for _family, addr in peers}
        self._refuse = refuse
        self._done: ConnectDone | None = done
        self.refused = 0  # connections from other addresses, or refused ones
        family: int = socket.AF_INET6 if ":" in local_host else socket.AF_INET
        if egress is not None and peers:
            # the peer comes from an address of its own family: the first one the
            # egress serves (a peer of no such family cannot be waited for)
            families = [f for f, _addr in peers if egress.serves(f)]
            family = families[0] if families else peers[0][0]
        try:
            self._listener = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise UpstreamError(f"cannot listen for the peer: {exc.strerror}") from None
        try:
            self._listener.setblocking(False)
            tune_socket(self._listener, buffers)
            if egress is None or egress.bind(self._listener, family, sticky_key) is None:
                self._listener.bind((local_host, 0))
            self._listener.listen(8)
        except EgressError as exc:
            self._listener.close()
            raise HostUnreachable(f"cannot listen for the peer: {exc} (egress)") from None
        except OSError as exc:
            self._listener.close()
            raise UpstreamError(f"cannot listen for the peer: {exc.strerror}") from None
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
            if (
                parse(peer[0]) not in self._expected
                if self._expected is not None
                else self._refuse is not None and self._refuse(peer[0], 0) is not None
            ):
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
