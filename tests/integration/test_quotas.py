"""[accounting] and [[quotas]] against the real daemon: each user's bytes counted per
period into the state file, with one process and with workers; a quota crossed cuts
the tunnel that crosses it and refuses what comes after, for every protocol; the
counts survive a reload, a restart and a kill -9; `proxyd quota` shows and resets."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxyd import accounting

from conftest import PASSWORD, USER, Origin, basic_token, proxyd, request_head
from integration import socks5client
from integration.socks5client import recv_exact
from integration.test_metrics import metrics_address, scrape, value
from integration.test_status_page import status_json, until
from integration.test_udp import UdpEcho, header, udp_client
from integration.test_workers import workers_started

ALICE = (USER, PASSWORD)
UDP_ASSOCIATE = 3


def setup(
    tmp_path: Path, users_file: Path, tail: str = "", *, workers: int = 1
) -> tuple[str, Path]:
    """A config counting into a state file under tmp_path, and that file's path."""
    state = tmp_path / "state" / "accounting.json"
    text = (
        f"[server]\nworkers = {workers}\n"
        f'[auth]\nusers_file = "{users_file}"\n'
        f'[accounting]\nperiod = "day"\nstate_file = "{state}"\nsave_interval = 0.5\n'
        f"{tail}"
    )
    return text, state


def quota(total: int) -> str:
    return f'[[quotas]]\nusers = ["{USER}"]\nbytes = {total}\n'


def sender(pause: float) -> Callable[[socket.socket], None]:
    """A server that sends what the client asks for (an 8-byte count), 16 KiB at a
    time, `pause` seconds apart."""

    def send(conn: socket.socket) -> None:
        want = int.from_bytes(recv_exact(conn, 8), "big")
        block = b"q" * 16384
        while want > 0:
            conn.sendall(block[: min(want, len(block))])
            want -= len(block)
            if pause:
                time.sleep(pause)

    return send


streamer = sender(0.005)
blaster = sender(0.0)  # as fast as it is taken


def fetch(daemon, port: int, size: int) -> tuple[int, BaseException | None, float]:
    """Ask the streamer for `size` bytes through a SOCKS5 tunnel as alice: the bytes
    that came, how it ended (None: a whole answer), and when the last byte came."""
    with socks5client.open_tunnel(daemon.address, "127.0.0.1", port, auth=ALICE) as sock:
        sock.sendall(size.to_bytes(8, "big"))
        got, last = 0, time.monotonic()
        try:
            while got < size:
                data = sock.recv(65536)
                if not data:
                    return got, EOFError(), last
                got += len(data)
                last = time.monotonic()
        except OSError as exc:
            return got, exc, last
        return got, None, last


def state_of(path: Path) -> dict:
    return json.loads(path.read_text())


def used(path: Path, user: str = USER) -> int:
    if not path.exists():
        return 0  # (not saved yet)
    counts = state_of(path)["users"].get(user, {"up": 0, "down": 0})
    return counts["up"] + counts["down"]


def access_total(daemons, user: str = USER) -> int:
    return sum(
        e.get("bytes_up", 0) + e.get("bytes_down", 0)
        for d in daemons
        for e in d.access_events()
        if e.get("user") == user
    )


def test_a_tunnel_crossing_the_quota_is_cut_there(start_daemon, tcp_server, tmp_path, users_file):
    """The tunnel moves exactly up to the quota, then is reset at once; the user is
    refused from then on, by SOCKS5, HTTP CONNECT, forwarding and UDP ASSOCIATE alike,
    and quota_exceeded is logged once."""
    text, state = setup(tmp_path, users_file, quota(1_000_000))
    daemon = start_daemon(text)
    server = tcp_server(streamer)
    got, ended, last = fetch(daemon, server.port, 4_000_000)
    cut_after = time.monotonic() - last
    assert isinstance(ended, ConnectionResetError), ended
    assert cut_after < 1.0
    assert got == 1_000_000 - 8  # the 8 bytes sent up count too
    line = daemon.access()
    assert line["status"] == "quota_exceeded"
    assert (line["bytes_up"], line["bytes_down"]) == (8, 1_000_000 - 8)

    # refused now, whatever the protocol
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port, auth=ALICE)
    sock.close()
    assert rep == 0x02
    target = f"127.0.0.1:{server.port}"
    for head in (
        request_head("CONNECT", target, password=PASSWORD),
        request_head("GET", f"http://{target}/", host=target, password=PASSWORD),
    ):
        with socket.create_connection(daemon.address, timeout=5) as conn:
            conn.sendall(head)
            answer = conn.recv(65536)
        assert answer.startswith(b"HTTP/1.1 403 "), answer
        assert b"quota of user alice" in answer and b"is used up until" in answer
    control, rep, _, _ = socks5client.connect(
        daemon.address, "0.0.0.0", 0, auth=ALICE, command=UDP_ASSOCIATE
    )
    control.close()
    assert rep == 0x02
    daemon.wait_for(lambda _e: len(daemon.access_events()) >= 5)
    assert [e["status"] for e in daemon.access_events()] == ["quota_exceeded"] * 5
    told = daemon.wait_for(lambda e: e.get("event") == "quota_exceeded")
    assert (told["user"], told["quota"]) == (USER, 0)
    assert told["bytes_up"] + told["bytes_down"] == 1_000_000
    time.sleep(0.6)  # (the books learn each report within REPORT_INTERVAL)
    assert len(daemon.named("quota_exceeded")) == 1
    daemon.stop()
    assert used(state) == 1_000_000 == access_total([daemon])
    # explain reads the state file: the same answer, and why
    said = proxyd("explain", "--config", str(daemon.config_path), "--user", USER, "--json", target)
    assert said.returncode == 3, said.stderr
    answer = json.loads(said.stdout)
    assert (answer["status"], answer["reason"]) == ("quota_exceeded", "quota_exceeded")
    assert answer["quota"]["exceeded"] and answer["quota"]["bytes_down"] == 1_000_000 - 8
    human = proxyd("explain", "--config", str(daemon.config_path), "--user", USER, target)
    assert "decided by:  quotas[0] (used up)" in human.stdout, human.stdout


def test_udp_datagrams_beyond_the_quota_are_dropped_and_counted(start_daemon, tmp_path, users_file):
    text, state = setup(tmp_path, users_file, quota(5_000))
    daemon = start_daemon(text)
    control, rep, host, port = socks5client.connect(
        daemon.address, "0.0.0.0", 0, auth=ALICE, command=UDP_ASSOCIATE
    )
    assert rep == 0
    payload = b"u" * 1000
    answered = 0
    echo = UdpEcho()
    with control, udp_client() as client, contextlib.closing(echo):
        client.settimeout(1.0)
        for _ in range(3):
            client.sendto(header("127.0.0.1", echo.port) + payload, (host, port))
            try:
                client.recvfrom(65535)
                answered += 1
            except TimeoutError:
                pass
    line = daemon.access()
    assert answered == 2  # 2 x (1000 up + 1005 down); the third does not fit
    assert line["datagrams_over_quota"] == 1
    assert line["bytes_up"] + line["bytes_down"] == 4010
    daemon.stop()
    assert used(state) == 4010


def test_counts_survive_a_reload_and_a_restart(start_daemon, tcp_server, tmp_path, users_file):
    text, state = setup(tmp_path, users_file)
    server = tcp_server(streamer)
    first = start_daemon(text)
    assert fetch(first, server.port, 300_000)[1] is None
    # a reload (with a quota now) keeps counting where it was
    first.reload(text + quota(10_000_000))
    assert fetch(first, server.port, 200_000)[1] is None
    first.access(lambda e: e["bytes_down"] == 200_000)
    # a quota lowered below what was used refuses at once
    first.reload(text + quota(400_000))
    sock, rep, _, _ = socks5client.connect(first.address, "127.0.0.1", server.port, auth=ALICE)
    sock.close()
    assert rep == 0x02
    assert first.stop() == 0
    assert used(state) == 500_016 == access_total([first])
    second = start_daemon(text + quota(10_000_000))
    assert fetch(second, server.port, 100_000)[1] is None
    second.access()
    assert second.stop() == 0
    assert used(state) == 600_024 == access_total([first, second])
    shown = proxyd("quota", "--config", str(second.config_path), "show", "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["daemon_pid"] is None
    (alice,) = report["users"]
    assert (alice["user"], alice["bytes"], alice["exceeded"]) == (USER, 600_024, False)
    assert alice["used"] == pytest.approx(0.06, abs=0.001)


def test_two_workers_count_into_one_total_and_refuse_together(
    start_daemon, tcp_server, tmp_path, users_file
):
    """Tunnels spread over both workers add up in the supervisor's books; once the
    quota is used up, every worker refuses within a second; `proxyd quota reset`
    lets the user in again everywhere."""
    text, state = setup(tmp_path, users_file, quota(2_000_000), workers=2)
    daemon = start_daemon(text)
    workers_started(daemon, 2)
    server = tcp_server(streamer)
    for _ in range(12):
        assert fetch(daemon, server.port, 100_000)[1] is None
    daemon.wait_for(lambda _e: len(daemon.access_events()) >= 12)
    served_by = {e["conn_id"] % 2 for e in daemon.access_events()}  # (ids alternate by worker)
    assert served_by == {0, 1}
    until(lambda: _equal(used(state), 12 * 100_008))
    daemon.reload(results=2)  # (the books and every worker's counts go on)
    assert fetch(daemon, server.port, 100_000)[1] is None
    until(lambda: _equal(used(state), 13 * 100_008))
    # the rest of the quota, through whichever worker; the others learn it
    got, ended, _ = fetch(daemon, server.port, 2_000_000)
    assert isinstance(ended, ConnectionResetError) and got == 2_000_000 - 13 * 100_008 - 8, (
        daemon.access_events()[-3:],
        [e for e in daemon.events if e.get("event") != "access"][-5:],
    )
    time.sleep(1.0)
    reps = []
    for _ in range(10):
        sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port, auth=ALICE)
        sock.close()
        reps.append(rep)
    assert reps == [0x02] * 10
    done = proxyd("quota", "--config", str(daemon.config_path), "reset", USER)
    assert done.returncode == 0, done.stderr
    assert f"by the daemon (pid {daemon.proc.pid})" in done.stdout
    for _ in range(10):
        assert fetch(daemon, server.port, 1_000)[1] is None
    assert daemon.wait_for(lambda e: e.get("event") == "quota_reset")["user"] == USER
    assert daemon.stop() == 0
    assert used(state) == 10 * 1_008


def test_reset_without_a_daemon_edits_the_state_file(
    tmp_path, users_file, start_daemon, tcp_server
):
    text, state = setup(tmp_path, users_file, quota(50_000))
    daemon = start_daemon(text)
    fetch(daemon, tcp_server(streamer).port, 100_000)
    daemon.stop()
    assert used(state) == 50_000
    shown = proxyd("quota", "--config", str(daemon.config_path), "show", "--user", USER)
    assert "EXCEEDED" in shown.stdout and "no daemon is running" in shown.stdout
    done = proxyd("quota", "--config", str(daemon.config_path), "reset", USER)
    assert done.returncode == 0, done.stderr
    assert f"in {state}" in done.stdout
    assert used(state) == 0
    assert oct(state.stat().st_mode & 0o777) == "0o600"


def test_the_state_file_outlives_a_kill_9_whole(start_daemon, tcp_server, tmp_path, users_file):
    """Saved every save_interval: a kill -9 loses at most the last interval, and a
    reader never finds the file half-written."""
    text, state = setup(tmp_path, users_file)
    daemon = start_daemon(text)
    server = tcp_server(streamer)
    assert fetch(daemon, server.port, 200_000)[1] is None
    until(lambda: _equal(used(state), 200_008))
    bad: list[str] = []
    reading = True

    def read_all_along() -> None:
        while reading:
            try:
                state_of(state)
            except ValueError as exc:
                bad.append(str(exc))

    reader = threading.Thread(target=read_all_along)
    reader.start()
    try:
        for _ in range(5):
            assert fetch(daemon, server.port, 100_000)[1] is None
        time.sleep(1.2)  # (at least one save of these)
        assert fetch(daemon, server.port, 100_000)[1] is None
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(5)
    finally:
        reading = False
        reader.join()
    assert not bad
    saved = used(state)
    assert 700_048 <= saved <= 800_056  # (200_008 + 5 x 100_008, and one more maybe)
    again = start_daemon(text)  # the lock died with the killed daemon
    assert fetch(again, server.port, 1_000)[1] is None
    again.access()
    again.stop()
    assert used(state) == saved + 1_008


def test_a_second_daemon_on_the_same_state_file_will_not_start(start_daemon, tmp_path, users_file):
    text, _ = setup(tmp_path, users_file)
    first = start_daemon(text)
    second = start_daemon(text, wait=False)
    assert second.proc.wait(15) == 1
    failed = second.wait_for(lambda e: e.get("event") == "accounting_failed")
    assert f"in use by the daemon of pid {first.proc.pid}" in failed["error"]
    assert first.proc.poll() is None


def test_per_user_metrics_are_capped(start_daemon, tcp_server, tmp_path, users_file):
    users = tmp_path / "users"
    users.write_text(users_file.read_text())
    made = proxyd("passwd", "--file", str(users), "bob", stdin=b"bob-secret-7\n")
    assert made.returncode == 0, made.stderr
    daemon = start_daemon(
        f'[auth]\nusers_file = "{users}"\n'
        '[metrics]\nlisten = "127.0.0.1:0"\nper_user = true\nper_user_max = 1\n'
    )
    metrics_address(daemon)
    server = tcp_server(streamer)
    assert fetch(daemon, server.port, 30_000)[1] is None
    daemon.access()
    with socks5client.open_tunnel(
        daemon.address, "127.0.0.1", server.port, auth=("bob", "bob-secret-7")
    ) as sock:
        sock.sendall((5_000).to_bytes(8, "big"))
        assert len(recv_exact(sock, 5_000)) == 5_000

    def counted() -> None:
        samples = scrape(daemon)
        assert value(samples, "proxyd_user_bytes_total", user=USER, direction="down") == 30_000
        assert value(samples, "proxyd_user_bytes_total", user="other", direction="down") == 5_000
        assert value(samples, "proxyd_user_bytes_total", user="bob", direction="down") == 0

    until(counted)


def test_the_status_page_shows_quota_use(start_daemon, tcp_server, tmp_path, users_file):
    text, _ = setup(tmp_path, users_file, quota(1_000_000) + '[metrics]\nlisten = "127.0.0.1:0"\n')
    daemon = start_daemon(text)
    metrics_address(daemon)
    assert fetch(daemon, tcp_server(streamer).port, 250_000)[1] is None

    def shown() -> None:
        quotas = status_json(daemon)["quotas"]
        assert quotas["period"] == "day"
        (row,) = quotas["users"]
        assert (row["user"], row["up"] + row["down"], row["bytes"]) == (USER, 250_008, 1_000_000)
        assert row["used"] == pytest.approx(0.25, abs=0.001)

    until(shown)
    import http.client

    conn = http.client.HTTPConnection(*metrics_address(daemon), timeout=5)
    conn.request("GET", "/")
    page = conn.getresponse().read().decode()
    conn.close()
    assert "Quotas, this day" in page and "25%" in page


def _equal(a: object, b: object) -> None:
    assert a == b, (a, b)


def test_forwarded_bodies_count_and_stop_at_the_quota(start_daemon, origin, tmp_path, users_file):
    """A forwarded answer's body is counted as its access line says, and one that would
    cross the quota is cut (a reset: never taken for a whole answer)."""
    text, state = setup(tmp_path, users_file, quota(300_000))
    daemon = start_daemon(text)
    token = basic_token()
    proxy = f"http://{daemon.host}:{daemon.port}"
    ok = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x", proxy,
         "-H", f"Proxy-Authorization: Basic {token}", origin.url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert ok.returncode == 0 and ok.stdout == "200", ok
    cut = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-x", proxy,
         "-H", f"Proxy-Authorization: Basic {token}", origin.url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert cut.returncode != 0, cut  # (reset mid-body)
    lines = [daemon.access(lambda e, i=i: e["conn_id"] == i) for i in (1, 2)]
    assert lines[0]["status"] == "ok" and lines[0]["bytes_down"] == len(origin.body)
    assert lines[1]["status"] == "quota_exceeded"
    assert sum(e["bytes_down"] + e["bytes_up"] for e in lines) <= 300_000
    daemon.stop()
    # the heads passed on count for the quota too (not in the access line's bodies)
    assert access_total([daemon]) < used(state) <= 300_000
    assert used(state) - access_total([daemon]) < 2048


def test_forwarded_heads_count_for_the_quota(start_daemon, tmp_path, users_file):
    """Requests whose heads carry the data (an 8 KB header each, empty bodies) are
    refused once the heads add up to the quota."""
    text, state = setup(tmp_path, users_file, quota(60_000))
    daemon = start_daemon(text)
    empty = Origin(b"")
    try:
        target = f"127.0.0.1:{empty.port}"
        answers = []
        for _ in range(12):
            head = request_head("GET", f"http://{target}/", host=target, password=PASSWORD)
            padded = head[:-2] + b"X-Pad: " + b"p" * 8000 + b"\r\n\r\n"
            with socket.create_connection(daemon.address, timeout=5) as conn:
                conn.sendall(padded)
                answers.append(conn.recv(65536).split(b" ", 2)[1])
    finally:
        empty.close()
    assert answers[:6] == [b"200"] * 6
    assert answers[-4:] == [b"403"] * 4
    daemon.stop()
    assert used(state) <= 60_000


def test_quota_command_problems(tmp_path, users_file):
    off = tmp_path / "off.toml"
    off.write_text("")
    said = proxyd("quota", "--config", str(off), "show")
    assert said.returncode == 1 and "accounting is off" in said.stderr
    text, state = setup(tmp_path, users_file)
    on = tmp_path / "on.toml"
    on.write_text(text)
    said = proxyd("quota", "--config", str(on), "show")
    assert said.returncode == 1 and "no state file yet" in said.stderr
    # a process that holds the lock but never answers: the reset says so, and leaves
    # no request behind
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time; from pathlib import Path; from proxyd import books; "
            "signal.signal(signal.SIGUSR2, signal.SIG_IGN); "
            f"books.take_lock(Path({str(state)!r})); print('locked', flush=True); "
            "time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        said = proxyd("quota", "--config", str(on), "reset", "--wait", "0.5", USER)
        assert said.returncode == 1
        assert f"the daemon (pid {holder.pid}) did not answer within 0.5 s" in said.stderr
        assert not list(state.parent.glob("*.reset"))
    finally:
        holder.kill()
        holder.wait()


def test_workers_together_keep_to_the_quota(start_daemon, tcp_server, tmp_path, users_file):
    """Twenty tunnels at full speed over two workers: each worker moves only its share
    of what is left until it learns what the other moved, so together they stop at
    the quota (give or take one worker's last share), not at a quota each."""
    text, state = setup(tmp_path, users_file, quota(5_000_000), workers=2)
    daemon = start_daemon(text)
    workers_started(daemon, 2)
    server = tcp_server(blaster)
    moved: list[int] = []

    def one() -> None:
        sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port, auth=ALICE)
        with sock:
            if rep != 0:
                return
            sock.sendall((2_000_000).to_bytes(8, "big"))
            got = 0
            try:
                while data := sock.recv(65536):
                    got += len(data)
            except OSError:
                pass
            moved.append(got)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    daemon.wait_for(lambda _e: len(daemon.access_events()) >= 20)
    assert {e["conn_id"] % 2 for e in daemon.access_events()} == {0, 1}
    daemon.stop()
    assert 5_000_000 - 65536 <= used(state) <= 5_000_000 + accounting.MIN_LEASE
    assert used(state) == access_total([daemon])
    assert sum(moved) == sum(e.get("bytes_down", 0) for e in daemon.access_events())


def alice_connects(port: int) -> bytes:
    """A whole SOCKS5 handshake as alice, to 127.0.0.1:port, in one piece."""
    user, password = (s.encode() for s in ALICE)
    login = bytes([len(user)]) + user + bytes([len(password)]) + password
    return b"\x05\x01\x02\x01" + login + b"\x05\x01\x00" + socks5client.address("127.0.0.1", port)


def sink(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass


def test_bytes_sent_with_the_request_keep_to_the_quota(
    start_daemon, tcp_server, tmp_path, users_file
):
    """What a client sends in the same packets as its SOCKS5 handshake is read before
    the tunnel is up: it passes only if it fits the quota, whole."""
    text, state = setup(tmp_path, users_file, quota(20_000))
    daemon = start_daemon(text)
    server = tcp_server(sink)
    hello = alice_connects(server.port)
    for _ in range(3):
        with socket.create_connection(daemon.address, timeout=5) as conn:
            conn.sendall(hello + b"e" * 16384)
            with contextlib.suppress(OSError):  # (it may be cut already)
                conn.shutdown(socket.SHUT_WR)
            try:
                while conn.recv(65536):
                    pass
            except ConnectionResetError:
                pass
    daemon.wait_for(lambda _e: len(daemon.access_events()) >= 3)
    statuses = [e["status"] for e in daemon.access_events()]
    assert statuses == ["ok", "quota_exceeded", "quota_exceeded"]
    daemon.stop()
    assert used(state) == 16384 == access_total([daemon])


def test_a_slow_client_gets_every_counted_byte_before_the_cut(
    start_daemon, tcp_server, tmp_path, users_file
):
    """A client that reads slowly still gets all the tunnel read up to the quota: the
    reset comes once what is queued for it has gone (the reset would drop it)."""
    text, _ = setup(tmp_path, users_file, quota(1_000_000))
    daemon = start_daemon(text)
    server = tcp_server(blaster)
    with socket.socket() as sock:
        # a small window (set before connecting): bytes wait in the daemon's send queue
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.settimeout(10)
        sock.connect(daemon.address)
        sock.sendall(alice_connects(server.port))
        assert recv_exact(sock, 4) == b"\x05\x02\x01\x00"
        assert socks5client.read_reply(sock)[0] == 0
        sock.sendall((4_000_000).to_bytes(8, "big"))
        got = 0
        with pytest.raises(ConnectionResetError):
            while data := sock.recv(4096):
                got += len(data)
                time.sleep(0.002)  # (about 2 MB/s at most)
    assert got == 1_000_000 - 8
    assert daemon.access()["status"] == "quota_exceeded"


def test_accounting_itself_waits_for_a_restart_and_a_lost_state_dir_is_told(
    start_daemon, tcp_server, tmp_path, users_file
):
    """A reload that changes [accounting] keeps the running period and state file
    (reload_needs_restart). A state file that cannot be written is logged, serving
    goes on, and the next save after the directory is back has every count."""
    text, state = setup(tmp_path, users_file)
    daemon = start_daemon(text)
    server = tcp_server(streamer)
    daemon.reload(text.replace('period = "day"', 'period = "week"'))
    warning = daemon.wait_for(lambda e: e.get("event") == "reload_needs_restart")
    assert "accounting" in warning["keys"]
    assert fetch(daemon, server.port, 50_000)[1] is None
    until(lambda: _equal(used(state), 50_008))
    assert state_of(state)["period"] == "day from 00:00 UTC"
    for left in state.parent.iterdir():
        left.unlink()
    state.parent.rmdir()
    assert fetch(daemon, server.port, 50_000)[1] is None
    failed = daemon.wait_for(lambda e: e.get("event") == "accounting_save_failed")
    assert failed["path"] == str(state)
    assert fetch(daemon, server.port, 50_000)[1] is None  # (still serving)
    state.parent.mkdir()
    until(lambda: _equal(used(state), 3 * 50_008))
