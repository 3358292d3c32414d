"""Listeners and lifecycle: bind (or take systemd's sockets), accept, one Session per
client, tell systemd how things stand, reload on SIGHUP and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import ipaddress
import itertools
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from proxyd import __version__, access, context, gate, status, systemd
from proxyd.accounting import REPORT_INTERVAL
from proxyd.books import Books, until
from proxyd.config import Config, ListenAddress
from proxyd.context import Conn
from proxyd.direct import tune_socket
from proxyd.errors import ConfigError, ListenFailed, Status
from proxyd.keepers import Channel, Owned, Supervised
from proxyd.metrics import AdminServer, Metrics
from proxyd.poller import poller
from proxyd.protocols import messages
from proxyd.session import Session
from proxyd.settings import Settings, keep_fixed

ACCEPT_BATCH = 128  # accepts per wake-up, so one busy listener cannot starve the loop
ACCEPT_BACKOFF = 0.5  # seconds to pause a listener after EMFILE and friends
METER_INTERVAL = 5.0  # seconds between metric updates for the bytes of open tunnels
REFUSAL_WARNING_INTERVAL = 10.0  # seconds between warnings of clients refused at accept
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
        # Accepted sockets inherit the sizes; set here so TCP window scaling sees them.
        tune_socket(sock, config.buffers, nodelay=False)
        sock.bind((address.host, address.port))
        if listen:
            sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _name(sock: socket.socket) -> str:
    """ "127.0.0.1:1080" or "[::1]:1080": where a listener listens."""
    return str(ListenAddress(*sock.getsockname()[:2]))


class Server:
    """One event loop's daemon: its listeners, its sessions, its reloads and its end."""

    def __init__(
        self,
        settings: Settings,
        log: Any,
        *,
        worker: int = 0,
        activated: list[socket.socket] | None = None,
        watcher: systemd.Watcher | None = None,
        reread: Callable[[], Settings] | None = None,
        books: Books | None = None,
        accounts: Channel | None = None,
    ) -> None:
        config = self.config = settings.config
        self.log = log
        self.worker = worker
        self.ctx = context.build(settings, log)
        self.sessions: set[Session] = set()
        # connection ids stay unique across workers: worker w of n counts w+1, w+1+n, ...
        self._ids = itertools.count(worker + 1, config.server.workers)
        self._stop = asyncio.Event()
        self._force = asyncio.Event()  # a second stop signal: no more draining
        self._drained = asyncio.Event()  # the last session ended while draining
        self._draining = False
        self._buffers = config.buffers
        self._activated = activated or []  # listening sockets systemd passed
        self._bound: dict[ListenAddress, socket.socket] = {}  # server.listen -> its socket
        self.watcher: systemd.Watcher = watcher or systemd.Notifier({})
        self._reread = reread  # SIGHUP: the settings read anew (blocking: run in a thread)
        self._reload: asyncio.Task[None] | None = None
        self._reload_again = False  # a SIGHUP came while a reload was running
        self._serving = False  # listeners up and READY sent: reloads may run
        self._hangup_pending = False  # a SIGHUP came before that
        self._tick: asyncio.TimerHandle | None = None
        self.metrics: Metrics | None = None
        self._admin: AdminServer | None = None
        self._admin_port: int | None = None
        self.lookups_left = False  # at the end: a resolver thread still waits for its DNS server
        # connections refused at accept since the last warning, and when that was
        self._refused = 0
        self._refusal_warned = -REFUSAL_WARNING_INTERVAL
        # each user's traffic: reported to the books, kept here (`books`) or by the
        # supervisor (through `accounts`), and the totals learnt back
        self._books = books
        self._keeper: Owned | Supervised | None = None
        if (ledger := self.ctx.ledger) is not None:
            if books is not None:
                self._keeper = Owned(ledger, books)
            elif accounts is not None:
                self._keeper = Supervised(ledger, accounts)
        self._accounts_timer: asyncio.TimerHandle | None = None
        self._saving: asyncio.Future[None] | None = None
        self._next_save = 0.0

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then close every listener and tunnel."""
        loop = asyncio.get_running_loop()
        # before the first "listening" line: a SIGTERM right after it must stop us cleanly
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        # `proxyd quota reset` (from a worker's supervisor's pid it is never sent here)
        loop.add_signal_handler(signal.SIGUSR2, self._on_reset)
        # a worker is forked with SIGHUP blocked, so that one sent before this handler
        # existed waits for it instead of being lost (workers.py)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        admin = None
        role, address = "", None
        try:
            if self._activated:  # socket activation: systemd's sockets instead of server.listen
                for sock in self._activated:
                    self._bound[ListenAddress(*sock.getsockname()[:2])] = sock
            else:
                role = "server.listen"
                for address in self.config.server.listen:
                    self._bound[address] = bind(address, self.config)
            if (address := self.config.metrics.listen) is not None:
                role = "metrics.listen"
                admin = bind(address, self.config)
        except OSError as exc:
            self._close_listeners()
            raise ListenFailed(role, address, exc) from None
        if admin is not None:
            await self._replace_admin(admin)
        # What exists now (modules, config) lives as long as the daemon: keep it out
        # of every garbage-collection pass.
        gc.freeze()
        poller(loop)  # the connections' epoll, from the start (a descriptor for good)
        for sock in self._bound.values():
            self._watch(sock)
        self.log.info(
            "started",
            version=__version__,
            pid=os.getpid(),
            worker=self.worker,
            loop=type(loop).__module__,
            http_parser=messages.PARSER,
            socket_activated=bool(self._activated),
        )
        self.watcher.ready(len(self.sessions))
        self._serving = True
        self._schedule_tick()
        self._start_accounts()
        if self._hangup_pending:
            self._on_hangup()
        try:
            await self._stop.wait()
            if self._reload is not None:  # one under way must not reopen what closes now
                self._reload.cancel()
                await asyncio.gather(self._reload, return_exceptions=True)
            self._close_listeners()
            self.watcher.stopping(len(self.sessions))
            await self._drain()
        finally:
            self._close_listeners()
            if self._tick is not None:
                self._tick.cancel()
            if self._reload is not None:
                self._reload.cancel()
                await asyncio.gather(self._reload, return_exceptions=True)
            for session in list(self.sessions):
                session.abort()
            # forwarding connections and UDP associations end in their own tasks
            tasks = [s.task for s in self.sessions if s.task is not None]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if self._admin is not None:
                await self._admin.close()
            self.ctx.auth.close()
            self.lookups_left = self.ctx.resolver.close()
            self.ctx.upstreams.close()
            await self._close_accounts()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
                loop.remove_signal_handler(sig)
        self.log.info("stopped")

    # -- stopping ---------------------------------------------------------------------

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

    # -- reloading --------------------------------------------------------------------

    def _on_hangup(self) -> None:
        """SIGHUP: read the settings anew; one more reload if it comes during one."""
        if self._stop.is_set():
            return
        if not self._serving:  # still starting: reload once started
            self._hangup_pending = True
            return
        if self._reload is not None and not self._reload.done():
            self._reload_again = True
            return
        self._reload = asyncio.get_running_loop().create_task(self._reloads())

    async def _reloads(self) -> None:
        self._reload_again = True
        while self._reload_again and not self._stop.is_set():
            self._reload_again = False
            await self._reload_once()

    async def _reload_once(self) -> None:
        self.watcher.reloading()
        self.log.info("reloading", signal="SIGHUP")
        problems = None
        try:
            if self._reread is None:
                raise ConfigError(["nothing to reload from"])
            settings = await asyncio.to_thread(self._reread)
            if self._stop.is_set():
                return  # stopping meanwhile: nothing to apply
            await self._apply(settings)
        except ConfigError as exc:
            problems = exc.problems
        except Exception as exc:  # a reload must never take the daemon down
            problems = [f"{type(exc).__name__}: {exc}"]
        # with workers, the supervisor reports (and counts) for all of them, once
        alone = self.config.server.workers == 1
        if problems is not None:  # the old settings stay in force, whole
            self.log.error("reload_failed", problems=problems)
            self.watcher.reload_failed()
        elif alone:
            with contextlib.suppress(OSError):  # a file gone since: no warning to give
                for event, fields in settings.warnings():
                    self.log.warning(event, **fields)
        if alone and self.metrics is not None:
            self.metrics.reloads.labels("failed" if problems else "ok").inc()
        self.watcher.ready(len(self.sessions))

    async def _apply(self, settings: Settings) -> None:
        """Make `settings` the daemon's for new connections; open tunnels keep theirs.
        Everything new is bound first, so a reload that cannot bind changes nothing."""
        old = self.config
        new, fixed = keep_fixed(old, settings.config)
        opened: dict[ListenAddress, socket.socket] = {}
        admin = None
        move_admin = new.metrics.listen != old.metrics.listen
        try:
            for address in () if self._activated else new.server.listen:
                if address not in self._bound and address not in opened:
                    where = f"server.listen: {address}"
                    opened[address] = bind(address, new)
            if move_admin and new.metrics.listen is not None:
                where = f"metrics.listen: {new.metrics.listen}"
                admin = bind(new.metrics.listen, new)
        except OSError as exc:
            for sock in opened.values():
                sock.close()
            raise ConfigError([f"{where}: {exc.strerror}"]) from None
        # nothing fails from here on: the new settings take over
        if fixed:
            self.log.warning("reload_needs_restart", keys=fixed, hint="restart to change these")
        removed = [] if self._activated else [a for a in self._bound if a not in new.server.listen]
        closed = [self._unwatch(address) for address in removed]
        for address, sock in opened.items():
            self._bound[address] = sock
            self._watch(sock)
        if new.buffers != old.buffers:
            for sock in self._bound.values():
                tune_socket(sock, new.buffers, nodelay=False)
        self.config = new
        self._buffers = new.buffers
        self.ctx.reconfigure(new, settings.users, context.rules_of(new), settings.tls)
        if self._books is not None:
            self._books.configure(new.quotas)
        self._guard()
        if move_admin:
            await self._replace_admin(admin)
        self._schedule_tick()
        self.log.info(
            "reloaded",
            listeners=[_name(sock) for sock in self._bound.values()],
            opened=[_name(sock) for sock in opened.values()],
            closed=closed,
            users=len(settings.users),
            rules=len(new.rules),
        )

    # -- listeners --------------------------------------------------------------------

    def _watch(self, sock: socket.socket) -> None:
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_acceptable, sock)
        self._guard()
        self.log.info("listening", address=_name(sock))

    def _guard(self) -> None:
        """Tell the gate what no client may reach through us (context.guard): every port
        this daemon listens on, the metrics listener's included; the daemon is exposed
        when the config says so, or systemd passed a socket off loopback."""
        ports = {sock.getsockname()[1] for sock in self._bound.values() if sock.fileno() >= 0}
        if self._admin_port is not None:
            ports.add(self._admin_port)
        exposed = self.config.exposed or any(
            not ipaddress.ip_address(sock.getsockname()[0]).is_loopback for sock in self._activated
        )
        context.guard(self.ctx, ports, exposed)

    def _unwatch(self, address: ListenAddress) -> str:
        """Close one listener (connections it accepted go on); the address it had."""
        sock = self._bound.pop(address)
        name = _name(sock)
        asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()
        self._guard()
        self.log.info("listener_closed", address=name)
        return name

    def _close_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._bound.values():
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
                sock.close()
        self._bound.clear()

    async def _replace_admin(self, sock: socket.socket | None) -> None:
        """Serve /metrics and /healthz on `sock` (a bound socket; None: nowhere) instead
        of where they were served. Turned off, the metrics go on recording."""
        if self._admin is not None:
            await self._admin.close()
            self._admin = None
        self._admin_port = None if sock is None else sock.getsockname()[1]
        self._guard()
        if sock is None:
            return
        try:
            if self.metrics is None:
                self.metrics = Metrics()
                self.ctx.auth.on_failure = self.metrics.auth_failed
            self.ctx.metrics = self.metrics
            self.ctx.upstreams.watch(self.metrics)
            admin = AdminServer(self.metrics, lambda: not self._stop.is_set(), self._about)
            await admin.start(sock)
        except BaseException:
            sock.close()
            raise
        self._admin = admin
        self.log.info("metrics_listening", address=_name(sock))

    # -- status -----------------------------------------------------------------------

    def _about(self) -> status.About:
        """What the status page says of this daemon besides its counts."""
        return status.About(
            workers=self.config.server.workers,
            listeners=[_name(sock) for sock in self._bound.values() if sock.fileno() >= 0],
            enabled=self.config.metrics.status_page,
            quotas=self._quota_use(),
        )

    def _quota_use(self) -> dict[str, Any] | None:
        """What users under a quota used of it (as this process knows: within a second)."""
        ledger = self.ctx.ledger
        if ledger is None or not self.config.quotas:
            return None
        ends = until(ledger.end)
        rows = ledger.quota_use()[: status.TOP * 5]
        return {"period": ledger.period.spec, "period_end": ends, "users": rows}

    def _schedule_tick(self) -> None:
        if self._tick is None and (self.watcher.interval or self.ctx.metrics is not None):
            self._on_tick()

    def _on_tick(self) -> None:
        """From the event loop, so that a stuck loop stops the watchdog pings and
        systemd restarts the daemon; also the bytes of open tunnels, for the metrics."""
        interval = self.watcher.interval
        metrics = self.ctx.metrics
        if metrics is not None:
            interval = min(interval or METER_INTERVAL, METER_INTERVAL)
        # the next one first: nothing below may stop the pings
        self._tick = None
        if interval is not None:
            self._tick = asyncio.get_running_loop().call_later(interval, self._on_tick)
        if self.watcher.interval is not None:
            self.watcher.alive(len(self.sessions))
        if metrics is not None:
            with contextlib.suppress(OSError):  # metrics files on a full disk
                for session in self.sessions:
                    session.meter()
            with contextlib.suppress(OSError):
                metrics.count_tasks()
            if self._admin is not None:
                self._admin.publish()  # with workers: this one's share of the status page

    # -- accounting -------------------------------------------------------------------

    def _start_accounts(self) -> None:
        if self.ctx.ledger is None:
            return
        if isinstance(self._keeper, Supervised):  # the totals, as soon as they come
            channel = self._keeper.channel
            asyncio.get_running_loop().add_reader(channel.sock.fileno(), self._keeper.learn)
        self._next_save = asyncio.get_running_loop().time() + self.config.accounting.save_interval
        self._on_accounts()

    def _on_accounts(self) -> None:
        """What each user moved since last time: to the books and the per-user metrics;
        the totals learnt back; the books saved when it is time."""
        loop = asyncio.get_running_loop()
        self._accounts_timer = loop.call_later(REPORT_INTERVAL, self._on_accounts)
        ledger = self.ctx.ledger
        assert ledger is not None
        reports = ledger.report()
        metrics_cfg = self.config.metrics
        if metrics_cfg.per_user and self.metrics is not None:
            with contextlib.suppress(OSError):  # metrics files on a full disk
                self.metrics.user_traffic(reports, metrics_cfg.per_user_max)
        if self._keeper is not None:
            self._keeper.exchange(reports)
        books = self._books
        saving = self._saving is not None and not self._saving.done()
        if books is not None and books.changed and loop.time() >= self._next_save and not saving:
            self._next_save = loop.time() + self.config.accounting.save_interval
            self._saving = loop.run_in_executor(None, self._write_books, books.encode())

    def _write_books(self, data: bytes) -> None:
        """The state file, in a thread; a failure is logged, and the next save tries again."""
        assert self._books is not None
        try:
            self._books.write(data)
        except OSError as exc:
            self._books.changed = True
            self.log.error("accounting_save_failed", path=str(self._books.path), error=str(exc))

    def _on_reset(self) -> None:
        """SIGUSR2: the resets `proxyd quota reset` left beside the state file."""
        if self._books is None or not isinstance(self._keeper, Owned):
            return
        if self._books.take_resets(save=False):
            # saved by the writer thread, after a save under way (which holds the
            # counts from before): at the next report, not on the loop
            self._next_save = 0.0
        self._keeper.learn()

    async def _close_accounts(self) -> None:
        """The last counts to the books; the daemon that keeps them saves them."""
        if self._accounts_timer is None:
            return
        self._accounts_timer.cancel()
        if isinstance(self._keeper, Supervised):
            asyncio.get_running_loop().remove_reader(self._keeper.channel.sock.fileno())
        if self._saving is not None:
            await asyncio.gather(self._saving, return_exceptions=True)
        ledger, keeper = self.ctx.ledger, self._keeper
        if ledger is not None and keeper is not None:
            keeper.exchange(ledger.report())
        if self._books is not None:
            self._write_books(self._books.encode())

    # -- accepting --------------------------------------------------------------------

    def _on_acceptable(self, listener: socket.socket) -> None:
        # socket.accept() without its wrapper: the wrapper asks the listener for its
        # family and type (enum conversions) and the new socket for its timeout, per client
        family = listener.family
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = listener._accept()  # type: ignore[attr-defined]
                sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause(listener, exc)
                    return
                continue  # ECONNABORTED and the like concern one client only
            self._start(sock, peer)

    def _refuse_at_accept(self, sock: socket.socket, ip: str) -> None:
        """A client over limits.per_client: closed at once, unanswered, in no count and
        no access line (a flood of them must cost little); a metric, and a warning at
        most every REFUSAL_WARNING_INTERVAL seconds with how many were refused."""
        sock.close()
        if self.ctx.metrics is not None:
            self.ctx.metrics.closed(None, Status.LIMIT, active=False)
        self._refused += 1
        now = asyncio.get_running_loop().time()
        if now >= self._refusal_warned + REFUSAL_WARNING_INTERVAL:
            self._refusal_warned = now
            self.log.warning(
                "per_client_refused",
                client=ip,
                limit=self.config.limits.per_client,
                refused=self._refused,
                hint="connections over limits.per_client are closed at accept",
            )
            self._refused = 0

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
        if gate.over_per_client(self.ctx, peer[0]):
            self._refuse_at_accept(sock, peer[0])
            return
        conn_id = next(self._ids)
        active = len(self.sessions)
        refusal = gate.capacity(self.ctx, active)
        if refusal is gate.DROP:
            sock.close()
            if self.ctx.metrics is not None:
                self.ctx.metrics.closed(None, Status.LIMIT, active=False)
            write = self.config.log.access
            access.record(Conn(conn_id, peer), Status.LIMIT, error=refusal, write=write)
            return
        try:
            sock.setblocking(False)
            tune_socket(sock, self._buffers, sizes=False)
        except OSError:  # the client is already gone
            sock.close()
            return
        session = Session(
            self.ctx,
            sock,
            peer,
            conn_id,
            on_close=self._closed,
            refusal=refusal,
        )
        self.sessions.add(session)
        session.start()
