"""The soak: cycles of thousands of concurrent clients of every kind against one daemon,
after which it must hold what it held before: descriptors, asyncio tasks and resident
memory back near their level after the first cycle, and no socket left in CLOSE_WAIT.

Every cycle opens its clients at once and lets them do their work only when all are
open, so the daemon holds them all together: SOCKS5 and CONNECT tunnels (bytes both
ways, then a half-close), plain HTTP forwarding on kept-alive connections, UDP
associations, clients that reset mid-tunnel and clients that give up mid-handshake.
Targets are an echo server, an HTTP origin and a UDP echo in the test, on loopback.

`test_short_soak` runs in the suite; `pytest -m soak` runs the long one, for
PROXYD_SOAK_SECONDS (180) with PROXYD_SOAK_CLIENTS (2000) clients a cycle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http.client
import os
import resource
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxyd.relay import IDLE_PIPES_KEPT

from conftest import PASSWORD, USER, basic_token
from integration.test_metrics import metrics_address

try:
    import uvloop
except ImportError:  # the load is lighter on uvloop, but it runs without
    uvloop = None

# a cycle's clients, by share of every 20: (kind, how many of 20)
MIX = (
    ("socks5", 7),
    ("connect", 5),
    ("forward", 2),
    ("udp", 2),
    ("reset", 2),
    ("abandon", 2),
)
STATUS = {  # what each kind's access line says
    "socks5": "ok",
    "connect": "ok",
    "forward": "ok",
    "udp": "ok",
    "reset": "reset",
    "abandon": "client_closed",
}
LINES = {"forward": 2}  # access lines per client (one per forwarded request); else 1
BODY = b"b" * 1000  # the HTTP origin's answer
CYCLE_LIMIT = 120.0  # seconds a cycle may take before it counts as hung
STEP_LIMIT = 30.0  # seconds for any one read


@dataclass
class Targets:
    echo: int = 0
    origin: int = 0
    udp: int = 0
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    transports: list[asyncio.BaseTransport] = field(default_factory=list)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then close (the client sees the end after its half-close)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every request of a kept-alive connection with BODY."""
    try:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def start_targets() -> Targets:
    loop = asyncio.get_running_loop()
    targets = Targets()
    for handler in (_echo, _origin):
        server = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=4096)
        targets.servers.append(server)
    targets.echo = targets.servers[0].sockets[0].getsockname()[1]
    targets.origin = targets.servers[1].sockets[0].getsockname()[1]
    transport, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    targets.transports.append(transport)
    targets.udp = transport.get_extra_info("sockname")[1]
    return targets


async def stop_targets(targets: Targets) -> None:
    for server in targets.servers:
        server.close()
    for transport in targets.transports:
        transport.close()


# -- the clients ----------------------------------------------------------------------


def _target(port: int, host: str = "127.0.0.1") -> bytes:
    return b"\x01" + socket.inet_aton(host) + struct.pack("!H", port)


async def _read(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), STEP_LIMIT)


async def _socks5(proxy: tuple[str, int], command: int, target: bytes):
    """A SOCKS5 connection with a login: (reader, writer, BND address, BND port)."""
    reader, writer = await asyncio.open_connection(*proxy)
    user, password = USER.encode(), PASSWORD.encode()
    writer.write(b"\x05\x01\x02")
    assert await _read(reader, 2) == b"\x05\x02"
    writer.write(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
    assert await _read(reader, 2) == b"\x01\x00"
    writer.write(b"\x05" + bytes([command]) + b"\x00" + target)
    reply = await _read(reader, 10)
    assert reply[:4] == b"\x05\x00\x00\x01", reply
    return reader, writer, socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:])[0]


async def _connect(proxy: tuple[str, int], port: int):
    reader, writer = await asyncio.open_connection(*proxy)
    target = f"127.0.0.1:{port}"
    writer.write(
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        f"Proxy-Authorization: Basic {basic_token()}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_LIMIT)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return reader, writer


async def _exchange_and_half_close(reader, writer, size: int) -> None:
    payload = os.urandom(size)
    writer.write(payload)
    assert await _read(reader, size) == payload
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(1), STEP_LIMIT) == b""  # the target's end


class Cycle:
    """One cycle's clients: each opens, waits until every client is open, then works."""

    def __init__(self, proxy: tuple[str, int], targets: Targets, clients: int) -> None:
        self.proxy, self.targets = proxy, targets
        self.kinds = [kind for kind, share in MIX for _ in range(share)]
        self.plan = [self.kinds[i % len(self.kinds)] for i in range(clients)]
        self.pending = clients
        self.all_open = asyncio.Event()
        self.done: collections.Counter[str] = collections.Counter()

    def opened(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.all_open.set()

    async def run(self) -> None:
        async with asyncio.timeout(CYCLE_LIMIT):
            await asyncio.gather(*(self.client(kind, i) for i, kind in enumerate(self.plan)))

    async def client(self, kind: str, index: int) -> None:
        writer = None
        try:
            writer = await getattr(self, kind)(index)
        finally:
            if writer is not None:
                writer.close()
        self.done[kind] += 1

    async def _wait_for_all(self) -> None:
        self.opened()
        await self.all_open.wait()

    async def socks5(self, index: int):
        reader, writer, _, _ = await _socks5(self.proxy, 1, _target(self.targets.echo))
        await self._wait_for_all()
        await _exchange_and_half_close(reader, writer, 1024 + index % 16 * 1024)
        return writer

    async def connect(self, index: int):
        reader, writer = await _connect(self.proxy, self.targets.echo)
        await self._wait_for_all()
        await _exchange_and_half_close(reader, writer, 512 + index % 8 * 2048)
        return writer

    async def forward(self, index: int):
        reader, writer = await asyncio.open_connection(*self.proxy)
        await self._wait_for_all()
        target = f"127.0.0.1:{self.targets.origin}"
        for path in ("/one", "/two"):
            writer.write(
                f"GET http://{target}{path} HTTP/1.1\r\nHost: {target}\r\n"
                f"Proxy-Authorization: Basic {basic_token()}\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_LIMIT)
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert await _read(reader, len(BODY)) == BODY
        return writer

    async def udp(self, index: int):
        _, writer, host, port = await _socks5(self.proxy, 3, _target(0, "0.0.0.0"))
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[bytes] = asyncio.Queue()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Collect(answers), local_addr=("127.0.0.1", 0)
        )
        try:
            await self._wait_for_all()
            header = b"\0\0\0" + _target(self.targets.udp)
            for n in range(5):
                payload = b"datagram %d of client %d" % (n, index)
                if not await _answered(transport, header + payload, (host, port), answers):
                    raise AssertionError(f"no answer to {payload!r}")
        finally:
            transport.close()
        return writer

    async def reset(self, index: int):
        """Sends, never reads, and resets its connection."""
        _, writer, _, _ = await _socks5(self.proxy, 1, _target(self.targets.echo))
        await self._wait_for_all()
        writer.write(b"r" * 32768)
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        return None

    async def abandon(self, index: int):
        """Half a greeting, then gone."""
        _, writer = await asyncio.open_connection(*self.proxy)
        writer.write(b"\x05\x02")
        await writer.drain()
        await self._wait_for_all()
        return writer


async def _answered(
    transport: asyncio.DatagramTransport,
    datagram: bytes,
    relay: tuple[str, int],
    answers: asyncio.Queue[bytes],
) -> bool:
    """Send until the datagram comes back (at most 5 tries a second apart): UDP under
    load may lose one. A late answer to an earlier datagram, or to a repeat, is skipped."""
    for _attempt in range(5):
        transport.sendto(datagram, relay)
        deadline = asyncio.get_running_loop().time() + 1.0
        try:
            async with asyncio.timeout_at(deadline):
                while await answers.get() != datagram:
                    pass
            return True
        except TimeoutError:
            continue
    return False


class _Collect(asyncio.DatagramProtocol):
    def __init__(self, queue: asyncio.Queue[bytes]) -> None:
        self.queue = queue

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


# -- what the daemon holds --------------------------------------------------------------


@dataclass
class Holdings:
    fds: int
    rss: int  # bytes
    tasks: float
    close_wait: list[str]
    fd_kinds: collections.Counter[str]

    def __str__(self) -> str:
        return (
            f"{self.fds} fds, {self.rss / 2**20:.1f} MiB RSS, {self.tasks:.0f} tasks, "
            f"{len(self.close_wait)} CLOSE_WAIT ({dict(self.fd_kinds)})"
        )


def holdings(daemon, scraper: Scraper) -> Holdings:
    """What the daemon holds now."""
    pid = daemon.proc.pid
    fds = os.listdir(f"/proc/{pid}/fd")
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    close_wait = subprocess.run(
        ["ss", "-Htanp", "state", "close-wait"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return Holdings(
        fds=len(fds),
        rss=rss,
        tasks=scraper.samples()["proxyd_asyncio_tasks"],
        close_wait=[line for line in close_wait if f"pid={pid}," in line],
        fd_kinds=collections.Counter(_kind(pid, fd) for fd in fds),
    )


class Scraper:
    """/metrics over one kept-alive connection, so that scraping opens and closes no
    descriptor of the daemon's between the counts (the admin listener closes a
    connection idle for 30 s: then it is opened again)."""

    def __init__(self, daemon) -> None:
        self.conn = http.client.HTTPConnection(*metrics_address(daemon), timeout=10)
        self.samples()  # the connection is open (both ends) before anything is counted

    def samples(self) -> dict[str, float]:
        """name -> the sum over its labels."""
        for attempt in (1, 2):
            try:
                self.conn.request("GET", "/metrics")
                response = self.conn.getresponse()
                text = response.read().decode()
                break
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                if attempt == 2:
                    raise
        assert response.status == 200
        sums: collections.Counter[str] = collections.Counter()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                sums[sample.name] += sample.value
        return dict(sums)

    def close(self) -> None:
        self.conn.close()


def _kind(pid: int, fd: str) -> str:
    """socket, pipe, anon_inode or the file a descriptor is, for the failure message."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}").split(":")[0]
    except OSError:
        return "gone"


@contextlib.contextmanager
def enough_descriptors(clients: int) -> Iterator[None]:
    """The test holds two sockets a client (its own and the target's end), the daemon
    up to six (two sockets, a pipe each way): the soft limit, which the daemon
    inherits, raised for the while."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8 * clients + 1024
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is below the {want} needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def soak(start_daemon, users_file, *, clients: int, seconds: float, max_cycles: int) -> None:
    with enough_descriptors(clients):
        _soak(start_daemon, users_file, clients=clients, seconds=seconds, max_cycles=max_cycles)


def _soak(start_daemon, users_file, *, clients: int, seconds: float, max_cycles: int) -> None:
    daemon = start_daemon(
        f'[auth]\nusers_file = "{users_file}"\n[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    expected_lines = 0
    scraper = Scraper(daemon)
    idle = holdings(daemon, scraper)
    report: list[str] = [f"before: {idle}"]

    async def cycles() -> None:
        nonlocal expected_lines
        targets = await start_targets()
        try:
            started = time.monotonic()
            cycle_no = 0
            while cycle_no < max_cycles and (cycle_no < 3 or time.monotonic() - started < seconds):
                cycle_no += 1
                cycle = Cycle(daemon.address, targets, clients)
                await cycle.run()
                assert cycle.done == collections.Counter(cycle.plan)
                expected_lines += sum(LINES.get(kind, 1) for kind in cycle.plan)
                await asyncio.to_thread(settle, cycle_no, cycle)
        finally:
            await stop_targets(targets)

    baseline: Holdings | None = None
    rss: list[int] = []  # after each cycle

    def settle(cycle_no: int, cycle: Cycle) -> None:
        nonlocal baseline
        deadline = time.monotonic() + 60
        while len(lines := daemon.access_events()) < expected_lines:
            if time.monotonic() > deadline:
                held = holdings(daemon, scraper)
                raise AssertionError(
                    f"{expected_lines - len(lines)} access lines missing after 60 s; "
                    f"the daemon holds {held}\n" + "\n".join(held.close_wait[:20])
                )
            time.sleep(0.1)
        assert len(lines) == expected_lines
        # a forwarding connection's lines come before its close: wait for the closes
        deadline = time.monotonic() + 30
        while (active := scraper.samples()["proxyd_connections_active"]) > 0:
            assert time.monotonic() < deadline, f"{active} connections still open"
            time.sleep(0.05)
        held = holdings(daemon, scraper)
        report.append(f"cycle {cycle_no}: {held}")
        rss.append(held.rss)
        assert not held.close_wait, held.close_wait
        if baseline is None:
            # after the first cycle: pools and caches are warm. Of descriptors, only
            # the splice relay's idle pipes may stay; of tasks, none.
            assert held.fds <= idle.fds + 2 * IDLE_PIPES_KEPT, report
            assert held.tasks == idle.tasks, report
            baseline = held
            return
        assert held.fds <= baseline.fds, report
        assert held.tasks <= baseline.tasks, report

    try:
        if uvloop is not None:
            uvloop.run(cycles())
        else:
            asyncio.run(cycles())
    finally:
        scraper.close()

    lines = daemon.access_events()
    counts = collections.Counter(line["status"] for line in lines)
    per_cycle = collections.Counter()
    for kind in Cycle(daemon.address, Targets(), clients).plan:
        per_cycle[STATUS[kind]] += LINES.get(kind, 1)
    cycles_run = len(report) - 1
    assert counts == collections.Counter({s: n * cycles_run for s, n in per_cycle.items()})
    assert baseline is not None
    # memory: the allocator's high-water mark takes a few cycles to settle (with many
    # UDP associations it steps up over two); after the first three (two of a short
    # soak) it may grow by 4 MiB at most, or 50 bytes a client served since, if more.
    # The long soak (some 50,000 clients after those) so catches a leak of about 80
    # bytes a connection; the short one only leaks of a few KiB a connection.
    warm = min(3, len(rss) - 1)
    served = clients * (len(rss) - warm)
    allowed = max(4 * 2**20, 50 * served)
    assert max(rss[warm:]) - max(rss[:warm]) <= allowed, report
    output = daemon.output()
    assert "Traceback" not in output and "session_error" not in output
    print("\n".join(report))


def test_short_soak(start_daemon, users_file):
    """Three cycles of 1000 clients: the soak's checks, in the suite."""
    soak(start_daemon, users_file, clients=1000, seconds=0, max_cycles=3)


@pytest.mark.soak
def test_soak(start_daemon, users_file):
    soak(
        start_daemon,
        users_file,
        clients=int(os.environ.get("PROXYD_SOAK_CLIENTS", "2000")),
        seconds=float(os.environ.get("PROXYD_SOAK_SECONDS", "180")),
        max_cycles=1000,
    )
