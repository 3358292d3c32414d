"""Processes the bench starts, and what /proc says about them.

Every child is recorded (PID and start time) so that all of it is stopped at the
end, also when the bench fails or is interrupted; bench/run stops what is left if
the interpreter itself dies.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any

LOOPBACK = "127.0.0.1"
NOFILE = 20000  # descriptor limit for every proxy (the hard limit per process)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class StartFailed(Exception):
    """A server or proxy did not come up; the message says why."""


class MeasurementFailed(Exception):
    """A measurement could not produce a figure; the message says why."""


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a process from a later one with the same PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class Processes:
    """Starts children (pinned, with a descriptor limit, output to NAME.log) and stops them."""

    def __init__(self, workdir: Path, pidfile: Path | None) -> None:
        self.workdir = workdir
        self.pidfile = pidfile
        self.running: list[subprocess.Popen[bytes]] = []

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cpu: str | None,
        nofile: bool = False,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start argv on the CPUs in `cpu` (a taskset list; None = any); stderr to NAME.log."""
        prefix: list[str] = []
        if nofile:
            prefix += ["prlimit", f"--nofile={NOFILE}:{NOFILE}"]
        if cpu is not None:
            prefix += ["taskset", "-c", cpu]
        with self.log(name).open("ab") as log:  # prlimit and taskset exec: the PID is argv's
            proc = subprocess.Popen(
                prefix + argv,
                stdin=stdin,
                stdout=log if stdout is None else stdout,
                stderr=log,
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C reaches the bench, which stops these in order
            )
        self.running.append(proc)
        if self.pidfile is not None:
            with self.pidfile.open("a") as f:
                f.write(f"{proc.pid} {start_time(proc.pid)} {name}\n")
        return proc

    def run(self, name: str, argv: list[str], *, cpu: str | None, timeout: float) -> str:
        """Run a bounded command to its end; its stdout."""
        proc = self.start(name, argv, cpu=cpu, stdout=subprocess.PIPE)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise MeasurementFailed(f"{name} took longer than {timeout:.0f} s") from exc
        finally:
            self.stop(proc)
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            why = (text + self.log(name).read_text(errors="replace")).strip()[-300:]
            raise MeasurementFailed(f"{name} exited {proc.returncode}: {why}")
        return text

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        """SIGTERM, SIGKILL after `grace` seconds; always reaped."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)


# ---- /proc ---------------------------------------------------------------------------------------


def pids_of_tree(root: int) -> list[int]:
    """The process and all its descendants (workers, forked children)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children[ppid].append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds of the process tree, reaped children included."""
    ticks = 0
    for pid in pids_of_tree(root):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / CLK_TCK


def usage(root: int) -> dict[str, int]:
    """RSS in KiB, open descriptors, threads and processes of the process tree."""
    rss = fds = threads = 0
    pids = pids_of_tree(root)
    for pid in pids:
        with contextlib.suppress(OSError):
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
            fds += len(os.listdir(f"/proc/{pid}/fd"))
            threads += len(os.listdir(f"/proc/{pid}/task"))
    return {"rss_kib": rss, "fds": fds, "threads": threads, "processes": len(pids)}


def busy_processes(seconds: float = 1.0, threshold: float = 10.0) -> list[dict[str, Any]]:
    """Processes using more than `threshold`% of a CPU over `seconds`: noise for the figures."""

    def ticks() -> dict[int, tuple[str, int]]:
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    head, tail = (entry / "stat").read_text().rsplit(")", 1)
                    fields = tail.split()
                    found[int(entry.name)] = (
                        head.split("(", 1)[1],
                        int(fields[11]) + int(fields[12]),
                    )
        return found

    before = ticks()
    time.sleep(seconds)
    after = ticks()
    busy = []
    for pid, (comm, used) in after.items():
        if pid in before:
            pct = 100 * (used - before[pid][1]) / CLK_TCK / seconds
            if pct >= threshold:
                busy.append({"pid": pid, "command": comm, "cpu_pct": round(pct)})
    return busy


# ---- ports and readiness -------------------------------------------------------------------------


def free_port() -> int:
    """A free loopback port below the ephemeral range.

    Ports inside the range may still be held by TIME_WAIT sockets of earlier load,
    and a server that does not set SO_REUSEADDR could not bind them.
    """
    high = 32767
    with contextlib.suppress(OSError, ValueError):
        high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) - 1
    for _ in range(100):
        port = random.randint(max(1024, high - 12000), high)
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise StartFailed("no free loopback port found")


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return ": " + log.read_text(errors="replace")[-400:].strip()


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], log: Path | None = None, timeout: float = 10.0
) -> None:
    """Until something accepts on the port; StartFailed if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartFailed(f"exited with {proc.returncode} before listening{_tail(log)}")
        with socket.socket() as s:
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    raise StartFailed(f"not listening on {port} after {timeout:.0f} s{_tail(log)}")


def wait_for_lines(
    log: Path, pattern: str, proc: subprocess.Popen[bytes], count: int = 1, timeout: float = 15.0
) -> list[re.Match[str]]:
    """Until `count` lines of the log match `pattern`; the matches."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        matches = [m for m in map(regex.search, text.splitlines()) if m]
        if len(matches) >= count:
            return matches
        if proc.poll() is not None:
            raise StartFailed(f"exited with {proc.returncode}{_tail(log)}")
        if time.monotonic() > deadline:
            raise StartFailed(f"no {pattern!r} after {timeout:.0f} s{_tail(log)}")
        time.sleep(0.05)


def readline(stream: IO[bytes], timeout: float) -> str:
    """One line from a child's stdout, or MeasurementFailed after `timeout` seconds."""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise MeasurementFailed(f"no output after {timeout:.0f} s")
    line = stream.readline().decode(errors="replace")
    if not line:
        raise MeasurementFailed("the process exited without output")
    return line


def as_json_line(text: str) -> dict[str, Any]:
    """The last line of `text` that is a JSON object."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise MeasurementFailed(f"no JSON line in {text[-200:]!r}")
