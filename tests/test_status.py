"""proxyd.status and proxyd.status_page without sockets: the per-second buckets, the
cap on users and clients, bytes counted once, the merge of workers' snapshots,
their files, and the page's escaping."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxyd import status, status_page
from proxyd.status import KEEP, WINDOW, About, Recorder

ABOUT = About(workers=1, listeners=["127.0.0.1:1080"], enabled=True)


@dataclass
class FakeConn:
    user: str | None = "alice"
    peer_ip: str = "192.0.2.1"
    metered: tuple[int, int, int, int] = (0, 0, 0, 0)


class Clock:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1_800_000_000.5
        monkeypatch.setattr(status.time, "time", lambda: self.now)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock(monkeypatch)


def test_buckets_cover_the_window_and_forget_what_is_older(clock: Clock) -> None:
    recorder = Recorder()
    recorder.opened("socks5")
    recorder.traffic("alice", "192.0.2.1", 100, 1000)
    clock.now += 10
    recorder.opened("http")
    recorder.closed("socks5", active=True)
    recorder.closed(None, active=False)  # refused at accept: came, never open
    report = status.report([recorder.snapshot()], ABOUT)
    assert report["connections"] == 3
    assert report["active"] == {"http": 1} and report["active_total"] == 1
    assert (report["bytes_up"], report["bytes_down"]) == (100, 1000)
    assert report["series"]["connections"][-1] == 2 and report["series"]["connections"][-11] == 1
    assert len(report["series"]["bytes_up"]) == WINDOW
    clock.now += WINDOW - 10  # the first second is out of the window now
    report = status.report([recorder.snapshot()], ABOUT)
    assert report["connections"] == 2 and report["bytes_up"] == 0
    assert report["top_users"] == []
    # a second's slot is reused a window later, from zero
    recorder.opened("socks5")
    assert status.report([recorder.snapshot()], ABOUT)["series"]["connections"][-1] == 1


def test_distinct_users_and_clients_beyond_the_cap_fold_into_other(clock: Clock) -> None:
    recorder = Recorder()
    for i in range(KEEP + 5):
        recorder.traffic(f"user{i}", f"10.0.0.{i}", 10 + i, 0)
    recorder.traffic("user0", "10.0.0.0", 1000, 0)  # one already kept keeps counting
    report = status.report([recorder.snapshot()], ABOUT)
    assert len(report["top_users"]) == status.TOP
    assert report["top_users"][0] == {"user": "user0", "bytes": 1010}
    everything = sum(10 + i for i in range(KEEP + 5)) + 1000
    assert report["bytes_up"] == everything
    shown = sum(row["bytes"] for row in report["top_users"])
    assert shown + report["other_users_bytes"] == everything
    shown = sum(row["bytes"] for row in report["top_clients"])
    assert shown + report["other_clients_bytes"] == everything
    assert len(recorder.snapshot()["users"]) == KEEP


def test_an_access_line_adds_only_the_bytes_no_meter_told(clock: Clock) -> None:
    recorder = Recorder()
    tunnel = FakeConn(metered=(300, 4000, 0, 0))
    recorder.traffic("alice", tunnel.peer_ip, 300, 4000)  # as the meter told them
    recorder.logged(tunnel, "ok", "alice", 300, 4000)
    forwarded = FakeConn(user=None)
    recorder.logged(forwarded, "ok", "bob", 50, 600)  # a request's user is the line's
    recorder.logged(FakeConn(), "denied", "alice", 0, 0)
    recorder.logged(FakeConn(), "client_closed", None, 0, 0)
    report = status.report([recorder.snapshot()], ABOUT)
    assert (report["bytes_up"], report["bytes_down"]) == (350, 4600)
    assert report["top_users"] == [
        {"user": "alice", "bytes": 4300},
        {"user": "bob", "bytes": 650},
    ]
    assert report["refusals"] == {"denied": 1}


def test_snapshots_of_workers_sum_and_a_parent_is_down_if_any_worker_has_it_out(
    clock: Clock,
) -> None:
    one, two = Recorder(), Recorder()
    for recorder, up in ((one, True), (two, False)):
        recorder.opened("socks5")
        recorder.traffic(None, "192.0.2.9", 5, 7)
        recorder.logged(FakeConn(), "limit", None, 0, 0)
        recorder.parents["egress", "socks5://192.0.2.1:1080"] = up
        recorder.parents["egress", "socks5://192.0.2.2:1080"] = True
    # a file's snapshot goes through JSON
    snapshots = [one.snapshot(), json.loads(json.dumps(two.snapshot()))]
    report = status.report(snapshots, About(workers=2, listeners=[], enabled=True))
    assert report["workers_reporting"] == 2
    assert report["active"] == {"socks5": 2} and report["connections"] == 2
    assert report["top_users"] == [{"user": None, "bytes": 24}]
    assert report["top_clients"] == [{"client": "192.0.2.9", "bytes": 24}]
    assert report["refusals"] == {"limit": 2}
    assert report["upstreams"] == [
        {
            "group": "egress",
            "servers": [
                {"server": "socks5://192.0.2.1:1080", "up": False},
                {"server": "socks5://192.0.2.2:1080", "up": True},
            ],
        }
    ]


def test_workers_files_live_gone_and_stale(tmp_path: Path, clock: Clock) -> None:
    recorder = Recorder()
    recorder.opened("http")
    mine = recorder.snapshot()
    other = {**mine, "pid": os.getppid()}  # a process that is alive
    status.write(tmp_path, other)
    status.write(tmp_path, {**mine, "pid": 2**22 + 1})  # no such process
    status.write(tmp_path, mine)  # this worker's own: its live snapshot counts instead
    (tmp_path / "junk.json").write_text("{")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    gathered = status.gather(mine, tmp_path)
    assert [s["pid"] for s in gathered] == [mine["pid"], os.getppid()]
    clock.now += status.STALE + 1  # a worker silent that long no longer counts
    assert [s["pid"] for s in status.gather(mine, tmp_path)] == [mine["pid"]]


def test_the_page_escapes_names_and_shows_the_numbers(clock: Clock) -> None:
    recorder = Recorder()
    recorder.opened("socks5")
    recorder.traffic("<script>alert(1)</script>", "<b>&", 1234, 5678)
    recorder.logged(FakeConn(), "denied", None, 0, 0)
    recorder.parents['"><img src=x>', "socks5://h:1"] = False
    page = status_page.render(status.report([recorder.snapshot()], ABOUT)).decode()
    assert "<script" not in page and "<img" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;&amp;" in page
    assert "&quot;&gt;&lt;img src=x&gt;" in page
    assert "6,912 B (6.9 kB)" in page and "denied" in page
    assert '<meta http-equiv="refresh"' in page and "<polyline" in page
    # self-contained: nothing fetched from elsewhere
    assert "src=" not in page.replace("&lt;img src=x&gt;", "")
    assert 'href="/status.json"' in page
