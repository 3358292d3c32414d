"""Prometheus metrics (prometheus-client) and the admin listener that serves them.

`[metrics] listen` turns them on: `GET /metrics` in the Prometheus text format
and `GET /healthz` (200 while serving, 503 while draining), and unless
`[metrics] status_page = false` the live status page, `GET /` and
`GET /status.json` (proxyd.status, proxyd.status_page). With several workers
every worker records into prometheus-client's multiprocess files (the supervisor
sets PROMETHEUS_MULTIPROC_DIR before forking), and whichever worker the kernel
hands a scrape to answers with the sum over all of them, dead workers' counters
included.

Hot paths pay one method call and a few increments per connection; the label
children are looked up once and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import h11

from proxyd import status, status_page
from proxyd.status import RECORDER

if TYPE_CHECKING:
    import socket

    from proxyd.accounting import Report
    from proxyd.status import Metered

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
# seconds: a handshake is mostly sub-millisecond on loopback, a password derivation
# tens of milliseconds, a slow client up to timeouts.handshake
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
ADMIN_TIMEOUT: Final = 30.0  # seconds for a request and its answer, or between requests
ADMIN_MAX_CONNECTIONS: Final = 64
ADMIN_MAX_REQUEST: Final = 16 * 1024
RELOADS: Final = ("proxyd_config_reloads", "SIGHUP reloads, by result")


class Metrics:
    """The metrics one process records; `render()` gives what /metrics answers."""

    def __init__(self) -> None:
        # imported here: prometheus-client picks its multiprocess mode at import,
        # from the environment the supervisor prepares
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created: noise here

        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV)
        # in multiprocess mode the values live in files and a fresh registry reads
        # them all at each scrape; otherwise they register here
        self._registry = None if self.multiprocess_dir else CollectorRegistry()
        reg: Any = {"registry": self._registry}
        self.active = Gauge(
            "proxyd_connections_active",
            "Client connections open now, past protocol detection",
            ["protocol"],
            multiprocess_mode="livesum",
            **reg,
        )
        self.connections = Counter(
            "proxyd_connections",
            "Client connections finished, by protocol and access-log status",
            ["protocol", "status"],
            **reg,
        )
        self.requests = Counter(
            "proxyd_http_requests",
            "Forwarded HTTP requests finished, by access-log status",
            ["status"],
            **reg,
        )
        self.bytes = Counter(
            "proxyd_bytes",
            "Payload bytes relayed: up is client to target, down is target to client",
            ["direction"],
            **reg,
        )
        self.datagrams = Counter(
            "proxyd_udp_datagrams",
            "UDP datagrams relayed for SOCKS5 UDP associations",
            ["direction"],
            **reg,
        )
        self.handshake = Histogram(
            "proxyd_handshake_seconds",
            "From accept to a complete, authenticated request",
            ["protocol"],
            buckets=LATENCY_BUCKETS,
            **reg,
        )
        self.connect = Histogram(
            "proxyd_upstream_connect_seconds",
            "Reaching the target: name lookup and TCP connect, successful ones",
            buckets=LATENCY_BUCKETS,
            **reg,
        )
        self.auth_failures = Counter("proxyd_auth_failures", "Wrong user names or passwords", **reg)
        self.lockouts = Counter(
            "proxyd_auth_lockouts", "Client addresses locked out after failed logins", **reg
        )
        self.reloads = Counter(*RELOADS, ["result"], **reg)
        parent = ["group", "server"]
        self.parent_up = Gauge(
            "proxyd_upstream_up",
            "1 while a parent proxy is in use, 0 while taken out after failures "
            "(with workers: 0 when any worker has it out)",
            parent,
            multiprocess_mode="livemin",
            **reg,
        )
        self.parent_failures = Counter(
            "proxyd_upstream_failures",
            "Connections to or through a parent proxy that failed because of the parent",
            parent,
            **reg,
        )
        self.parent_active = Gauge(
            "proxyd_upstream_connections_active",
            "Connections through a parent proxy now",
            parent,
            multiprocess_mode="livesum",
            **reg,
        )
        self.tasks = Gauge(
            "proxyd_asyncio_tasks",
            "asyncio tasks alive (a count that keeps growing is a leak)",
            multiprocess_mode="livesum",
            **reg,
        )
        self.user_bytes = Counter(
            "proxyd_user_bytes",
            "Payload bytes by user ([metrics] per_user; past per_user_max users in a "
            'process, the rest count as user "other")',
            ["user", "direction"],
            **reg,
        )
        self._users_labelled: set[str] = set()
        up, down = self.bytes.labels("up"), self.bytes.labels("down")
        self.bytes_up_inc, self.bytes_down_inc = up.inc, down.inc
        self._dg_up, self._dg_down = self.datagrams.labels("up"), self.datagrams.labels("down")
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- what sessions call --------------------------------------------------------

    def opened(self, protocol: str) -> None:
        self._child(self.active, protocol).inc()
        RECORDER.opened(protocol)

    def handshake_done(self, protocol: str, seconds: float) -> None:
        self._child(self.handshake, protocol).observe(seconds)

    def connected(self, seconds: float) -> None:
        self.connect.observe(seconds)

    def closed(self, protocol: str | None, status: str, *, active: bool) -> None:
        """A connection ended; `active` when `opened` counted it."""
        if active and protocol is not None:
            self._child(self.active, protocol).dec()
        self._child(self.connections, protocol or "unknown", status).inc()
        RECORDER.closed(protocol, active=active)

    def request_done(self, status: str, bytes_up: int, bytes_down: int) -> None:
        self._child(self.requests, status).inc()
        self.relayed(bytes_up, bytes_down)

    def relayed(self, bytes_up: int, bytes_down: int, dg_up: int = 0, dg_down: int = 0) -> None:
        if bytes_up:
            self.bytes_up_inc(bytes_up)
        if bytes_down:
            self.bytes_down_inc(bytes_down)
        if dg_up:
            self._dg_up.inc(dg_up)
        if dg_down:
            self._dg_down.inc(dg_down)

    def user_traffic(self, reports: Iterable[Report], most: int) -> None:
        """What users moved lately (proxyd.accounting's reports), by user; the first
        `most` users of this process have a series each, later ones share "other"."""
        labelled = self._users_labelled
        for report in reports:
            for user, (up, down) in report.users.items():
                label = user
                if user not in labelled:
                    if len(labelled) < most:
                        labelled.add(user)
                    else:
                        label = "other"
                if up:
                    self._child(self.user_bytes, label, "up").inc(up)
                if down:
                    self._child(self.user_bytes, label, "down").inc(down)

    def parent_state(self, group: str, server: str, up: bool) -> None:
        self._child(self.parent_up, group, server).set(1 if up else 0)
        RECORDER.parents[group, server] = up

    def parent_failed(self, group: str, server: str) -> None:
        self._child(self.parent_failures, group, server).inc()

    def parent_gone(self, group: str, server: str) -> None:
        """A reload removed the parent: its up/down series goes (with workers, the
        value already written stays in the files until a restart)."""
        RECORDER.parents.pop((group, server), None)
        child = self._children.pop((id(self.parent_up), group, server), None)
        if child is not None:
            self.parent_up.remove(group, server)

    def parent_connections(self, group: str, server: str, change: int) -> None:
        self._child(self.parent_active, group, server).inc(change)

    def auth_failed(self, locked_out: bool) -> None:
        self.auth_failures.inc()
        if locked_out:
            self.lockouts.inc()

    # -- exposition ------------------------------------------------------------------

    def count_tasks(self) -> None:
        """Record this process's asyncio tasks (at each scrape it answers, and every few
        seconds, for the workers that do not answer it)."""
        self.tasks.set(len(asyncio.all_tasks()))

    def render(self) -> bytes:
        """The text exposition; reads every worker's files in multiprocess mode."""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        registry = self._registry
        if registry is None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        data: bytes = generate_latest(registry)
        return data


class Meter:
    """One connection in the metrics: counted open from its protocol's detection, its
    traffic told as it grows (`update`, every few seconds and at the end), to the
    metrics and to the status page's recorder, by the connection's user and client
    address. What was told is kept on the connection (`metered`), so that its
    access line adds only what was not."""

    __slots__ = ("_conn", "_metrics", "_protocol")

    def __init__(self, metrics: Metrics, protocol: str, conn: Metered) -> None:
        self._metrics = metrics
        self._protocol = protocol
        self._conn = conn
        metrics.opened(protocol)

    def handshake_done(self, seconds: float) -> None:
        self._metrics.handshake_done(self._protocol, seconds)

    def update(self, usage: tuple[int, int, int, int]) -> None:
        """Bytes up and down, datagrams up and down so far: what is new is recorded."""
        conn = self._conn
        told = conn.metered
        if usage != told:
            self._metrics.relayed(*(n - b for n, b in zip(usage, told, strict=True)))
            up, down = usage[0] - told[0], usage[1] - told[1]
            if up or down:
                RECORDER.traffic(conn.user, conn.peer_ip, up, down)
            conn.metered = usage


def reload_counter() -> Any:
    """proxyd_config_reloads_total for the supervisor of workers, which checks every
    reload once, in the multiprocess files the workers' scrapes read."""
    from prometheus_client import Counter

    return Counter(*RELOADS, ["result"], registry=None)


def forget_process(pid: int) -> None:
    """A worker is gone: its live gauges (open connections) stop counting. Its
    counters stay, so totals never go backwards."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


class AdminServer:
    """The admin listener: GET /metrics, /healthz, and the status page (/ and
    /status.json) over HTTP/1.1 (h11)."""

    def __init__(
        self,
        metrics: Metrics,
        healthy: Callable[[], bool],
        about: Callable[[], status.About],
    ) -> None:
        self.metrics = metrics
        self.healthy = healthy
        self.about = about  # the daemon's facts for the status page, as they are now
        self._server: asyncio.Server | None = None
        self._publishing: asyncio.Future[None] | None = None  # a snapshot being written
        # the status page's answers, by path: made at most once a second, and shared by
        # every request that asks meanwhile (a snapshot costs the loop milliseconds)
        self._answers: dict[bytes, tuple[float, asyncio.Future[bytes]]] = {}
        # open connections, oldest first: a new one beyond the cap closes the oldest,
        # so clients that connect and stall cannot lock the scrapers out
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._serve, sock=sock)

    def publish(self) -> None:
        """With workers: leave this worker's status snapshot where the others read it
        (every few seconds, from the server's tick); written in a thread."""
        directory = status.shared_dir()
        if directory is None or not self.about().enabled:
            return
        if self._publishing is not None and not self._publishing.done():
            return  # the last one is still being written: skip one
        snapshot = RECORDER.snapshot()
        loop = asyncio.get_running_loop()
        self._publishing = loop.run_in_executor(None, status.write, directory, snapshot)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = list(self._clients)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= ADMIN_MAX_CONNECTIONS:
            oldest = next(iter(self._clients))
            self._clients.pop(oldest).transport.abort()
        self._clients[task] = writer
        try:
            await self._conversation(reader, writer)
        except (OSError, TimeoutError, h11.ProtocolError):
            pass  # a scraper that went away, stalled or spoke nonsense: nothing to tell it
        except asyncio.CancelledError:
            pass  # closing: the task ends here (a cancelled one would be logged on 3.11)
        finally:
            self._clients.pop(task, None)
            writer.transport.abort()

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=ADMIN_MAX_REQUEST)
        # each request, from its first byte to its answer sent, within ADMIN_TIMEOUT
        async with asyncio.timeout(ADMIN_TIMEOUT) as deadline:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Request):
                    status, body, kind = await self._answer(event)
                    headers = [("Content-Type", kind), ("Content-Length", str(len(body)))]
                    if kind.startswith("text/html"):
                        headers += PAGE_HEADERS
                    writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
                    if event.method != b"HEAD":
                        writer.write(conn.send(h11.Data(data=body)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    if conn.our_state is not h11.DONE:  # HTTP/1.0 or "Connection: close"
                        return
                elif isinstance(event, h11.ConnectionClosed):
                    return
                elif conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()  # the request's end: ready for the next one
                    deadline.reschedule(asyncio.get_running_loop().time() + ADMIN_TIMEOUT)

    async def _answer(self, request: h11.Request) -> tuple[int, bytes, str]:
        text = "text/plain; charset=utf-8"
        if request.method not in (b"GET", b"HEAD"):
            return 405, USAGE, text
        path = request.target.split(b"?", 1)[0]
        if path == b"/" or path == b"/status.json":
            about = self.about()
            if not about.enabled:
                return 404, b"the status page is off ([metrics] status_page = false)\n", text
            if not _asked_by_address(request):
                return 421, NOT_BY_NAME, text
            body = await self._status_answer(path, about)
            return 200, body, "text/html; charset=utf-8" if path == b"/" else "application/json"
        if path == b"/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            # the multiprocess files are read off the loop
            with contextlib.suppress(OSError):  # a full disk (multiprocess files)
                self.metrics.count_tasks()  # here: the rendering thread has no loop
            return 200, await asyncio.to_thread(self.metrics.render), CONTENT_TYPE_LATEST
        if path == b"/healthz":
            if self.healthy():
                return 200, b"ok\n", text
            return 503, b"draining\n", text
        return 404, USAGE, text

    def _status_answer(self, path: bytes, about: status.About) -> asyncio.Future[bytes]:
        """The page or its JSON: the one made within the last STATUS_FRESH seconds (or
        being made), else a new one: this worker's share now, then, off the loop, the
        other workers' files read and the answer rendered."""
        loop = asyncio.get_running_loop()
        made = self._answers.get(path)
        if made is not None and loop.time() - made[0] < STATUS_FRESH:
            return asyncio.shield(made[1])
        live = RECORDER.snapshot()
        render = _status_page if path == b"/" else _status_json
        answer = asyncio.ensure_future(asyncio.to_thread(render, live, about))
        self._answers[path] = (loop.time(), answer)
        return asyncio.shield(answer)


STATUS_FRESH: Final = 1.0  # seconds a status answer is served again

USAGE: Final = b"GET /metrics, /healthz, / (status page) or /status.json\n"
# the status page loads nothing and runs nothing: should a name ever slip through
# unescaped, the browser still runs no script from it
PAGE_HEADERS: Final = [
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
]


NOT_BY_NAME: Final = (
    b"the status page answers requests for an IP address or localhost, not a name: "
    b"a page another site's name points at us could read it (DNS rebinding)\n"
)


def _asked_by_address(request: h11.Request) -> bool:
    """Whether the request's Host is an IP literal or `localhost` (or it has none): a
    browser sent here by a name could have been sent by a site whose name was made
    to resolve to this address, and would let that site's script read user names
    and client addresses (Syncthing's GUI guards the same way)."""
    host = next((value for name, value in request.headers if name == b"host"), None)
    if host is None:
        return True  # (a browser always sends one)
    match = _HOST.fullmatch(host.decode("ascii", "replace"))
    if match is None:
        return False
    name = match["v6"] or match["name"]
    if name.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# host[:port] with a digits-only port; an IPv6 literal in brackets, no zone
_HOST: Final = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]]+))(?::[0-9]{1,5})?")


def _status_report(live: dict[str, Any], about: status.About) -> dict[str, Any]:
    return status.report(status.gather(live, status.shared_dir()), about)


def _status_page(live: dict[str, Any], about: status.About) -> bytes:
    return status_page.render(_status_report(live, about))


def _status_json(live: dict[str, Any], about: status.About) -> bytes:
    return json.dumps(_status_report(live, about), separators=(",", ":")).encode() + b"\n"
