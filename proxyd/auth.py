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
import os
import secrets
import stat
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any, Final

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
MAX_THROTTLED_CLIENTS: Final = 65536  # client addresses whose failures are remembered


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _decoy(users: dict[str, PasswordHash]) -> PasswordHash:
    """A hash no password matches, standing in for unknown users so that they cost
    the same derivation as known ones: with the parameters most users' hashes have."""
    params = [(h.log_n, h.r, h.p) for h in users.values()]
    log_n, r, p = (DEFAULT_LOG_N, DEFAULT_R, DEFAULT_P)
    if params:
        log_n, r, p = max(set(params), key=params.count)
    salt, key = secrets.token_bytes(SALT_BYTES), secrets.token_bytes(KEY_BYTES)
    return PasswordHash(log_n, r, p, salt, key)


class Throttle:
    """Failed logins per client address: `max_failures` of them within `window`
    seconds lock the address out for `lockout` seconds. Memory is bounded: at most
    MAX_THROTTLED_CLIENTS addresses, the least recently failed forgotten first."""

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
        self._locked: dict[str, float] = {}  # address -> when its lockout ends

    def configure(self, max_failures: int, window: float, lockout: float) -> None:
        """New limits (a reload); failures counted so far and running lockouts stay."""
        self.max_failures, self.window, self.lockout = max_failures, window, lockout

    def locked(self, client: str) -> float:
        """Seconds left of the client's lockout; 0 when it may try."""
        until = self._locked.get(client)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left > 0:
            return left
        del self._locked[client]
        return 0.0

    def failed(self, client: str) -> bool:
        """Count one failure; True when it starts a lockout (report it, once)."""
        if not self.max_failures:
            return False
        now = self._clock()
        times = self._failures.pop(client, None)
        if times is None:
            times = deque(maxlen=self.max_failures)
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.max_failures:
            self._failures[client] = times  # most recent last
            while len(self._failures) > MAX_THROTTLED_CLIENTS:
                self._failures.popitem(last=False)
            return False
        if len(self._locked) >= MAX_THROTTLED_CLIENTS:  # drop the expired ones first
            self._locked = {c: t for c, t in self._locked.items() if t > now}
        self._locked[client] = now + self.lockout
        return True


@dataclass(slots=True)
class _PendingCheck:
    """A derivation in flight and how many sessions wait for it."""

    future: asyncio.Future[bool]
    waiters: int = 0


class Authenticator:
    """Verifies credentials against the users; remembers successes, bounded in size;
    locks out client addresses that fail too often (see Throttle)."""

    def __init__(
        self,
        users: dict[str, PasswordHash],
        cache_size: int = 4096,
        *,
        throttle: Throttle | None = None,
        log: Any = None,
    ) -> None:
        self._users = users
        self._decoy = _decoy(users)
        self._cache: OrderedDict[bytes, PasswordHash] = OrderedDict()
        self._cache_size = cache_size
        self._key = secrets.token_bytes(32)
        self._pending: dict[bytes, _PendingCheck] = {}
        self.throttle = throttle or Throttle(0, 1.0, 1.0)
        self._log = log
        self.on_failure: Callable[[bool], object] | None = None  # (started a lockout)
        # Own threads, so a burst of derivations never queues behind DNS lookups.
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="proxyd-kdf")

    @property
    def required(self) -> bool:
        return bool(self._users)

    def replace_users(self, users: dict[str, PasswordHash]) -> None:
        """A reload's users file. Remembered successes are forgotten, so a removed
        user or a changed password takes effect at once."""
        self._users = users
        self._decoy = _decoy(users)
        self._cache.clear()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _token(self, credentials: Credentials) -> bytes:
        """The cache key: a keyed hash, so the cache holds no password."""
        return hmac.new(
            self._key,
            credentials.username.encode("utf-8") + b"\0" + credentials.password.encode("utf-8"),
            sha256,
        ).digest()

    def check_lockout(self, client: str) -> None:
        """Refuse a client address that is locked out, whatever it sends: right and
        wrong passwords get the same answer, at once, with no derivation."""
        left = self.throttle.locked(client)
        if left:
            raise LockedOut(f"too many failed logins from {client}; locked for {left:.0f} s more")

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

    async def verify(self, credentials: Credentials, client: str) -> None:
        """Return when the credentials are right; raise AuthFailed (or LockedOut, or
        OverLimit) when not. Unknown users cost the same derivation as known ones,
        so right and wrong answers take the same time."""
        self.check_lockout(client)
        if self.cached(credentials):
            return
        stored = self._users.get(credentials.username)
        token = self._token(credentials)
        # Concurrent connections with the same credentials share one derivation;
        # it is dropped from the queue when every session waiting for it has gone.
        entry = self._pending.get(token)
        if entry is None:
            if len(self._pending) >= MAX_PENDING_CHECKS:
                raise OverLimit("too many password checks in progress")
            loop = asyncio.get_running_loop()
            target = stored if stored is not None else self._decoy
            future = loop.run_in_executor(self._executor, target.matches, credentials.password)
            entry = self._pending[token] = _PendingCheck(future)
            future.add_done_callback(lambda _: self._pending.pop(token, None))
        entry.waiters += 1
        try:
            ok = await asyncio.shield(entry.future) and stored is not None
        except asyncio.CancelledError:
            if entry.waiters == 1:
                entry.future.cancel()
            raise
        finally:
            entry.waiters -= 1
        # Guesses sent in parallel all wait for derivations: those finishing after
        # the lockout began learn nothing, right or wrong.
        self.check_lockout(client)
        if not ok or stored is None:
            self._failed(client)
            raise AuthFailed("wrong user name or password")
        self._cache[token] = stored
        self._cache.move_to_end(token)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _failed(self, client: str) -> None:
        throttle = self.throttle
        locked = throttle.failed(client)
        if self.on_failure is not None:
            self.on_failure(locked)
        if locked and self._log is not None:
            self._log.warning(
                "auth_lockout",
                client=client,
                failures=throttle.max_failures,
                window_s=throttle.window,
                lockout_s=throttle.lockout,
            )
