"""The proxies under test: proxyd and its peers, each started on loopback with its own config.

A proxy is described by what it speaks and a function that starts it and says
on which port it listens. Peers that are not installed are skipped.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procs import LOOPBACK, NOFILE, Processes, StartFailed, free_port, wait_for_lines, wait_for_port

BENCH = Path(__file__).resolve().parent
VENV_PYTHON = str(BENCH.parent / ".venv" / "bin" / "python")


@dataclass
class Running:
    """A proxy up and listening."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    info: dict[str, Any] = field(default_factory=dict)


# start(processes, workdir, cpu) -> Running
Starter = Callable[[Processes, Path, str | None], Running]


@dataclass(frozen=True)
class Proxy:
    name: str
    socks5: bool
    connect: bool
    http: bool  # speaks HTTP at all, so plain forwarding is worth a try
    start: Starter
    version: Callable[[], str]
    installed: Callable[[], bool] = lambda: True


def dpkg_version(package: str) -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def python_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


_serial = 0


def _name(base: str) -> str:
    """A unique name per start, for log and config files."""
    global _serial
    _serial += 1
    return f"{base}-{_serial}"


def _listening(procs: Processes, name: str, argv: list[str], cpu: str | None, port: int) -> Running:
    proc = procs.start(name, argv, cpu=cpu, nofile=True)
    try:
        wait_for_port(port, proc, procs.log(name))
    except StartFailed:
        procs.stop(proc)
        raise
    return Running(proc, port, procs.log(name))


# ---- proxyd --------------------------------------------------------------------------------------


def start_proxyd(
    procs: Processes, workdir: Path, cpu: str | None, workers: int = 1, metrics: bool = False
) -> Running:
    """proxyd on its built-in defaults (access log on, to a file) but for listen and
    workers; with `metrics`, the Prometheus metrics on too."""
    name = _name(f"proxyd-w{workers}")
    config = workdir / f"{name}.toml"
    text = f'[server]\nlisten = ["{LOOPBACK}:0"]\nworkers = {workers}\n'
    if metrics:
        text += f'[metrics]\nlisten = "{LOOPBACK}:0"\n'
    config.write_text(text)
    argv = [VENV_PYTHON, "-m", "proxyd", "--config", str(config)]
    proc = procs.start(name, argv, cpu=cpu, nofile=True)
    log = procs.log(name)
    try:
        # every worker says "started", and the port it listens on
        started = wait_for_lines(log, r'"event": "started".*"loop": "([\w.]+)"', proc, workers)
        address = wait_for_lines(log, rf'"event": "listening", "address": "{LOOPBACK}:(\d+)"', proc)
    except StartFailed:
        procs.stop(proc)
        raise
    return Running(proc, int(address[0].group(1)), log, {"loop": started[0].group(1)})


def proxyd_version() -> str:
    argv = [VENV_PYTHON, "-m", "proxyd", "--version"]
    return subprocess.run(argv, capture_output=True, text=True).stdout.strip()


PROXYD = Proxy("proxyd", True, True, True, start_proxyd, proxyd_version)


def proxyd_variant(workers: int, metrics: bool = False) -> Proxy:
    def start(procs: Processes, workdir: Path, cpu: str | None) -> Running:
        return start_proxyd(procs, workdir, cpu, workers, metrics)

    name = f"proxyd-w{workers}" + ("-metrics" if metrics else "")
    return Proxy(name, True, False, False, start, proxyd_version)


# ---- peers ---------------------------------------------------------------------------------------


def start_microsocks(procs: Processes, workdir: Path, cpu: str | None) -> Running:
    port = free_port()
    argv = ["microsocks", "-i", LOOPBACK, "-p", str(port)]  # default would be 0.0.0.0
    return _listening(procs, _name("microsocks"), argv, cpu, port)


def start_pproxy(procs: Processes, workdir: Path, cpu: str | None) -> Running:
    port = free_port()
    launcher = str(BENCH / "pproxy_uvloop.py")
    argv = [VENV_PYTHON, launcher, "-l", f"http+socks5://{LOOPBACK}:{port}"]
    running = _listening(procs, _name("pproxy"), argv, cpu, port)
    on_uvloop = "Using uvloop" in running.log.read_text(errors="replace")
    running.info["loop"] = "uvloop" if on_uvloop else "asyncio"
    return running


def start_tinyproxy(procs: Processes, workdir: Path, cpu: str | None) -> Running:
    port = free_port()
    name = _name("tinyproxy")
    config = workdir / f"{name}.conf"
    # No ConnectPort line: CONNECT may go to any port. Loopback only; quiet log.
    config.write_text(
        f"Port {port}\nListen {LOOPBACK}\nAllow {LOOPBACK}\nTimeout 600\n"
        f'LogFile "{workdir / name}.tinyproxy.log"\nLogLevel Warning\n'
        f"MaxClients {NOFILE // 2 - 100}\nDisableViaHeader Yes\n"
    )
    return _listening(procs, name, ["tinyproxy", "-d", "-c", str(config)], cpu, port)


PEERS = [
    Proxy(
        "microsocks",
        socks5=True,
        connect=False,
        http=False,
        start=start_microsocks,
        version=lambda: dpkg_version("microsocks"),
        installed=lambda: shutil.which("microsocks") is not None,
    ),
    Proxy(
        "pproxy",
        socks5=True,
        connect=True,
        http=True,
        start=start_pproxy,
        version=lambda: f"{python_version('pproxy')} (uvloop {python_version('uvloop')})",
        installed=lambda: python_version("pproxy") != "not installed",
    ),
    Proxy(
        "tinyproxy",
        socks5=False,
        connect=True,
        http=True,
        start=start_tinyproxy,
        version=lambda: dpkg_version("tinyproxy"),
        installed=lambda: shutil.which("tinyproxy") is not None,
    ),
]
