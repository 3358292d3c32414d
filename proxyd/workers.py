"""`server.workers = N`: a supervisor process and N workers, each with its own event loop.

The supervisor binds every listen address first (with SO_REUSEPORT, without
listening), which fixes ephemeral ports and keeps them reserved across worker
restarts; each worker then binds the same addresses with SO_REUSEPORT and
listens, and the kernel spreads connections over them. A worker that dies is
restarted (after a pause if it died young); SIGTERM or SIGINT is passed on to
every worker and the supervisor exits once all are gone.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from proxyd import systemd
from proxyd.config import Config, ListenAddress
from proxyd.server import bind

RESTART_PAUSE: Final = 1.0  # seconds before restarting a worker that lived less than this
EXIT_WORKER_FAILED: Final = 70
_SIGNALS: Final = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


class Supervisor:
    def __init__(
        self,
        config: Config,
        run_worker: Callable[[int, Config], int],
        log: Any,
        *,
        activated: bool = False,
    ) -> None:
        self.config = config
        self.activated = activated  # systemd passed the listeners: nothing to bind
        self.notifier = systemd.Notifier()
        self.run_worker = run_worker
        self.log = log
        self.children: dict[int, int] = {}  # pid -> worker index
        self.started: dict[int, float] = {}  # worker index -> start time
        self.restarts: dict[int, float] = {}  # worker index -> when to restart it
        self.stopping = False
        self._reserved: list[socket.socket] = []

    def run(self) -> int:
        """Fork the workers and look after them until a stop signal; the exit code."""
        for address in self.config.server.listen:  # OSError (address in use) reaches the CLI
            if not self.activated:
                self._reserved.append(bind(address, self.config, listen=False))
        if not self.activated:
            listen = tuple(
                ListenAddress(address.host, sock.getsockname()[1])
                for address, sock in zip(self.config.server.listen, self._reserved, strict=True)
            )
            self.config = dataclasses.replace(
                self.config, server=dataclasses.replace(self.config.server, listen=listen)
            )
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            for index in range(self.config.server.workers):
                self._spawn(index)
            self.log.info("supervising", workers=self.config.server.workers, pid=os.getpid())
            # once the workers are forked; each is listening a moment later
            self.notifier.send("READY=1", f"STATUS={len(self.children)} workers")
            while self.children or (self.restarts and not self.stopping):
                self._wait()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            for sock in self._reserved:
                sock.close()
        self.log.info("stopped")
        return 0

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's code
            code = EXIT_WORKER_FAILED
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
                for sock in self._reserved:
                    sock.close()
                code = self.run_worker(index, self.config)
            finally:
                sys.stdout.flush()
                os._exit(code)
        self.children[pid] = index
        self.started[index] = time.monotonic()

    def _wait(self) -> None:
        timeout = None
        if self.restarts:
            timeout = max(0.0, min(self.restarts.values()) - time.monotonic())
        info = signal.sigtimedwait(_SIGNALS, 3600 if timeout is None else timeout)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
            self._stop(signal.Signals(info.si_signo))
        self._reap()
        now = time.monotonic()
        for index, due in list(self.restarts.items()):
            if due <= now and not self.stopping:
                del self.restarts[index]
                self._spawn(index)
                self.log.info("worker_restarted", worker=index)

    def _stop(self, sig: signal.Signals) -> None:
        self.log.info("stopping", signal=sig.name, workers=len(self.children))
        self.notifier.send("STOPPING=1")
        self.stopping = True
        self.restarts.clear()
        for pid in self.children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        while self.children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is None or self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            young = time.monotonic() - self.started[index] < RESTART_PAUSE
            self.log.warning("worker_exited", worker=index, pid=pid, exit_code=code)
            self.restarts[index] = time.monotonic() + (RESTART_PAUSE if young else 0.0)
