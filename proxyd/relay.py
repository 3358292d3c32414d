"""The relay: the one place that moves tunnel bytes, both ways, for every protocol.

Each direction is a pump driven by loop readiness callbacks (no task or timer
per chunk): take what the source has, hand it to the destination; when the
destination cannot take it all, stop reading the source until the rest is
written (backpressure: at most one read's worth in flight per direction). EOF
on one side becomes shutdown(SHUT_WR) on the other; the tunnel ends when both
directions are done, on an error, or after `idle` seconds with no bytes either way.

On Linux the bytes go through a pipe with splice(2) and never enter Python
(zero-copy); elsewhere, or with `buffers.splice = false`, through one reused buffer.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import termios
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from proxyd.errors import ClientClosed, ProtocolError, Status
from proxyd.poller import poller

if TYPE_CHECKING:
    from proxyd.accounting import Account

# Reads per readiness callback before yielding to the rest of the loop, while
# each read fills the whole buffer (a shorter one took all there was).
READS_PER_WAKEUP: Final = 8

SPLICE_AVAILABLE: Final = hasattr(os, "splice")
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_LINGER_NOT: Final = struct.pack("ii", 1, 0)


# A direction whose share of the user's quota is spent (with workers) reads again
# after this many seconds: by then its worker has learnt what the others moved.
LEASE_WAIT: Final = 0.25

# A rate-limited direction waits for at least this many bytes of allowance (or its
# whole read size, if smaller) before it reads again: few, larger reads.
RATE_CHUNK: Final = 16384


class Bucket:
    """A token bucket: `rate` bytes per second, bursts of up to one second's worth.

    One bucket is shared by every tunnel (and forwarded request, and association)
    of one user in one direction, so their sum keeps to the rate. Streams read what
    `allowance` (or, awaited, `reserve`) grants and `take` it; a datagram passes
    whole or not at all (`try_take`): UDP is policed, not queued."""

    __slots__ = ("_loop", "_stamp", "_tokens", "capacity", "rate")

    def __init__(self, rate: int) -> None:
        self._loop = asyncio.get_running_loop()
        self.rate = rate
        self.capacity = rate
        self._tokens = float(rate)
        self._stamp = self._loop.time()

    def available(self) -> int:
        """Bytes that may pass now."""
        now = self._loop.time()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return int(self._tokens)

    def take(self, n: int) -> None:
        self._tokens -= n

    def try_take(self, n: int) -> bool:
        """Let `n` bytes pass now, or refuse them whole (a datagram). One larger than
        a burst passes when the bucket is full, and the debt is paid off over time."""
        if self.available() < min(n, self.capacity):
            return False
        self._tokens -= n
        return True

    def delay(self, want: int) -> float:
        """Seconds until `want` bytes (at most a burst) may pass, after `available()`."""
        return max(0.0, (min(want, self.capacity) - self._tokens) / self.rate)

    def allowance(self, size: int) -> tuple[int, float]:
        """How much of a `size`-byte read may happen now, or else how long to wait."""
        allowed = self.available()
        want = min(size, RATE_CHUNK, self.capacity)
        if allowed >= want:
            return min(allowed, size), 0.0
        return 0, self.delay(want)

    async def reserve(self, size: int) -> int:
        """`allowance`, awaited: how much of a `size`-byte read may happen, once some may."""
        while True:
            allowed, wait = self.allowance(size)
            if allowed:
                return allowed
            await asyncio.sleep(wait)


_shared_buffers: dict[int, memoryview] = {}


def abort(sock: socket.socket) -> None:
    """Make the socket's close() a reset (RST), not an orderly end (FIN): a peer must not
    take a stream that was cut off for a whole one."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NOT)
    except OSError:
        pass  # closed already, or not TCP


def _shared_buffer(size: int) -> memoryview:
    """One read buffer per size for the whole process: pumps run one at a time on the
    loop and empty it before returning, so idle tunnels hold no buffer at all."""
    view = _shared_buffers.get(size)
    if view is None:
        view = _shared_buffers[size] = memoryview(bytearray(size))
    return view


class _Pump:
    """One direction, src -> dst, through the shared buffer."""

    __slots__ = (
        "_buffer",
        "_loop",
        "_pending",
        "_pending_is_shared",
        "_poller",
        "_refill",
        "_relay",
        "_watching",
        "account",
        "bucket",
        "count",
        "done",
        "dst",
        "dst_fd",
        "head",
        "side",
        "size",
        "src",
        "src_fd",
        "stopped",
    )

    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket, size: int) -> None:
        self._loop = relay.loop
        self._poller = relay.poller
        # A weak link back: no reference cycle, so a finished relay is freed at
        # once rather than by a garbage-collection pass (pumps never outlive it).
        self._relay = weakref.proxy(relay)
        self.src, self.src_fd = src, src.fileno()
        self.dst, self.dst_fd = dst, dst.fileno()
        self.size = size
        self._buffer = _shared_buffer(size)
        self.head: memoryview | None = None  # bytes to send before anything read
        self.count = 0  # bytes the destination's socket accepted
        self.done = False
        self.stopped = False
        self._watching: str | None = None  # "read" (the source), "write" (the destination)
        self._pending: memoryview | None = None
        self._pending_is_shared = False
        self.bucket: Bucket | None = None  # the user's rate limit, if there is one
        self.account: Account | None = None  # the user's traffic this period (a quota)
        self.side = 0  # which way, in the account: 0 up (from the client), 1 down
        self._refill: asyncio.TimerHandle | None = None  # waiting for the bucket

    # -- the two steps a pump kind defines ---------------------------------------

    def _read(self, size: int) -> int:
        """Take up to `size` bytes the source has (0 at EOF); raises BlockingIOError
        when it has nothing."""
        buffer = self._buffer
        n = self.src.recv_into(buffer, size)
        self._pending = buffer[:n]
        self._pending_is_shared = True
        return n

    def _write(self) -> None:
        """Hand staged bytes on until all are written or the destination would block."""
        try:
            while self._pending:
                sent = self.dst.send(self._pending)
                self.count += sent
                self._pending = self._pending[sent:]
        except (BlockingIOError, InterruptedError):
            if self._pending is not None and self._pending_is_shared:
                # the next read anywhere reuses the shared buffer: keep a copy
                self._pending = memoryview(bytes(self._pending))
                self._pending_is_shared = False
            raise

    @property
    def staged(self) -> bool:
        return bool(self._pending) or bool(self.head)

    def close(self) -> None:
        """Release what the pump owns (not the sockets)."""

    # -- the loop callbacks, common to every kind ---------------------------------

    def start(self, first: bytes = b"") -> None:
        if first:  # bytes the client sent with its request go out before anything else
            self.head = memoryview(first)
            # (not read on till they are out: the session's watch, which a pump
            # takes over by watching the same socket, stops)
            self._poller.remove_reader(self.src_fd)
            if self.account is not None:  # (they fit: Relay.start checked)
                self.account.charge(self.side, len(first))
            if (bucket := self.bucket) is not None:
                # read before the user was known, they pay the user's rate now: they
                # wait while the bucket is in debt, as a read would have waited
                bucket.take(len(first))
                bucket.available()
                if (wait := bucket.delay(0)) > 0:
                    self._refill = self._loop.call_later(wait, self._on_refilled)
                    return
            self._watch("write")
        else:
            self._watch("read")

    def stop(self) -> None:
        self.stopped = True
        self._watch(None)
        if self._refill is not None:
            self._refill.cancel()
        self.close()

    def _watch(self, what: str | None) -> None:
        """Wait for the source to be readable, the destination writable, or nothing.
        Tracked here so that each change costs the loop one call, not a blind two."""
        if what == self._watching:
            return
        if self._watching == "read":
            self._poller.remove_reader(self.src_fd)
        elif self._watching == "write":
            self._poller.remove_writer(self.dst_fd)
        if what == "read":
            self._poller.add_reader(self.src_fd, self._on_readable)
        elif what == "write":
            self._poller.add_writer(self.dst_fd, self._on_writable)
        self._watching = what

    def _flush(self) -> bool:
        """Write what is staged; True when everything went out."""
        try:
            if self.head:
                sent = self.dst.send(self.head)
                self.count += sent
                self.head = self.head[sent:]
                if self.head:
                    return False
            self._write()
        except (BlockingIOError, InterruptedError):
            return False
        return not self.staged

    def _on_readable(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            # a continuation may arrive after backpressure, EOF or the end of the tunnel
            if self.stopped or self.done or self.staged:
                return
            size = self.size
            if (account := self.account) is not None:
                allowed = account.allowance(self.side)
                if allowed < size:
                    if allowed <= 0:
                        self._watch(None)
                        if account.room(self.side) <= 0:  # used up: the tunnel ends here
                            self._relay.exceeded()
                        else:  # this worker's share is: read again once it learns more
                            self._refill = self._loop.call_later(LEASE_WAIT, self._on_refilled)
                        return
                    size = allowed
            if self.bucket is not None:
                size, wait = self.bucket.allowance(size)
                if not size:  # over the user's rate: read again once it allows
                    self._watch(None)
                    self._refill = self._loop.call_later(wait, self._on_refilled)
                    return
            try:
                n = self._read(size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._relay.fail(exc)
                return
            if self.bucket is not None:
                self.bucket.take(n)
            if account is not None:
                account.charge(self.side, n)
            if n == 0:
                self._watch(None)
                self._finish()
                return
            self._relay.last_activity = self._loop.time()
            try:
                flushed = self._flush()
            except OSError as exc:
                self._relay.fail(exc)
                return
            if not flushed:
                self._watch("write")
                return
            if n < size:  # read to the end (the poller says when there is more)
                return
        # Still readable after a full batch: the poller reports it again once the rest
        # of the loop has had its turn.

    def _on_refilled(self) -> None:
        self._refill = None
        if not (self.stopped or self.done):
            self._watch("write" if self.head else self._after_write())

    def _on_writable(self) -> None:
        if self.stopped:
            return
        try:
            flushed = self._flush()
        except OSError as exc:
            self._relay.fail(exc)
            return
        self._relay.last_activity = self._loop.time()
        if flushed:
            self._watch(self._after_write())

    def _after_write(self) -> str | None:
        """What to wait for once staged bytes are out: the source, unless the tunnel
        is being cut (then nothing more is read)."""
        return None if self._relay.cutting else "read"

    # the relay's view of the watch, to stop reading when a quota cuts the tunnel
    @property
    def watching(self) -> str | None:
        return self._watching

    def watch(self, what: str | None) -> None:
        self._watch(what)

    def _finish(self) -> None:
        """The source sent EOF and everything read has been written: half-close dst.
        Not after the other direction ended: the tunnel ends now, its owner closes
        both sockets, and the close sends the FIN (both sides read to their EOF, so
        nothing unread turns it into a reset)."""
        self.done = True
        if not self._relay.ending:
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._relay.fail(exc)
                return
        self._relay.direction_done()


# Empty pipes kept for the next read, by size. A pump holds a pipe only while
# bytes sit in it, so an idle tunnel costs two descriptors, not six, and short
# tunnels do not spend a pipe2, an fcntl and two closes each.
_idle_pipes: dict[int, list[tuple[int, int]]] = {}
IDLE_PIPES_KEPT: Final = 64


class _SplicePump(_Pump):
    """One direction through a pipe with splice(2): the bytes stay in the kernel.

    A pump copies until one read fills the whole buffer, and splices from then
    on: a request or an echo is a single small read, for which the pipe (two
    more system calls and a descriptor) costs more than copying saves. When no
    pipe can be had (out of descriptors) a chunk is copied too.
    """

    __slots__ = ("_bulk", "_in_pipe", "_pipe_r", "_pipe_w")

    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket, size: int) -> None:
        super().__init__(relay, src, dst, size)
        self._bulk = False
        self._pipe_r = self._pipe_w = -1
        self._in_pipe = 0

    def _take_pipe(self) -> None:
        idle = _idle_pipes.get(self.size)
        if idle:
            self._pipe_r, self._pipe_w = idle.pop()
            return
        self._pipe_r, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:  # a pipe as large as one read; the default 64 KiB serves when this fails
            fcntl.fcntl(self._pipe_w, _F_SETPIPE_SZ, self.size)
        except OSError:
            pass

    def _release_pipe(self) -> None:
        if self._pipe_r < 0:
            return
        idle = _idle_pipes.setdefault(self.size, [])
        if self._in_pipe == 0 and len(idle) < IDLE_PIPES_KEPT:
            idle.append((self._pipe_r, self._pipe_w))  # empty: safe for any pump
        else:
            os.close(self._pipe_r)
            os.close(self._pipe_w)
        self._pipe_r = self._pipe_w = -1

    def _read(self, size: int) -> int:
        if not self._bulk:
            n = super()._read(size)
            self._bulk = n == self.size
            return n
        if self._pipe_w < 0:
            try:
                self._take_pipe()
            except OSError:
                return super()._read(size)
        try:
            n = os.splice(self.src_fd, self._pipe_w, size, flags=_SPLICE_FLAGS)
        except OSError:
            self._release_pipe()
            raise
        self._in_pipe = n
        if n == 0:
            self._release_pipe()
        return n

    def _write(self) -> None:
        if self._pending:
            super()._write()
        while self._in_pipe:
            sent = os.splice(self._pipe_r, self.dst_fd, self._in_pipe, flags=_SPLICE_FLAGS)
            self.count += sent
            self._in_pipe -= sent
        self._release_pipe()

    @property
    def staged(self) -> bool:
        return self._in_pipe > 0 or bool(self.head) or bool(self._pending)

    def close(self) -> None:
        self._release_pipe()


class Relay:
    """Bytes between a client and its target until both are done, an error, or idleness.

    `on_end(status, error)` is called once when the tunnel ends by itself, saying
    how (`status` and `error` keep it). `stop()` ends it from outside without the call. The counters
    can be read at any time. The caller owns and closes both sockets.
    """

    __slots__ = (
        "__weakref__",
        "_cut_deadline",
        "_down",
        "_on_end",
        "_quota_timer",
        "_timer",
        "_up",
        "error",
        "idle",
        "last_activity",
        "loop",
        "poller",
        "status",
    )

    # seconds a tunnel cut at its user's quota has to hand what it read on
    DRAIN_BEFORE_CUT: Final = 2.0

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        read_size: int,
        idle: float,
        on_end: Callable[[Status, str | None], object],
        splice: bool = SPLICE_AVAILABLE,
        rate: tuple[Bucket, Bucket] | None = None,
        account: Account | None = None,
    ) -> None:
        self.loop = loop = asyncio.get_running_loop()
        self.poller = poller(loop)
        self.idle = idle
        self.last_activity = self.loop.time()
        self.status = Status.OK
        self.error: str | None = None
        self._on_end: Callable[[Status, str | None], object] | None = on_end
        kind = _SplicePump if splice and SPLICE_AVAILABLE else _Pump
        self._up = kind(self, client, upstream, read_size)
        try:
            self._down = kind(self, upstream, client, read_size)
        except BaseException:
            self._up.close()
            raise
        if rate is not None:
            self._up.bucket, self._down.bucket = rate
        if account is not None:
            self._up.account = self._down.account = account
            self._down.side = 1
        self._timer: asyncio.TimerHandle | None = None
        # waiting for a grant of the user's quota, or for the last bytes to go out
        self._quota_timer: asyncio.Handle | None = None
        self._cut_deadline = 0.0  # cut at its user's quota: when it ends at the latest

    @property
    def bytes_up(self) -> int:
        """Client to target, delivered to the target's socket."""
        return self._up.count

    @property
    def bytes_down(self) -> int:
        return self._down.count

    def start(self, first_up: bytes = b"", first_down: bytes = b"") -> None:
        """Relay until the tunnel ends; `first_up` goes to the target and `first_down`
        (what a parent proxy passed on with its answer) to the client before anything else."""
        self._timer = self.loop.call_at(self.last_activity + self.idle, self._check_idle)
        self._begin(first_up, first_down)

    def _begin(self, first_up: bytes, first_down: bytes) -> None:
        """Start both pumps, once what came with the request fits the user's quota
        (with workers: this worker's grant of it); if it cannot, none of it goes."""
        self._quota_timer = None
        account = self._up.account
        if account is not None and (first_up or first_down):
            need = len(first_up) + len(first_down)
            if need > min(account.room(0), account.room(1)):
                self._quota_timer = self.loop.call_soon(self._end, *_QUOTA_USED_UP)
                return
            if need > min(account.allowance(0), account.allowance(1)):
                self._quota_timer = self.loop.call_later(
                    LEASE_WAIT, self._begin, first_up, first_down
                )
                return
        self._up.start(first_up)
        self._down.start(first_down)

    def stop(self) -> None:
        """Stop relaying now; `on_end` is not called."""
        self._on_end = None
        if self._quota_timer is not None:
            self._quota_timer.cancel()
            self._quota_timer = None
        if self._up.stopped:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._up.stop()
        self._down.stop()

    @property
    def ending(self) -> bool:
        """Both directions are done."""
        return self._up.done and self._down.done

    def direction_done(self) -> None:
        if self._up.done and self._down.done:
            self._end(Status.OK, None)

    def fail(self, exc: OSError) -> None:
        self._end(Status.RESET, exc.strerror or type(exc).__name__)

    @property
    def cutting(self) -> bool:
        """The user's quota is used up: nothing more is read, what was read goes out."""
        return self._cut_deadline > 0

    def exceeded(self) -> None:
        """The user's quota is used up: nothing more is read, what was read and
        counted is handed on (for up to DRAIN_BEFORE_CUT seconds), then the tunnel is
        cut off (its owner resets both sides: the reset would drop what is unsent)."""
        if self._on_end is None or self._cut_deadline:
            return
        self._cut_deadline = self.loop.time() + self.DRAIN_BEFORE_CUT
        for pump in (self._up, self._down):
            if pump.watching == "read":
                pump.watch(None)
        self._drain()

    def _drain(self) -> None:
        self._quota_timer = None
        pumps = (self._up, self._down)
        if self.loop.time() < self._cut_deadline and any(p.staged or _unsent(p.dst) for p in pumps):
            self._quota_timer = self.loop.call_later(0.05, self._drain)
            return
        self._end(*_QUOTA_USED_UP)

    def _check_idle(self) -> None:
        deadline = self.last_activity + self.idle
        if self.loop.time() >= deadline:
            self._end(Status.IDLE_TIMEOUT, None)
        else:
            self._timer = self.loop.call_at(deadline, self._check_idle)

    def _end(self, status: Status, error: str | None) -> None:
        on_end = self._on_end
        if on_end is None:
            return  # already ended or stopped
        self.status, self.error = status, error
        self.stop()
        on_end(status, error)


_QUOTA_USED_UP: Final = (Status.QUOTA_EXCEEDED, "the user's traffic quota is used up")


def _unsent(sock: socket.socket) -> int:
    """Bytes in the socket's send queue, not yet taken by the peer (0 when not known)."""
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", buf)[0])


def send_reply(sock: socket.socket, data: bytes) -> None:
    """A handshake reply: a few bytes into a socket with nothing queued, so one send
    takes them all; a client that has not let it is not reading at all."""
    try:
        sent = sock.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError as exc:
        raise ClientClosed(f"client connection failed: {exc.strerror}") from None
    if sent < len(data):
        raise ProtocolError("client does not read the handshake replies")
