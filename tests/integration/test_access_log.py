"""The access log: exactly one line per connection, every field DESIGN.md names, true counts."""

from __future__ import annotations

import datetime
import socket
import time

from conftest import Daemon, closed_port
from integration import socks5client
from integration.socks5client import recv_exact

FIELDS = {
    "ts": str,
    "conn_id": int,
    "client": str,
    "user": (str, type(None)),
    "protocol": (str, type(None)),
    "command": (str, type(None)),
    "target": (str, type(None)),
    "status": str,
    "bytes_up": int,
    "bytes_down": int,
    "duration_ms": (int, float),
}


def test_one_complete_line_per_connection(start_daemon, tcp_server):
    daemon = start_daemon()
    server = tcp_server()
    # 1: a tunnel with exact payloads each way
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    with sock:
        assert rep == 0
        sock.sendall(b"a" * 1000)
        assert recv_exact(sock, 1000) == b"a" * 1000
        sock.sendall(b"b" * 234)
        assert recv_exact(sock, 234) == b"b" * 234
    # 2: refused target; 3: garbage; 4: client that connects and leaves
    sock, _, _, _ = socks5client.connect(daemon.address, "127.0.0.1", closed_port())
    sock.close()
    with socket.create_connection(daemon.address) as s:
        s.sendall(b"\xfe")
        s.recv(1)
    socket.create_connection(daemon.address).close()

    for conn_id in (1, 2, 3, 4):
        daemon.access(lambda e, i=conn_id: e["conn_id"] == i)
    lines = daemon.access_events()
    assert sorted(line["conn_id"] for line in lines) == [1, 2, 3, 4]
    for line in lines:
        for field, kind in FIELDS.items():
            assert isinstance(line[field], kind), (field, line)
        ts = datetime.datetime.fromisoformat(line["ts"])
        assert ts.utcoffset() == datetime.timedelta(0)
        assert line["client"].startswith("127.0.0.1:")
    by_id = {line["conn_id"]: line for line in lines}
    assert (by_id[1]["status"], by_id[1]["bytes_up"], by_id[1]["bytes_down"]) == ("ok", 1234, 1234)
    assert by_id[1]["target"] == f"127.0.0.1:{server.port}"
    assert by_id[2]["status"] == "refused"
    assert by_id[3]["status"] == "bad_request"
    assert by_id[4]["status"] == "client_closed"


def test_access_events_can_be_turned_off(start_daemon, tcp_server):
    daemon = start_daemon("[log]\naccess = false\n")
    server = tcp_server()
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    sock.close()
    assert rep == 0
    daemon.stop()
    assert not daemon.access_events()
    assert any(e.get("event") == "stopped" for e in daemon.events)


def test_console_format(tcp_server):
    daemon = Daemon(["--listen", "127.0.0.1:0", "--log-format", "console"])
    try:
        end = time.monotonic() + 15
        line = None
        while line is None and time.monotonic() < end:
            line = next((ln for ln in list(daemon.lines) if "listening" in ln), None)
            time.sleep(0.05)
        assert line is not None, daemon.output()
        assert not line.startswith("{")  # key=value text, not JSON
        port = int(line.split("address=")[1].split()[0].rpartition(":")[2])
        server = tcp_server()
        sock, rep, _, _ = socks5client.connect(("127.0.0.1", port), "127.0.0.1", server.port)
        sock.close()
        assert rep == 0
        end = time.monotonic() + 10
        while not any("access" in ln for ln in list(daemon.lines)) and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        assert daemon.stop() == 0
    assert any("access" in ln and "status=ok" in ln for ln in daemon.lines), daemon.output()
