"""HAProxy in front of proxyd instances, for tests: deploy/haproxy.cfg, run as is.

Not a test module: a harness the tests use. HAProxy runs in the foreground (-db)
as a child of the test and is stopped by its PID; its stdout and stderr go to a
file, so no pipe can fill up and block it. Every address reaches the config
through the environment variables it documents.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CONFIG = Path(__file__).parents[2] / "deploy" / "haproxy.cfg"
# The backend and server names deploy/haproxy.cfg declares.
BACKEND = "proxyd"
FRONTEND = "proxyd_in"
SERVERS = ("a", "b")
START_TIMEOUT = 10.0


def _free_port(host: str) -> int:
    """A loopback port nothing listens on (bound, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Haproxy:
    """HAProxy started by the test on deploy/haproxy.cfg, in the foreground, by PID."""

    def __init__(
        self,
        tmp_path: Path,
        frontend: tuple[str, int] | None,
        backends: dict[str, tuple[str, int, int]],
    ) -> None:
        """`backends`: server name ("a", "b") -> (host, port, admin_port) of a proxyd;
        `frontend` None: a free loopback port."""
        if set(backends) != set(SERVERS):
            raise ValueError(f"{CONFIG} declares servers {SERVERS}, got {sorted(backends)}")
        self.host, self.port = frontend or ("127.0.0.1", _free_port("127.0.0.1"))
        self.log_path = tmp_path / "haproxy.log"
        # A unix socket path is limited to 108 bytes, and a test's tmp_path can be long.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="haproxy-"))
        self.stats_socket = self._socket_dir / "stats.sock"
        self.env = {
            **os.environ,
            "PROXYD_FRONTEND": _hostport(self.host, self.port),
            "HAPROXY_STATS_SOCKET": str(self.stats_socket),
        }
        for name, (host, port, admin_port) in backends.items():
            self.env[f"PROXYD_{name.upper()}"] = _hostport(host, port)
            self.env[f"PROXYD_{name.upper()}_ADMIN_PORT"] = str(admin_port)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Haproxy:
        """Start HAProxy and wait (at most 10 s) until its stats socket answers and
        reports the frontend OPEN: HAProxy binds every listener before it serves any,
        so the frontend then accepts connections. (No probe connection is made to the
        frontend: it would reach a proxyd as a client connection and show in its log.)
        Raises with HAProxy's output if it exits or does not get there in time."""
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(CONFIG)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(
                    f"haproxy exited with {self.proc.returncode} at start:\n{self.output()}"
                )
            try:
                if self._frontend_status() == "OPEN":
                    return self
            except OSError:
                pass  # the socket is not there yet
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"haproxy not ready within {START_TIMEOUT}s:\n{self.output()}")
            time.sleep(0.05)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def command(self, line: str, timeout: float = 5.0) -> str:
        """One command on the stats socket ("show stat", "disable server proxyd/a", ...)
        and its whole answer (HAProxy closes the connection after it)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def _stat_rows(self) -> list[dict[str, str]]:
        text = self.command("show stat")
        if not text.startswith("# "):
            raise RuntimeError(f"unexpected answer to 'show stat': {text!r}")
        return list(csv.DictReader(io.StringIO(text[2:])))

    def _frontend_status(self) -> str:
        for row in self._stat_rows():
            if row["pxname"] == FRONTEND and row["svname"] == "FRONTEND":
                return row["status"]
        return ""

    def server_states(self) -> dict[str, str]:
        """Server name -> status in the proxyd backend: "UP", "DOWN", "MAINT", "DRAIN",
        "no check", or "UP 1/2" / "DOWN 1/2" while a state change is being confirmed."""
        return {
            row["svname"]: row["status"]
            for row in self._stat_rows()
            if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_for_state(self, server: str, state: str, timeout: float = 10.0) -> None:
        """Poll every 50 ms until `server`'s status is exactly `state`."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"haproxy is not running; output:\n{self.output()}")
            states = self.server_states()
            if states.get(server) == state:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"server {server} not {state!r} within {timeout}s: {states}\n"
                    f"haproxy output:\n{self.output()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (HAProxy's hard stop), SIGKILL after `timeout`; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def output(self) -> str:
        """What HAProxy wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""
