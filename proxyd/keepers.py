"""Between a process's ledger and the books: the daemon that keeps its own books
(`Owned`), or a worker's reports to the supervisor's and the totals and grants back
over a datagram socket pair (`Supervised`, `Share`, `serve_workers`).

With workers, the supervisor grants each worker what it may move of every quota
(`grant`): what is left, split between the workers that move the user's bytes, a
grant counting as taken until the worker says it applied a later one, so that the
workers together never pass the quota whatever each knows of the others.
"""

from __future__ import annotations

import contextlib
import socket

from proxyd.accounting import (
    DOWN,
    KEPT_GRANTS,
    MIN_LEASE,
    UP,
    Ledger,
    Report,
    Totals,
    dimensions,
    first_grant,
    quota_for,
)
from proxyd.books import Books

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
