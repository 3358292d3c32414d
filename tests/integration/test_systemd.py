"""Life under systemd: sd_notify messages, socket activation, and draining on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, Daemon, NotifyReceiver, proxyd
from integration import socks5client
from integration.socks5client import recv_exact


def test_notify_ready_status_watchdog_stopping(start_daemon, tmp_path, tcp_server):
    receiver = NotifyReceiver(tmp_path / "notify")
    try:
        daemon = start_daemon(env={"NOTIFY_SOCKET": str(receiver.path), "WATCHDOG_USEC": "300000"})
        ready = receiver.wait_for("READY=1")
        assert "STATUS=0 active connections" in ready
        server = tcp_server()
        with socks5client.open_tunnel(daemon.address, "127.0.0.1", server.port):
            # pings at half of WATCHDOG_USEC, from the loop, with the status
            ping = receiver.wait_for("STATUS=1 active connections", timeout=5)
            assert "WATCHDOG=1" in ping
            receiver.messages.clear()
            started = time.monotonic()
            receiver.wait_for("WATCHDOG=1", timeout=5)
            assert time.monotonic() - started < 2
        daemon.proc.send_signal(signal.SIGTERM)
        assert receiver.wait_for("STOPPING=1")
        assert daemon.proc.wait(10) == 0
    finally:
        receiver.close()


def test_no_notify_socket_no_messages(start_daemon, tcp_server):
    """Without NOTIFY_SOCKET the daemon runs as ever (every other test shows it too)."""
    env = {k: "" for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    daemon = start_daemon(env=env)
    server = tcp_server()
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    sock.close()
    assert rep == 0
    assert daemon.stop() == 0


def test_socket_activation_serves_curl(tmp_path, origin):
    """Under systemd-socket-activate the daemon takes the passed socket (LISTEN_FDS,
    LISTEN_PID) instead of binding server.listen, and detects protocols on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "proxyd.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:1"]\n')  # ignored: systemd's socket wins
    daemon = Daemon(
        ["--config", str(config)],
        prefix=["systemd-socket-activate", "--listen", f"127.0.0.1:{port}"],
    )
    try:
        # systemd-socket-activate listens first (wait for it without connecting), and
        # runs the daemon when the first client connects
        deadline = time.monotonic() + 15
        while (
            f":{port} "
            not in subprocess.run(
                ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True
            ).stdout
        ):
            assert time.monotonic() < deadline, "systemd-socket-activate is not listening"
            time.sleep(0.05)
        for proxy in (f"socks5h://127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
            result = subprocess.run(
                ["curl", "-sS", "--max-time", "20", "--proxy", proxy, origin.url],
                capture_output=True,
                timeout=30,
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout == origin.body
        daemon.started()
        assert daemon.port == port
        activation = daemon.wait_for(lambda e: e.get("event") == "socket_activation")
        assert activation["listeners"] == [f"127.0.0.1:{port}"]
        protocols = [daemon.access(lambda e, i=i: e["conn_id"] == i)["protocol"] for i in (1, 2)]
        assert protocols == ["socks5", "http"]
    finally:
        assert daemon.stop() == 0


def test_sigterm_drains_open_tunnels(start_daemon, tcp_server):
    """SIGTERM: new clients are turned away at once, an open tunnel carries on until
    its client is done, then the daemon exits 0."""
    daemon = start_daemon("[server]\nshutdown_grace = 30\n")
    server = tcp_server()
    with socks5client.open_tunnel(daemon.address, "127.0.0.1", server.port) as sock:
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_for(lambda e: e.get("event") == "draining")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(daemon.address, timeout=5).close()
        for i in range(3):
            sock.sendall(b"still %d" % i)
            assert recv_exact(sock, 7) == b"still %d" % i
        assert daemon.proc.poll() is None
    started = time.monotonic()
    assert daemon.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    line = daemon.access()
    assert (line["status"], line["bytes_up"]) == ("ok", 21)


def test_grace_runs_out_and_a_second_signal_cuts_short(start_daemon, tcp_server):
    server = tcp_server()
    daemon = start_daemon("[server]\nshutdown_grace = 1\n")
    with socks5client.open_tunnel(daemon.address, "127.0.0.1", server.port) as sock:
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0
        assert 0.9 <= time.monotonic() - started < 5
        assert sock.recv(1) == b""
    assert daemon.access()["status"] == "shutdown"

    daemon = start_daemon("[server]\nshutdown_grace = 60\n")
    with socks5client.open_tunnel(daemon.address, "127.0.0.1", server.port) as sock:
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_for(lambda e: e.get("event") == "draining")
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGINT)
        assert daemon.proc.wait(10) == 0
        assert time.monotonic() - started < 5
    assert daemon.access()["status"] == "shutdown"


def test_drain_closes_idle_keep_alive_connections(start_daemon, origin):
    """A forwarding connection waiting for its next request holds no drain up."""
    daemon = start_daemon("[server]\nshutdown_grace = 30\n")
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(f"GET {origin.url} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        received = b""
        while len(received) < len(origin.body):
            received += sock.recv(65536)
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0
        assert time.monotonic() - started < 5
    assert daemon.access()["status"] == "ok"


def _unit_text(name: str) -> str:
    return (ROOT / "systemd" / name).read_text()


def test_units_verify(tmp_path):
    """systemd-analyze verify accepts both units (ExecStart pointed at this checkout's
    proxyd, since verify wants the program to exist)."""
    program = Path(sys.executable).parent / "proxyd"
    for name in ("proxyd.service", "proxyd.socket"):
        text = _unit_text(name).replace("/usr/local/bin/proxyd", str(program))
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            str(tmp_path / "proxyd.service"),
            str(tmp_path / "proxyd.socket"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    assert result.returncode == 0, result.stderr
    problems = [line for line in result.stderr.splitlines() if "proxyd" in line]
    assert not problems, problems


def test_service_security_rating_is_ok_or_better(tmp_path):
    """systemd-analyze security (offline: no running systemd needed) rates the service
    OK or better; README quotes the score."""
    unit = tmp_path / "proxyd.service"
    unit.write_text(_unit_text("proxyd.service"))
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    overall = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert overall, result.stdout + result.stderr
    score, rating = overall[0].split(": ", 1)[1].split()[:2]
    assert rating in ("PERFECT", "SAFE", "OK"), overall[0]
    assert float(score) <= 2.0


def test_a_passed_descriptor_that_is_no_listening_socket_is_an_error(tmp_path):
    """LISTEN_FDS naming something else (here /dev/null as fd 3) stops the start with
    a clear error, not a traceback."""
    config = tmp_path / "proxyd.toml"
    config.write_text("")
    script = (
        'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -m proxyd --config "$1" --listen 127.0.0.1:0 '
        "3</dev/null"
    )
    result = subprocess.run(
        ["sh", "-c", script, sys.executable, str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "LISTEN_FDS: descriptor 3" in result.stdout
    assert "Traceback" not in result.stderr


def test_a_passed_socket_beyond_loopback_meets_the_open_proxy_guard(tmp_path):
    """server.listen is on loopback, but systemd passes a socket on every address: with
    no users that is an open proxy, refused at the start, naming the socket."""
    config = tmp_path / "proxyd.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:1"]\n')
    # the socket comes as stdin, and is moved to descriptor 3 as systemd would pass it
    script = 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -m proxyd --config "$1" 3<&0 </dev/null'
    with socket.socket() as passed:  # listening, never connected to
        passed.bind(("0.0.0.0", 0))
        passed.listen()
        port = passed.getsockname()[1]
        result = subprocess.run(
            ["sh", "-c", script, sys.executable, str(config)],
            stdin=passed,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
    assert result.returncode == 1, result
    assert f"socket activation: 0.0.0.0:{port} is reachable beyond this host" in result.stderr
    assert "listening" not in result.stdout


def test_workers_supervisor_notifies(start_daemon, tmp_path):
    """With workers > 1 the supervisor speaks to systemd (NotifyAccess=main)."""
    receiver = NotifyReceiver(tmp_path / "notify")
    try:
        daemon = start_daemon("[server]\nworkers = 2\n", env={"NOTIFY_SOCKET": str(receiver.path)})
        ready = receiver.wait_for("READY=1")
        assert "STATUS=0 active connections, 2 of 2 workers serving" in ready
        daemon.proc.send_signal(signal.SIGTERM)
        receiver.wait_for("STOPPING=1")
        assert daemon.proc.wait(10) == 0
        assert not [m for m in receiver.messages if "WATCHDOG=1" in m]  # workers stay silent
    finally:
        receiver.close()


def test_workers_watchdog_restarts_a_stuck_worker(start_daemon, tmp_path, tcp_server):
    """Under a watchdog each worker's loop pings the supervisor; one that stops (here:
    SIGSTOP) is killed and restarted while the supervisor keeps systemd's watchdog fed."""
    from integration.test_workers import alive, workers_started

    receiver = NotifyReceiver(tmp_path / "notify")
    try:
        env = {"NOTIFY_SOCKET": str(receiver.path), "WATCHDOG_USEC": "1000000"}
        daemon = start_daemon("[server]\nworkers = 2\n", env=env)
        pids = workers_started(daemon, 2)
        assert "STATUS=0 active connections, 2 of 2 workers serving" in receiver.wait_for("READY=1")
        held = [
            socks5client.connect(daemon.address, "127.0.0.1", tcp_server().port)[0]
            for _ in range(3)
        ]
        # the workers' counts, summed in the supervisor's status
        receiver.wait_for("STATUS=3 active connections, 2 of 2 workers serving")
        for sock in held:
            sock.close()
        os.kill(pids[0], signal.SIGSTOP)
        stuck = daemon.wait_for(lambda e: e.get("event") == "worker_unresponsive")
        assert (stuck["worker"], stuck["pid"]) == (0, pids[0])
        daemon.wait_for(lambda e: e.get("event") == "worker_restarted")
        new = workers_started(daemon, 3)[0]
        assert new != pids[0] and not alive(pids[0]) and alive(pids[1])
        receiver.messages.clear()
        assert "WATCHDOG=1" in receiver.wait_for(
            "STATUS=0 active connections, 2 of 2 workers serving"
        )
        server = tcp_server()
        for _ in range(10):
            sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
            sock.close()
            assert rep == 0
        assert not [e for e in daemon.events if e.get("event") == "worker_unresponsive"][1:]
    finally:
        receiver.close()


@pytest.mark.parametrize("which", ["users_file", "tls_key"])
def test_files_readable_by_others_are_warned_about(start_daemon, tmp_path, users_file, which):
    """A users file or TLS key readable by other users gives a warning at start."""
    import shutil

    users = tmp_path / "users"
    shutil.copy(users_file, users)
    made = proxyd("gen-cert", "--out", str(tmp_path), "--name", "x")
    assert made.returncode == 0
    users.chmod(0o644 if which == "users_file" else 0o600)
    (tmp_path / "key.pem").chmod(0o644 if which == "tls_key" else 0o600)
    daemon = start_daemon(
        f'[auth]\nusers_file = "{users}"\n'
        f'[tls]\ncert = "{tmp_path / "cert.pem"}"\nkey = "{tmp_path / "key.pem"}"\n'
    )
    warning = daemon.wait_for(lambda e: e.get("event", "").endswith("world_readable"))
    assert warning["event"] == f"{which}_world_readable"
    assert warning["level"] == "warning"
    assert len([e for e in daemon.events if e.get("event", "").endswith("world_readable")]) == 1
