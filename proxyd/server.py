"""Listeners and lifecycle: bind (or take systemd's sockets), accept, one Session per
client, tell systemd how things stand, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import gc
import itertools
import os
import signal
import socket
import ssl
from typing import Any

from proxyd import __version__, systemd, upstream
from proxyd.auth import Authenticator
from proxyd.config import Config, ListenAddress
from proxyd.log import access
from proxyd.protocols.common import format_hostport
from proxyd.rules import Rules
from proxyd.session import Context, Session

ACCEPT_BATCH = 128  # accepts per wake-up, so one busy listener cannot starve the loop
ACCEPT_BACKOFF = 0.5  # seconds to pause a listener after EMFILE and friends
OVERLOAD_SLACK = 256  # clients beyond max_connections that still get a polite refusal
STATUS_INTERVAL = 5.0  # seconds between STATUS= updates to systemd
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def bind(address: ListenAddress, config: Config, *, listen: bool = True) -> socket.socket:
    """A bound (and by default listening) non-blocking TCP socket.

    With several workers every socket sets SO_REUSEPORT, and the kernel spreads
    new connections over the workers' listening sockets.
    """
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if config.server.workers > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit these; set here so TCP window scaling sees them.
        if config.buffers.so_rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, config.buffers.so_rcvbuf)
        if config.buffers.so_sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.buffers.so_sndbuf)
        sock.bind((address.host, address.port))
        if listen:
            sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Server:
    def __init__(
        self,
        config: Config,
        auth: Authenticator,
        log: Any,
        *,
        worker: int = 0,
        tls: ssl.SSLContext | None = None,
        activated: list[socket.socket] | None = None,
        notifier: systemd.Notifier | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.worker = worker
        dns = config.dns
        resolver = upstream.Resolver(
            size=dns.cache_size, ttl=dns.cache_ttl, negative_ttl=dns.negative_ttl
        )
        rules = Rules(config.rules, default_allow=config.server.default_action == "allow")
        self.ctx = Context(config, auth, resolver, log, rules, tls=tls)
        self.listeners: list[socket.socket] = []
        self.sessions: set[Session] = set()
        # connection ids stay unique across workers: worker w of n counts w+1, w+1+n, ...
        self._ids = itertools.count(worker + 1, config.server.workers)
        self._stop = asyncio.Event()
        self._force = asyncio.Event()  # a second stop signal: no more draining
        self._drained = asyncio.Event()  # the last session ended while draining
        self._draining = False
        self._nodelay = config.buffers.tcp_nodelay
        self._activated = activated or []  # listening sockets systemd passed
        self.notifier = notifier or systemd.Notifier({})
        self._tick: asyncio.TimerHandle | None = None

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then close every listener and tunnel."""
        loop = asyncio.get_running_loop()
        # before the first "listening" line: a SIGTERM right after it must stop us cleanly
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self._activated:  # socket activation: systemd's sockets instead of server.listen
            self.listeners = list(self._activated)
        else:
            try:
                for address in self.config.server.listen:
                    self.listeners.append(bind(address, self.config))
            except OSError:
                self._close_listeners()
                raise
        # What exists now (modules, config) lives as long as the daemon: keep it out
        # of every garbage-collection pass.
        gc.freeze()
        for sock in self.listeners:
            loop.add_reader(sock.fileno(), self._on_acceptable, sock)
            host, port = sock.getsockname()[:2]
            self.ctx.listening.append((host, port))
            self.log.info("listening", address=str(ListenAddress(host, port)))
        self.log.info(
            "started",
            version=__version__,
            pid=os.getpid(),
            worker=self.worker,
            loop=type(loop).__module__,
            socket_activated=bool(self._activated),
        )
        self.notifier.send("READY=1", self._status())
        self._on_tick()
        try:
            await self._stop.wait()
            self._close_listeners()
            self.notifier.send("STOPPING=1", f"STATUS=draining {len(self.sessions)} connections")
            await self._drain()
        finally:
            self._close_listeners()
            if self._tick is not None:
                self._tick.cancel()
            for session in list(self.sessions):
                session.abort()
            # forwarding connections and UDP associations end in their own tasks
            tasks = [s.task for s in self.sessions if s.task is not None]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self.ctx.auth.close()
            self.ctx.resolver.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        self.log.info("stopped")

    def _on_signal(self, sig: signal.Signals) -> None:
        """The first SIGTERM or SIGINT drains, a second one stops at once."""
        first = not self._stop.is_set()
        self._stop.set()
        if not first:
            self._force.set()
        self.log.info(
            "stopping" if first else "stopping_now", signal=sig.name, active=len(self.sessions)
        )

    async def _drain(self) -> None:
        """Listeners are closed: let open sessions finish, for up to server.shutdown_grace
        seconds or until a second signal. Keep-alive connections waiting for their next
        request are closed at once; the others close after their current answer."""
        grace = self.config.server.shutdown_grace
        self.ctx.draining = True
        for session in list(self.sessions):
            if session.between_requests:
                session.abort()
        if not self.sessions or grace <= 0 or self._force.is_set():
            return
        self._draining = True
        self.log.info("draining", active=len(self.sessions), grace_s=grace)
        waits = [asyncio.ensure_future(e.wait()) for e in (self._drained, self._force)]
        try:
            await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self.sessions:
            self.log.info("drain_ended", cut=len(self.sessions))

    def _closed(self, session: Session) -> None:
        self.sessions.discard(session)
        if self._draining and not self.sessions:
            self._drained.set()

    def _status(self) -> str:
        return f"STATUS={len(self.sessions)} active connections"

    def _on_tick(self) -> None:
        """From the event loop, so that a stuck loop stops the watchdog pings and systemd
        restarts the daemon: WATCHDOG=1 at half its timeout, and the status line."""
        notifier = self.notifier
        if not notifier.enabled:
            return
        interval = notifier.watchdog_interval
        if interval is not None:
            notifier.send("WATCHDOG=1", self._status())
        else:
            notifier.send(self._status())
        delay = STATUS_INTERVAL if interval is None else min(interval, STATUS_INTERVAL)
        self._tick = asyncio.get_running_loop().call_later(delay, self._on_tick)

    def _close_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.listeners:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
                sock.close()
        self.listeners = []

    def _on_acceptable(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause(listener, exc)
                    return
                continue  # ECONNABORTED and the like concern one client only
            self._start(sock, peer)

    def _pause(self, listener: socket.socket, exc: OSError) -> None:
        """Out of descriptors: stop polling this listener for a while instead of spinning."""
        loop = asyncio.get_running_loop()
        self.log.warning("accept_paused", error=exc.strerror, seconds=ACCEPT_BACKOFF)
        loop.remove_reader(listener.fileno())

        def resume() -> None:
            if listener.fileno() >= 0 and not self._stop.is_set():
                loop.add_reader(listener.fileno(), self._on_acceptable, listener)

        loop.call_later(ACCEPT_BACKOFF, resume)

    def _start(self, sock: socket.socket, peer: tuple[Any, ...]) -> None:
        conn_id = next(self._ids)
        active = len(self.sessions)
        limit = self.config.server.max_connections
        if active >= limit + OVERLOAD_SLACK:
            sock.close()
            if self.config.log.access:
                access(
                    conn_id=conn_id,
                    client=format_hostport(peer[0], peer[1]),
                    status="limit",
                    error="server.max_connections reached",
                )
            return
        try:
            sock.setblocking(False)
            if self._nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # the client is already gone
            sock.close()
            return
        session = Session(
            self.ctx,
            sock,
            peer,
            conn_id,
            on_close=self._closed,
            over_limit=f"server.max_connections ({limit}) reached" if active >= limit else None,
        )
        self.sessions.add(session)
        session.start()
