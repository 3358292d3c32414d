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
from typing import Final

OK: Final = "ok"
IDLE_TIMEOUT: Final = "idle_timeout"
RESET: Final = "reset"

# Reads per readiness callback before yielding to the rest of the loop. A pump
# reads until the socket would block (below), because uvloop stops watching a
# socket whose peer reset it while data was still unread, after one last call.
READS_PER_WAKEUP: Final = 8


class _Pump:
    """One direction: src -> dst."""

    __slots__ = (
        "_loop",
        "_tunnel",
        "buffer",
        "count",
        "done",
        "dst",
        "dst_fd",
        "pending",
        "src",
        "src_fd",
        "stopped",
        "view",
    )

    def __init__(self, tunnel: Tunnel, src: socket.socket, dst: socket.socket, size: int) -> None:
        self._loop = tunnel.loop
        self._tunnel = tunnel
        self.src, self.src_fd = src, src.fileno()
        self.dst, self.dst_fd = dst, dst.fileno()
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.pending: memoryview | None = None
        self.count = 0
        self.done = False
        self.stopped = False

    def start(self, first: bytes = b"") -> None:
        if first:  # bytes the client sent with its request go out before anything else
            self.pending = memoryview(first)
            self._loop.add_writer(self.dst_fd, self._on_writable)
        else:
            self._loop.add_reader(self.src_fd, self._on_readable)

    def stop(self) -> None:
        self.stopped = True
        self._loop.remove_reader(self.src_fd)
        self._loop.remove_writer(self.dst_fd)

    def _on_readable(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            # a continuation may arrive after backpressure, EOF or the end of the tunnel
            if self.stopped or self.done or self.pending is not None:
                return
            try:
                n = self.src.recv_into(self.buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._tunnel.fail(exc)
                return
            if n == 0:
                self._loop.remove_reader(self.src_fd)
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
                self._loop.remove_reader(self.src_fd)
                self._loop.add_writer(self.dst_fd, self._on_writable)
                return
        # Still readable after a full batch: continue on the next loop iteration
        # rather than rely on a readiness event uvloop may no longer deliver.
        self._loop.call_soon(self._on_readable)

    def _on_writable(self) -> None:
        pending = self.pending
        if self.stopped or pending is None:
            return
        try:
            sent = self.dst.send(pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._tunnel.fail(exc)
            return
        self.count += sent
        self._tunnel.last_activity = self._loop.time()
        if sent < len(pending):
            self.pending = pending[sent:]
            return
        self.pending = None
        self._loop.remove_writer(self.dst_fd)
        self._loop.add_reader(self.src_fd, self._on_readable)

    def _finish(self) -> None:
        """The source sent EOF and everything read has been written: half-close dst."""
        self.done = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._tunnel.fail(exc)
            return
        self._tunnel.direction_done()


class Tunnel:
    """Bytes between a client and its target until both are done, an error, or idleness.

    The counters can be read at any time, also after the run was cancelled.
    The caller owns and closes both sockets.
    """

    def __init__(
        self, client: socket.socket, upstream: socket.socket, *, read_size: int, idle: float
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle = idle
        self.last_activity = self.loop.time()
        self.status = OK
        self.error: str | None = None
        self._finished: asyncio.Future[None] = self.loop.create_future()
        self._up = _Pump(self, client, upstream, read_size)
        self._down = _Pump(self, upstream, client, read_size)
        self._timer: asyncio.TimerHandle | None = None

    @property
    def bytes_up(self) -> int:
        """Client to target, delivered to the target's socket."""
        return self._up.count

    @property
    def bytes_down(self) -> int:
        return self._down.count

    async def run(self, first_up: bytes = b"") -> None:
        """Relay until the tunnel ends; `status` and `error` then say how it ended."""
        self._timer = self.loop.call_at(self.last_activity + self.idle, self._check_idle)
        self._up.start(first_up)
        self._down.start()
        try:
            await self._finished
        finally:
            self._stop()

    def direction_done(self) -> None:
        if self._up.done and self._down.done:
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
        if not self._finished.done():
            self.status, self.error = status, error
            self._finished.set_result(None)
        self._stop()

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._up.stop()
        self._down.stop()
