"""server.workers = N: processes sharing the port, restarted when they die, stopped together."""

from __future__ import annotations

import os
import signal
import time

from conftest import proxyd
from integration import socks5client
from integration.socks5client import recv_exact


def workers_started(daemon, n: int) -> dict[int, int]:
    """worker index -> pid, once n workers have logged `started`."""
    daemon.wait_for(
        lambda e: len({x["pid"] for x in daemon.events if x.get("event") == "started"}) >= n
    )
    return {e["worker"]: e["pid"] for e in daemon.events if e.get("event") == "started"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_workers_share_port_restart_and_stop(start_daemon, tcp_server):
    daemon = start_daemon("[server]\nworkers = 2\n")
    supervisor = daemon.wait_for(lambda e: e.get("event") == "supervising")
    assert supervisor["pid"] == daemon.proc.pid
    pids = workers_started(daemon, 2)
    assert sorted(pids) == [0, 1] and daemon.proc.pid not in pids.values()
    listening = {e["address"] for e in daemon.events if e.get("event") == "listening"}
    assert listening == {f"127.0.0.1:{daemon.port}"}  # one port, both workers

    server = tcp_server()
    for _ in range(40):
        sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
        with sock:
            assert rep == 0
            sock.sendall(b"w")
            assert recv_exact(sock, 1) == b"w"
    daemon.wait_for(lambda e: sum(x.get("event") == "access" for x in daemon.events) >= 40)
    ids = [line["conn_id"] for line in daemon.access_events()]
    assert len(ids) == len(set(ids)) == 40  # unique across workers
    # worker w numbers its connections w+1, w+1+2, ...: both parities means both served
    assert {i % 2 for i in ids} == {0, 1}

    # a worker killed outright is replaced, and the port keeps answering
    os.kill(pids[0], signal.SIGKILL)
    daemon.wait_for(lambda e: e.get("event") == "worker_exited" and e["worker"] == 0)
    replacement = daemon.wait_for(
        lambda e: e.get("event") == "started" and e["worker"] == 0 and e["pid"] != pids[0]
    )["pid"]
    deadline = time.monotonic() + 10
    served = 0
    while served < 20 and time.monotonic() < deadline:
        sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
        sock.close()
        served += rep == 0
    assert served == 20

    # SIGTERM to the supervisor reaches every worker
    assert daemon.stop() == 0
    for pid in (pids[1], replacement):
        deadline = time.monotonic() + 5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid)
    assert sum(e.get("event") == "stopped" for e in daemon.events) == 3


def test_workers_config_is_checked(tmp_path):
    path = tmp_path / "w.toml"
    path.write_text("[server]\nworkers = 0\n")
    result = proxyd("check-config", "--config", str(path))
    assert result.returncode == 1
    assert "server.workers" in result.stderr
