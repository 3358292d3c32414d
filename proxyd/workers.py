"""`server.workers = N`: a supervisor process and N workers, each with its own event loop.

The supervisor binds every listen address first (with SO_REUSEPORT, without
listening), which fixes ephemeral ports and keeps them reserved across worker
restarts; each worker then binds the same addresses with SO_REUSEPORT and
listens, and the kernel spreads connections over them. A worker that dies is
restarted (after a pause if it died young); SIGTERM or SIGINT is passed on to
every worker and the supervisor exits once all are gone.

The supervisor alone speaks to systemd. Workers tell it with real-time signals
(queued, and carrying the sender's pid) when they are ready, that their loop is
alive (every few seconds, with their open connections written to a pipe first)
and when a reload failed for them: READY=1 goes out once every worker listens,
STATUS= sums the workers' connections, and under a systemd watchdog a worker
whose loop stops answering is killed and restarted while the others go on. On
SIGHUP the supervisor reads the settings, reserves new addresses, leaves them in
its runtime directory and passes the signal on; each worker applies exactly
what the supervisor checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from proxyd import accounting, books, files, keepers, metrics, settings, status, systemd, tls
from proxyd.config import Config, ListenAddress
from proxyd.errors import ConfigError, ListenFailed
from proxyd.server import bind
from proxyd.settings import Settings, Source

RESTART_PAUSE: Final = 1.0  # seconds before restarting a worker that lived less than this
EXIT_WORKER_FAILED: Final = 70
SIG_READY: Final = int(signal.SIGRTMIN)  # worker -> supervisor: listening (or reloaded)
SIG_ALIVE: Final = SIG_READY + 1  # worker -> supervisor: its loop is alive
SIG_FAILED: Final = SIG_READY + 2  # worker -> supervisor: it could not apply a reload
_SIGNALS: Final[set[int]] = {
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGCHLD,
    signal.SIGHUP,
    SIG_READY,
    SIG_ALIVE,
    SIG_FAILED,
    signal.SIGUSR2,
}
SETTINGS_FILE: Final = "settings.pickle"


class SupervisorLink:
    """A worker's systemd.Watcher: readiness and liveness go to the supervisor; the
    settings of a reload come from it."""

    def __init__(
        self,
        supervisor: int,
        interval: float,
        runtime: Path,
        reports: int,
        accounts: keepers.Channel | None,
    ) -> None:
        self._supervisor = supervisor
        self._interval = interval
        self._runtime = runtime
        self._reports = reports  # the pipe's write end (non-blocking)
        self.accounts = accounts  # to the books (proxyd.keepers), when traffic is counted

    @property
    def interval(self) -> float | None:
        return self._interval

    def _tell(self, sig: int, active: int | None = None) -> None:
        if os.getppid() != self._supervisor:  # never a stranger that got its pid
            return
        if active is not None:
            # one short line: atomic in a pipe; lost, never waited for, when it is full
            with contextlib.suppress(OSError):
                os.write(self._reports, f"{os.getpid()} {active}\n".encode())
        os.kill(self._supervisor, sig)

    def ready(self, active: int) -> None:
        self._tell(SIG_READY, active)

    def reloading(self) -> None:
        pass  # the supervisor said so already

    def reload_failed(self) -> None:
        self._tell(SIG_FAILED)

    def alive(self, active: int) -> None:
        self._tell(SIG_ALIVE, active)

    def stopping(self, active: int) -> None:
        pass

    def reread(self) -> Settings:
        """The settings the supervisor checked for this reload (the TLS context is made
        anew here: it cannot travel)."""
        with (self._runtime / SETTINGS_FILE).open("rb") as f:
            cfg, users = pickle.load(f)
        context = None
        if cfg.tls.cert is not None and cfg.tls.key is not None:
            context = tls.server_context(cfg.tls.cert, cfg.tls.key)
        return Settings(cfg, users, context)


class Supervisor:
    def __init__(
        self,
        current: Settings,
        source: Source,
        run_worker: Callable[[int, Settings, SupervisorLink], int],
        log: Any,
        *,
        activated: bool = False,
        books: books.Books | None = None,
    ) -> None:
        self.settings = current
        self.source = source
        self.activated = activated  # systemd passed the listeners: nothing to bind
        self.notifier = systemd.Notifier()
        self.run_worker = run_worker
        self.log = log
        self.children: dict[int, int] = {}  # pid -> worker index
        self.started: dict[int, float] = {}  # worker index -> start time
        self.restarts: dict[int, float] = {}  # worker index -> when to restart it
        self.alive: dict[int, float] = {}  # pid -> when it last said so
        self.active: dict[int, int] = {}  # pid -> its open connections, as it last said
        self.unready: set[int] = set()  # pids yet to listen (or to apply a reload)
        self.announce = False  # READY=1 is due once `unready` is empty
        self.stopping = False
        self._reserved: dict[tuple[str, ListenAddress], socket.socket] = {}
        self._next_tick = 0.0
        self._reloads: Any = None  # proxyd_config_reloads_total, once there was a reload
        # systemd's RuntimeDirectory= when the unit has one (removed even after a crash)
        self.runtime = Path(
            tempfile.mkdtemp(prefix="proxyd-", dir=os.environ.get("RUNTIME_DIRECTORY"))
        )
        self._reports_in, self._reports_out = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # the workers' traffic by user, summed here (proxyd.accounting)
        self.books = books
        self.shares: dict[int, keepers.Share] = {}  # pid -> its channel, counts, grants
        self._next_accounts = 0.0
        self._next_save = 0.0

    @property
    def config(self) -> Config:
        return self.settings.config

    def run(self) -> int:
        """Fork the workers and look after them until a stop signal; the exit code."""
        # each worker's metrics go to files here, summed by whichever worker is scraped
        (self.runtime / "metrics").mkdir()
        os.environ[metrics.MULTIPROC_ENV] = str(self.runtime / "metrics")
        # and their status page snapshots here, merged by whichever worker answers
        (self.runtime / "status").mkdir()
        os.environ[status.DIR_ENV] = str(self.runtime / "status")
        try:
            config = self._reserve(self.config)  # OSError (address in use) reaches the CLI
            self.settings = dataclasses.replace(self.settings, config=config)
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
            try:
                for index in range(config.server.workers):
                    self._spawn(index)
                self.announce = True
                self.log.info("supervising", workers=config.server.workers, pid=os.getpid())
                while self.children or (self.restarts and not self.stopping):
                    self._wait()
                self._count()  # the workers' last reports
                self._save()
            finally:
                # A worker's last report, queued as it exited, would end the supervisor
                # by the default action of a real-time signal once unblocked (seen as
                # exit by signal 35): ignored from here on, which also discards it.
                for sig in (SIG_READY, SIG_ALIVE, SIG_FAILED):
                    signal.signal(sig, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        finally:
            self._end_children()  # after a failure of our own: no worker left orphaned
            for sock in self._reserved.values():
                sock.close()
            os.close(self._reports_in)
            os.close(self._reports_out)
            shutil.rmtree(self.runtime, ignore_errors=True)
        self.log.info("stopped")
        return 0

    def _addresses(self, config: Config) -> list[tuple[str, ListenAddress]]:
        """What the workers bind, by role: the listeners (unless systemd passed them)
        and the metrics listener (port 0 in both is two ports)."""
        found = [] if self.activated else [("listen", a) for a in config.server.listen]
        if config.metrics.listen is not None:
            found.append(("metrics", config.metrics.listen))
        return found

    def _reserve(self, config: Config) -> Config:
        """Bind (without listening) what `config` listens on and is not bound yet,
        release what it no longer names; `config` with port 0 replaced by the port
        the kernel chose, so every worker binds the same one. OSError changes nothing."""
        wanted = self._addresses(config)
        new: dict[tuple[str, ListenAddress], socket.socket] = {}
        try:
            for key in wanted:
                if key not in self._reserved and key not in new:
                    new[key] = bind(key[1], config, listen=False)
        except OSError as exc:
            for sock in new.values():
                sock.close()
            role = "server.listen" if key[0] == "listen" else "metrics.listen"
            raise ListenFailed(role, key[1], exc) from None
        for key in [k for k in self._reserved if k not in wanted]:
            self._reserved.pop(key).close()
        self._reserved.update(new)

        def fixed(role: str, address: ListenAddress) -> ListenAddress:
            sock = self._reserved.get((role, address))
            return address if sock is None else ListenAddress(address.host, sock.getsockname()[1])

        server = dataclasses.replace(
            config.server, listen=tuple(fixed("listen", a) for a in config.server.listen)
        )
        listen = config.metrics.listen
        metrics_cfg = dataclasses.replace(
            config.metrics, listen=None if listen is None else fixed("metrics", listen)
        )
        return dataclasses.replace(config, server=server, metrics=metrics_cfg)

    def _end_children(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.children.pop(pid)

    def _interval(self) -> float:
        """Seconds between status updates (and watchdog pings)."""
        watchdog = self.notifier.watchdog_interval
        return (
            systemd.STATUS_INTERVAL if watchdog is None else min(watchdog, systemd.STATUS_INTERVAL)
        )

    def _spawn(self, index: int) -> None:
        supervisor, interval = os.getpid(), self._interval()
        ours, theirs = keepers.channel_pair() if self.books is not None else (None, None)
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's code
            code = EXIT_WORKER_FAILED
            try:
                # SIGHUP stays blocked until the worker's loop handles it (Server.serve):
                # a reload sent meanwhile waits instead of ending the worker
                signal.pthread_sigmask(signal.SIG_SETMASK, self._mask | {signal.SIGHUP})
                for sock in self._reserved.values():
                    sock.close()
                self.notifier.close()
                os.close(self._reports_in)
                if self.books is not None:  # (the lock stays the supervisor's alone)
                    self.books.close()
                for share in self.shares.values():
                    share.channel.close()
                if ours is not None:
                    ours.close()
                link = SupervisorLink(supervisor, interval, self.runtime, self._reports_out, theirs)
                code = self.run_worker(index, self.settings, link)
            finally:
                sys.stdout.flush()
                os._exit(code)
        if ours is not None and theirs is not None and self.books is not None:
            theirs.close()
            self.shares[pid] = keepers.Share(ours)
            for part in self.books.totals_for(0):  # what it finds when it starts
                ours.send(part)
        self.children[pid] = index
        self.started[index] = self.alive[pid] = time.monotonic()
        self.unready.add(pid)

    def _read_reports(self) -> None:
        """The workers' "pid count" lines that came with their signals."""
        try:
            words = os.read(self._reports_in, 65536).decode().split()
        except BlockingIOError:
            return
        for pid, count in zip(words[::2], words[1::2], strict=True):
            if int(pid) in self.children:
                self.active[int(pid)] = int(count)

    def _notify(self, assignment: str) -> None:
        """`assignment` ("READY=1", ...; "" for none) to systemd, with the status."""
        serving = len(self.children) - len(self.unready)
        workers = self.config.server.workers
        active = sum(self.active.get(pid, 0) for pid in self.children)
        status = f"STATUS={active} active connections, {serving} of {workers} workers serving"
        self.notifier.send(*filter(None, (assignment, status)))

    def _wait(self) -> None:
        deadlines = [*self.restarts.values()]
        if self.notifier.enabled:
            deadlines.append(self._next_tick)
        if self.books is not None:
            deadlines.append(self._next_accounts)
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 3600.0
        info = signal.sigtimedwait(_SIGNALS, timeout)
        if info is not None:
            if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self._stop(signal.Signals(info.si_signo))
            elif info.si_signo == signal.SIGHUP:
                self._reload()
            elif info.si_signo == SIG_ALIVE and info.si_pid in self.children:
                self.alive[info.si_pid] = time.monotonic()
                self._read_reports()
            elif info.si_signo == SIG_READY and info.si_pid in self.children:
                self.alive[info.si_pid] = time.monotonic()
                self.unready.discard(info.si_pid)
                self._read_reports()
            elif info.si_signo == SIG_FAILED and info.si_pid in self.children:
                worker = self.children[info.si_pid]
                self.log.warning("reload_incomplete", worker=worker, pid=info.si_pid)
            elif info.si_signo == signal.SIGUSR2:
                self._reset()
        self._reap()
        if self.announce and not self.unready and not self.stopping:
            self.announce = False
            self._notify("READY=1")
        now = time.monotonic()
        for index, due in list(self.restarts.items()):
            if due <= now and not self.stopping:
                del self.restarts[index]
                self._spawn(index)
                self.log.info("worker_restarted", worker=index)
        if self.notifier.enabled and now >= self._next_tick:
            self._tick(now)
        if self.books is not None and now >= self._next_accounts:
            self._next_accounts = now + accounting.REPORT_INTERVAL
            self._count()
            if now >= self._next_save:
                self._next_save = now + self.config.accounting.save_interval
                self._save()

    # -- the workers' traffic ----------------------------------------------------------

    def _count(self) -> None:
        """Add what the workers reported to the books; each learns the totals back."""
        if self.books is None:
            return
        shares = list(self.shares.values())
        keepers.serve_workers(self.books, shares, self.config.server.workers)

    def _save(self) -> None:
        if self.books is not None and self.books.changed:
            try:
                self.books.save()
            except OSError as exc:
                path = str(self.books.path)
                self.log.error("accounting_save_failed", path=path, error=str(exc))

    def _reset(self) -> None:
        """SIGUSR2: `proxyd quota reset` left its request beside the state file; every
        worker learns the new totals at once."""
        if self.books is None:
            return
        self._count()  # (what was counted before the reset is reset too)
        try:
            self.books.take_resets()
        except OSError as exc:
            self.log.error("accounting_save_failed", path=str(self.books.path), error=str(exc))
        self._count()  # (every worker learns it, and its grants anew)

    def _tick(self, now: float) -> None:
        """The status for systemd, and with a watchdog a ping for the supervisor; a
        worker silent for the whole watchdog timeout has a stuck loop: kill it, and
        the reaping restarts it."""
        self._next_tick = now + self._interval()
        interval = self.notifier.watchdog_interval
        if interval is not None and not self.stopping:
            for pid, last in self.alive.items():
                if pid in self.children and now - last > 2 * interval:
                    self.log.error(
                        "worker_unresponsive",
                        worker=self.children[pid],
                        pid=pid,
                        silent_s=round(now - last, 1),
                    )
                    os.kill(pid, signal.SIGKILL)
                    self.alive[pid] = now  # once: the kill takes a moment to be reaped
        self._notify("WATCHDOG=1" if interval is not None else "")

    def _reload(self) -> None:
        """SIGHUP: read and check the settings here, then let every worker apply them.
        A bad config changes nothing, anywhere."""
        if self.stopping:
            return
        self.notifier.reloading()
        self.log.info("reloading", signal="SIGHUP")
        try:
            self._reload_checked()
        except Exception as exc:  # a reload must never take the supervisor down
            self._count_reload("failed")  # (counted before it is told: a scrape after agrees)
            self.log.error("reload_failed", problems=[f"{type(exc).__name__}: {exc}"])
            self._notify("READY=1")

    def _count_reload(self, result: str) -> None:
        if self._reloads is None:
            self._reloads = metrics.reload_counter()
        self._reloads.labels(result).inc()

    def _reload_checked(self) -> None:
        try:
            new = self.source.read()
            config, fixed = settings.keep_fixed(self.config, new.config)
            try:
                config = self._reserve(config)
            except OSError as exc:
                raise ConfigError([str(exc.strerror)]) from None
            new = dataclasses.replace(new, config=config)
            self._hand_over(new)
        except ConfigError as exc:
            self._count_reload("failed")  # (counted before it is told: a scrape after agrees)
            self.log.error("reload_failed", problems=exc.problems)
            self._notify("READY=1")
            return
        self._count_reload("ok")
        if self.books is not None:
            self.books.configure(new.config.quotas)
        if fixed:
            self.log.warning("reload_needs_restart", keys=fixed, hint="restart to change these")
        with contextlib.suppress(OSError):  # a file gone since: no warning to give
            for event, fields in new.warnings():
                self.log.warning(event, **fields)
        self.settings = new  # for workers started from now on
        for pid in self.children:
            os.kill(pid, signal.SIGHUP)
        self.unready.update(self.children)
        self.announce = True

    def _hand_over(self, new: Settings) -> None:
        """Leave the checked settings where the workers read them (SupervisorLink.reread)."""
        try:
            data = pickle.dumps((new.config, new.users))
            files.replace(self.runtime / SETTINGS_FILE, data)
        except OSError as exc:
            raise ConfigError([f"cannot hand the settings to the workers: {exc}"]) from None

    def _stop(self, sig: signal.Signals) -> None:
        self.log.info("stopping", signal=sig.name, workers=len(self.children))
        self.notifier.send("STOPPING=1", f"STATUS=stopping {len(self.children)} workers")
        self.stopping = True
        self.restarts.clear()
        for pid in self.children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        while self.children:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            self.alive.pop(pid, None)
            self.active.pop(pid, None)
            self.unready.discard(pid)
            metrics.forget_process(pid)
            status.forget_process(pid)
            if pid in self.shares:  # its last reports first; what it was granted goes
                self._count()
                self.shares.pop(pid).channel.close()
            if index is None or self.stopping:
                continue
            code = os.waitstatus_to_exitcode(wait_status)
            young = time.monotonic() - self.started[index] < RESTART_PAUSE
            self.log.warning("worker_exited", worker=index, pid=pid, exit_code=code)
            self.restarts[index] = time.monotonic() + (RESTART_PAUSE if young else 0.0)
