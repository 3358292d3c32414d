"""The relay: the one place that moves tunnel bytes, both ways, for every protocol.

Each direction is a pump driven by loop readiness callbacks (no task or timer
per chunk): read into a reused buffer, write it on; when the destination cannot
take it all, stop reading the source until the rest is written (backpressure,
at most one buffer in flight per direction). EOF on one side becomes
shutdown(SHUT_WR) on the other; the tunnel ends when both directions are done,
on an error, or after `idle` seconds with no bytes either way.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Final

OK: Final = "ok"
IDLE_TIMEOUT: Final = "idle_timeout"
RESET: Final = "reset"


@dataclass(slots=True)
class RelayResult:
    bytes_up: int  # client to target
    bytes_down: int  # target to client
    status: str  # OK, IDLE_TIMEOUT or RESET
    error: str | None = None


class _Pump:
    """One direction: src -> dst."""

    __slots__ = ("_loop", "_tunnel", "buffer", "count", "done", "dst", "pending", "src", "view")

    def __init__(self, tunnel: _Tunnel, src: socket.socket, dst: socket.socket, size: int) -> None:
        self._loop = tunnel.loop
        self._tunnel = tunnel
        self.src = src
        self.dst = dst
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.pending: memoryview | None = None
        self.count = 0
        self.done = False

    def start(self) -> None:
        self._loop.add_reader(self.src.fileno(), self._on_readable)

    def stop(self) -> None:
        self._loop.remove_reader(self.src.fileno())
        self._loop.remove_writer(self.dst.fileno())

    def _on_readable(self) -> None:
        try:
            n = self.src.recv_into(self.buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._tunnel.fail(exc)
            return
        if n == 0:
            self._loop.remove_reader(self.src.fileno())
            self._finish()
            return
        self._tunnel.last_activity = self._loop.time()
        try:
            sent = self.dst.send(self.view[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._tunnel.fail(exc)
            return
        self.count += sent
        if sent < n:
            self.pending = self.view[sent:n]
            self._loop.remove_reader(self.src.fileno())
            self._loop.add_writer(self.dst.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        assert self.pending is not None
        try:
            sent = self.dst.send(self.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._tunnel.fail(exc)
            return
        self.count += sent
        self._tunnel.last_activity = self._loop.time()
        if sent < len(self.pending):
            self.pending = self.pending[sent:]
            return
        self.pending = None
        self._loop.remove_writer(self.dst.fileno())
        self._loop.add_reader(self.src.fileno(), self._on_readable)

    def _finish(self) -> None:
        """The source sent EOF and everything read has been written: half-close dst."""
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._tunnel.fail(exc)
            return
        self._tunnel.direction_done()


class _Tunnel:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        upstream: socket.socket,
        read_size: int,
        idle: float,
    ) -> None:
        self.loop = loop
        self.idle = idle
        self.last_activity = loop.time()
        self.finished: asyncio.Future[tuple[str, str | None]] = loop.create_future()
        self.up = _Pump(self, client, upstream, read_size)
        self.down = _Pump(self, upstream, client, read_size)
        self._timer = loop.call_at(self.last_activity + idle, self._check_idle)

    def direction_done(self) -> None:
        if self.up.done and self.down.done:
            self._end(OK, None)

    def fail(self, exc: OSError) -> None:
        self._end(RESET, exc.strerror or type(exc).__name__)

    def _check_idle(self) -> None:
        deadline = self.last_activity + self.idle
        if self.loop.time() >= deadline:
            self._end(IDLE_TIMEOUT, None)
        else:
            self._timer = self.loop.call_at(deadline, self._check_idle)

    def _end(self, status: str, error: str | None) -> None:
        if not self.finished.done():
            self.finished.set_result((status, error))
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        self.up.stop()
        self.down.stop()


async def relay(
    client: socket.socket,
    upstream: socket.socket,
    *,
    read_size: int,
    idle: float,
    first_up: bytes = b"",
) -> RelayResult:
    """Move bytes between two connected non-blocking sockets until the tunnel ends.

    `first_up` is what the client sent after its request, delivered before the rest.
    The caller owns and closes both sockets.
    """
    loop = asyncio.get_running_loop()
    sent_first = 0
    if first_up:
        try:
            await asyncio.wait_for(loop.sock_sendall(upstream, first_up), idle)
        except TimeoutError:
            return RelayResult(0, 0, IDLE_TIMEOUT)
        except OSError as exc:
            return RelayResult(0, 0, RESET, exc.strerror)
        sent_first = len(first_up)
    tunnel = _Tunnel(loop, client, upstream, read_size, idle)
    tunnel.up.start()
    tunnel.down.start()
    try:
        status, error = await tunnel.finished
    finally:
        tunnel.stop()
    return RelayResult(sent_first + tunnel.up.count, tunnel.down.count, status, error)
