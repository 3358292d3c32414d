"""Credentials: the users file, salted scrypt hashes, and verification with a bounded cache.

A users file holds `user:$scrypt$ln=15,r=8,p=1$<salt>$<key>` lines written by
`proxyd passwd`. Verifying costs one scrypt derivation, run off the event loop
with hashlib's scrypt, which releases the GIL (cryptography's Scrypt gives the
same bytes but holds the GIL for the whole ~80 ms, stalling every tunnel);
successful verifications are remembered under an HMAC of the credentials with a
key random to this process, so a busy client does not pay the KDF per connection
and the cache never holds anything that reveals a password.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import secrets
import stat
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any, Final

from proxyd import files
from proxyd.errors import AuthFailed, ConfigError, LockedOut, OverLimit
from proxyd.protocols.common import Credentials

SCHEME: Final = "scrypt"
DEFAULT_LOG_N: Final = 15  # n = 2**15, r = 8: 32 MiB and ~80 ms per derivation
DEFAULT_R: Final = 8
DEFAULT_P: Final = 1
SALT_BYTES: Final = 16
KEY_BYTES: Final = 32
MAX_FIELD_BYTES: Final = 255  # SOCKS5 (RFC 1929) carries at most 255 bytes of each
MAX_KDF_MEMORY: Final = 256 * 1024 * 1024  # hashes asking for more are refused at load
MAX_PENDING_CHECKS: Final = 256  # distinct verifications queued at once, beyond: refused
MAX_THROTTLED_CLIENTS: Final = 65536  # client groups (or user names) whose failures are remembered
SLOTS: Final = 2  # derivations running at once (each takes a core for ~80 ms)
GROUP_RUNNING: Final = 2  # of them, at most this many for one client group
GROUP_QUEUE: Final = 16  # checks of one client group waiting; beyond, refused as a failure
MAX_EXEMPT_GROUPS: Final = 256  # client groups remembered per user as having logged in
DEFAULT_IPV6_PREFIX: Final = 64


def _kdf_memory(log_n: int, r: int) -> int:
    return 128 * r * (1 << log_n)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


@dataclass(frozen=True, slots=True)
class PasswordHash:
    log_n: int
    r: int
    p: int
    salt: bytes = field(repr=False)
    key: bytes = field(repr=False)

    @classmethod
    def parse(cls, encoded: str) -> PasswordHash:
        """Parse `$scrypt$ln=..,r=..,p=..$salt$key`; ValueError when it is not one."""
        parts = encoded.split("$")
        if len(parts) != 5 or parts[0] or parts[1] != SCHEME:
            raise ValueError("not a $scrypt$ hash")
        params = dict(item.partition("=")[::2] for item in parts[2].split(","))
        try:
            log_n, r, p = int(params["ln"]), int(params["r"]), int(params["p"])
            salt, key = _unb64(parts[3]), _unb64(parts[4])
        except (KeyError, ValueError) as exc:
            raise ValueError("malformed $scrypt$ parameters") from exc
        if not (1 <= log_n <= 24 and 1 <= r <= 32 and 1 <= p <= 16 and salt and key):
            raise ValueError("$scrypt$ parameters out of range")
        if _kdf_memory(log_n, r) > MAX_KDF_MEMORY:
            raise ValueError("$scrypt$ parameters need more than 256 MiB")
        return cls(log_n, r, p, salt, key)

    def encode(self) -> str:
        params = f"ln={self.log_n},r={self.r},p={self.p}"
        return f"${SCHEME}${params}${_b64(self.salt)}${_b64(self.key)}"

    def derive(self, password: str) -> bytes:
        return hashlib.scrypt(
            password.encode("utf-8"),
            salt=self.salt,
            n=1 << self.log_n,
            r=self.r,
            p=self.p,
            maxmem=2 * _kdf_memory(self.log_n, self.r),
            dklen=len(self.key),
        )

    def matches(self, password: str) -> bool:
        return hmac.compare_digest(self.derive(password), self.key)


def hash_password(password: str, *, log_n: int = DEFAULT_LOG_N) -> str:
    """A new salted scrypt hash of `password`, encoded for the users file."""
    salt = secrets.token_bytes(SALT_BYTES)
    draft = PasswordHash(log_n, DEFAULT_R, DEFAULT_P, salt, b"\0" * KEY_BYTES)
    return PasswordHash(log_n, DEFAULT_R, DEFAULT_P, salt, draft.derive(password)).encode()


def check_username(user: str) -> None:
    if not user or ":" in user or any(c in user for c in "\r\n\0"):
        raise ValueError("a user name must be non-empty and contain no ':' or line breaks")
    if len(user.encode("utf-8")) > MAX_FIELD_BYTES:
        raise ValueError(f"a user name must be at most {MAX_FIELD_BYTES} bytes")


def check_password(password: str) -> None:
    if not password:
        raise ValueError("the password is empty")
    if len(password.encode("utf-8")) > MAX_FIELD_BYTES:
        raise ValueError(f"a password must be at most {MAX_FIELD_BYTES} bytes (SOCKS5 limit)")


def load_users(path: Path) -> dict[str, PasswordHash]:
    """Parse a users file; problems name the line, never its content (it holds hashes)."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"auth.users_file: cannot read {path}: {exc}"]) from exc
    users: dict[str, PasswordHash] = {}
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        try:
            if not sep:
                raise ValueError("expected user:hash")
            check_username(user)
            users[user] = PasswordHash.parse(encoded)
        except ValueError as exc:
            problems.append(f"auth.users_file: {path} line {number}: {exc}")
    if problems:
        raise ConfigError(problems)
    return users


def is_world_readable(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IROTH)


def set_user(path: Path, user: str, password: str) -> None:
    """Add or replace `user` in the users file: atomic replace, mode 0600."""
    check_username(user)
    check_password(password)
    try:
        lines = path.read_text("utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    lines = [line for line in lines if line.partition(":")[0].strip() != user]
    lines.append(f"{user}:{hash_password(password)}")
    files.replace(path, ("\n".join(lines) + "\n").encode(), durable=True)


def _decoy(users: dict[str, PasswordHash]) -> PasswordHash:
    """A hash no password matches, standing in for unknown users so that they cost
    the same derivation as known ones: with the parameters most users' hashes have."""
    params = [(h.log_n, h.r, h.p) for h in users.values()]
    log_n, r, p = (DEFAULT_LOG_N, DEFAULT_R, DEFAULT_P)
    if params:
        log_n, r, p = max(set(params), key=params.count)
    salt, key = secrets.token_bytes(SALT_BYTES), secrets.token_bytes(KEY_BYTES)
    return PasswordHash(log_n, r, p, salt, key)


def client_group(ip: str, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """The key a client's failures and password checks are counted under: an IPv4
    address itself, an IPv6 address's network of `ipv6_prefix` bits (one host is
    commonly given a whole /64), an IPv4-mapped IPv6 address as its IPv4 address."""
    if ":" not in ip:  # IPv4, as the socket or a PROXY header gives it: itself
        return ip
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


class Throttle:
    """Failed logins per key (a client group, or a user name): `max_failures` of them
    within `window` seconds lock the key out for `lockout` seconds. Memory is bounded:
    at most MAX_THROTTLED_CLIENTS keys, the least recently failed forgotten first.

    Only known failures count: the Authenticator runs no more checks for a key than
    its `recent` failures leave before a lockout, so a burst of guesses gets no more
    answers than that, and a burst of right passwords is never taken for one."""

    def __init__(
        self,
        max_failures: int,
        window: float,
        lockout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._locked: dict[str, float] = {}  # key -> when its lockout ends

    def configure(self, max_failures: int, window: float, lockout: float) -> None:
        """New limits (a reload); failures counted so far and running lockouts stay."""
        self.max_failures, self.window, self.lockout = max_failures, window, lockout

    def locked(self, key: str) -> float:
        """Seconds left of the key's lockout; 0 when it may try."""
        until = self._locked.get(key)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left > 0:
            return left
        del self._locked[key]
        return 0.0

    def failed(self, key: str) -> bool:
        """Count one failure; True when it starts a lockout (report it, once)."""
        if not self.max_failures:
            return False
        return self._count(key, self._clock())

    def recent(self, key: str) -> int:
        """The failures counted for `key` within the window."""
        times = self._failures.get(key)
        if times is None:
            return 0
        since = self._clock() - self.window
        while times and times[0] <= since:
            times.popleft()
        return len(times)

    def _count(self, key: str, now: float) -> bool:
        times = self._failures.pop(key, None)
        if times is None:
            times = deque()
        times.append(now)
        self._failures[key] = times  # most recent last
        while len(self._failures) > MAX_THROTTLED_CLIENTS:
            self._failures.popitem(last=False)
        if self.locked(key):
            return False
        return self._lock_if(key, times, now)

    def _lock_if(self, key: str, times: deque[float], now: float) -> bool:
        """Lock `key` when `times` holds max_failures failures within the window."""
        while times and times[0] <= now - self.window:
            times.popleft()
        while len(times) > self.max_failures:  # more are never needed
            times.popleft()
        if len(times) < self.max_failures:
            return False
        if len(self._locked) >= MAX_THROTTLED_CLIENTS:  # drop the expired ones first
            self._locked = {k: t for k, t in self._locked.items() if t > now}
        self._locked[key] = now + self.lockout
        return True


@dataclass(slots=True)
class _Check:
    """One derivation wanted: queued for its group, then run on the executor; the
    sessions waiting for it (several with the same credentials) share it."""

    token: bytes
    group: str  # the client group that asked first, whose queue it waits in
    user: str
    target: PasswordHash = field(repr=False)
    password: str = field(repr=False)
    # the answer: right (True: for a user that exists) or wrong; None: dropped, never
    # checked
    result: asyncio.Future[bool | None]
    known: bool = False  # the user exists (else the decoy is derived: never right)
    waiters: int = 0
    running: bool = False


class Authenticator:
    """Verifies credentials against the users; remembers successes, bounded in size;
    locks out client groups and user names that fail too often (see Throttle).

    Derivations are fair among clients: at most GROUP_RUNNING of one client group run
    at once and GROUP_QUEUE more wait (beyond, a check is refused at once, and counts
    as a failure); a free slot goes to the groups in turn, so one busy group never
    keeps another waiting behind all of its queue."""

    def __init__(
        self,
        users: dict[str, PasswordHash],
        cache_size: int = 4096,
        *,
        throttle: Throttle | None = None,
        user_throttle: Throttle | None = None,
        ipv6_prefix: int = DEFAULT_IPV6_PREFIX,
        log: Any = None,
    ) -> None:
        self._users = users
        self._decoy = _decoy(users)
        self._cache: OrderedDict[bytes, PasswordHash] = OrderedDict()
        self._cache_size = cache_size
        self._key = secrets.token_bytes(32)
        self._pending: dict[bytes, _Check] = {}
        self.throttle = throttle or Throttle(0, 1.0, 1.0)
        # failures per user name, from any client: guesses spread over many addresses
        self.user_throttle = user_throttle or Throttle(0, 1.0, 1.0)
        self.ipv6_prefix = ipv6_prefix
        self._log = log
        self.on_failure: Callable[[bool], object] | None = None  # (started a lockout)
        # Own threads, so a burst of derivations never queues behind DNS lookups.
        self._executor = ThreadPoolExecutor(max_workers=SLOTS, thread_name_prefix="proxyd-kdf")
        self._queues: OrderedDict[str, deque[_Check]] = OrderedDict()  # waiting, by group
        self._running: dict[str, int] = {}  # derivations running, by group
        self._busy = 0  # derivations running in all
        # user -> client group -> when it last logged in as that user: exempt from the
        # user's lockout for a while
        self._logged_in: dict[str, OrderedDict[str, float]] = {}

    @property
    def required(self) -> bool:
        return bool(self._users)

    def configure(self, ipv6_prefix: int) -> None:
        """A reload's grouping of IPv6 clients (the throttles have their own)."""
        self.ipv6_prefix = ipv6_prefix

    def replace_users(self, users: dict[str, PasswordHash]) -> None:
        """A reload's users file. Remembered successes are forgotten, so a removed
        user or a changed password takes effect at once."""
        self._users = users
        self._decoy = _decoy(users)
        self._cache.clear()
        for user in [u for u in self._logged_in if u not in users]:
            del self._logged_in[user]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def group(self, client: str) -> str:
        """The client group an address belongs to (see client_group)."""
        return client_group(client, self.ipv6_prefix)

    def _token(self, credentials: Credentials) -> bytes:
        """The cache key: a keyed hash, so the cache holds no password."""
        return hmac.new(
            self._key,
            credentials.username.encode("utf-8") + b"\0" + credentials.password.encode("utf-8"),
            sha256,
        ).digest()

    def check_lockout(self, client: str, user: str | None = None) -> None:
        """Refuse a client address whose group is locked out, or a user name locked
        out for it, whatever it sends: right and wrong passwords get the same answer,
        at once, with no derivation."""
        group = self.group(client)
        left = self.throttle.locked(group)
        if left:
            raise LockedOut(
                f"too many failed logins from {group}; locked for {left:.0f} s more",
                retry_after=left,
            )
        left = 0.0 if user is None else self.user_throttle.locked(user)
        if left and user is not None and not self._exempt(user, group):
            raise LockedOut(
                f"too many failed logins for this user; locked for {left:.0f} s more",
                retry_after=left,
            )

    def _exempt(self, user: str, group: str) -> bool:
        """Whether `group` logged in as `user` lately: a user's lockout spares it."""
        groups = self._logged_in.get(user)
        when = None if groups is None else groups.get(group)
        throttle = self.user_throttle
        since = time.monotonic() - max(throttle.window, throttle.lockout)
        return when is not None and when > since

    def cached(self, credentials: Credentials) -> bool:
        """True when these credentials were verified recently (and the user is unchanged):
        the answer without a derivation. False says nothing; ask `verify`."""
        stored = self._users.get(credentials.username)
        token = self._token(credentials)
        cached = self._cache.get(token)
        if cached is not None and cached is stored:
            self._cache.move_to_end(token)
            return True
        return False

    def accepted_at_once(self, credentials: Credentials, client: str) -> bool:
        """LockedOut when the client or the user is locked out; True when the answer is
        yes without a derivation (a remembered success), False when `verify` must
        derive."""
        self.check_lockout(client, credentials.username)
        if self.cached(credentials):
            self._logged_in_as(credentials.username, self.group(client))
            return True
        return False

    async def verify(self, credentials: Credentials, client: str) -> None:
        """Return when the credentials are right; raise AuthFailed (or LockedOut, or
        OverLimit) when not. Unknown users cost the same derivation as known ones,
        so right and wrong answers take the same time."""
        if self.accepted_at_once(credentials, client):
            return
        user, group = credentials.username, self.group(client)
        stored = self._users.get(user)
        token = self._token(credentials)
        # Concurrent connections with the same credentials share one derivation;
        # it leaves the queue when every session waiting for it has gone.
        check = self._pending.get(token)
        if check is None:
            queued = self._running.get(group, 0) + len(self._queues.get(group, ()))
            if queued >= GROUP_RUNNING + GROUP_QUEUE:
                # (nothing derived, nothing learned: not a failure, a wait)
                raise LockedOut(
                    f"too many password checks from {group} in progress", retry_after=1.0
                )
            if len(self._pending) >= MAX_PENDING_CHECKS and not self._make_room(queued):
                raise OverLimit("too many password checks in progress")
            target = stored if stored is not None else self._decoy
            future = asyncio.get_running_loop().create_future()
            check = _Check(token, group, user, target, credentials.password, future)
            check.known = stored is not None
            self._pending[token] = check
            self._queues.setdefault(group, deque()).append(check)
            self._pump()
        # (else the same credentials are being checked already: one guess, counted once,
        # so a browser's first burst of connections with the right password is no flood)
        check.waiters += 1
        try:
            matched = await asyncio.shield(check.result)
        except asyncio.CancelledError:
            if not check.running and check.waiters == 1:
                self._drop(check)  # never derived: nothing learned, nothing counted
            raise  # (one that runs is counted as its answer says, when it ends)
        finally:
            check.waiters -= 1
        if matched is False:  # counted as it ended (see _finished)
            raise AuthFailed("wrong user name or password")
        # a right password, or a check dropped: nothing once a lockout began
        self.check_lockout(client, user)
        if matched is None:
            raise OverLimit("password check dropped")
        assert stored is not None
        self._cache[token] = stored
        self._cache.move_to_end(token)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _logged_in_as(self, user: str, group: str) -> None:
        if user not in self._users:
            return
        groups = self._logged_in.setdefault(user, OrderedDict())
        groups.pop(group, None)
        groups[group] = time.monotonic()
        while len(groups) > MAX_EXEMPT_GROUPS:
            groups.popitem(last=False)

    # -- the queue ----------------------------------------------------------------------

    def _pump(self) -> None:
        """Start waiting checks while slots are free, the groups taking turns."""
        while self._busy < SLOTS:
            group = next((g for g in self._queues if self._may_start(g)), None)
            if group is None:
                return
            queue = self._queues[group]
            check = queue.popleft()
            if queue:
                self._queues.move_to_end(group)  # the next slot goes to the next group
            else:
                del self._queues[group]
            self._start(check)

    def _may_start(self, group: str) -> bool:
        """Whether a waiting check of `group` may run now: at most GROUP_RUNNING at once,
        and never more than its failures leave before a lockout, so no burst gets
        more answers than auth.max_failures, and right passwords in one just wait."""
        running = self._running.get(group, 0)
        limit = self.throttle.max_failures
        return running < GROUP_RUNNING and (
            not limit or running + self.throttle.recent(group) < limit
        )

    def _start(self, check: _Check) -> None:
        check.running = True
        self._busy += 1
        self._running[check.group] = self._running.get(check.group, 0) + 1
        try:
            derivation = asyncio.get_running_loop().run_in_executor(
                self._executor, check.target.matches, check.password
            )
        except RuntimeError:  # the executor is shut down: the daemon is stopping
            self._finished(check, None)
            return
        derivation.add_done_callback(lambda done: self._finished(check, done))

    def _finished(self, check: _Check, done: asyncio.Future[bool] | None) -> None:
        self._busy -= 1
        left = self._running[check.group] - 1
        if left:
            self._running[check.group] = left
        else:
            del self._running[check.group]
        if self._pending.get(check.token) is check:
            del self._pending[check.token]
        if done is None or done.cancelled():
            answer: bool | None = None
        elif (error := done.exception()) is not None:
            if not check.result.done():
                check.result.set_exception(error)
            self._pump()
            return
        else:
            answer = done.result() and check.known
        # Counted here, once a check, whoever still waits for it: a client that left
        # cannot guess unseen, and a burst sharing one check is one try.
        if answer is True:
            self._logged_in_as(check.user, check.group)
        elif answer is False:
            group_locked = self.throttle.failed(check.group)
            self._failed(
                check.group, check.user, group_locked, self.user_throttle.failed(check.user)
            )
        if not check.result.done():
            check.result.set_result(answer)
        self._pump()

    def _make_room(self, queued: int) -> bool:
        """All checks are taken: the newest waiting check of the group with the most
        leaves (unanswered, as a dropped one) for a group that has fewer, so that many
        addresses (an IPv6 /48 is 65,536 groups) cannot fill the checks between them
        and refuse everyone else's login."""
        group = max(self._queues, key=lambda g: len(self._queues[g]), default=None)
        if group is None:
            return False
        queue = self._queues[group]
        if self._running.get(group, 0) + len(queue) <= queued + 1:
            return False
        self._drop(queue[-1])
        return True

    def _drop(self, check: _Check) -> None:
        """A check that has not started leaves its queue unanswered."""
        queue = self._queues.get(check.group)
        if queue is not None and check in queue:
            queue.remove(check)
            if not queue:
                del self._queues[check.group]
        if self._pending.get(check.token) is check:
            del self._pending[check.token]
        if not check.result.done():
            check.result.set_result(None)

    def _drop_locked(self, group: str | None, user: str | None) -> None:
        """A lockout began: the checks waiting for that group, or for that user from a
        group not exempt, are dropped; their clients learn nothing from them."""
        for queue in list(self._queues.values()):
            for check in list(queue):
                if check.group == group or (
                    check.user == user and not self._exempt(check.user, check.group)
                ):
                    self._drop(check)

    def _failed(self, group: str, user: str, group_locked: bool, user_locked: bool) -> None:
        """A failure was counted; report it, and a lockout it started."""
        if self.on_failure is not None:
            self.on_failure(group_locked)
        if group_locked or user_locked:
            self._drop_locked(group if group_locked else None, user if user_locked else None)
        if self._log is None:
            return
        if group_locked:
            throttle = self.throttle
            self._log.warning(
                "auth_lockout",
                client=group,
                failures=throttle.max_failures,
                window_s=throttle.window,
                lockout_s=throttle.lockout,
            )
        if user_locked:
            throttle = self.user_throttle
            self._log.warning(
                "user_locked",
                user=user,
                failures=throttle.max_failures,
                window_s=throttle.window,
                lockout_s=throttle.lockout,
            )
