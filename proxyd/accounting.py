"""Traffic per user, per period, and the quotas on it.

Every byte a user's tunnels, forwarded requests and datagrams move is charged as it
is read to the user's `Account` in this process: the relay asks how much it may
still read (`room`), a forwarded body and a datagram are charged as they pass. The
counts are those of the access line's `bytes_up` and `bytes_down`. A quota caps an
account: a user over it is refused new requests (proxyd.gate), a tunnel that reaches
it is cut, a datagram beyond it dropped.

The totals have one owner, `Books`: the daemon itself, or with workers the
supervisor, which sums what every worker counted. Each process's `Ledger` reports
what its accounts counted since it last did (`report`, a few times a second) and
learns the totals of users with a quota back (`learn`), so that every worker knows
what the others used within about a second. The books are saved in the state file
(JSON, replaced whole) every `accounting.save_interval` seconds and when the daemon
stops; a lock file beside it holds the owner's pid, so that `proxyd quota` knows
whether a daemon owns the file and which one to ask for a reset.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from proxyd import files
from proxyd.errors import ConfigError
from proxyd.periods import Period

UP: Final = 0
DOWN: Final = 1
UNLIMITED: Final = 1 << 62
DEFAULT_STATE_DIR: Final = Path("/var/lib/proxyd")
STATE_FILE_NAME: Final = "accounting.json"
STATE_VERSION: Final = 1
# how often a process reports its counts and learns the totals back (seconds)
REPORT_INTERVAL: Final = 0.25
# users per message between a worker and the supervisor (one datagram each)
CHUNK: Final = 200  # (a name is at most 255 bytes: a message stays well within 200 KB)
# With workers, what one worker may move of a user's remaining quota before it learns
# what the others moved: its share of it, and at least this much (so that the last
# bytes are not held back share by share).
MIN_LEASE: Final = 65536
KEPT_GRANTS: Final = 16  # grants remembered per worker until it applies them
# a reset asked of a running daemon: a file named so in the state file's directory
RESET_SUFFIX: Final = ".reset"
MAX_REQUEST: Final = 1024  # bytes a reset request may hold (a user name)

_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(value: object) -> int:
    """A byte count: an integer, or a string with a unit ("10GiB", "500 MB", "1.5TiB")."""
    if type(value) is int:
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"must be a byte count (10737418240, or with a unit: '10GiB'), not {value!r}"
        )
    match = _SIZE.fullmatch(value)
    unit = match and _UNITS.get(match.group(2).lower())
    if match is None or unit is None:
        raise ValueError(
            f"{value!r} is not a size (a number and one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(float(match.group(1)) * unit)


def format_size(n: int) -> str:
    """A byte count for people: 1.5 GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# -- quotas --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Quota:
    """One `[[quotas]]` table: how much its users may move per period, both ways
    together (`total`) and each way; None is no limit. The first table naming a user
    (or "*") is that user's."""

    index: int
    users: frozenset[str] | None  # None: every user ("*")
    total: int | None
    up: int | None
    down: int | None

    def applies(self, user: str) -> bool:
        return self.users is None or user in self.users

    def reached(self, up: int, down: int) -> bool:
        """Whether a limit is reached by these counts."""
        return (
            (self.total is not None and up + down >= self.total)
            or (self.up is not None and up >= self.up)
            or (self.down is not None and down >= self.down)
        )

    def share(self, up: int, down: int) -> float:
        """How much of the tightest limit these counts use (1.0: reached), to 4 places."""
        caps = ((up + down, self.total), (up, self.up), (down, self.down))
        return round(max((used / cap for used, cap in caps if cap), default=0.0), 4)

    def describe(self) -> str:
        parts = [
            f"{format_size(n)}{what}"
            for n, what in ((self.total, ""), (self.up, " up"), (self.down, " down"))
            if n is not None
        ]
        return ", ".join(parts)


def parse_quotas(value: Any, problems: list[str]) -> tuple[Quota, ...]:
    """`[[quotas]]` tables, each problem named by its key path."""
    if not isinstance(value, list):
        problems.append("quotas: must be an array of tables ([[quotas]])")
        return ()
    found = []
    for index, table in enumerate(value):
        path = f"quotas[{index}]"
        if not isinstance(table, Mapping):
            problems.append(f"{path}: must be a table")
            continue
        unknown = set(table) - {"users", "bytes", "up", "down"}
        for key in sorted(unknown):
            problems.append(f"{path}.{key}: unknown key (known: users, bytes, up, down)")
        users = _quota_users(table.get("users"), f"{path}.users", problems)
        if users is _INVALID:
            continue
        limits: dict[str, int | None] = {}
        for key in ("bytes", "up", "down"):
            raw = table.get(key)
            limits[key] = None
            if raw is not None:
                try:
                    limits[key] = parse_size(raw)
                except ValueError as exc:
                    problems.append(f"{path}.{key}: {exc}")
        if all(table.get(key) is None for key in ("bytes", "up", "down")):
            problems.append(f"{path}: set bytes, up or down (the limit)")
        found.append(Quota(index, users, limits["bytes"], limits["up"], limits["down"]))
    return tuple(found)


_INVALID: Final = object()


def _quota_users(value: Any, path: str, problems: list[str]) -> Any:
    """A quota's users: a set of names, None for "*" (everyone), or _INVALID."""
    if value == "*" or value == ["*"]:
        return None
    if isinstance(value, list) and value and all(isinstance(u, str) and u for u in value):
        if "*" in value:
            problems.append(f'{path}: "*" stands alone (every user), not in a list of names')
            return False
        return frozenset(value)
    problems.append(f'{path}: must be a list of user names, or "*" for every user')
    return _INVALID


def quota_for(quotas: Iterable[Quota], user: str) -> Quota | None:
    return next((q for q in quotas if q.applies(user)), None)


# -- one user's account, in one process -------------------------------------------------


def first_grant(cap: int, shares: int) -> int:
    """What each worker may move of a quota's dimension before the supervisor grants
    it anything: the same on both sides, and no more than the quota in all."""
    return min(MIN_LEASE, cap // shares)


def dimensions(limit: Quota) -> tuple[int | None, int | None, int | None]:
    """A quota's caps by dimension: both ways together, up, down."""
    return (limit.total, limit.up, limit.down)


class Account:
    """What one user moved this period, as this process knows it: its own counts,
    and (learnt from the books) everyone else's. `used` is [up, down]; `mark` the
    part of it the books know or were sent.

    With workers (`shares` > 1), a worker may move only what the supervisor granted
    it of the quota (`allowance`: `granted`, by dimension, against `own`, what this
    worker moved this period), so that the workers together never pass the quota
    whatever each knows of the others; `room` 0 (the quota reached) is known only
    from the totals."""

    __slots__ = ("granted", "limit", "mark", "own", "shares", "starved", "used", "user")

    def __init__(self, user: str, limit: Quota | None, shares: int = 1) -> None:
        self.user = user
        self.limit = limit
        self.shares = shares
        self.used = [0, 0]
        self.mark = [0, 0]
        self.own = [0, 0]
        self.granted: list[int] | None = None  # by dimension; None: the first grant
        self.starved = False  # its grant held it back since the last report: it wants more

    def room(self, side: int) -> int:
        """Bytes that may still move this way before a limit is reached."""
        limit = self.limit
        if limit is None:
            return UNLIMITED
        used = self.used
        left = UNLIMITED if limit.total is None else limit.total - used[UP] - used[DOWN]
        one_way = limit.up if side == UP else limit.down
        if one_way is not None:
            left = min(left, one_way - used[side])
        return max(left, 0)

    def allowance(self, side: int) -> int:
        """Bytes this process may move this way now: the room without workers; with
        them, what is left of this worker's grant (0 until the supervisor grants more)."""
        limit = self.limit
        if limit is None:
            return UNLIMITED
        left = self.room(side)
        if self.shares == 1:
            return left
        own = self.own
        spent = (own[UP] + own[DOWN], own[UP], own[DOWN])
        for dim, cap in enumerate(dimensions(limit)):
            if cap is None or dim == 1 + (1 - side):  # (the other direction's own cap)
                continue
            granted = first_grant(cap, self.shares) if self.granted is None else self.granted[dim]
            if granted - spent[dim] < left:
                left = granted - spent[dim]
                self.starved = True
        return max(left, 0)

    def charge(self, side: int, n: int) -> None:
        self.used[side] += n
        self.own[side] += n

    @property
    def exhausted(self) -> bool:
        """A limit is reached: new requests are refused."""
        return self.limit is not None and (self.room(UP) == 0 or self.room(DOWN) == 0)


# -- this process's accounts -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    """What one process counted since its last report (number `seq`), for one
    period (`start`), and the last grants it applied (`gen`); and, with `seq` the
    last report counted, what the supervisor says back (`Totals`, number `gen`, in
    parts of which the last is `final`): the period's totals of the users with a
    quota, and what the worker may move of each one's (`grants`, by dimension)."""

    seq: int
    start: float
    users: dict[str, tuple[int, int]]
    grants: dict[str, list[int]] = field(default_factory=dict)
    gen: int = 0
    final: bool = True
    wants: list[str] = field(default_factory=list)  # users whose grant held it back

    def encode(self) -> bytes:
        msg = {
            "seq": self.seq,
            "start": self.start,
            "users": self.users,
            "grants": self.grants,
            "gen": self.gen,
            "final": self.final,
            "wants": self.wants,
        }
        return json.dumps(msg).encode()

    @classmethod
    def decode(cls, data: bytes) -> Report:
        msg = json.loads(data)
        users = {str(u): (int(v[0]), int(v[1])) for u, v in msg["users"].items()}
        grants = {str(u): [int(n) for n in v] for u, v in msg.get("grants", {}).items()}
        gen, final = int(msg.get("gen", 0)), bool(msg.get("final", True))
        wants = [str(u) for u in msg.get("wants", [])]
        return cls(int(msg["seq"]), float(msg["start"]), users, grants, gen, final, wants)

    @property
    def ack(self) -> int:
        return self.seq


# the books' answer has the same form: the reports up to `ack` are in its totals
Totals = Report


class Ledger:
    """This process's accounts for the current period."""

    def __init__(
        self,
        period: Period,
        quotas: tuple[Quota, ...],
        now: float | None = None,
        shares: int = 1,
    ) -> None:
        self.period = period
        self.quotas = quotas
        self.shares = shares  # the processes counting at once (server.workers)
        self.start, self.end = period.bounds(time.time() if now is None else now)
        self.accounts: dict[str, Account] = {}
        self._pending: dict[int, dict[str, tuple[int, int]]] = {}  # reports not yet counted
        self._seq = 0
        self.gen = 0  # the supervisor's grants applied last (told with each report)

    def account(self, user: str | None) -> Account | None:
        """The user's account (None for a client without a user)."""
        if user is None:
            return None
        account = self.accounts.get(user)
        if account is None:
            account = Account(user, quota_for(self.quotas, user), self.shares)
            self.accounts[user] = account
        return account

    def configure(self, quotas: tuple[Quota, ...]) -> None:
        """A reload: every account under its (new) quota."""
        self.quotas = quotas
        for account in self.accounts.values():
            account.limit = quota_for(quotas, account.user)

    def report(self, now: float | None = None) -> list[Report]:
        """What was counted since the last report, in messages of at most CHUNK users
        (none when nothing was); a period that ended is reported, then a new one begins."""
        new: dict[str, tuple[int, int]] = {}
        wants = []
        for user, account in self.accounts.items():
            if account.starved:
                account.starved = False
                wants.append(user)
            used, mark = account.used, account.mark
            if used != mark:
                new[user] = (used[UP] - mark[UP], used[DOWN] - mark[DOWN])
                account.mark = used.copy()
        reports = []
        names: list[str | None] = [*new] or [None]  # (an empty one still asks for the totals)
        for first in range(0, len(names), CHUNK):
            self._seq += 1
            part = {user: new[user] for user in names[first : first + CHUNK] if user is not None}
            self._pending[self._seq] = part
            reports.append(Report(self._seq, self.start, part, gen=self.gen, wants=wants))
            wants = []
        now = time.time() if now is None else now
        if now >= self.end:  # a new period: everyone starts from nothing
            self.start, self.end = self.period.bounds(now)
            self._pending.clear()
            for account in self.accounts.values():  # (in place: open tunnels hold them)
                account.used, account.mark, account.own = [0, 0], [0, 0], [0, 0]
                account.granted = None
            self.gen = 0
        return reports

    @property
    def seq(self) -> int:
        """The last report's number."""
        return self._seq

    def unreport(self, report: Report) -> None:
        """A report that could not be delivered: its counts are reported again."""
        self._pending.pop(report.seq, None)
        if report.start != self.start:
            return  # (a period that ended: its last counts are lost)
        for user, (up, down) in report.users.items():
            if (account := self.accounts.get(user)) is not None:
                account.mark[UP] -= up
                account.mark[DOWN] -= down

    def learn(self, totals: Totals) -> None:
        """The books' totals: reports up to `ack` are in them, the rest still count on
        top; for users not named, what is known stays."""
        for seq in [s for s in self._pending if s <= totals.ack]:
            del self._pending[seq]
        if totals.start != self.start:
            return  # another period's (the books or this process rolled over first)
        for user, (up, down) in totals.users.items():
            account = self.account(user)
            assert account is not None
            mark_up, mark_down = up, down
            for part in self._pending.values():
                if (sent := part.get(user)) is not None:
                    mark_up += sent[UP]
                    mark_down += sent[DOWN]
            used, mark = account.used, account.mark
            account.used = [mark_up + used[UP] - mark[UP], mark_down + used[DOWN] - mark[DOWN]]
            account.mark = [mark_up, mark_down]
        for user, granted in totals.grants.items():
            account = self.account(user)
            assert account is not None
            account.granted = granted
        if totals.final:  # (the supervisor holds us to the older grants until we say so)
            self.gen = max(self.gen, totals.gen)

    def quota_use(self) -> list[dict[str, Any]]:
        """Users with a quota and what they used of it, most used first (the status page)."""
        rows: list[dict[str, Any]] = []
        for account in self.accounts.values():
            if (limit := account.limit) is None:
                continue
            up, down = account.used
            rows.append(
                {
                    "user": account.user,
                    "up": up,
                    "down": down,
                    "bytes": limit.total,
                    "up_limit": limit.up,
                    "down_limit": limit.down,
                    "used": limit.share(up, down),
                }
            )
        rows.sort(key=lambda row: (-row["used"], row["user"]))
        return rows


# -- the owner of the totals ----------------------------------------------------------------


def state_path(configured: Path | None) -> Path:
    """`accounting.state_file`, or systemd's StateDirectory= (STATE_DIRECTORY), or
    /var/lib/proxyd."""
    if configured is not None:
        return configured
    directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return (Path(directory) if directory else DEFAULT_STATE_DIR) / STATE_FILE_NAME


def lock_path(state: Path) -> Path:
    return state.with_name(state.name + ".lock")


class StateInUse(Exception):
    """Another running daemon owns the state file."""


def take_lock(state: Path) -> int:
    """Own the state file: a lock file beside it, held while this process lives, with
    its pid in it. StateInUse when another process holds it; OSError when it cannot
    be made."""
    state.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock_path(state), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateInUse(f"{state} is in use by the daemon of pid {lock_owner(state)}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def lock_owner(state: Path) -> int | None:
    """The pid of the daemon that owns the state file now, or None when none does."""
    try:
        fd = os.open(lock_path(state), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def until(ts: float) -> str:
    """The end of a period, for people: "2027-01-01 00:00 UTC"."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _users(raw: Any) -> dict[str, list[int]]:
    return {str(u): [int(v["up"]), int(v["down"])] for u, v in dict(raw).items()}


def read_state(path: Path) -> dict[str, Any]:
    """The state file as saved (ConfigError when it cannot be read)."""
    try:
        state = json.loads(path.read_bytes())
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"version {state.get('version')!r}, not {STATE_VERSION}")
        state["users"] = _users(state.get("users", {}))
        previous = state.get("previous")
        if previous is not None:
            previous["users"] = _users(previous.get("users", {}))
        return dict(state)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError([f"{path}: not a proxyd accounting state file ({exc})"]) from None


class Books:
    """The totals of the current period (and the last), the owner's: added to by
    every process's reports, saved to the state file, reset per user on request."""

    def __init__(
        self,
        path: Path,
        period: Period,
        quotas: tuple[Quota, ...],
        log: Any,
        now: float | None = None,
    ) -> None:
        self.path = path
        self.period = period
        self.quotas = quotas
        self.log = log
        now = time.time() if now is None else now
        self.start, self.end = period.bounds(now)
        self.totals: dict[str, list[int]] = {}
        self.previous: dict[str, Any] | None = None  # {"start", "end", "users"}
        self.told: set[str] = set()  # users whose quota_exceeded was logged this period
        self.changed = False  # since the last save
        self._lock: int | None = None

    # -- the state file ----------------------------------------------------------------

    def open(self) -> None:
        """Own the state file and resume what it holds (StateInUse, OSError, ConfigError)."""
        self._lock = take_lock(self.path)
        for left in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # a write cut short
            left.unlink(missing_ok=True)
        try:
            state = read_state(self.path)
        except FileNotFoundError:
            return
        start, end = float(state["start"]), float(state["end"])
        if start == self.start:
            self.totals = state["users"]
            self.previous = state.get("previous")
        elif end <= self.start:  # saved in a period since ended: it is the last one now
            self.previous = {"start": start, "end": end, "users": state["users"]}
        else:  # the period was defined otherwise: what was counted carries on
            self.totals = state["users"]
            self.log.warning(
                "accounting_period_changed",
                saved_from=_iso(start),
                saved_until=_iso(end),
                now_from=_iso(self.start),
                now_until=_iso(self.end),
            )
        for user, (up, down) in self.totals.items():
            quota = quota_for(self.quotas, user)
            if quota is not None and quota.reached(up, down):
                self.told.add(user)  # logged in the run that counted it

    def save(self) -> None:
        """Replace the state file with the books (durable: it must outlive a power cut)."""
        self.write(self.encode())

    def write(self, data: bytes) -> None:
        """Blocking (a thread's work in a daemon's loop)."""
        files.replace(self.path, data, durable=True)

    def encode(self) -> bytes:
        """The state file's text; what changed since is in the next one."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "period": str(self.period),
            "start": self.start,
            "end": self.end,
            "start_iso": _iso(self.start),
            "end_iso": _iso(self.end),
            "saved": time.time(),
            "users": {u: {"up": v[UP], "down": v[DOWN]} for u, v in sorted(self.totals.items())},
        }
        if self.previous is not None:
            prev = self.previous
            state["previous"] = {
                "start": prev["start"],
                "end": prev["end"],
                "users": {
                    u: {"up": v[UP], "down": v[DOWN]} for u, v in sorted(prev["users"].items())
                },
            }
        self.changed = False
        return json.dumps(state, indent=1).encode() + b"\n"

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # -- counting ----------------------------------------------------------------------

    def add(self, report: Report, now: float | None = None) -> None:
        """One process's counts; a report of the period just ended goes to the last one."""
        now = time.time() if now is None else now
        if report.start > self.start or now >= self.end:
            self.roll(max(now, report.start))
        if report.start == self.start:
            totals = self.totals
        elif self.previous is not None and report.start == self.previous["start"]:
            totals = self.previous["users"]
        else:
            return  # of a period long gone
        for user, (up, down) in report.users.items():
            counts = totals.setdefault(user, [0, 0])
            counts[UP] += up
            counts[DOWN] += down
            if totals is self.totals:
                self._check(user, counts)
        self.changed = True

    def _check(self, user: str, counts: list[int]) -> None:
        """A user who reached a quota is logged once a period."""
        if user in self.told:
            return
        quota = quota_for(self.quotas, user)
        if quota is not None and quota.reached(*counts):
            self.told.add(user)
            self.log.warning(
                "quota_exceeded",
                user=user,
                quota=quota.index,
                limit=quota.describe(),
                bytes_up=counts[UP],
                bytes_down=counts[DOWN],
                period_end=_iso(self.end),
            )

    def roll(self, now: float) -> None:
        """A new period began: this one becomes the last, and counting starts anew."""
        if now < self.end:
            return
        self.previous = {"start": self.start, "end": self.end, "users": self.totals}
        self.start, self.end = self.period.bounds(now)
        self.totals = {}
        self.told = set()
        self.changed = True

    def configure(self, quotas: tuple[Quota, ...]) -> None:
        """A reload: users may now be over a new quota (told once), or no longer."""
        self.quotas = quotas
        still = set()
        for user in self.told:
            quota = quota_for(quotas, user)
            if quota is not None and quota.reached(*self.totals.get(user, [0, 0])):
                still.add(user)
        self.told = still

    def reset(self, user: str) -> bool:
        """The user starts this period anew; False if it had no count."""
        counts = self.totals.get(user)
        self.told.discard(user)
        if counts is None:
            return False
        self.totals[user] = [0, 0]  # (named in the totals: every worker learns it is 0)
        self.changed = True
        return True

    def totals_for(
        self, ack: int, grants: dict[str, list[int]] | None = None, gen: int = 0
    ) -> list[Totals]:
        """What a process learns: the totals of users with a quota (and its grants of
        them), in parts of CHUNK."""
        grants = grants or {}
        users = {
            u: (v[UP], v[DOWN])
            for u, v in self.totals.items()
            if quota_for(self.quotas, u) is not None
        }
        names = list(users)
        parts = []
        for i in range(0, len(names), CHUNK):
            part = names[i : i + CHUNK]
            given = {u: grants[u] for u in part if u in grants}
            parts.append(Totals(ack, self.start, {u: users[u] for u in part}, given, gen, False))
        if not parts:
            return [Totals(ack, self.start, {}, {}, gen)]
        last = parts[-1]
        parts[-1] = Totals(last.seq, last.start, last.users, last.grants, gen, True)
        return parts

    def take_resets(self, save: bool = True) -> list[str]:
        """Apply the resets `proxyd quota reset` left beside the state file: each
        request file is removed once applied (the CLI waits for that)."""
        done = []
        for request in sorted(self.path.parent.glob(f"{self.path.name}.*{RESET_SUFFIX}")):
            try:
                user = _read_request(request)
            except (OSError, ValueError) as exc:
                # left in place: the CLI that wrote it says it was not answered
                self.log.error("quota_reset_failed", request=str(request), error=str(exc))
                continue
            if user:
                had = self.reset(user)
                self.log.info("quota_reset", user=user, had_count=had)
                done.append(user)
            with contextlib.suppress(OSError):
                request.unlink()
        if done and save:
            self.save()
        return done


def _read_request(path: Path) -> str:
    """A reset request's user name: from a small regular file only, never waiting (a
    FIFO put there would stop the loop) and never through a symbolic link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = os.read(fd, MAX_REQUEST + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_REQUEST:
        raise ValueError(f"longer than {MAX_REQUEST} bytes")
    return data.decode("utf-8").strip()


def open_books(path: Path | None, period: Period, quotas: tuple[Quota, ...], log: Any) -> Books:
    """The books of the daemon that owns them (StateInUse, OSError, ConfigError)."""
    books = Books(state_path(path), period, quotas, log)
    books.open()
    return books


# -- between a process's ledger and the books -----------------------------------------


class Channel:
    """One end of a worker's datagram socket pair to the supervisor: reports go one
    way, totals the other, one message per datagram. Never blocks: a report the
    socket cannot take now is handed back (the ledger counts it again next time)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, 1 << 22)
        self.sock = sock

    def send(self, message: Report | Totals) -> bool:
        try:
            self.sock.send(message.encode())
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # the other end is gone
            return False
        return True

    def receive(self) -> list[bytes]:
        """Every datagram waiting now."""
        found: list[bytes] = []
        while True:
            try:
                data = self.sock.recv(1 << 22)
            except (BlockingIOError, InterruptedError):
                return found
            except OSError:
                return found
            if not data:
                return found
            found.append(data)

    def close(self) -> None:
        self.sock.close()


def channel_pair() -> tuple[Channel, Channel]:
    """The supervisor's end and a worker's end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    return Channel(ours), Channel(theirs)


class Owned:
    """A daemon without workers keeps the books itself."""

    def __init__(self, ledger: Ledger, books: Books) -> None:
        self.ledger = ledger
        self.books = books

    def exchange(self, reports: list[Report]) -> None:
        for report in reports:
            self.books.add(report)
        self.learn()

    def learn(self) -> None:
        for part in self.books.totals_for(self.ledger.seq):
            self.ledger.learn(part)


class Supervised:
    """A worker's side: its reports go to the supervisor's books, the totals come back."""

    def __init__(self, ledger: Ledger, channel: Channel) -> None:
        self.ledger = ledger
        self.channel = channel

    def exchange(self, reports: list[Report]) -> None:
        for report in reports:
            if not self.channel.send(report):
                self.ledger.unreport(report)
        self.learn()

    def learn(self) -> None:
        for data in self.channel.receive():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.ledger.learn(Totals.decode(data))


class Share:
    """One worker as the supervisor sees it: its channel, its last report, and for
    each user with a quota what it moved this period (`spent`: [up, down], as
    reported) and the grants sent to it (by number: each, by user, by dimension),
    of which it is bound by the last it applied (`applied`) and any sent since."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.last = 0  # the last report's number
        self.start = 0.0  # the period of `spent` and the grants
        self.spent: dict[str, list[int]] = {}
        self.active: set[str] = set()  # users it moved bytes of since the last grants
        self.gen = 0  # the grants sent last
        self.applied = 0  # the grants it said it applied (0: the first grants)
        self.sent: dict[int, dict[str, list[int]]] = {0: {}}

    def count(self, books: Books, report: Report) -> None:
        books.add(report)
        self.last = report.seq
        self.roll(books.start)
        if report.start != books.start:
            return  # (the last period's: its grants are gone, its counts in the books)
        if report.gen > self.applied:  # older grants bind it no more
            self.applied = report.gen
            self.sent = {g: v for g, v in self.sent.items() if g >= report.gen}
        for user, (up, down) in report.users.items():
            spent = self.spent.setdefault(user, [0, 0])
            spent[UP] += up
            spent[DOWN] += down
            if up or down:
                self.active.add(user)
        self.active.update(report.wants)

    def remember(self, grants: dict[str, list[int]]) -> dict[str, list[int]]:
        """The grants to send now, in force (with every one sent since the last it
        applied) until it says it applied a later one. A worker that has not said so
        for KEPT_GRANTS rounds gets the last ones again, not new ones."""
        if len(self.sent) >= KEPT_GRANTS:
            return self.sent[self.gen]
        self.gen += 1
        self.sent[self.gen] = grants
        return grants

    def roll(self, start: float) -> None:
        """A new period: nothing spent, only the first grants (as the worker starts over)."""
        if self.start != start:
            self.start = start
            self.spent.clear()
            self.active.clear()
            self.gen = self.applied = 0
            self.sent = {0: {}}

    def bound(self, user: str, firsts: list[int]) -> list[int]:
        """The most it may move of the user's quota, by dimension: the largest grant
        that may still be in force."""
        bounds = [self.sent[g].get(user, firsts) for g in self.sent] or [firsts]
        return [max(b[dim] for b in bounds) for dim in range(3)]

    def spent_by_dimension(self, user: str) -> list[int]:
        up, down = self.spent.get(user, [0, 0])
        return [up + down, up, down]


def grant(books: Books, shares: list[Share], workers: int) -> dict[int, dict[str, list[int]]]:
    """Each worker's next grants (by index in `shares`): for every user with a quota,
    what it may move, over what it moved, by dimension. What is left of the quota is
    split between the workers that moved the user's bytes lately (the others keep a
    quarter share, for a client that comes to them), and a grant sent counts as taken
    until the worker says it applied a lower one: whatever each worker knows of the
    others, together they never pass the quota."""
    grants: dict[int, dict[str, list[int]]] = {i: {} for i in range(len(shares))}
    for user, (up, down) in books.totals.items():
        quota = quota_for(books.quotas, user)
        if quota is None:
            continue
        counted = (up + down, up, down)
        caps = dimensions(quota)
        firsts = [0 if cap is None else first_grant(cap, workers) for cap in caps]
        given = [list(firsts) for _ in shares]
        active = [user in share.active for share in shares]
        for dim, cap in enumerate(caps):
            if cap is None:
                continue
            left = max(cap - counted[dim], 0)
            bounds = [share.bound(user, firsts)[dim] for share in shares]
            spent = [share.spent_by_dimension(user)[dim] for share in shares]
            free = left - sum(max(b - sp, 0) for b, sp in zip(bounds, spent, strict=True))
            idle = left // (4 * workers)
            if idle < MIN_LEASE:  # (near the end: all of it to those that want it)
                idle = 0
            busy = sum(active) or 1
            wanted = [(left - idle * (len(shares) - busy)) // busy if on else idle for on in active]
            for index, want in enumerate(wanted):
                new = spent[index] + max(want, 0)
                if new > bounds[index]:  # more than it may have now: from what is free
                    more = min(new - bounds[index], max(free, 0))
                    free -= more
                    new = bounds[index] + more
                given[index][dim] = new
        for index in grants:
            grants[index][user] = given[index]
    return grants


def serve_workers(books: Books, shares: list[Share], workers: int) -> None:
    """The supervisor's side: every worker's reports are added to the books, the
    grants worked out, and every worker learns the totals and its grants at once."""
    for share in shares:
        for data in share.channel.receive():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                share.count(books, Report.decode(data))
        share.roll(books.start)
    grants = grant(books, shares, workers)
    for index, share in enumerate(shares):
        sent = share.remember(grants[index])
        share.active.clear()
        for part in books.totals_for(share.last, sent, share.gen):
            share.channel.send(part)


# -- `proxyd quota` --------------------------------------------------------------------


def usage(
    state: dict[str, Any], quotas: tuple[Quota, ...], user: str | None
) -> list[dict[str, Any]]:
    """The state file's users (or the one asked for), each with its quota and the share
    of it used; users a quota names who moved nothing yet are listed with 0."""
    counts: dict[str, list[int]] = dict(state["users"])
    for quota in quotas:
        for name in quota.users or ():
            counts.setdefault(name, [0, 0])
    if user is not None:
        counts = {user: counts.get(user, [0, 0])}
    rows = []
    for name, (up, down) in sorted(counts.items()):
        limit = quota_for(quotas, name)
        row: dict[str, Any] = {"user": name, "up": up, "down": down, "bytes": up + down}
        if limit is not None:
            row.update(
                quota=limit.index,
                limit=limit.describe(),
                used=limit.share(up, down),
                exceeded=limit.reached(up, down),
            )
        rows.append(row)
    return rows


def reset_user(
    path: Path, period: Period, quotas: tuple[Quota, ...], user: str, log: Any, wait: float = 5.0
) -> int | None:
    """Start `user`'s count of this period anew: through the daemon that owns the state
    file (SIGUSR2 after a request file beside it, which it removes once applied; its
    pid is returned), or in the file itself when no daemon owns it (None). TimeoutError
    when the daemon does not answer within `wait` seconds."""
    books = Books(path, period, quotas, log)
    try:
        books.open()
    except StateInUse:
        pass
    else:
        try:
            was = path.stat() if path.exists() else None
            books.reset(user)
            books.save()
            if was is not None and os.geteuid() == 0:  # still the daemon's user's file
                os.chown(path, was.st_uid, was.st_gid)
        finally:
            books.close()
        return None
    owner = lock_owner(path)
    if not owner:
        raise StateInUse(f"{path} is locked by a process whose pid is not known")
    request = path.with_name(f"{path.name}.{os.getpid()}-{time.monotonic_ns()}{RESET_SUFFIX}")
    files.replace(request, user.encode(), mode=0o644)  # (a daemon of its own user reads it)
    try:
        os.kill(owner, signal.SIGUSR2)
        deadline = time.monotonic() + wait
        while request.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the daemon (pid {owner}) did not answer within {wait:g} s")
            time.sleep(0.05)
    finally:
        request.unlink(missing_ok=True)
    return owner
