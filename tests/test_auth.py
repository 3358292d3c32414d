"""proxyd.auth: scrypt hashes, the users file, and verification with a bounded cache."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxyd.auth import (
    GROUP_QUEUE,
    GROUP_RUNNING,
    MAX_PENDING_CHECKS,
    Authenticator,
    PasswordHash,
    Throttle,
    client_group,
    hash_password,
    load_users,
    set_user,
)
from proxyd.errors import AuthFailed, ConfigError, LockedOut
from proxyd.protocols.common import Credentials

FAST = 10  # log_n for hashes made here: 2**10 keeps each derivation around a millisecond


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return hash_password("wonderland", log_n=FAST)


# --- hashes ------------------------------------------------------------------------


def test_hash_round_trip(alice_hash: str) -> None:
    parsed = PasswordHash.parse(alice_hash)
    assert parsed.encode() == alice_hash
    assert parsed.matches("wonderland")
    assert (parsed.log_n, parsed.r, parsed.p) == (FAST, 8, 1)
    assert len(parsed.salt) == 16
    assert len(parsed.key) == 32
    assert alice_hash.startswith("$scrypt$ln=10,r=8,p=1$")


# Not "wonderland\x00": HMAC pads short keys with zero bytes, so scrypt (PBKDF2 inside)
# cannot tell trailing NULs apart. Harmless, as it needs the password anyway.
@pytest.mark.parametrize("wrong", ["", "Wonderland", "wonderland ", "wonderlan", "\x00wonderland"])
def test_wrong_password_fails(alice_hash: str, wrong: str) -> None:
    assert not PasswordHash.parse(alice_hash).matches(wrong)


@pytest.mark.parametrize("password", ["p", "pässwörd€ 🦀", "x" * 255, "with:colon$and$dollars"])
def test_any_password_round_trips(password: str) -> None:
    encoded = hash_password(password, log_n=FAST)
    assert PasswordHash.parse(encoded).matches(password)
    assert not PasswordHash.parse(encoded).matches(password + "x")


def test_same_password_different_salt() -> None:
    first = PasswordHash.parse(hash_password("same", log_n=FAST))
    second = PasswordHash.parse(hash_password("same", log_n=FAST))
    assert first.salt != second.salt
    assert first.key != second.key
    assert first.matches("same") and second.matches("same")


def test_default_cost() -> None:
    # DESIGN.md and proxyd passwd promise a salted scrypt hash; the default cost is n = 2**15.
    assert hash_password("slow").startswith("$scrypt$ln=15,r=8,p=1$")


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "wonderland",
        "$bcrypt$ln=10,r=8,p=1$c2FsdA$a2V5",
        "scrypt$ln=10,r=8,p=1$c2FsdA$a2V5",
        "x$scrypt$ln=10,r=8,p=1$c2FsdA$a2V5",
        "$scrypt$ln=10,r=8,p=1$c2FsdA",
        "$scrypt$ln=10,r=8,p=1$c2FsdA$a2V5$extra",
        "$scrypt$ln=10,r=8$c2FsdA$a2V5",
        "$scrypt$ln=ten,r=8,p=1$c2FsdA$a2V5",
        "$scrypt$ln=0,r=8,p=1$c2FsdA$a2V5",
        "$scrypt$ln=21,r=8,p=1$c2FsdA$a2V5",
        "$scrypt$ln=10,r=0,p=1$c2FsdA$a2V5",
        "$scrypt$ln=10,r=33,p=1$c2FsdA$a2V5",
        "$scrypt$ln=10,r=8,p=0$c2FsdA$a2V5",
        "$scrypt$ln=10,r=8,p=17$c2FsdA$a2V5",
        "$scrypt$ln=10,r=8,p=1$$a2V5",
        "$scrypt$ln=10,r=8,p=1$c2FsdA$",
        "$scrypt$ln=10,r=8,p=1$!!!!$a2V5",
        "$scrypt$ln=10,r=8,p=1$c2FsdA$a2V*",
    ],
)
def test_parse_rejects(encoded: str) -> None:
    with pytest.raises(ValueError):
        PasswordHash.parse(encoded)


# --- the users file ------------------------------------------------------------------


def test_load_users(tmp_path: Path, alice_hash: str) -> None:
    bob_hash = hash_password("builder", log_n=FAST)
    path = tmp_path / "users"
    path.write_text(
        f"# proxyd users\n\nalice:{alice_hash}\n   \n  bob:{bob_hash}  \n# carol:{alice_hash}\n"
    )
    users = load_users(path)
    assert set(users) == {"alice", "bob"}
    assert users["alice"].matches("wonderland")
    assert users["bob"].matches("builder")
    assert not users["bob"].matches("wonderland")


def test_load_empty_users_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("")
    assert load_users(path) == {}


def test_load_users_problems_name_lines_not_content(tmp_path: Path, alice_hash: str) -> None:
    salt_and_key = alice_hash.split("$", 3)[3]  # what must never be echoed
    lines = [
        f"alice:{alice_hash}",  # 1: fine
        "# a comment",  # 2
        "justaname",  # 3: no colon
        f"bob:{alice_hash[:-3]}$zz",  # 4: extra field
        f":{alice_hash}",  # 5: empty user name
        f"carol:{alice_hash.replace('ln=10', 'ln=99')}",  # 6: out of range
        f"{'d' * 256}:{alice_hash}",  # 7: user name too long
        f"erin:{salt_and_key}",  # 8: not a $scrypt$ hash
        f"frank:{alice_hash.replace('ln=10', 'ln=x')}",  # 9: bad parameter
    ]
    path = tmp_path / "users"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_users(path)
    problems = info.value.problems
    assert len(problems) == 7
    for number, problem in zip([3, 4, 5, 6, 7, 8, 9], problems, strict=True):
        assert problem.startswith("auth.users_file: ")
        assert f"line {number}:" in problem
        assert str(path) in problem
    text = str(info.value)
    for secret in (
        alice_hash,
        salt_and_key,
        salt_and_key.split("$")[0],
        salt_and_key.split("$")[1],
    ):
        assert secret not in text


def test_load_users_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_users(tmp_path / "absent")
    assert info.value.problems[0].startswith("auth.users_file: ")


def test_load_users_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"al\xffice:$scrypt$\n")
    with pytest.raises(ConfigError):
        load_users(path)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_set_user_creates_file_0600(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_user(path, "alice", "wonderland-42")
    assert mode(path) == 0o600
    content = path.read_bytes()
    assert b"wonderland-42" not in content
    assert content.startswith(b"alice:$scrypt$")
    assert content.endswith(b"\n")
    users = load_users(path)
    assert set(users) == {"alice"}
    assert users["alice"].matches("wonderland-42")
    assert os.listdir(tmp_path) == ["users"]  # no temporary file left behind


def test_set_user_replaces_atomically(tmp_path: Path, alice_hash: str) -> None:
    bob_hash = hash_password("builder", log_n=FAST)
    path = tmp_path / "users"
    path.write_text(f"# keep me\nalice:{alice_hash}\nbob:{bob_hash}\n")
    path.chmod(0o644)
    before = path.stat().st_ino
    set_user(path, "alice", "new-secret")
    # A new file took the old one's name (os.replace), not an in-place rewrite.
    assert path.stat().st_ino != before
    assert mode(path) == 0o600
    content = path.read_text()
    assert "new-secret" not in content
    assert "# keep me" in content
    assert f"bob:{bob_hash}" in content
    assert alice_hash not in content
    assert sum(line.startswith("alice:") for line in content.splitlines()) == 1
    users = load_users(path)
    assert users["alice"].matches("new-secret")
    assert not users["alice"].matches("wonderland")
    assert users["bob"].matches("builder")
    assert sorted(os.listdir(tmp_path)) == ["users"]


def test_set_user_adds_a_second_user(tmp_path: Path, alice_hash: str) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice:{alice_hash}\n")
    set_user(path, "bob", "builder")
    users = load_users(path)
    assert set(users) == {"alice", "bob"}
    assert users["alice"].encode() == alice_hash


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("", "pw"),
        ("a:b", "pw"),
        ("a\nb", "pw"),
        ("a\rb", "pw"),
        ("a\x00b", "pw"),
        ("u" * 256, "pw"),
        ("alice", ""),
        ("alice", "p" * 256),
        ("alice", "€" * 86),  # 258 bytes of UTF-8
    ],
)
def test_set_user_rejects(tmp_path: Path, user: str, password: str) -> None:
    path = tmp_path / "users"
    with pytest.raises(ValueError):
        set_user(path, user, password)
    assert not path.exists()


def test_set_user_rejects_leave_the_file_alone(tmp_path: Path, alice_hash: str) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice:{alice_hash}\n")
    with pytest.raises(ValueError):
        set_user(path, "alice", "")
    assert path.read_text() == f"alice:{alice_hash}\n"


# --- verification -------------------------------------------------------------------------


@pytest.fixture
def derivations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every PasswordHash.derive call from now on, by the password it was given."""
    calls: list[str] = []
    original = PasswordHash.derive

    def counting(self: PasswordHash, password: str) -> bytes:
        calls.append(password)
        return original(self, password)

    monkeypatch.setattr(PasswordHash, "derive", counting)
    return calls


@pytest.fixture
def users() -> dict[str, PasswordHash]:
    return {
        name: PasswordHash.parse(hash_password(f"{name}-pw", log_n=FAST))
        for name in ("alice", "bob", "carol")
    }


@pytest.fixture
def make_auth() -> Iterator[type[Authenticator]]:
    made: list[Authenticator] = []

    class Closing(Authenticator):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    yield Closing
    for auth in made:
        auth.close()


async def accepted(
    auth: Authenticator, credentials: Credentials, client: str = "192.0.2.1"
) -> bool:
    """Whether `verify` lets the credentials in (it raises AuthFailed when not)."""
    try:
        await auth.verify(credentials, client)
    except AuthFailed:
        return False
    return True


def verify(auth: Authenticator, username: str, password: str) -> bool:
    return asyncio.run(accepted(auth, Credentials(username, password)))


def test_required(make_auth: type[Authenticator], users: dict[str, PasswordHash]) -> None:
    assert make_auth(users).required
    assert not make_auth({}).required


def test_verify(make_auth: type[Authenticator], users: dict[str, PasswordHash]) -> None:
    auth = make_auth(users)
    assert verify(auth, "alice", "alice-pw") is True
    assert verify(auth, "bob", "bob-pw") is True
    assert verify(auth, "alice", "bob-pw") is False
    assert verify(auth, "alice", "") is False
    assert verify(auth, "Alice", "alice-pw") is False
    assert verify(auth, "mallory", "alice-pw") is False
    assert verify(auth, "", "") is False


def test_unknown_user_costs_a_derivation_too(
    make_auth: type[Authenticator], users: dict[str, PasswordHash], derivations: list[str]
) -> None:
    auth = make_auth(users)
    assert verify(auth, "mallory", "guess") is False
    assert derivations == ["guess"]  # same work as a known user: no timing oracle
    assert verify(auth, "mallory", "guess") is False
    assert derivations == ["guess", "guess"]  # failures are never cached
    # with the users' own parameters, not the defaults: the same cost
    assert (auth._decoy.log_n, auth._decoy.r) == (FAST, users["alice"].r)


def test_success_is_cached(
    make_auth: type[Authenticator], users: dict[str, PasswordHash], derivations: list[str]
) -> None:
    auth = make_auth(users)
    assert verify(auth, "alice", "alice-pw")
    assert len(derivations) == 1
    assert verify(auth, "alice", "alice-pw")
    assert verify(auth, "alice", "alice-pw")
    assert len(derivations) == 1


def test_failure_is_not_cached(
    make_auth: type[Authenticator], users: dict[str, PasswordHash], derivations: list[str]
) -> None:
    auth = make_auth(users)
    assert not verify(auth, "alice", "wrong")
    assert not verify(auth, "alice", "wrong")
    assert len(derivations) == 2
    # A cached success for the right password does not let a wrong one through.
    assert verify(auth, "alice", "alice-pw")
    assert not verify(auth, "alice", "wrong")
    assert not verify(auth, "alice", "alice-pw ")
    assert len(derivations) == 5


def test_cache_is_per_user(
    make_auth: type[Authenticator], users: dict[str, PasswordHash], derivations: list[str]
) -> None:
    auth = make_auth(users)
    assert verify(auth, "alice", "alice-pw")
    assert not verify(auth, "bob", "alice-pw")
    assert len(derivations) == 2


def test_cache_is_bounded_lru(
    make_auth: type[Authenticator], users: dict[str, PasswordHash], derivations: list[str]
) -> None:
    auth = make_auth(users, cache_size=2)
    for name in ("alice", "bob", "carol"):
        assert verify(auth, name, f"{name}-pw")
    assert len(derivations) == 3
    # bob and carol are remembered; alice was pushed out.
    assert verify(auth, "bob", "bob-pw")
    assert verify(auth, "carol", "carol-pw")
    assert len(derivations) == 3
    assert verify(auth, "bob", "bob-pw")  # bob is now the most recent
    assert verify(auth, "alice", "alice-pw")  # a miss: evicts carol, the least recent
    assert len(derivations) == 4
    assert verify(auth, "bob", "bob-pw")
    assert verify(auth, "alice", "alice-pw")
    assert len(derivations) == 4
    assert verify(auth, "carol", "carol-pw")
    assert len(derivations) == 5


def test_cache_size_one(
    make_auth: type[Authenticator], users: dict[str, PasswordHash], derivations: list[str]
) -> None:
    auth = make_auth(users, cache_size=1)
    for _ in range(3):
        assert verify(auth, "alice", "alice-pw")
        assert verify(auth, "bob", "bob-pw")
    assert len(derivations) == 6


def test_concurrent_verifications_share_one_derivation(
    make_auth: type[Authenticator], users: dict[str, PasswordHash], derivations: list[str]
) -> None:
    auth = make_auth(users)

    async def many() -> list[bool]:
        creds = Credentials("alice", "alice-pw")
        return await asyncio.gather(*(accepted(auth, creds) for _ in range(5)))

    assert asyncio.run(many()) == [True] * 5
    assert len(derivations) == 1


def test_concurrent_wrong_and_right_passwords(
    make_auth: type[Authenticator], users: dict[str, PasswordHash]
) -> None:
    auth = make_auth(users)

    async def both() -> list[bool]:
        return await asyncio.gather(
            accepted(auth, Credentials("alice", "alice-pw")),
            accepted(auth, Credentials("alice", "nope")),
            accepted(auth, Credentials("bob", "bob-pw")),
            accepted(auth, Credentials("nobody", "alice-pw")),
        )

    assert asyncio.run(both()) == [True, False, True, False]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_locks_after_max_failures_within_the_window() -> None:
    clock = Clock()
    throttle = Throttle(3, window=10, lockout=60, clock=clock)
    assert [throttle.failed("a") for _ in range(2)] == [False, False]
    assert throttle.locked("a") == 0
    assert throttle.failed("a") is True  # the third: locked, reported once
    assert throttle.locked("a") == 60
    assert throttle.locked("b") == 0  # per client address
    clock.now += 59
    assert throttle.locked("a") == pytest.approx(1)
    clock.now += 1
    assert throttle.locked("a") == 0  # recovered


def test_throttle_forgets_failures_older_than_the_window() -> None:
    clock = Clock()
    throttle = Throttle(3, window=10, lockout=60, clock=clock)
    throttle.failed("a")
    throttle.failed("a")
    clock.now += 10  # those two have left the window
    assert throttle.failed("a") is False
    assert throttle.failed("a") is False
    assert throttle.locked("a") == 0
    assert throttle.failed("a") is True


def test_throttle_off_and_bounded() -> None:
    off = Throttle(0, window=10, lockout=60)
    assert not any(off.failed("a") for _ in range(100))
    assert off.locked("a") == 0
    throttle = Throttle(2, window=10, lockout=60)
    for i in range(70_000):
        throttle.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert len(throttle._failures) <= 65536


def test_lockout_refuses_right_passwords_too(
    make_auth: type[Authenticator], users: dict[str, PasswordHash]
) -> None:
    auth = make_auth(users, throttle=Throttle(2, window=60, lockout=60))

    async def attempts() -> None:
        assert not await accepted(auth, Credentials("alice", "x"), "198.51.100.7")
        assert not await accepted(auth, Credentials("mallory", "y"), "198.51.100.7")
        with pytest.raises(LockedOut):
            await auth.verify(Credentials("alice", "alice-pw"), "198.51.100.7")
        with pytest.raises(LockedOut):
            auth.check_lockout("198.51.100.7")
        assert await accepted(auth, Credentials("alice", "alice-pw"), "198.51.100.8")

    asyncio.run(attempts())


def test_a_burst_with_the_same_credentials_is_one_try(
    make_auth: type[Authenticator], users: dict[str, PasswordHash], derivations: list[str]
) -> None:
    """A browser's first burst of connections, all with the right password, shares
    one check and counts as one try, not as max_failures of them; the same wrong
    password sent 50 times at once is one wrong guess."""
    auth = make_auth(users, throttle=Throttle(3, window=60, lockout=60))

    async def bursts() -> None:
        right = Credentials("alice", "alice-pw")
        assert all(await asyncio.gather(*(accepted(auth, right, "192.0.2.9") for _ in range(50))))
        wrong = Credentials("bob", "nope")
        assert not any(
            await asyncio.gather(*(accepted(auth, wrong, "192.0.2.10") for _ in range(50)))
        )
        auth.check_lockout("192.0.2.10")  # one failure of 3: not locked out

    asyncio.run(bursts())
    assert derivations.count("alice-pw") == 1 and derivations.count("nope") == 1


def test_parallel_guesses_learn_nothing_after_the_lockout(
    make_auth: type[Authenticator], users: dict[str, PasswordHash], derivations: list[str]
) -> None:
    """Guesses sent all at once cannot outrun the throttle: no more checks run than
    the failures left before the lockout (2), those two are answered, and every other
    one is refused without an answer, the right one included, never derived."""
    auth = make_auth(users, throttle=Throttle(2, window=60, lockout=60))

    async def burst() -> list[str]:
        guesses = [Credentials("alice", f"guess-{i}") for i in range(6)]
        guesses.append(Credentials("alice", "alice-pw"))
        results = await asyncio.gather(
            *(auth.verify(c, "198.51.100.9") for c in guesses), return_exceptions=True
        )
        return [type(r).__name__ for r in results]

    outcomes = asyncio.run(burst())
    assert sorted(outcomes) == ["AuthFailed"] * 2 + ["LockedOut"] * 5
    assert len(derivations) == 2
    assert "alice-pw" not in derivations


def test_right_logins_of_many_users_from_one_address_are_no_flood(
    make_auth: type[Authenticator], derivations: list[str]
) -> None:
    """Eight users behind one NAT log in at the same moment (after a restart, say),
    more than max_failures of them: every one gets in and nothing is locked, as only
    known failures count."""
    many = {f"user{i}": PasswordHash.parse(hash_password(f"pw{i}", log_n=FAST)) for i in range(8)}
    auth = make_auth(many, throttle=Throttle(3, window=60, lockout=60))
    derivations.clear()  # (making the hashes derived too)

    async def logins() -> list[bool]:
        return await asyncio.gather(
            *(accepted(auth, Credentials(f"user{i}", f"pw{i}"), "198.51.100.4") for i in range(8))
        )

    assert all(asyncio.run(logins()))
    auth.check_lockout("198.51.100.4")
    assert len(derivations) == 8


def test_the_last_try_before_the_lockout_is_still_checked(
    make_auth: type[Authenticator], users: dict[str, PasswordHash]
) -> None:
    """max_failures - 1 typos, then the right password: in (only known failures
    count, and a success takes none away)."""
    auth = make_auth(users, throttle=Throttle(3, window=60, lockout=60))

    async def typos() -> None:
        for typo in ("alice-p", "alice-pw!"):
            assert not await accepted(auth, Credentials("alice", typo))
        assert await accepted(auth, Credentials("alice", "alice-pw"))
        # the third typo is the third failure: answered, and the lockout begins
        assert not await accepted(auth, Credentials("alice", "alice-pX"))
        with pytest.raises(LockedOut) as locked:
            auth.check_lockout("192.0.2.1")
        assert locked.value.retry_after == 60

    asyncio.run(typos())


def test_a_flooding_group_waits_its_turn(
    make_auth: type[Authenticator], users: dict[str, PasswordHash], derivations: list[str]
) -> None:
    """With the lockout off, one address queueing many checks gets GROUP_RUNNING +
    GROUP_QUEUE of them at most (the rest refused at once, as failures), and a check of
    another address is taken next, not after the whole queue."""
    auth = make_auth(users)

    async def flood() -> tuple[list[str], int]:
        guesses = [
            asyncio.ensure_future(accepted(auth, Credentials("alice", f"guess-{i}"), "192.0.2.7"))
            for i in range(60)
        ]
        await asyncio.sleep(0)
        right = await accepted(auth, Credentials("bob", "bob-pw"), "192.0.2.8")
        assert right
        position = derivations.index("bob-pw")
        outcomes = await asyncio.gather(*guesses)
        assert not any(outcomes)
        return derivations, position

    derived, position = asyncio.run(flood())
    assert len(derived) == 1 + GROUP_RUNNING + GROUP_QUEUE
    assert position <= GROUP_RUNNING + 1  # behind those running, not behind the queue


def test_many_groups_cannot_fill_the_checks_between_them(
    make_auth: type[Authenticator], users: dict[str, PasswordHash], derivations: list[str]
) -> None:
    """Many /64s each queue a few guesses (under the lockout's count) until every
    check slot is taken: a login from yet another address still gets a check,
    in place of the newest guess of the group with the most waiting."""
    auth = make_auth(users)
    per_group = 5
    groups = MAX_PENDING_CHECKS // per_group + 2

    async def flood() -> None:
        guesses = [
            asyncio.ensure_future(
                accepted(auth, Credentials("alice", f"g-{g}-{i}"), f"2001:db8:77:{g:x}::1")
            )
            for g in range(groups)
            for i in range(per_group)
        ]
        await asyncio.sleep(0)
        assert len(auth._pending) == MAX_PENDING_CHECKS  # full, the rest refused
        assert await accepted(auth, Credentials("bob", "bob-pw"), "192.0.2.8")
        for guess in guesses:
            guess.cancel()
        await asyncio.gather(*guesses, return_exceptions=True)

    asyncio.run(flood())
    assert "bob-pw" in derivations


def test_ipv6_clients_are_grouped_by_prefix(
    make_auth: type[Authenticator], users: dict[str, PasswordHash]
) -> None:
    assert client_group("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_group("2001:db8:1:2:aaaa::1", 48) == "2001:db8:1::/48"
    assert client_group("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_group("192.0.2.1") == "192.0.2.1"
    auth = make_auth(users, throttle=Throttle(2, window=60, lockout=60))

    async def guesses() -> None:
        assert not await accepted(auth, Credentials("alice", "x"), "2001:db8:1:2::1")
        assert not await accepted(auth, Credentials("alice", "y"), "2001:db8:1:2::2")
        with pytest.raises(LockedOut):  # another address of the same /64
            await auth.verify(Credentials("alice", "alice-pw"), "2001:db8:1:2:ffff::9")
        assert await accepted(auth, Credentials("alice", "alice-pw"), "2001:db8:1:3::1")

    asyncio.run(guesses())


def test_user_lockout_spares_addresses_that_logged_in(
    make_auth: type[Authenticator], users: dict[str, PasswordHash]
) -> None:
    log = Log()
    auth = make_auth(
        users,
        throttle=Throttle(2, window=60, lockout=60),
        user_throttle=Throttle(4, window=60, lockout=60),
        log=log,
    )

    async def spread() -> None:
        assert await accepted(auth, Credentials("alice", "alice-pw"), "192.0.2.50")
        for i in range(4):  # one guess from each of four addresses
            assert not await accepted(auth, Credentials("alice", f"guess-{i}"), f"192.0.2.{i}")
        # the user name is locked out, for a right password from a new address too
        with pytest.raises(LockedOut):
            await auth.verify(Credentials("alice", "alice-pw"), "192.0.2.60")
        # ... but not for the address that logged in as alice, nor for another user
        assert await accepted(auth, Credentials("alice", "alice-pw"), "192.0.2.50")
        assert await accepted(auth, Credentials("bob", "bob-pw"), "192.0.2.60")

    asyncio.run(spread())
    locked = [fields for event, fields in log.lines if event == "user_locked"]
    assert locked == [{"user": "alice", "failures": 4, "window_s": 60, "lockout_s": 60}]
    assert not any("guess" in repr(fields) for _, fields in log.lines)


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, object]]] = []

    def warning(self, event: str, **fields: object) -> None:
        self.lines.append((event, fields))


def test_leaving_before_the_answer_still_counts_a_wrong_guess(
    make_auth: type[Authenticator], users: dict[str, PasswordHash]
) -> None:
    """A client that goes away while its check runs cannot guess unseen: the check's
    answer counts for it all the same (a right one counts nothing)."""
    auth = make_auth(users, throttle=Throttle(2, window=60, lockout=60))

    async def leave(password: str, client: str) -> None:
        task = asyncio.ensure_future(auth.verify(Credentials("alice", password), client))
        await asyncio.sleep(0)  # queued and started
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):  # until the derivation has ended (bounded)
            if not auth._busy:
                break
            await asyncio.sleep(0.01)

    async def run() -> None:
        await leave("guess-1", "192.0.2.20")
        await leave("alice-pw", "192.0.2.20")  # right: taken back
        auth.check_lockout("192.0.2.20")
        await leave("guess-2", "192.0.2.20")
        with pytest.raises(LockedOut):
            auth.check_lockout("192.0.2.20")

    asyncio.run(run())
