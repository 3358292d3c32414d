"""Targets that fail, one table for every way of asking: SOCKS5, SOCKS4/4a, HTTP CONNECT
and plain HTTP forwarding. Each fault must give its reply code, a prompt close of the
client (no wait for a timeout that does not apply), and an access line with its status.

Targets are loopback listeners and processes of the test's own; names come from a hosts
file in the daemon's own namespace, so an unknown name never reaches a DNS server."""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from conftest import closed_port, listening_socket, silent_listener
from integration import socks5client
from integration.socks5client import recv_exact

FRONTS = ("socks5", "socks4", "connect", "forward")
SUCCESS = {"socks5": 0, "socks4": 90, "connect": 200, "forward": 200}
HOSTS = "127.0.0.1 known.test\n"
CONFIG = "[timeouts]\nconnect = 1\nidle = 60\n"
SLOWER = "[timeouts]\nconnect = 2\nidle = 60\n"  # for margins a busy machine keeps
# what the client must be told when the target cannot be reached, and the access status
UNREACHABLE = {
    "refused": ({"socks5": 0x05, "socks4": 91, "connect": 502, "forward": 502}, "refused"),
    "unknown_name": ({"socks5": 0x04, "socks4": 91, "connect": 502, "forward": 502}, "unreachable"),
    "silent": ({"socks5": 0x04, "socks4": 91, "connect": 504, "forward": 504}, "timeout"),
}
PROMPT = 10.0  # seconds: far below timeouts.idle (60), so a close that waited for it shows


def ask(
    front: str, daemon, host: str, port: int, timeout: float = 10.0
) -> tuple[socket.socket, int]:
    """Ask the daemon for host:port the way `front` does: (the socket, the answer's
    code). A forwarded request is a GET of a big body, sent without waiting."""
    if front == "socks5":
        sock, rep, _, _ = socks5client.connect(daemon.address, host, port, timeout=timeout)
        return sock, rep
    sock = socket.create_connection(daemon.address, timeout=timeout)
    if front == "socks4":
        try:  # SOCKS4 for an address, SOCKS4a for a name
            ip, name = socket.inet_aton(host), b""
        except OSError:
            ip, name = b"\0\0\0\1", host.encode() + b"\0"
        sock.sendall(struct.pack("!BBH", 4, 1, port) + ip + b"\0" + name)
        return sock, recv_exact(sock, 8)[1]
    target = f"{host}:{port}"
    if front == "connect":
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    else:
        sock.sendall(f"GET http://{target}/big HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        byte = sock.recv(1)
        assert byte, f"closed after {head!r}"
        head += byte
    return sock, int(head.split()[1])


def end_of(sock: socket.socket, limit: float = 10.0) -> tuple[str, float]:
    """Read until the daemon ends the connection: ("eof" or "reset", seconds it took)."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            assert time.monotonic() - started < limit, "still sending"
    except ConnectionResetError:
        return "reset", time.monotonic() - started
    return "eof", time.monotonic() - started


@pytest.mark.parametrize("fault", list(UNREACHABLE))
def test_a_target_that_cannot_be_reached(start_daemon, tmp_path, fault):
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    daemon = start_daemon(CONFIG, hosts=hosts)
    codes, status = UNREACHABLE[fault]
    with silent_listener() as silent_port:
        host, port = {
            "refused": ("127.0.0.1", closed_port()),
            "unknown_name": ("unknown.test", 80),
            "silent": ("127.0.0.1", silent_port),
        }[fault]
        for conn_id, front in enumerate(FRONTS, start=1):
            started = time.monotonic()
            sock, code = ask(front, daemon, host, port)
            with sock:
                assert code == codes[front], front
                how, _ = end_of(sock)  # an HTTP answer's body, then the close
            assert how == "eof", front
            # at most the connect timeout (1 s) for the silent target, at once otherwise
            assert time.monotonic() - started < PROMPT, front
            line = daemon.access(lambda e, i=conn_id: e["conn_id"] == i)
            assert (line["status"], line["target"]) == (status, f"{host}:{port}"), front
            assert line["error"], front
            if fault == "silent":  # the connect timeout (1 s) was what ended it
                # (to the loop's timer granularity: libuv counts in whole milliseconds
                # from the time its iteration began, so a timer may fire 1 ms early)
                assert line["duration_ms"] >= 990, front
    assert "Traceback" not in daemon.output()


def send_then_reset(conn: socket.socket) -> None:
    """Answer (an HTTP head when asked for one), send 64 KiB, then reset the connection."""
    first = conn.recv(4096)
    if first.startswith(b"GET "):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
    conn.sendall(b"r" * 65536)
    time.sleep(0.2)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


@pytest.mark.parametrize("front", FRONTS)
def test_a_target_that_resets_mid_transfer(start_daemon, tcp_server, front, relay_kind):
    """The reset is passed on as a reset: the client must not take the cut-off stream
    for a whole one (a FIN would say "that was all")."""
    daemon = start_daemon(CONFIG + relay_kind)
    server = tcp_server(send_then_reset)
    sock, code = ask(front, daemon, "127.0.0.1", server.port)
    with sock:
        assert code == SUCCESS[front]
        if front != "forward":
            sock.sendall(b"hello")
        assert recv_exact(sock, 1000) == b"r" * 1000
        how, took = end_of(sock)
    assert how == "reset"
    assert took < PROMPT
    line = daemon.access()
    assert line["status"] == ("upstream_closed" if front == "forward" else "reset")
    assert line["bytes_down"] > 0


# A target in a process of its own, killed with SIGKILL while it streams to the client.
# With "unread" it only peeks at what it was sent (waiting until the request is in its
# kernel's queue), so its kernel resets the connection; with "read" it reads it all,
# and the kernel's close is an orderly FIN. Every wait is bounded (20 s).
KILLABLE = r"""
import socket, sys, time
mode, front = sys.argv[1:]
listener = socket.create_server(("127.0.0.1", 0))
listener.settimeout(20)
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
conn.settimeout(20)
want = b"\r\n\r\n" if front == "forward" else b"hello"
seen = b""
while want not in seen:
    data = conn.recv(65536, socket.MSG_PEEK if mode == "unread" else 0)
    if not data:
        sys.exit("closed before the request came")
    if mode == "unread":
        seen = data
        time.sleep(0.01)
    else:
        seen += data
if front == "forward":
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n")
print("answering", flush=True)
while True:
    conn.sendall(b"k" * 65536)
"""


def line_from(process: subprocess.Popen[bytes], timeout: float = 20.0) -> bytes:
    """The next line the process prints, within `timeout`."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "the target said nothing"
    return process.stdout.readline()


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("unread", [True, False], ids=["unread", "all_read"])
def test_a_target_killed_mid_stream(start_daemon, front, unread, relay_kind):
    daemon = start_daemon(CONFIG + relay_kind)
    mode = "unread" if unread else "read"
    with subprocess.Popen(
        [sys.executable, "-c", KILLABLE, mode, front], stdout=subprocess.PIPE
    ) as target:
        try:
            port = int(line_from(target))
            sock, code = ask(front, daemon, "127.0.0.1", port)
            with sock:
                assert code == SUCCESS[front]
                if front != "forward":
                    sock.sendall(b"hello")
                assert line_from(target) == b"answering\n"
                assert recv_exact(sock, 256 * 1024) == b"k" * (256 * 1024)
                target.send_signal(signal.SIGKILL)
                target.wait(10)
                how, took = end_of(sock)
                assert took < PROMPT
                if front != "forward" and not unread:
                    # an orderly close, as the kernel made it: the client hears the end
                    # of the stream, and the tunnel ends once it closes its side too
                    assert how == "eof"
                    expected_status = "ok"
                else:  # a reset, or a forwarded answer cut short of its Content-Length
                    assert how == "reset"
                    expected_status = "upstream_closed" if front == "forward" else "reset"
        finally:
            if target.poll() is None:
                target.kill()
    line = daemon.access()
    assert line["status"] == expected_status
    assert line["bytes_down"] >= 256 * 1024


@pytest.mark.parametrize("front", ["socks5", "connect"])
def test_a_client_that_resets_mid_upload_resets_the_target(
    start_daemon, tcp_server, front, relay_kind
):
    """The other way round: the target hears the client's reset as one."""
    outcome: list[str] = []

    def sink(conn: socket.socket) -> None:
        outcome.append(end_of(conn)[0])

    daemon = start_daemon(CONFIG + relay_kind)
    server = tcp_server(sink)
    sock, code = ask(front, daemon, "127.0.0.1", server.port)
    with sock:
        assert code == SUCCESS[front]
        sock.sendall(b"u" * 65536)
        time.sleep(0.2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert daemon.access()["status"] == "reset"
    deadline = time.monotonic() + PROMPT
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outcome == ["reset"]


@contextlib.contextmanager
def dns_server(
    names: dict[str, str] | None = None,
    delay: float = 0.0,
    asked: list[str] | None = None,
    *,
    stall_unknown: bool = False,
) -> Iterator[str]:
    """A DNS server on a loopback address of its own (port 53); yields the address.
    Without `names` it takes every query and never answers (a dead server); with
    them it answers after `delay` seconds: an A record for a name it knows, and no
    address for anything else, or (`stall_unknown`) no answer ever for a name it
    does not know. Each A query's name is added to `asked`."""
    for last in range(77, 100):
        ip = f"127.0.0.{last}"
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            server.bind((ip, 53))
        except OSError:
            server.close()
            continue
        break
    else:
        raise RuntimeError("no loopback address with port 53 free")
    timers: list[threading.Timer] = []
    stop = threading.Event()
    server.settimeout(0.1)

    def serve() -> None:
        while not stop.is_set():
            try:
                query, client = server.recvfrom(512)
            except TimeoutError:
                continue
            if names is not None and not (stall_unknown and query_name(query) not in names):
                answer = dns_answer(query, names, asked)
                timer = threading.Timer(delay, server.sendto, (answer, client))
                timers.append(timer)
                timer.start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield ip
    finally:
        stop.set()
        thread.join(5)
        for timer in timers:
            timer.cancel()
        server.close()


def query_name(query: bytes) -> str:
    """The name a one-question query asks for."""
    return _question(query)[0]


def _question(query: bytes) -> tuple[str, int]:
    """The name a one-question query asks for, and where its type field starts."""
    labels, i = [], 12
    while i < len(query) and query[i]:
        labels.append(query[i + 1 : i + 1 + query[i]].decode())
        i += 1 + query[i]
    return ".".join(labels), i + 1


def dns_answer(query: bytes, names: dict[str, str], asked: list[str] | None = None) -> bytes:
    """The answer to a one-question query: an A record when the name is known."""
    name, at = _question(query)
    qtype = struct.unpack("!H", query[at : at + 2])[0]
    question = query[12 : at + 4]
    if qtype == 1 and asked is not None:
        asked.append(name)
    ip = names.get(name) if qtype == 1 else None
    head = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if ip else 0, 0, 0)
    record = b""
    if ip:
        record = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(ip)
    return head + question + record


def test_a_dead_dns_server_holds_no_one_up(start_daemon, tmp_path):
    """300 clients at once ask for names only a DNS server that never answers could
    know. Each is answered when timeouts.connect (1 s) runs out, or at once when its
    address has too many names being looked up already; and lookups nobody waits for any more
    leave the queue, so a name from the hosts file is served soon after, instead of
    waiting behind some 300 lookups of 2 s each on 32 threads."""
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    target = listening_socket()
    with dns_server() as nameserver, target:
        daemon = start_daemon(CONFIG, hosts=hosts, nameserver=nameserver)
        clients = []
        for n in range(300):
            sock = socket.create_connection(daemon.address, timeout=10)
            sock.sendall(b"\x05\x01\x00\x05\x01\x00" + socks5client.address(f"n{n}.test", 80))
            clients.append(sock)
        for sock in clients:
            with sock:
                assert recv_exact(sock, 2) == b"\x05\x00"
                assert socks5client.read_reply(sock)[0] == 0x04
        lines = daemon.wait_for(lambda _e: len(daemon.named("access")) >= 300) and (
            daemon.access_events()
        )
        assert {line["status"] for line in lines} <= {"timeout", "unreachable"}
        # (all from one address: bounded by dns.per_client, before the queue's own bound)
        busy = [line for line in lines if "dns.per_client" in line.get("error", "")]
        assert busy, "the queue of names was not bounded"
        time.sleep(5)  # the queries under way time out (2 s), and no others are left
        sock, rep, _, _ = socks5client.connect(
            daemon.address, "known.test", target.getsockname()[1]
        )
        sock.close()
        assert rep == 0


ADDRESS_RULES = """
[[rules]]
action = "allow"
destinations = ["127.0.0.0/8"]

[server]
default_action = "deny"
"""


@pytest.mark.parametrize("front", ["socks5", "forward"])
def test_the_lookup_for_address_rules_counts_against_the_connect_timeout(
    start_daemon, tmp_path, front
):
    """With address rules a name is resolved before the rules are checked, then
    connected to: timeouts.connect (1 s) bounds both together. A lookup of 0.6 s and
    a target that never answers end at 1 s, not at 1.6 s."""
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    with silent_listener() as port, dns_server({"slow.test": "127.0.0.1"}, 0.6) as nameserver:
        daemon = start_daemon(CONFIG + ADDRESS_RULES, hosts=hosts, nameserver=nameserver)
        sock, code = ask(front, daemon, "slow.test", port)
        with sock:
            assert code == UNREACHABLE["silent"][0][front]
        line = daemon.access()
    assert line["status"] == "timeout"
    assert 900 <= line["duration_ms"] < 1400


def test_a_lookup_outlasting_one_client_serves_the_next(start_daemon, tmp_path):
    """A lookup slower than timeouts.connect: its client gets 0x04, but the query goes
    on; a client asking for the same name meanwhile shares it (it neither starts
    another nor is left without an answer), and the answer is cached. (Margins of
    a second and more: both test passes run at once on two busy cores.)"""
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    asked: list[str] = []
    target = listening_socket()
    port = target.getsockname()[1]
    with target, dns_server({"slow.test": "127.0.0.1"}, 2.6, asked) as nameserver:
        daemon = start_daemon(SLOWER, hosts=hosts, nameserver=nameserver, dns_timeout=5)
        first, code = ask("socks5", daemon, "slow.test", port)
        with first:
            assert code == 0x04  # the lookup outlasted timeouts.connect (2 s)
        second, code = ask("socks5", daemon, "slow.test", port)  # while it goes on
        with second:
            assert code == 0
        third, code = ask("socks5", daemon, "slow.test", port)  # from the cache
        with third:
            assert code == 0
    assert asked == ["slow.test"]
    assert daemon.access(lambda line: line["conn_id"] == 1)["status"] == "timeout"


def test_a_slow_lookup_is_not_held_against_a_parent_proxy(start_daemon, tmp_path, tcp_server):
    """Address rules need the name resolved before the route through a parent is
    known. A lookup taking most of timeouts.connect (1.2 s of 2 s) leaves the parent
    the whole timeout still: one that takes 1.2 s to greet is used, not counted as
    failed."""

    def slow_parent(conn: socket.socket) -> None:
        """A SOCKS5 parent that thinks for 1.2 s, then grants anything and echoes."""
        time.sleep(1.2)
        assert recv_exact(conn, 3) == b"\x05\x01\x00"
        conn.sendall(b"\x05\x00")
        head = recv_exact(conn, 4)
        recv_exact(conn, recv_exact(conn, 1)[0] + 2 if head[3] == 3 else 6)
        conn.sendall(b"\x05\x00\x00\x01" + bytes(4) + b"\x00\x00")
        while data := conn.recv(65536):
            conn.sendall(data)

    parent = tcp_server(slow_parent)
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    config = (
        SLOWER
        + f'[[upstreams]]\nname = "p"\nservers = ["socks5h://127.0.0.1:{parent.port}"]\n'
        + "max_fails = 1\n"
        + '[[rules]]\naction = "allow"\ndestinations = ["127.0.0.0/8"]\nvia = "p"\n'
        + '[server]\ndefault_action = "deny"\n'
    )
    with dns_server({"far.test": "127.0.0.1"}, 1.2) as nameserver:
        daemon = start_daemon(config, hosts=hosts, nameserver=nameserver)
        sock, code = ask("socks5", daemon, "far.test", 80)
        with sock:
            assert code == 0
            sock.sendall(b"ping")
            assert recv_exact(sock, 4) == b"ping"
    line = daemon.access()
    assert (line["status"], line["via"]) == ("ok", "p")
    assert not daemon.named("upstream_failed")
