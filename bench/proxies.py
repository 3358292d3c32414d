"""The proxies under test: proxyd and its peers, each started on loopback with its own config.

A proxy is described by what it speaks and a function that starts it and says
on which port it listens. Peers that are not installed are skipped.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
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
    # lines the proxy has written to its access log so far (None: it keeps none), so that
    # the bench can check that a forwarding proxy logs one line per request
    access_lines: Callable[[], int] | None = None


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


def _listening(
    procs: Processes,
    name: str,
    argv: list[str],
    cpu: str | None,
    port: int,
    errors: Path | None = None,
    timeout: float = 10.0,
) -> Running:
    """Start argv and wait for its port; `errors` is the file whose tail explains a failure
    (the process's own output by default)."""
    proc = procs.start(name, argv, cpu=cpu, nofile=True)
    try:
        wait_for_port(port, proc, errors or procs.log(name), timeout)
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
    running = Running(proc, int(address[0].group(1)), log, {"loop": started[0].group(1)})
    running.access_lines = lambda: _count_lines(log, '"event": "access"')
    return running


def _count_lines(path: Path, marker: str = "") -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for line in f if marker.encode() in line)


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


def start_squid(procs: Processes, workdir: Path, cpu: str | None) -> Running:
    """Squid as a plain forwarding and CONNECT proxy: no cache, one worker, keep-alive
    on both sides, an access log like proxyd's. Its files go to a directory of its own
    that the unprivileged user it switches to (as root) can write."""
    port = free_port()
    name = _name("squid")
    home = workdir / name
    home.mkdir()
    user = ""
    if os.geteuid() == 0:  # squid will not serve as root: it switches to this user
        account = _unprivileged_user()
        os.chown(home, account.pw_uid, account.pw_gid)
        workdir.chmod(0o711)  # the user may pass through the workdir, not list it
        user = f"cache_effective_user {account.pw_name}\n"
    config = workdir / f"{name}.conf"
    config.write_text(_squid_conf(port, home) + user)
    argv = [_sbin("squid"), "-N", "-f", str(config)]
    cache_log = home / "cache.log"
    # Squid takes a moment (more on a busy machine) to set up before it listens.
    running = _listening(procs, name, argv, cpu, port, errors=cache_log, timeout=30.0)
    running.access_lines = lambda: _count_lines(home / "access.log")
    return running


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("proxy", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise StartFailed("no 'proxy' or 'nobody' account for squid to run as")


def _squid_conf(port: int, home: Path) -> str:
    """No cache, no SSL_ports rule (CONNECT to any port from loopback), DNS only to
    loopback, no ICMP pinger, and a quick stop on SIGTERM (the default waits 30 s)."""
    return (
        f"http_port {LOOPBACK}:{port}\n"
        "workers 1\n"
        "cache deny all\n"
        "cache_mem 8 MB\n"
        "acl localnet src 127.0.0.0/8\n"
        "http_access allow localnet\n"
        "http_access deny all\n"
        "client_persistent_connections on\n"
        "server_persistent_connections on\n"
        "via off\n"
        "forwarded_for delete\n"
        f"max_filedescriptors {NOFILE}\n"
        f"access_log stdio:{home}/access.log\n"
        f"cache_log {home}/cache.log\n"
        f"pid_filename {home}/squid.pid\n"
        f"coredump_dir {home}\n"
        f"dns_nameservers {LOOPBACK}\n"
        "pinger_enable off\n"
        "shutdown_lifetime 1 seconds\n"
    )


def start_dante(procs: Processes, workdir: Path, cpu: str | None) -> Running:
    """Dante's SOCKS5 server without authentication, one line per session to its log.

    Dante forks a process per stage (negotiate, request, io) and more of each as load
    grows; Debian's 1.4.2 has no setting for how many, only -N for more "main servers",
    which the manual says is not worth more than one per CPU: the proxy gets one core."""
    port = free_port()
    name = _name("dante")
    config = workdir / f"{name}.conf"
    log = workdir / f"{name}.dante.log"
    # As root its children drop to nobody; as anyone else they stay that user.
    users = "user.privileged: root\nuser.unprivileged: nobody\n" if os.geteuid() == 0 else ""
    config.write_text(
        f"logoutput: {log}\n"
        f"internal: {LOOPBACK} port = {port}\n"
        f"external: {LOOPBACK}\n"
        "socksmethod: none\n"
        "clientmethod: none\n"
        f"{users}"
        "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 log: error }\n"
        "socks pass { from: 0.0.0.0/0 to: 0.0.0.0/0 log: disconnect }\n"
    )
    return _listening(procs, name, [_sbin("danted"), "-f", str(config)], cpu, port)


def _sbin(command: str) -> str:
    """The path of a daemon in an sbin directory, which is not on every user's PATH; ""
    when it is not installed."""
    return shutil.which(command) or shutil.which(command, path="/usr/sbin:/usr/local/sbin") or ""


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
    Proxy(
        "squid",
        socks5=False,
        connect=True,
        http=True,
        start=start_squid,
        version=lambda: dpkg_version("squid"),
        installed=lambda: _sbin("squid") != "",
    ),
    Proxy(
        "dante",
        socks5=True,
        connect=False,
        http=False,
        start=start_dante,
        version=lambda: dpkg_version("dante-server"),
        installed=lambda: _sbin("danted") != "",
    ),
]
