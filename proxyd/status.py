"""What the live status page shows: this process's last five minutes, second by
second, and the merge of every worker's share.

One `Recorder` per process (`RECORDER`) keeps a ring of per-second buckets: the
connections that came, the bytes relayed in all and by user and by client
address, and the access lines' refusals by status. The metrics feed it
(`proxyd.metrics`: connections opened, the bytes of tunnels and UDP as they
grow) and so does every access line (its status, and the bytes the metrics did
not see: forwarded requests'). Each event costs a clock read and a few dict
increments; a bucket keeps at most `KEEP` users and `KEEP` client addresses, the
rest is folded into "other".

With workers, each one writes its snapshot as a JSON file into a directory the
supervisor makes (`DIR_ENV`) every few seconds, and the worker that answers a
request merges its live snapshot with the others' files (`gather`); the
supervisor removes the file of a worker that ended.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from proxyd import __version__, files

WINDOW: Final = 300  # seconds the page looks back
KEEP: Final = 100  # distinct users (and client addresses) per second; more go to "other"
PUBLISH_KEEP: Final = 200  # users (and clients) a worker's snapshot names; more go to "other"
TOP: Final = 10  # users and clients the report lists
DIR_ENV: Final = "PROXYD_STATUS_DIR"  # where workers leave their snapshots
STALE: Final = 30.0  # seconds after which a worker's file no longer counts (a stuck worker)
# statuses of connections served, or ended by the client or the daemon: no refusal
SERVED: Final = frozenset({"ok", "client_closed", "idle_timeout", "reset", "shutdown"})


class Metered(Protocol):
    """What the recorder reads of a connection (proxyd.context.Conn)."""

    user: str | None
    peer_ip: str
    metered: tuple[int, int, int, int]  # bytes up and down, datagrams, the metrics were told


class _Second:
    """One second's counts."""

    __slots__ = (
        "clients",
        "clients_other",
        "connections",
        "down",
        "refusals",
        "second",
        "up",
        "users",
        "users_other",
    )

    def __init__(self, second: int) -> None:
        self.second = second
        self.connections = 0
        self.up = 0
        self.down = 0
        self.refusals: dict[str, int] = {}
        self.users: dict[str, int] = {}  # "" for clients without a user
        self.users_other = 0
        self.clients: dict[str, int] = {}
        self.clients_other = 0


class Recorder:
    """This process's last WINDOW seconds, the connections open now by protocol and
    the parent proxies' state."""

    def __init__(self) -> None:
        self.started = time.time()  # (before the fork: the daemon's start, in every worker)
        self._ring = [_Second(-1) for _ in range(WINDOW)]
        self._now = self._ring[0]
        self.active: dict[str, int] = {}
        self.parents: dict[tuple[str, str], bool] = {}  # (group, server) -> up

    def _bucket(self) -> _Second:
        second = int(time.time())
        bucket = self._now
        if bucket.second != second:
            bucket = self._ring[second % WINDOW]
            if bucket.second != second:
                bucket = self._ring[second % WINDOW] = _Second(second)
            self._now = bucket
        return bucket

    # -- what the metrics and the access lines tell ----------------------------------------

    def opened(self, protocol: str) -> None:
        """A connection's protocol was detected: it counts as open, and as one more."""
        self.active[protocol] = self.active.get(protocol, 0) + 1
        self._bucket().connections += 1

    def closed(self, protocol: str | None, *, active: bool) -> None:
        """A connection ended; one `opened` never counted came and went."""
        if active and protocol is not None:
            self.active[protocol] = self.active.get(protocol, 0) - 1
        else:
            self._bucket().connections += 1

    def traffic(self, user: str | None, client: str, up: int, down: int) -> None:
        bucket = self._bucket()
        bucket.up += up
        bucket.down += down
        both = up + down
        bucket.users_other += _count(bucket.users, user or "", both)
        bucket.clients_other += _count(bucket.clients, client, both)

    def logged(self, conn: Metered, status: str, user: str | None, up: int, down: int) -> None:
        """An access line: a refusal counts; bytes the metrics were not told count too
        (a forwarded request's, which no meter sees; a tunnel's were, as they grew)."""
        if status not in SERVED:
            refusals = self._bucket().refusals
            refusals[status] = refusals.get(status, 0) + 1
        told = conn.metered
        up -= told[0]
        down -= told[1]
        if up > 0 or down > 0:
            self.traffic(user, conn.peer_ip, max(up, 0), max(down, 0))

    # -- reading ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """This process's share, JSON-ready: what a worker's file holds."""
        now = int(time.time())
        series: list[list[int]] = []
        refusals: dict[str, int] = {}
        users: dict[str, int] = {}
        clients: dict[str, int] = {}
        users_other = clients_other = 0
        for bucket in self._ring:
            if not now - WINDOW < bucket.second <= now:
                continue
            series.append([bucket.second, bucket.connections, bucket.up, bucket.down])
            _add(refusals, bucket.refusals)
            _add(users, bucket.users)
            _add(clients, bucket.clients)
            users_other += bucket.users_other
            clients_other += bucket.clients_other
        users, more_users = _top(users, PUBLISH_KEEP)
        clients, more_clients = _top(clients, PUBLISH_KEEP)
        return {
            "pid": os.getpid(),
            "time": time.time(),
            "started": self.started,
            "active": {p: n for p, n in self.active.items() if n},
            "series": sorted(series),
            "refusals": refusals,
            "users": users,
            "users_other": users_other + more_users,
            "clients": clients,
            "clients_other": clients_other + more_clients,
            "parents": [[g, s, up] for (g, s), up in sorted(self.parents.items())],
        }


def _count(counts: dict[str, int], key: str, n: int) -> int:
    """Add `n` to `key`'s count when it has one or there is room for it (KEEP);
    what did not fit, for "other"."""
    if key in counts:
        counts[key] += n
    elif len(counts) < KEEP:
        counts[key] = n
    else:
        return n
    return 0


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for key, n in counts.items():
        into[key] = into.get(key, 0) + n


def _top(counts: dict[str, int], keep: int) -> tuple[dict[str, int], int]:
    """The `keep` largest, and the sum of the rest."""
    if len(counts) <= keep:
        return counts, 0
    top = dict(heapq.nlargest(keep, counts.items(), key=lambda item: item[1]))
    return top, sum(counts.values()) - sum(top.values())


RECORDER: Final = Recorder()


# -- the workers' files --------------------------------------------------------------------


def shared_dir() -> Path | None:
    """Where workers leave their snapshots (None: one process, no workers)."""
    path = os.environ.get(DIR_ENV)
    return Path(path) if path else None


def write(directory: Path, snapshot: dict[str, Any]) -> None:
    """Leave `snapshot` as this worker's file, replaced whole (a reader never sees
    half of one). Blocking: run in a thread. A full disk skips one update."""
    with contextlib.suppress(OSError):
        data = json.dumps(snapshot, separators=(",", ":")).encode()
        files.replace(directory / f"{snapshot['pid']}.json", data)


def forget_process(pid: int) -> None:
    """A worker ended: its share leaves the page (the supervisor calls this)."""
    directory = shared_dir()
    if directory is not None:
        with contextlib.suppress(OSError):
            (directory / f"{pid}.json").unlink()


def _others(directory: Path, own: int) -> list[dict[str, Any]]:
    """The other workers' latest snapshots: not of one gone or silent for STALE."""
    found = []
    now = time.time()
    for path in directory.glob("*.json"):
        if path.stem == str(own):
            continue
        try:
            # a worker gone before the supervisor removed its file: ProcessLookupError
            os.kill(int(path.stem), 0)
            snapshot = json.loads(path.read_bytes())
            if now - snapshot["time"] < STALE:
                found.append(snapshot)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # gone, a file going away as it is read, or not one of ours
    return found


def gather(live: dict[str, Any], directory: Path | None) -> list[dict[str, Any]]:
    """This worker's live snapshot and the others' files. Blocking: run in a thread."""
    return [live, *(_others(directory, live["pid"]) if directory is not None else [])]


# -- the report ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class About:
    """The daemon's facts the report names besides the counts."""

    workers: int
    listeners: list[str]
    enabled: bool  # `[metrics] status_page`
    # `[[quotas]]` and what the users under one used of it this period (None: no quotas)
    quotas: dict[str, Any] | None = None


def report(snapshots: list[dict[str, Any]], about: About) -> dict[str, Any]:
    """What /status.json answers: the snapshots summed (README lists the keys)."""
    now = time.time()
    start = int(now) - WINDOW + 1
    connections, up, down = [0] * WINDOW, [0] * WINDOW, [0] * WINDOW
    active: dict[str, int] = {}
    refusals: dict[str, int] = {}
    users: dict[str, int] = {}
    clients: dict[str, int] = {}
    users_other = clients_other = 0
    parents: dict[tuple[str, str], bool] = {}
    for snap in snapshots:
        for second, conns, b_up, b_down in snap["series"]:
            if 0 <= second - start < WINDOW:
                connections[second - start] += conns
                up[second - start] += b_up
                down[second - start] += b_down
        _add(active, snap["active"])
        _add(refusals, snap["refusals"])
        _add(users, snap["users"])
        _add(clients, snap["clients"])
        users_other += snap["users_other"]
        clients_other += snap["clients_other"]
        for group, server, is_up in snap["parents"]:
            # down when any worker has it out, as proxyd_upstream_up says
            parents[group, server] = parents.get((group, server), True) and is_up
    top_users, more_users = _top(users, TOP)
    top_clients, more_clients = _top(clients, TOP)
    groups: dict[str, list[dict[str, Any]]] = {}
    for (group, server), is_up in sorted(parents.items()):
        groups.setdefault(group, []).append({"server": server, "up": is_up})
    started = min((snap["started"] for snap in snapshots), default=now)
    return {
        "version": __version__,
        "time": round(now, 3),
        "uptime_s": round(now - started),
        "workers": about.workers,
        "workers_reporting": len(snapshots),
        "listeners": about.listeners,
        "window_s": WINDOW,
        "active": dict(sorted(active.items())),
        "active_total": sum(active.values()),
        "connections": sum(connections),
        "bytes_up": sum(up),
        "bytes_down": sum(down),
        "series": {
            "start": start,
            "connections": connections,
            "bytes_up": up,
            "bytes_down": down,
        },
        "top_users": [
            {"user": user or None, "bytes": n}
            for user, n in sorted(top_users.items(), key=lambda item: -item[1])
        ],
        "other_users_bytes": users_other + more_users,
        "top_clients": [
            {"client": client, "bytes": n}
            for client, n in sorted(top_clients.items(), key=lambda item: -item[1])
        ],
        "other_clients_bytes": clients_other + more_clients,
        "refusals": dict(sorted(refusals.items(), key=lambda item: (-item[1], item[0]))),
        "upstreams": [{"group": g, "servers": servers} for g, servers in groups.items()],
        "quotas": about.quotas,
    }
