"""systemd glue: sd_notify (readiness, status, watchdog, stopping) and socket activation.

Both follow the documented environment protocol (sd_notify(3), sd_listen_fds(3))
with the standard library, so nothing here needs libsystemd; without systemd the
variables are unset and every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import Final, Protocol

from proxyd.errors import ConfigError

SD_LISTEN_FDS_START: Final = 3
STATUS_INTERVAL: Final = 5.0  # seconds between status updates when no watchdog asks for more


class Watcher(Protocol):
    """Who a server tells how it is doing: systemd itself, or the workers' supervisor.
    `active` is the number of open client connections."""

    @property
    def interval(self) -> float | None:
        """Seconds between `alive()` calls it wants, or None for none."""

    def ready(self, active: int) -> None: ...
    def reloading(self) -> None: ...
    def reload_failed(self) -> None: ...
    def alive(self, active: int) -> None: ...
    def stopping(self, active: int) -> None: ...


class Notifier:
    """Datagrams to $NOTIFY_SOCKET ("READY=1", "STATUS=...", "WATCHDOG=1", ...)."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._sock: socket.socket | None = None
        self._address = ""
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # the abstract namespace
            address = "\0" + address[1:]
        if address.startswith(("/", "\0")):
            self._address = address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        # WATCHDOG_USEC applies to us only when WATCHDOG_PID, if given, is our own
        self.watchdog_usec = 0
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the timeout), or None without one."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2e6

    @property
    def interval(self) -> float | None:
        if not self.enabled:
            return None
        watchdog = self.watchdog_interval
        return STATUS_INTERVAL if watchdog is None else min(watchdog, STATUS_INTERVAL)

    def ready(self, active: int) -> None:
        self.send("READY=1", f"STATUS={active} active connections")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd tell this reload from an earlier one (Type=notify-reload)
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={now}")

    def reload_failed(self) -> None:
        pass  # READY=1 follows, as after any reload; the log says why

    def alive(self, active: int) -> None:
        """From the event loop: a stuck loop stops the pings, and systemd restarts us."""
        status = f"STATUS={active} active connections"
        if self.watchdog_interval is not None:
            self.send("WATCHDOG=1", status)
        else:
            self.send(status)

    def stopping(self, active: int) -> None:
        self.send("STOPPING=1", f"STATUS=draining {active} connections")

    def send(self, *assignments: str) -> None:
        """One notification of `KEY=value` lines; lost, never blocking, when systemd
        cannot take it."""
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(assignments).encode(), self._address)
        except OSError:
            pass

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_sockets(environ: MutableMapping[str, str] = os.environ) -> list[socket.socket]:
    """The listening sockets systemd passed (LISTEN_FDS, for this LISTEN_PID), non-blocking,
    in order; the variables are removed so that no child takes them for its own.
    ConfigError when a descriptor is not a listening TCP socket."""
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    sockets, problems = [], []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError as exc:
            problems.append(f"LISTEN_FDS: descriptor {fd}: {exc.strerror}")
            continue
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or not listening:
            problems.append(f"LISTEN_FDS: descriptor {fd} is not a listening TCP socket")
        sock.setblocking(False)
        sockets.append(sock)
    if problems:
        for sock in sockets:
            sock.close()
        raise ConfigError(problems)
    return sockets
