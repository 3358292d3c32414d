"""SIGHUP: the config and users file read anew, listeners opened and closed, open
tunnels untouched, and a bad config refused with the old one kept."""

from __future__ import annotations

import shutil
import socket

import pytest

from conftest import NotifyReceiver, listening_socket, proxyd
from integration import socks5client
from integration.socks5client import recv_exact
from integration.test_workers import workers_started

BOB = ("bob", "builder-77")


def config(users, *listen: str, extra: str = "") -> str:
    addresses = ", ".join(f'"{a}"' for a in listen)
    return f'[server]\nlisten = [{addresses}]\n[auth]\nusers_file = "{users}"\n{extra}'


def echo_through(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    assert recv_exact(sock, len(payload)) == payload


def listening_on(daemon, host: str) -> tuple[str, int]:
    """The address of the newest listener on `host`, from its `listening` line."""
    lines = [e for e in daemon.named("listening") if e["address"].startswith(host + ":")]
    assert lines, daemon.output()
    return host, int(lines[-1]["address"].rpartition(":")[2])


def add_bob(users) -> None:
    done = proxyd("passwd", "--file", str(users), BOB[0], stdin=f"{BOB[1]}\n".encode())
    assert done.returncode == 0, done.stderr


def only_alice(users):
    """A copy of the users file with alice's line only."""
    path = users.with_name("only-alice")
    lines = [line for line in users.read_text().splitlines() if line.startswith("alice:")]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def users(users_file, tmp_path):
    """A users file of this test's own (alice), which it may change."""
    path = tmp_path / "users"
    shutil.copy(users_file, path)
    path.chmod(0o600)
    return path


def test_tunnel_carries_data_across_reload_adding_user_and_listener(
    start_daemon, tcp_server, users, tmp_path
):
    receiver = NotifyReceiver(tmp_path / "notify")
    try:
        daemon = start_daemon(
            config(users, "127.0.0.1:0"), listen="", env={"NOTIFY_SOCKET": str(receiver.path)}
        )
        receiver.wait_for("READY=1")
        server = tcp_server()
        with socks5client.open_tunnel(
            daemon.address, "127.0.0.1", server.port, auth=("alice", "wonderland-42")
        ) as tunnel:
            echo_through(tunnel, b"before" * 1000)
            # bob is unknown, 127.0.0.2 not listened on
            sock, rep, _, _ = socks5client.connect(
                daemon.address, "127.0.0.1", server.port, auth=BOB
            )
            sock.close()
            assert rep == -1

            add_bob(users)
            receiver.messages.clear()
            (outcome,) = daemon.reload(config(users, "127.0.0.1:0", "127.0.0.2:0"))
            assert outcome["event"] == "reloaded" and outcome["users"] == 2
            new = listening_on(daemon, "127.0.0.2")
            assert outcome["opened"] == [f"127.0.0.2:{new[1]}"]
            assert "RELOADING=1" in receiver.wait_for("RELOADING=1")
            assert "READY=1" in receiver.wait_for("READY=1")
            assert receiver.messages.index(receiver.wait_for("READY=1")) > 0  # after RELOADING

            echo_through(tunnel, b"during" * 50_000)  # the old tunnel still carries data
            for where in (daemon.address, new):  # bob, on the old listener and the new one
                with socks5client.open_tunnel(where, "127.0.0.1", server.port, auth=BOB) as sock:
                    echo_through(sock, b"bob")

            # a users file that cannot be read: refused, everything stays
            (outcome,) = daemon.reload(config(tmp_path / "missing", "127.0.0.1:0"))
            assert outcome["event"] == "reload_failed"
            assert "missing" in outcome["problems"][0]
            # the listener and bob go again; the tunnel stays
            (outcome,) = daemon.reload(config(only_alice(users), "127.0.0.1:0"))
            assert outcome["closed"] == [f"127.0.0.2:{new[1]}"] and outcome["users"] == 1
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(new, timeout=5).close()
            sock, rep, _, _ = socks5client.connect(
                daemon.address, "127.0.0.1", server.port, auth=BOB
            )
            sock.close()
            assert rep == -1
            echo_through(tunnel, b"after" * 1000)
        access = daemon.access(lambda e: e["user"] == "alice" and e["command"] == "connect")
        assert access["status"] == "ok"
        assert access["bytes_up"] == len(b"before" * 1000 + b"during" * 50_000 + b"after" * 1000)
        assert daemon.stop() == 0
    finally:
        receiver.close()


def test_reload_changes_users_rules_and_limits_for_new_connections(
    start_daemon, tcp_server, users, tmp_path
):
    add_bob(users)
    server = tcp_server()
    daemon = start_daemon(config(users, "127.0.0.1:0"), listen="")
    with socks5client.open_tunnel(daemon.address, "127.0.0.1", server.port, auth=BOB) as tunnel:
        # bob removed from the users file, the echo port denied, one connection per user
        rules = (
            f'[limits]\nper_user = 1\n[[rules]]\naction = "deny"\nports = [{server.port}]\n'
            '[[rules]]\naction = "allow"\n'
        )
        (outcome,) = daemon.reload(config(only_alice(users), "127.0.0.1:0", extra=rules))
        assert outcome["event"] == "reloaded" and outcome["users"] == 1 and outcome["rules"] == 2
        sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port, auth=BOB)
        sock.close()
        assert rep == -1  # bob is gone for new connections ...
        echo_through(tunnel, b"still bob")  # ... and his open tunnel is untouched
        sock, rep, _, _ = socks5client.connect(
            daemon.address, "127.0.0.1", server.port, auth=("alice", "wonderland-42")
        )
        sock.close()
        assert rep == 2  # denied by the new rule
        other = tcp_server()
        with socks5client.open_tunnel(
            daemon.address, "127.0.0.1", other.port, auth=("alice", "wonderland-42")
        ):
            second, rep, _, _ = socks5client.connect(
                daemon.address, "127.0.0.1", other.port, auth=("alice", "wonderland-42")
            )
            second.close()
            assert rep != 0  # limits.per_user = 1
    denied = daemon.access(lambda e: e["status"] == "denied")
    assert denied["rule"] == 0


def test_invalid_reload_keeps_everything(start_daemon, tcp_server, users, tmp_path):
    server = tcp_server()
    good = config(users, "127.0.0.1:0")
    daemon = start_daemon(good, listen="")
    taken = listening_socket("127.0.0.2")
    with taken:
        busy = f"127.0.0.2:{taken.getsockname()[1]}"
        add_bob(users)
        cases = {
            "[server\n": "not valid TOML",
            config(users, "127.0.0.1:0", extra="[timeouts]\nconnect = -1\n"): "timeouts.connect",
            config(users, "127.0.0.1:0", extra="[bogus]\n"): "bogus: unknown section",
            # bob is in the users file now, but a listener that cannot be bound fails it all
            config(users, "127.0.0.1:0", busy): f"server.listen: {busy}",
            config(users, "127.0.0.1:0", "127.0.0.3:0", extra='[metrics]\nlisten = "nope"\n'): (
                "metrics.listen"
            ),
        }
        for text, problem in cases.items():
            (outcome,) = daemon.reload(text)
            assert outcome["event"] == "reload_failed", outcome
            assert problem in " ".join(outcome["problems"]), outcome
        daemon.config_path.write_bytes(b'[server]\nlisten = ["127.0.0.1:0"] # \xff\n')
        (outcome,) = daemon.reload()
        assert outcome["problems"] == ["not valid TOML: not UTF-8 at byte 36"]
    assert not [e for e in daemon.named("listening") if not e["address"].startswith("127.0.0.1:")]
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port, auth=BOB)
    sock.close()
    assert rep == -1  # the users file was not re-read by a failed reload
    with socks5client.open_tunnel(
        daemon.address, "127.0.0.1", server.port, auth=("alice", "wonderland-42")
    ) as sock:
        echo_through(sock, b"ok")
    (outcome,) = daemon.reload(good)
    assert outcome["event"] == "reloaded" and outcome["users"] == 2
    assert daemon.proc.poll() is None


def test_reload_to_an_emptied_users_file_is_refused(start_daemon, tcp_server, users):
    """A users file emptied (or cut down to comments) would turn authentication off:
    the reload fails, and the users read before stay in force."""
    server = tcp_server()
    daemon = start_daemon(config(users, "127.0.0.1:0"), listen="")
    users.write_text("# everyone removed\n")
    (outcome,) = daemon.reload()
    assert outcome["event"] == "reload_failed", outcome
    assert any(p.startswith("auth.users_file:") for p in outcome["problems"]), outcome
    # still required, and alice's password still works
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00")  # no authentication offered
        assert recv_exact(sock, 2) == b"\x05\xff"
    with socks5client.open_tunnel(
        daemon.address, "127.0.0.1", server.port, auth=("alice", "wonderland-42")
    ) as sock:
        echo_through(sock, b"still alice")
    assert daemon.proc.poll() is None


def test_reload_of_what_needs_a_restart_warns(start_daemon, users):
    daemon = start_daemon(config(users, "127.0.0.1:0"), listen="")
    (outcome,) = daemon.reload(
        config(users, "127.0.0.1:0", extra='[log]\nformat = "console"\n').replace(
            "[server]\n", "[server]\nworkers = 3\n"
        )
    )
    assert outcome["event"] == "reloaded"
    warning = daemon.wait_for(lambda e: e.get("event") == "reload_needs_restart")
    assert warning["keys"] == ["server.workers", "log.format"]
    assert len({e["pid"] for e in daemon.named("started")}) == 1


def test_command_line_listen_survives_reload(start_daemon, users):
    """--listen overrides server.listen at start and at every reload."""
    daemon = start_daemon(config(users, "127.0.0.2:0"))
    (outcome,) = daemon.reload()
    assert outcome["opened"] == [] and outcome["closed"] == []
    assert outcome["listeners"] == [f"127.0.0.1:{daemon.port}"]


def test_workers_reload_together(start_daemon, tcp_server, users, tmp_path):
    receiver = NotifyReceiver(tmp_path / "notify")
    try:
        text = config(users, "127.0.0.1:0").replace("[server]\n", "[server]\nworkers = 2\n")
        daemon = start_daemon(text, listen="", env={"NOTIFY_SOCKET": str(receiver.path)})
        workers_started(daemon, 2)
        receiver.wait_for("READY=1")
        server = tcp_server()
        with socks5client.open_tunnel(
            daemon.address, "127.0.0.1", server.port, auth=("alice", "wonderland-42")
        ) as tunnel:
            add_bob(users)
            receiver.messages.clear()
            outcomes = daemon.reload(
                config(users, "127.0.0.1:0", "127.0.0.2:0").replace(
                    "[server]\n", "[server]\nworkers = 2\n"
                ),
                results=2,
            )
            assert [o["event"] for o in outcomes] == ["reloaded", "reloaded"]
            # the supervisor fixed the new port once: both workers listen on it
            assert outcomes[0]["opened"] == outcomes[1]["opened"] and outcomes[0]["opened"]
            new = listening_on(daemon, "127.0.0.2")
            ready = receiver.wait_for("READY=1")
            assert receiver.messages.index(receiver.wait_for("RELOADING=1")) < (
                receiver.messages.index(ready)
            )
            echo_through(tunnel, b"x" * 100_000)
            for _ in range(10):
                with socks5client.open_tunnel(new, "127.0.0.1", server.port, auth=BOB) as sock:
                    echo_through(sock, b"bob")
            # a bad config, or an address that cannot be bound, reaches no worker
            (outcome,) = daemon.reload("[server\n")
            assert outcome["event"] == "reload_failed"
            with listening_socket("127.0.0.3") as taken:
                busy = f"127.0.0.3:{taken.getsockname()[1]}"
                (outcome,) = daemon.reload(
                    config(users, "127.0.0.1:0", busy).replace(
                        "[server]\n", "[server]\nworkers = 2\n"
                    )
                )
            assert outcome["event"] == "reload_failed"
            assert outcome["problems"] == [f"server.listen: {busy}: Address already in use"]
            assert len(daemon.named("reloaded")) == 2
            echo_through(tunnel, b"y" * 1000)
        bob = [e for e in daemon.access_events() if e["user"] == "bob"]
        assert len(bob) == 10 and all(e["status"] == "ok" for e in bob)
    finally:
        receiver.close()
