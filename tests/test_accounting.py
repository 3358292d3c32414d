"""proxyd.accounting, proxyd.books and proxyd.keepers without a daemon: sizes and
[[quotas]] tables, an account's room, a ledger's reports and what it learns back,
the books (periods, resets, the state file and its lock), and a worker's channel
to the supervisor's books, with its grants."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxyd import accounting, books
from proxyd.accounting import (
    CHUNK,
    DOWN,
    UP,
    Account,
    Ledger,
    Quota,
    Report,
    Totals,
    parse_quotas,
    parse_size,
)
from proxyd.books import Books, StateInUse
from proxyd.keepers import Owned, Share, Supervised, channel_pair, serve_workers
from proxyd.periods import parse_period

DAY = parse_period("day")
NOON = 1796558400.0  # 2026-12-06 12:00 UTC
TOMORROW = NOON + 86400


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def _line(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    info = warning = error = _line

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.lines if name == event]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (0, 0),
        (1234, 1234),
        ("10GiB", 10 << 30),
        ("500 MB", 500_000_000),
        ("1.5KiB", 1536),
        ("7b", 7),
        ("3 tib", 3 << 40),
        ("42", 42),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "10 GB GB", "ten", "1e9", "-5", -5, 1.5, True, None])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_quota_tables_and_their_problems():
    problems: list[str] = []
    quotas = parse_quotas(
        [
            {"users": ["alice", "bob"], "bytes": "1GiB", "up": 1000},
            {"users": "*", "down": "5MB"},
            {"users": ["carol"]},
            {"users": ["*", "dave"], "bytes": 1},
            {"users": [], "bytes": 1},
            {"users": ["erin"], "bytes": "lots", "color": "red"},
        ],
        problems,
    )
    assert quotas[0] == Quota(0, frozenset({"alice", "bob"}), 1 << 30, 1000, None)
    assert quotas[1] == Quota(1, None, None, None, 5_000_000)
    assert problems == [
        "quotas[2]: set bytes, up or down (the limit)",
        'quotas[3].users: "*" stands alone (every user), not in a list of names',
        'quotas[4].users: must be a list of user names, or "*" for every user',
        "quotas[5].color: unknown key (known: users, bytes, up, down)",
        "quotas[5].bytes: 'lots' is not a size (a number and one of B, KB, MB, GB, TB, KiB, "
        "MiB, GiB, TiB)",
    ]
    assert accounting.quota_for(quotas, "alice") is quotas[0]
    assert accounting.quota_for(quotas, "zoe") is quotas[1]  # "*": the first table wins


def test_an_accounts_room_is_its_tightest_limit():
    account = Account("alice", Quota(0, None, 1000, 300, None))
    assert (account.room(UP), account.room(DOWN)) == (300, 1000)
    account.charge(UP, 250)
    account.charge(DOWN, 600)
    assert (account.room(UP), account.room(DOWN)) == (50, 150)
    assert not account.exhausted
    account.charge(UP, 50)
    assert account.room(UP) == 0 and account.exhausted
    account.charge(DOWN, 500)  # (beyond: room never goes negative)
    assert account.room(DOWN) == 0
    assert Account("bob", None).room(UP) == accounting.UNLIMITED


def test_a_ledger_reports_what_is_new_and_learns_the_totals():
    quotas = (Quota(0, frozenset({"alice"}), 10_000, None, None),)
    ledger = Ledger(DAY, quotas, now=NOON)
    alice = ledger.account("alice")
    assert alice is not None and ledger.account(None) is None
    alice.charge(UP, 100)
    alice.charge(DOWN, 400)
    (first,) = ledger.report(now=NOON)
    assert first.users == {"alice": (100, 400)} and first.start == ledger.start
    alice.charge(DOWN, 50)
    (second,) = ledger.report(now=NOON)
    assert second.users == {"alice": (0, 50)}
    (empty,) = ledger.report(now=NOON)  # (an empty report still asks for the totals)
    assert empty.users == {}
    alice.charge(DOWN, 7)  # not yet reported
    # the books counted the first report, and 3000 from another worker
    ledger.learn(Totals(first.seq, ledger.start, {"alice": (100, 3400)}))
    # the second report is still on its way: it counts on top, as does the unreported
    assert alice.used == [100, 3400 + 50 + 7]
    ledger.learn(Totals(second.seq, ledger.start, {"alice": (100, 3450)}))
    assert alice.used == [100, 3457]
    # another period's totals change nothing
    ledger.learn(Totals(empty.seq, ledger.start - 86400, {"alice": (0, 0)}))
    assert alice.used == [100, 3457]


def test_a_report_not_delivered_is_reported_again():
    ledger = Ledger(DAY, (), now=NOON)
    bob = ledger.account("bob")
    assert bob is not None
    bob.charge(DOWN, 10)
    (report,) = ledger.report(now=NOON)
    ledger.unreport(report)
    bob.charge(DOWN, 5)
    (again,) = ledger.report(now=NOON)
    assert again.users == {"bob": (0, 15)}


def test_a_new_period_starts_every_account_anew_in_place():
    ledger = Ledger(DAY, (), now=NOON)
    alice = ledger.account("alice")
    assert alice is not None
    alice.charge(UP, 9)
    (last,) = ledger.report(now=TOMORROW)  # the old period's last counts, then the new one
    assert last.users == {"alice": (9, 0)} and last.start == NOON - 12 * 3600
    assert ledger.start == NOON + 12 * 3600
    assert ledger.account("alice") is alice and alice.used == [0, 0]


def test_reports_and_totals_come_in_parts():
    ledger = Ledger(DAY, (), now=NOON)
    for i in range(CHUNK + 5):
        account = ledger.account(f"u{i}")
        assert account is not None
        account.charge(UP, 1)
    reports = ledger.report(now=NOON)
    assert [len(r.users) for r in reports] == [CHUNK, 5]
    assert Report.decode(reports[1].encode()) == reports[1]


def test_books_add_roll_over_and_log_a_crossing_once(tmp_path):
    log = Log()
    quotas = (Quota(0, frozenset({"alice"}), 1000, None, None),)
    books = Books(tmp_path / "state.json", DAY, quotas, log, now=NOON)
    start = books.start
    books.add(Report(1, start, {"alice": (100, 800), "bob": (5, 5)}), now=NOON)
    assert not log.named("quota_exceeded")
    books.add(Report(2, start, {"alice": (0, 100)}), now=NOON)
    books.add(Report(3, start, {"alice": (0, 100)}), now=NOON)
    (told,) = log.named("quota_exceeded")
    assert (told["user"], told["bytes_up"], told["bytes_down"]) == ("alice", 100, 900)
    assert [t.users for t in books.totals_for(3)] == [{"alice": (100, 1000)}]  # quota'd only
    books.add(Report(4, start + 86400, {"bob": (1, 1)}), now=TOMORROW)  # a new period
    assert books.start == start + 86400 and books.totals == {"bob": [1, 1]}
    assert books.previous is not None and books.previous["users"]["alice"] == [100, 1000]
    books.add(Report(5, start, {"bob": (2, 2)}), now=TOMORROW)  # late, for the last one
    assert books.previous["users"]["bob"] == [7, 7] and books.totals == {"bob": [1, 1]}


def test_books_are_saved_and_resumed_and_reset(tmp_path):
    path = tmp_path / "deep" / "accounting.json"
    kept = Books(path, DAY, (), Log(), now=NOON)
    kept.open()
    kept.add(Report(1, kept.start, {"alice": (1, 2), "bob": (3, 4)}), now=NOON)
    kept.save()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(StateInUse, match=f"pid {os.getpid()}"):
        Books(path, DAY, (), Log(), now=NOON).open()
    assert books.lock_owner(path) == os.getpid()
    kept.close()
    assert books.lock_owner(path) is None
    again = Books(path, DAY, (), Log(), now=NOON + 60)
    again.open()
    assert again.totals == {"alice": [1, 2], "bob": [3, 4]}
    assert again.reset("alice") and not again.reset("carol")
    assert again.totals["alice"] == [0, 0]
    again.close()
    # the next day the saved period is the last one
    later = Books(path, DAY, (), Log(), now=TOMORROW)
    later.open()
    assert later.totals == {} and later.previous is not None
    assert later.previous["users"]["bob"] == [3, 4]
    later.close()
    saved = json.loads(path.read_text())
    assert saved["version"] == 1 and saved["period"] == "day from 00:00 UTC"


def test_a_changed_period_carries_the_counts_on(tmp_path):
    path = tmp_path / "accounting.json"
    books = Books(path, parse_period("week"), (), Log(), now=NOON)
    books.open()
    books.add(Report(1, books.start, {"alice": (5, 5)}), now=NOON)
    books.save()
    books.close()
    log = Log()
    daily = Books(path, DAY, (), log, now=NOON)
    daily.open()
    assert daily.totals == {"alice": [5, 5]}
    assert log.named("accounting_period_changed")
    daily.close()


def test_a_state_file_not_ours_is_an_error(tmp_path):
    path = tmp_path / "accounting.json"
    for text in ("{", '{"version": 9}', '{"version": 1, "users": {"a": 5}}'):
        path.write_text(text)
        with pytest.raises(books.ConfigError, match="not a proxyd accounting state file"):
            books.read_state(path)


def test_resets_left_beside_the_state_file(tmp_path):
    path = tmp_path / "accounting.json"
    log = Log()
    books = Books(path, DAY, (), log, now=NOON)
    books.add(Report(1, books.start, {"alice": (1, 1)}), now=NOON)
    (tmp_path / "accounting.json.1-2.reset").write_text("alice\n")
    (tmp_path / "accounting.json.3-4.reset").write_bytes(b"\xff\xfe")
    os.mkfifo(tmp_path / "accounting.json.5-6.reset")  # (reading it would wait forever)
    (tmp_path / "accounting.json.7-8.reset").symlink_to("/dev/zero")
    (tmp_path / "accounting.json.9-9.reset").write_text("x" * 5000)
    assert books.take_resets() == ["alice"]
    assert books.totals["alice"] == [0, 0]
    assert not (tmp_path / "accounting.json.1-2.reset").exists()
    assert (tmp_path / "accounting.json.3-4.reset").exists()  # unreadable: left, and logged
    assert len(log.named("quota_reset_failed")) == 4
    assert json.loads(path.read_text())["users"]["alice"] == {"up": 0, "down": 0}


def test_workers_report_through_their_channels_into_one_total():
    quotas = (Quota(0, None, 10_000_000, None, None),)
    books = Books(Path("/nonexistent/state.json"), DAY, quotas, Log(), now=NOON)
    ledgers = [Ledger(DAY, quotas, now=NOON, shares=2) for _ in range(2)]
    pairs = [channel_pair() for _ in ledgers]
    sides = [Supervised(ledger, theirs) for ledger, (_, theirs) in zip(ledgers, pairs, strict=True)]
    shares = [Share(ours) for ours, _ in pairs]
    try:
        for n, (ledger, side) in enumerate(zip(ledgers, sides, strict=True)):
            account = ledger.account("alice")
            assert account is not None
            account.charge(DOWN, 1000 * (n + 1))
            side.exchange(ledger.report(now=NOON))
        serve_workers(books, shares, 2)
        assert [share.last for share in shares] == [1, 1]
        assert books.totals == {"alice": [0, 3000]}
        for side in sides:
            side.learn()
        assert [ledger.accounts["alice"].used for ledger in ledgers] == [[0, 3000]] * 2
        # each may now move half of what is left
        for ledger in ledgers:
            assert ledger.accounts["alice"].allowance(DOWN) == (10_000_000 - 3000) // 2
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def test_the_daemons_own_books():
    quotas = (Quota(0, None, 100, None, None),)
    books = Books(Path("/nonexistent/state.json"), DAY, quotas, Log(), now=NOON)
    ledger = Ledger(DAY, quotas, now=NOON)
    keeper = Owned(ledger, books)
    account = ledger.account("alice")
    assert account is not None
    account.charge(UP, 60)
    keeper.exchange(ledger.report(now=NOON))
    books.reset("alice")
    keeper.learn()
    assert account.used == [0, 0] and not account.exhausted


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 1), st.integers(0, 10**6)),
        max_size=60,
    ),
    st.lists(st.integers(0, 59), max_size=8),
)
def test_a_ledger_and_the_books_agree_whatever_the_order(charges, flush_at):
    """However charges and reports interleave (and some reports get lost and are
    reported again), the books end with every byte charged, counted once."""
    books = Books(
        Path("/nonexistent/state.json"), DAY, (Quota(0, None, 1, None, None),), Log(), now=NOON
    )
    ledger = Ledger(DAY, books.quotas, now=NOON)
    keeper = Owned(ledger, books)
    expected: dict[str, list[int]] = {}
    for i, (user, side, n) in enumerate(charges):
        account = ledger.account(user)
        assert account is not None
        account.charge(side, n)
        expected.setdefault(user, [0, 0])[side] += n
        if i in flush_at:
            reports = ledger.report(now=NOON)
            if i % 2:  # lost once, reported again
                for report in reports:
                    ledger.unreport(report)
            else:
                keeper.exchange(reports)
    keeper.exchange(ledger.report(now=NOON))
    assert {u: v for u, v in books.totals.items() if v != [0, 0]} == {
        u: v for u, v in expected.items() if v != [0, 0]
    }
    for user, counts in expected.items():
        assert ledger.accounts[user].used == counts


@pytest.mark.parametrize("seed", range(12))
def test_workers_together_never_pass_the_quota(seed):
    """Three workers and the supervisor, their messages delivered in any order the
    dice say: each moves what it may, and together they never pass the quota (both
    ways, and up); then, with everyone talking, they get all of it."""
    rng = random.Random(seed)
    quota = Quota(0, None, 1_000_000, 300_000, None)
    books = Books(Path("/nonexistent/state.json"), DAY, (quota,), Log(), now=NOON)
    ledgers = [Ledger(DAY, (quota,), now=NOON, shares=3) for _ in range(3)]
    pairs = [channel_pair() for _ in ledgers]
    sides = [Supervised(ledger, theirs) for ledger, (_, theirs) in zip(ledgers, pairs, strict=True)]
    shares = [Share(ours) for ours, _ in pairs]
    moved = [0, 0]

    def move(w: int, fraction: float) -> None:
        account = ledgers[w].account("alice")
        assert account is not None
        side = rng.choice((UP, DOWN))
        n = int(account.allowance(side) * fraction)
        account.charge(side, n)
        moved[side] += n

    try:
        for _ in range(400):
            w, dice = rng.randrange(3), rng.random()
            if dice < 0.5:
                move(w, rng.random())
            elif dice < 0.7:
                sides[w].exchange(ledgers[w].report(now=NOON))
            elif dice < 0.85:
                sides[w].learn()
            else:
                serve_workers(books, shares, 3)
            assert moved[UP] <= 300_000 and sum(moved) <= 1_000_000
        for _ in range(60):  # everyone talks: the rest of the quota is theirs
            for w in range(3):
                move(w, 1.0)
                sides[w].exchange(ledgers[w].report(now=NOON))
            serve_workers(books, shares, 3)
            for side in sides:
                side.learn()
        assert moved[UP] <= 300_000 and sum(moved) <= 1_000_000
        assert sum(moved) >= 1_000_000 - 3 * 1000  # (all but crumbs)
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def test_a_worker_that_stops_applying_grants_is_held_to_them():
    share = Share(None)  # type: ignore[arg-type]
    for n in range(40):
        share.remember({"alice": [n, n, n]})
    assert len(share.sent) == accounting.KEPT_GRANTS
    assert share.bound("alice", [0, 0, 0]) == [accounting.KEPT_GRANTS - 2] * 3


def test_a_new_period_with_workers_grants_anew():
    """The last report of a period (its grants applied, numbered) reaching the
    supervisor after the period ended neither stops it nor freezes the new grants."""
    quota = Quota(0, None, 10_000_000, None, None)
    books = Books(Path("/nonexistent/state.json"), DAY, (quota,), Log(), now=NOON)
    ledgers = [Ledger(DAY, (quota,), now=NOON, shares=2) for _ in range(2)]
    pairs = [channel_pair() for _ in ledgers]
    sides = [Supervised(ledger, theirs) for ledger, (_, theirs) in zip(ledgers, pairs, strict=True)]
    shares = [Share(ours) for ours, _ in pairs]

    def round_at(now: float, moving: int) -> None:
        for ledger, side in zip(ledgers, sides, strict=True):
            account = ledger.account("alice")
            assert account is not None
            account.charge(DOWN, min(moving, account.allowance(DOWN)))
            side.exchange(ledger.report(now=now))
        serve_workers(books, shares, 2)
        for side in sides:
            side.learn()

    try:
        for _ in range(5):
            round_at(NOON, 100_000)
        assert all(share.applied > 0 for share in shares)
        # the first worker goes on into the new period and moves bytes there; the
        # other's last report of the old one (with its grants' number) comes after
        first = ledgers[0].account("alice")
        assert first is not None
        sides[0].exchange(ledgers[0].report(now=TOMORROW))
        first.charge(DOWN, first.allowance(DOWN))
        sides[0].exchange(ledgers[0].report(now=TOMORROW))
        serve_workers(books, shares, 2)
        sides[1].exchange(ledgers[1].report(now=TOMORROW))
        serve_workers(books, shares, 2)
        for side in sides:
            side.learn()
        assert books.start == ledgers[0].start == NOON + 12 * 3600
        for _ in range(30):
            round_at(TOMORROW, 1_000_000)
        moved = books.totals["alice"][DOWN]
        assert 9_000_000 <= moved <= 10_000_000  # (granted all along: no freeze)
        assert all(len(share.sent) < accounting.KEPT_GRANTS for share in shares)
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
