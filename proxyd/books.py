"""The owner of the counts: the books of this period (and the last), their state
file and its lock, resets, and what `proxyd quota` reads and asks.

The books are the daemon's, or with workers the supervisor's, which sums what every
worker counted (proxyd.keepers). They are saved in the state file (JSON, replaced
whole) every `accounting.save_interval` seconds and when the daemon stops; a lock
file beside it holds the owner's pid, so that `proxyd quota` knows whether a daemon
owns the file and which one to ask for a reset.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import stat
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from proxyd import files
from proxyd.accounting import CHUNK, DOWN, UP, Quota, Report, Totals, quota_for
from proxyd.errors import ConfigError
from proxyd.periods import Period

DEFAULT_STATE_DIR: Final = Path("/var/lib/proxyd")
STATE_FILE_NAME: Final = "accounting.json"
STATE_VERSION: Final = 1
# a reset asked of a running daemon: a file named so in the state file's directory
RESET_SUFFIX: Final = ".reset"
MAX_REQUEST: Final = 1024  # bytes a reset request may hold (a user name)


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
