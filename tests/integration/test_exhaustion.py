"""Resource exhaustion: out of file descriptors the daemon pauses accepting instead of
spinning or dying and serves again once connections close; `server.max_connections`
holds under a burst of clients arriving at once."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from conftest import Daemon
from integration import socks5client

NOFILE = 64  # the daemon needs about 20 of them for itself


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (/proc/PID/stat, clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / 100


def test_out_of_descriptors_pauses_accepting_and_recovers(tcp_server, tmp_path: Path):
    echo = tcp_server()
    config = tmp_path / "proxyd.toml"
    config.write_text("")
    prefix = ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"]  # execs: the same pid
    daemon = Daemon(["--config", str(config), "--listen", "127.0.0.1:0"], prefix=prefix)
    clients: list[socket.socket] = []
    try:
        daemon.started()
        # clients that connect and say nothing hold a descriptor each, until there are none
        for _ in range(NOFILE * 2):
            clients.append(socket.create_connection(daemon.address, timeout=5))
        paused = daemon.wait_for(lambda e: e.get("event") == "accept_paused")
        assert "Too many open files" in paused["error"]
        # paused, not spinning: the loop sleeps while the backlog waits
        before = cpu_seconds(daemon.proc.pid)
        time.sleep(1.0)
        assert cpu_seconds(daemon.proc.pid) - before < 0.3
        assert daemon.proc.poll() is None
        for sock in clients:
            sock.close()
        clients.clear()
        # once they are gone it serves again (each of them got its line)
        daemon.wait_for(lambda _e: len(daemon.access_events()) >= NOFILE * 2, timeout=20)
        with socks5client.open_tunnel(daemon.address, "127.0.0.1", echo.port) as sock:
            sock.sendall(b"back")
            assert socks5client.recv_exact(sock, 4) == b"back"
        assert "Traceback" not in daemon.output()
    finally:
        for sock in clients:
            sock.close()
        daemon.stop(force_after=2.0)


def test_max_connections_holds_under_a_burst(start_daemon, tcp_server):
    echo = tcp_server()
    limit, burst = 20, 120
    daemon = start_daemon(f"[server]\nmax_connections = {limit}\n")
    results: list[int] = []
    held: list[socket.socket] = []
    lock = threading.Lock()
    go = threading.Event()

    def client() -> None:
        go.wait(5)
        try:
            sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", echo.port)
        except (OSError, AssertionError):
            rep, sock = -2, None  # closed without an answer
        with lock:
            results.append(rep)
            if sock is not None:
                held.append(sock)

    threads = [threading.Thread(target=client) for _ in range(burst)]
    for thread in threads:
        thread.start()
    go.set()
    for thread in threads:
        thread.join(20)
    try:
        assert len(results) == burst
        assert results.count(0) == limit, sorted(results)
        assert all(rep in (1, -2) for rep in results if rep != 0)
        refused = daemon.wait_for(
            lambda _e: (
                len([e for e in daemon.access_events() if e["status"] == "limit"]) >= burst - limit
            )
        )
        assert refused
    finally:
        for sock in held:
            sock.close()
    # the tunnels end, and the next client is served
    daemon.wait_for(lambda _e: len(daemon.access_events()) == burst)
    with socks5client.open_tunnel(daemon.address, "127.0.0.1", echo.port) as sock:
        sock.sendall(b"ok")
        assert socks5client.recv_exact(sock, 2) == b"ok"
