"""Shared fixtures: the real daemon as a subprocess, and real servers on loopback."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0
# PROXYD_TEST_LOOP=asyncio runs every daemon without accelerators: the stock event
# loop (uvloop hidden) and h11 for forwarding's heads (httptools hidden).
STOCK_LOOP = os.environ.get("PROXYD_TEST_LOOP") == "asyncio"
_STOCK_LOOP_MAIN = (
    "import sys; sys.modules['uvloop'] = None; sys.modules['httptools'] = None; "
    "from proxyd.cli import main; sys.exit(main())"
)


class Daemon:
    """A proxyd process on an ephemeral loopback port; its stdout parsed line by line."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, prefix: list[str] | None = None
    ) -> None:
        entry = ["-c", _STOCK_LOOP_MAIN] if STOCK_LOOP else ["-m", "proxyd"]
        self.args = [*(prefix or []), sys.executable, *entry, *args]
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            # a process group of its own: workers forked by the daemon go with it
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()
        self.port = 0
        self.host = "127.0.0.1"
        self.config_path: Path | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass
                self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first event (seen so far or arriving within `timeout`) matching `predicate`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no matching event within {timeout}s; output:\n"
                        + "\n".join(self.lines)
                        + f"\nstderr: {self.stderr.decode(errors='replace')}"
                    )
                self._cond.wait(min(left, 0.1))

    def started(self) -> Daemon:
        loop = self.wait_for(lambda e: e.get("event") == "started", START_TIMEOUT)["loop"]
        assert loop == ("asyncio.unix_events" if STOCK_LOOP else "uvloop"), loop
        listening = self.wait_for(lambda e: e.get("event") == "listening", START_TIMEOUT)
        host, _, port = listening["address"].rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        return self

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def named(self, *names: str) -> list[dict[str, Any]]:
        """The events so far with one of these names, in order."""
        with self._cond:
            return [e for e in self.events if e.get("event") in names]

    def reload(self, config_toml: str | None = None, *, results: int = 1) -> list[dict[str, Any]]:
        """Rewrite the config file (when given) and send SIGHUP; the next `results`
        outcome events ("reloaded" or "reload_failed": one per worker)."""
        outcomes = ("reloaded", "reload_failed")
        before = len(self.named(*outcomes))
        if config_toml is not None:
            assert self.config_path is not None
            self.config_path.write_text(config_toml)
        self.proc.send_signal(signal.SIGHUP)
        self.wait_for(lambda _e: len(self.named(*outcomes)) >= before + results)
        return self.named(*outcomes)[before:]

    def access(
        self, conn_filter: Callable[[dict[str, Any]], bool] = lambda e: True, timeout: float = 10.0
    ) -> dict[str, Any]:
        return self.wait_for(lambda e: e.get("event") == "access" and conn_filter(e), timeout)

    def access_events(self) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == "access"]

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines) + self.stderr.decode("utf-8", "replace")

    def stop(
        self, sig: int = signal.SIGTERM, timeout: float = 10.0, *, force_after: float | None = None
    ) -> int:
        """Stop with one `sig` (the daemon drains for server.shutdown_grace); with
        `force_after`, a second signal after that many seconds ends the drain."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                if force_after is not None:
                    try:
                        self.proc.wait(force_after)
                    except subprocess.TimeoutExpired:
                        self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # whatever of its group outlived it (workers of a supervisor that was killed)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(5)
        self._err_reader.join(5)
        return self.proc.returncode


class NotifyReceiver:
    """A NOTIFY_SOCKET of our own: the datagrams the daemon sends, as lists of lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[list[str]] = []

    def wait_for(self, line: str, timeout: float = 10.0) -> list[str]:
        """The first message (seen or arriving within `timeout`) with `line` in it."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                if line in message:
                    return message
            if time.monotonic() > deadline:
                raise AssertionError(f"no {line!r} in {self.messages}")
            try:
                self.messages.append(self.sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                pass

    def close(self) -> None:
        self.sock.close()


def local_names(
    workdir: Path, hosts: Path, nameserver: str | None = None, dns_timeout: int = 2
) -> list[str]:
    """A command prefix: run in a mount namespace of its own where names come from
    `hosts` only (nsswitch "files"), and any resolver that reads resolv.conf asks
    127.0.0.1. No name lookup of the command leaves the machine. With `nameserver`
    (a loopback address), names not in `hosts` are asked of the DNS server there,
    once, with a timeout of `dns_timeout` seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    nsswitch, resolv = workdir / "nsswitch.conf", workdir / "resolv.conf"
    if nameserver is None:
        nsswitch.write_text("hosts: files\n")
        resolv.write_text("nameserver 127.0.0.1\n")
    else:
        assert nameserver.startswith("127."), "tests ask DNS servers on loopback only"
        nsswitch.write_text("hosts: files dns\n")
        resolv.write_text(f"nameserver {nameserver}\noptions timeout:{dns_timeout} attempts:1\n")
    mounts = " && ".join(
        f'mount --bind "${i}" /etc/{name}'
        for i, name in enumerate(("hosts", "nsswitch.conf", "resolv.conf"), start=1)
    )
    shell = f'{mounts} && shift 3 && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", shell, "sh", str(hosts), str(nsswitch), str(resolv)]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start_daemon(config_toml="", *extra_args) -> a started Daemon, stopped at teardown."""
    daemons: list[Daemon] = []
    counter = iter(range(1000))

    def start(
        config_toml: str = "",
        *extra: str,
        listen: str = "127.0.0.1:0",
        wait: bool = True,
        hosts: Path | None = None,
        nameserver: str | None = None,
        dns_timeout: int = 2,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> Daemon:
        """`hosts`: a file the daemon sees as /etc/hosts, in a mount namespace of its own
        where names are looked up in that file only: tests name loopback addresses,
        and an unknown name fails there, without a query to any DNS server; or, with
        `nameserver`, next from the DNS server at that loopback address (which the
        resolver gives up on after `dns_timeout` seconds). `prefix`: a
        command the daemon runs under (a network namespace of the test's own)."""
        index = next(counter)
        path = tmp_path / f"proxyd-{index}.toml"
        path.write_text(config_toml)
        args = ["--config", str(path), *extra]
        if listen:
            args += ["--listen", listen]
        if hosts is not None:
            prefix = [
                *(prefix or []),
                *local_names(tmp_path / f"names-{index}", hosts, nameserver, dns_timeout),
            ]
        daemon = Daemon(args, env=env, prefix=prefix)
        daemon.config_path = path
        daemons.append(daemon)
        return daemon.started() if wait else daemon

    yield start
    for daemon in daemons:  # a test's leftover connections do not hold teardown up
        daemon.stop(force_after=2.0)


@pytest.fixture(params=["splice", "copy"])
def relay_kind(request: pytest.FixtureRequest) -> str:
    """A `[buffers]` table choosing the zero-copy (splice) or the copying relay."""
    return f"[buffers]\nsplice = {'true' if request.param == 'splice' else 'false'}\n"


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A users file made by `proxyd passwd`: alice / wonderland-42."""
    path = tmp_path_factory.mktemp("auth") / "users"
    subprocess.run(
        [sys.executable, "-m", "proxyd", "passwd", "--file", str(path), "alice"],
        input=b"wonderland-42\n",
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    return path


USER, PASSWORD = "alice", "wonderland-42"


def basic_token(user: str = USER, password: str = PASSWORD) -> str:
    """The Basic credentials of a Proxy-Authorization header."""
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def request_head(
    method: str,
    target: str,
    *,
    host: str | None = None,
    password: str | None = None,
    user: str = USER,
) -> bytes:
    """An HTTP/1.1 request head to the proxy; with `password`, Basic credentials."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host or target}"]
    if password is not None:
        lines.append(f"Proxy-Authorization: Basic {basic_token(user, password)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def proxyd(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    """The proxyd command line, run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "proxyd", *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


# --- real servers on loopback -------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


class Origin:
    def __init__(self, body: bytes) -> None:
        handler = type("Handler", (_Handler,), {"body": body})
        self.body = body
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def origin() -> Iterator[Origin]:
    """An HTTP server on loopback serving 256 KiB of pseudo-random bytes at /."""
    server = Origin(os.urandom(256 * 1024))
    yield server
    server.close()


class TcpServer:
    """A threaded TCP server on loopback running `handle(conn)` for each client."""

    def __init__(self, handle: Callable[[socket.socket], None], host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        self.peers: list[tuple[Any, ...]] = []
        self.errors: list[BaseException] = []
        self._closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handle(conn)
            except OSError as exc:
                self.errors.append(exc)

    def close(self) -> None:
        self._closed = True
        self.sock.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


@pytest.fixture
def tcp_server() -> Iterator[Callable[..., TcpServer]]:
    servers: list[TcpServer] = []

    def make(handle: Callable[[socket.socket], None] = echo, host: str = "127.0.0.1") -> TcpServer:
        server = TcpServer(handle, host)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def listening_socket(
    host: str = "127.0.0.1", port: int = 0, *, also_free_on: str = ""
) -> socket.socket:
    """A listening TCP socket on host:port. With `also_free_on`, its (ephemeral) port
    is one that the other address can bind too, for tests that need the same port
    on two addresses; a port taken there is skipped (a bounded number of times)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        sock = socket.socket(family)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(16)
        if not also_free_on:
            return sock
        other_family = socket.AF_INET6 if ":" in also_free_on else socket.AF_INET
        probe = socket.socket(other_family)
        if other_family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((also_free_on, sock.getsockname()[1]))
            return sock
        except OSError:
            sock.close()  # taken on the other address: another port
        finally:
            probe.close()
    raise RuntimeError(f"no port free on both {host} and {also_free_on}")


@contextlib.contextmanager
def silent_listener(host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """A port whose accept queue is full: the kernel drops further SYNs, so a connect
    to it neither succeeds nor fails (a target that never answers). Yields the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family)
    if family == socket.AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    fillers: list[socket.socket] = []
    try:
        listener.bind((host, port))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(8):
            filler = socket.socket(family)
            filler.setblocking(False)
            filler.connect_ex((host, port))
            fillers.append(filler)
        time.sleep(0.2)
        yield port
    finally:
        for sock in (*fillers, listener):
            sock.close()


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ws_echo(ws: Any) -> None:
    for message in ws:
        ws.send(message)


@pytest.fixture
def ws_server() -> Iterator[int]:
    """An echoing WebSocket server on loopback (the websockets package's); its port."""
    from websockets.sync.server import serve

    with serve(_ws_echo, "127.0.0.1", 0, max_size=None) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield server.socket.getsockname()[1]
        server.shutdown()


def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Headless Chromium loading `url` with `args` (a proxy, --dump-dom, a screenshot),
    its name lookups confined to a hosts file of the test's own (only localhost):
    whatever it tries in the background fails inside the machine."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    browser = [
        "chromium",
        "--headless",
        "--no-sandbox",  # as root
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--no-first-run",
        *args,
        url,
    ]
    return subprocess.run(
        [*local_names(tmp_path / "names", hosts), *browser], capture_output=True, timeout=60
    )
