"""Readiness of the sockets on the connection path, watched by an epoll of our own.

Every connection watches its client while the handshake waits, its target while
it connects, and both while the relay runs. Through the event loop, each new
watch costs uvloop a poll handle: on Linux seven system calls (a test ADD and DEL,
an ioctl, the real ADD, and three DELs when it ends) and two objects, about
4 µs of CPU, three times per connection. Here a watch is one epoll_ctl and a dict
entry, and the loop watches one descriptor: this epoll, readable while any socket
in it is ready.

The epoll is level-triggered: a socket is reported for as long as it is ready,
so a reader need not read until EAGAIN to be called again, and a reset is
reported until it has been read (uvloop calls a reset socket's reader once).

The interface is the loop's own (`add_reader(fd, callback, *args)`, ...), and a
descriptor is removed before it is closed, as with the loop. Where epoll is not
available, the loop serves.
"""

from __future__ import annotations

import asyncio
import select
import weakref
from collections.abc import Callable
from typing import Any, Final

# Events taken from the epoll per loop callback; more wait for the next iteration.
MAX_EVENTS: Final = 256

_IN: Final = getattr(select, "EPOLLIN", 1)
_OUT: Final = getattr(select, "EPOLLOUT", 4)
_ERR: Final = getattr(select, "EPOLLERR", 8) | getattr(select, "EPOLLHUP", 16)

Callback = tuple[Callable[..., object], tuple[Any, ...]]


class Poller:
    """The sockets of one event loop's connections, in one epoll."""

    __slots__ = ("__weakref__", "_epoll", "_loop", "_masks", "_readers", "_touched", "_writers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._masks: dict[int, int] = {}
        # descriptors whose watch changed while events were being handed out: an
        # event already taken for them may be for a closed socket whose number a new
        # one reuses, so it is dropped (a level-triggered epoll reports it again)
        self._touched: set[int] | None = None
        loop.add_reader(self._epoll.fileno(), self._dispatch)
        weakref.finalize(loop, self._epoll.close)

    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        self._readers[fd] = (callback, args)
        self._set(fd, self._masks.get(fd, 0) | _IN)

    def remove_reader(self, fd: int) -> bool:
        if self._readers.pop(fd, None) is None:
            return False
        self._set(fd, self._masks.get(fd, 0) & ~_IN)
        return True

    def add_writer(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        self._writers[fd] = (callback, args)
        self._set(fd, self._masks.get(fd, 0) | _OUT)

    def remove_writer(self, fd: int) -> bool:
        if self._writers.pop(fd, None) is None:
            return False
        self._set(fd, self._masks.get(fd, 0) & ~_OUT)
        return True

    def _set(self, fd: int, mask: int) -> None:
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        if self._touched is not None:
            self._touched.add(fd)
        if not mask:
            del self._masks[fd]
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # closed already (the kernel dropped it with the socket)
            return
        self._masks[fd] = mask
        if not old:
            self._epoll.register(fd, mask)
            return
        try:
            self._epoll.modify(fd, mask)
        except FileNotFoundError:  # a socket closed while watched, its number reused
            self._epoll.register(fd, mask)

    def _dispatch(self) -> None:
        events = self._epoll.poll(0, MAX_EVENTS)
        touched: set[int] = set()
        self._touched = touched
        try:
            for fd, mask in events:
                if fd in touched:
                    continue
                if mask & (_IN | _ERR) and (reader := self._readers.get(fd)) is not None:
                    self._run(reader)
                    if fd in touched:
                        continue
                if mask & (_OUT | _ERR) and (writer := self._writers.get(fd)) is not None:
                    self._run(writer)
        finally:
            self._touched = None

    def _run(self, callback: Callback) -> None:
        try:
            callback[0](*callback[1])
        except Exception as exc:  # as the loop does with a callback's error: report, go on
            self._loop.call_exception_handler(
                {"message": "Exception in a poller callback", "exception": exc}
            )


_current: tuple[asyncio.AbstractEventLoop, Poller] | None = None


def poller(loop: asyncio.AbstractEventLoop) -> Poller | asyncio.AbstractEventLoop:
    """The loop's poller (made on first use), or the loop itself without epoll."""
    global _current
    if _current is not None and _current[0] is loop:
        return _current[1]
    if not hasattr(select, "epoll"):
        return loop
    found = Poller(loop)
    _current = (loop, found)
    return found
