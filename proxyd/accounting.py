"""Traffic per user, per period, and the quotas on it: what one process counts.

Every byte a user's tunnels, forwarded requests and datagrams move is charged as it
is read to the user's `Account` in this process: the relay asks how much it may
still read (`room`; with workers, `allowance`: this worker's grant of it), a
forwarded head or body and a datagram are charged as they pass. A quota caps an
account: a user over it is refused new requests (proxyd.gate), a tunnel that
reaches it is cut, a datagram beyond it dropped.

Each process's `Ledger` reports what its accounts counted since it last did
(`report`, four times a second) and learns back the totals of users with a quota,
and its grants of them (`learn`). The totals have one owner (proxyd.books), the
daemon itself or with workers the supervisor; proxyd.keepers carries the reports
and the totals between them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from proxyd.periods import Period

UP: Final = 0
DOWN: Final = 1
UNLIMITED: Final = 1 << 62
# how often a process reports its counts and learns the totals back (seconds)
REPORT_INTERVAL: Final = 0.25
# users per message between a worker and the supervisor (one datagram each)
CHUNK: Final = 200  # (a name is at most 255 bytes: a message stays well within 200 KB)
# With workers, what one worker may move of a user's remaining quota before it learns
# what the others moved: its share of it, and at least this much (so that the last
# bytes are not held back share by share).
MIN_LEASE: Final = 65536
KEPT_GRANTS: Final = 16  # grants remembered per worker until it applies them

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
