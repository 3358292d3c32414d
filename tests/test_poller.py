"""The connection path's epoll (proxyd.poller), on real sockets in a real loop."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

from proxyd.poller import Poller, poller


def run(test: Callable[[asyncio.AbstractEventLoop], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        await test(asyncio.get_running_loop())

    asyncio.run(main())


async def turns(n: int = 5) -> None:
    """Let the loop run a few iterations."""
    for _ in range(n):
        await asyncio.sleep(0)


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_one_poller_per_loop() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        assert poller(loop) is poller(loop)
        assert isinstance(poller(loop), Poller)

    run(test)


def test_readers_and_writers_are_called_while_ready_and_not_after_removal() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        p = poller(loop)
        a, b = pair()
        calls: list[str] = []
        p.add_reader(a.fileno(), calls.append, "read")
        await turns()
        assert calls == []  # nothing to read
        b.send(b"x")
        await turns(3)
        assert calls.count("read") >= 2  # level-triggered: reported while unread
        assert p.remove_reader(a.fileno()) is True
        assert p.remove_reader(a.fileno()) is False
        calls.clear()
        await turns()
        assert calls == []
        p.add_writer(a.fileno(), calls.append, "write")
        await turns(2)
        assert "write" in calls
        p.remove_writer(a.fileno())
        a.close()
        b.close()

    run(test)


def test_a_reset_is_reported_until_it_is_read() -> None:
    """What uvloop's own watch misses: a reset behind unread bytes."""

    async def test(loop: asyncio.AbstractEventLoop) -> None:
        p = poller(loop)
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
        ours.setblocking(False)
        client.send(b"y" * 10000)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset behind 10,000 unread bytes
        seen: list[bytes | OSError] = []

        def on_readable() -> None:
            try:
                seen.append(ours.recv(4096))  # one short read per call
            except BlockingIOError:
                pass
            except OSError as exc:
                seen.append(exc)
                p.remove_reader(ours.fileno())

        p.add_reader(ours.fileno(), on_readable)
        for _ in range(100):
            await turns(1)
            if seen and isinstance(seen[-1], OSError):
                break
        assert isinstance(seen[-1], ConnectionResetError)
        ours.close()
        listener.close()

    run(test)


def test_a_failing_callback_is_reported_and_the_others_still_run() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        p = poller(loop)
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        a, b = pair()
        c, d = pair()
        calls: list[str] = []

        def boom() -> None:
            raise RuntimeError("boom")

        p.add_reader(a.fileno(), boom)
        p.add_reader(c.fileno(), calls.append, "other")
        b.send(b"x")
        d.send(b"x")
        await turns(3)
        assert calls and reported
        assert isinstance(reported[0]["exception"], RuntimeError)
        for s in (a, c):
            p.remove_reader(s.fileno())
        for s in (a, b, c, d):
            s.close()

    run(test)


def test_an_event_for_a_descriptor_reused_within_one_batch_is_dropped() -> None:
    """A callback that closes a socket and watches a new one with the same number:
    the event taken for the old socket is not handed to the new one's callback."""

    async def test(loop: asyncio.AbstractEventLoop) -> None:
        p = poller(loop)
        a, b = pair()
        c, d = pair()
        fd_c = c.fileno()
        replaced: list[socket.socket] = []
        new_calls: list[int] = []

        def first() -> None:
            # (both a and c are ready in this batch) close c and reuse its number
            p.remove_reader(fd_c)
            c.close()
            e, f = pair()
            replaced.extend((e, f))
            fresh = e if e.fileno() == fd_c else f
            p.add_reader(fresh.fileno(), new_calls.append, 1)
            p.remove_reader(a.fileno())

        p.add_reader(a.fileno(), first)
        p.add_reader(fd_c, lambda: None)
        b.send(b"x")
        d.send(b"x")
        await turns(3)
        assert replaced
        assert new_calls == []  # nothing was sent to the new socket
        for s in replaced:
            p.remove_reader(s.fileno())
            s.close()
        for s in (a, b, d):
            s.close()

    run(test)
