"""Never itself, no private destination by default, and a denial that does not show
whether a name exists: the daemon as an attacker with valid access meets it.

The self-loop forms run in a network namespace of the test's own with an interface
of its own (198.51.100.7, 2001:db8::7), so that "the host's own address" is one the
test chose; the client there is run through nsenter. Exposed mode is had on loopback
through `server.proxy_protocol_from`, as a daemon behind a load balancer is exposed.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT, proxyd, request_head
from integration import socks5client
from integration.socks5client import recv_exact
from integration.test_udp import UdpEcho, no_datagram, udp_client
from integration.test_udp import header as udp_header

OWN_V4, OWN_V6 = "198.51.100.7", "2001:db8::7"
# a namespace with loopback up and a veth pair, one end holding the "host's" addresses
NETNS = [
    "unshare",
    "--net",
    "sh",
    "-c",
    "ip link set lo up && ip link add v0 type veth peer name v1"
    f" && ip addr add {OWN_V4}/24 dev v0 && ip addr add {OWN_V6}/64 dev v0 nodad"
    ' && ip link set v0 up && ip link set v1 up && exec "$@"',
    "sh",
]

# Run in the daemon's namespace: each (protocol, host, port) asked of the proxy at
# argv[1]:argv[2], the SOCKS5 reply code or the HTTP status printed as JSON.
CLIENT = """
import json, socket, sys
sys.path[:0] = [sys.argv[3] + "/tests"]
from integration import socks5client
proxy = ("127.0.0.1", int(sys.argv[2]))
found = []
for protocol, host, port in json.loads(sys.argv[1]):
    if protocol == "socks5":
        sock, rep, _, _ = socks5client.connect(proxy, host, port)
        sock.close()
        found.append(rep)
    else:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        with socket.create_connection(proxy) as sock:
            sock.sendall(f"CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n".encode())
            found.append(int(sock.recv(1024).split()[1]))
print(json.dumps(found))
"""


def ask_inside(daemon, requests: list[tuple[str, str, int]]) -> list[int]:
    run = subprocess.run(
        [
            "nsenter",
            f"--net=/proc/{daemon.proc.pid}/ns/net",
            sys.executable,
            "-c",
            CLIENT,
            json.dumps(requests),
            str(daemon.port),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def self_forms(port: int) -> list[str]:
    """Every way to write this host at `port` that a client could try."""
    return [
        "127.0.0.1",
        "127.3.2.1",
        "0.0.0.0",
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:0.0.0.0",
        f"::ffff:{OWN_V4}",
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::c633:6407",  # NAT64 of 198.51.100.7
        OWN_V4,
        OWN_V6,
    ]


def test_the_daemon_never_connects_to_itself_in_any_form(start_daemon):
    # loopback-only, so private destinations are allowed: only "itself" refuses these
    daemon = start_daemon('[metrics]\nlisten = "127.0.0.1:0"\n', prefix=NETNS)
    metrics = daemon.wait_for(lambda e: e.get("event") == "metrics_listening")
    metrics_port = int(metrics["address"].rpartition(":")[2])
    asked = [
        (protocol, host, port)
        for port in (daemon.port, metrics_port)
        for host in self_forms(port)
        for protocol in ("socks5", "http")
    ]
    answers = ask_inside(daemon, asked)
    assert answers == [2 if protocol == "socks5" else 403 for protocol, _, _ in asked], list(
        zip(asked, answers, strict=True)
    )
    lines = [e for e in daemon.access_events() if e["command"] == "connect"]
    assert len(lines) == len(asked)
    assert {(e["status"], e["reason"]) for e in lines} == {("denied", "own_listener")}
    # another port of the same host is no loop: refused by the kernel, not by us
    assert ask_inside(daemon, [("socks5", OWN_V4, 9)]) == [5]


def hosts_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hosts"
    path.write_text(text)
    return path


def test_a_name_for_this_host_at_our_port_is_refused_too(start_daemon, tmp_path):
    daemon = start_daemon("", hosts=hosts_file(tmp_path, "127.0.0.1 me.test\n::1 me6.test\n"))
    for name in ("me.test", "me6.test"):
        sock, rep, _, _ = socks5client.connect(daemon.address, name, daemon.port)
        sock.close()
        assert rep == 2, name
        assert daemon.access(lambda e, n=name: n in (e["target"] or ""))["reason"] == (
            "own_listener"
        )


# --- private destinations ----------------------------------------------------------------

# a balancer on loopback relays clients from elsewhere: the daemon is exposed
EXPOSED = '[server]\nproxy_protocol_from = ["127.0.0.1/32"]\nallow_open_proxy = true\n'


def v1(client: str = "192.0.2.50", port: int = 40000) -> bytes:
    family = "TCP6" if ":" in client else "TCP4"
    local = "::1" if ":" in client else "127.0.0.1"
    return f"PROXY {family} {client} {local} {port} 1080\r\n".encode()


def socks5_via_balancer(
    daemon, host: str, port: int, command: bytes = b"\x01"
) -> tuple[socket.socket, int]:
    """A SOCKS5 request (CONNECT, or `command`) from a client beyond the balancer."""
    sock = socket.create_connection(daemon.address, timeout=10)
    sock.sendall(v1() + b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    sock.sendall(b"\x05" + command + b"\x00" + socks5client.address(host, port))
    rep, _, _ = socks5client.read_reply(sock)
    return sock, rep


def http_via_balancer(daemon, head: bytes) -> bytes:
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(v1() + head)
        return sock.recv(65536)


class Watched:
    """A loopback TCP server that counts the connections it gets."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(b"hi")


@pytest.fixture
def watched():
    server = Watched()
    yield server
    server.sock.close()


PRIVATE = [
    "127.0.0.1",
    "::1",
    "::ffff:127.0.0.1",
    "64:ff9b::7f00:1",
    "169.254.169.254",
    "10.1.2.3",
    "192.168.1.1",
    "172.16.0.1",
    "100.64.0.1",
    "0.0.0.0",
    "fd00::1",
]


def test_an_exposed_daemon_refuses_private_destinations(start_daemon, watched, tmp_path):
    hosts = hosts_file(tmp_path, "127.0.0.1 db.test\n10.9.8.7 intranet.test\n")
    daemon = start_daemon(EXPOSED, hosts=hosts)
    for host in [*PRIVATE, "db.test", "intranet.test"]:
        sock, rep = socks5_via_balancer(daemon, host, watched.port)
        sock.close()
        assert rep == 2, host
        line = daemon.access(lambda e, h=host: (e["target"] or "").startswith((h, f"[{h}]")))
        assert (line["status"], line["reason"]) == ("denied", "private_destination"), line
    # HTTP: CONNECT and forwarding alike, 403
    answer = http_via_balancer(daemon, request_head("CONNECT", f"127.0.0.1:{watched.port}"))
    assert answer.startswith(b"HTTP/1.1 403")
    url = f"http://db.test:{watched.port}/"
    answer = http_via_balancer(daemon, request_head("GET", url, host=f"db.test:{watched.port}"))
    assert answer.startswith(b"HTTP/1.1 403")
    assert daemon.access(lambda e: e["command"] == "GET")["reason"] == "private_destination"
    assert watched.accepted == 0  # nothing reached the host's service


def test_only_a_rule_naming_the_destination_lets_it_through(start_daemon, watched, tmp_path):
    hosts = hosts_file(tmp_path, "127.0.0.1 db.test other.test\n")
    rules = (
        '[[rules]]\naction = "allow"\ndestinations = ["db.test", "127.0.0.2/32"]\n'
        '[[rules]]\naction = "allow"\n'  # a catch-all allow: not enough
    )
    daemon = start_daemon(EXPOSED + rules, hosts=hosts)
    sock, rep = socks5_via_balancer(daemon, "db.test", watched.port)
    with sock:
        assert rep == 0 and recv_exact(sock, 2) == b"hi"
    for host in ("other.test", "127.0.0.1"):  # by the catch-all
        sock, rep = socks5_via_balancer(daemon, host, watched.port)
        sock.close()
        assert rep == 2, host
    assert watched.accepted == 1
    # never the daemon itself, even where a rule names the address
    sock, rep = socks5_via_balancer(daemon, "db.test", daemon.port)
    sock.close()
    assert rep == 2
    assert daemon.access(lambda e: e["target"] == f"db.test:{daemon.port}")["reason"] == (
        "own_listener"
    )


def test_an_anywhere_cidr_names_no_private_destination(start_daemon, watched, tmp_path):
    """A rule for "anywhere on ports 80 and 443" written as 0.0.0.0/0 and ::/0 (or
    halves of it) covers private addresses without naming them: they stay denied.
    A CIDR inside a private network, or a narrow one, names what it holds."""
    hosts = hosts_file(tmp_path, "127.0.0.1 db.test\n")
    port = watched.port
    rules = (
        '[[rules]]\naction = "allow"\ndestinations = ["127.0.0.3/32", "10.0.0.0/8"]\n'
        '[[rules]]\naction = "allow"\n'
        'destinations = ["0.0.0.0/0", "::/0", "0.0.0.0/1", "128.0.0.0/1"]\n'
        f"ports = [{port}]\n"
    )
    daemon = start_daemon(EXPOSED + rules, hosts=hosts)
    for host in ("127.0.0.1", "db.test", "::1", "::ffff:127.0.0.1", "169.254.169.254"):
        sock, rep = socks5_via_balancer(daemon, host, port)
        sock.close()
        assert rep == 2, host
        line = daemon.access(lambda e, h=host: (e["target"] or "").startswith((h, f"[{h}]")))
        assert line["reason"] == "private_destination", line
    assert watched.accepted == 0
    with socket.create_server(("127.0.0.3", 0)) as named:  # named by its /32
        sock, rep = socks5_via_balancer(daemon, "127.0.0.3", named.getsockname()[1])
        with sock:
            assert rep == 0
            named.accept()[0].close()


def test_datagrams_and_bind_peers_meet_the_same_check(start_daemon):
    daemon = start_daemon(EXPOSED)
    echo = UdpEcho()
    try:
        sock = socket.create_connection(daemon.address, timeout=10)
        with sock:  # (the header names a loopback client: the datagrams come from there)
            sock.sendall(v1("127.0.0.1") + b"\x05\x01\x00")
            assert recv_exact(sock, 2) == b"\x05\x00"
            sock.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
            rep, relay_host, relay_port = socks5client.read_reply(sock)
            assert rep == 0
            with udp_client() as udp:
                udp.sendto(udp_header("127.0.0.1", echo.port) + b"ping", (relay_host, relay_port))
                assert no_datagram(udp)  # the echo would have answered
        line = daemon.access(lambda e: e["command"] == "udp_associate")
        assert line.get("datagrams_denied") == 1, json.dumps(line)
    finally:
        echo.close()
    sock, rep = socks5_via_balancer(daemon, "127.0.0.1", 0, b"\x02")
    sock.close()
    assert rep == 2


def test_a_route_through_a_parent_is_judged_on_what_is_known_here(
    start_daemon, tcp_server, watched, tmp_path
):
    """A parent on this host would come back to us, or reach the host's services:
    an address in the request, or the addresses a name resolved to for address
    rules, meet the same checks through a parent as when dialled directly."""
    asked: list[bytes] = []

    def parent(conn: socket.socket) -> None:  # a SOCKS5 parent that records and grants
        asked.append(conn.recv(256))

    group = tcp_server(parent)
    upstream = f'[[upstreams]]\nname = "p"\nservers = ["socks5h://127.0.0.1:{group.port}"]\n'
    # the daemon itself, on a loopback-only daemon, through a catch-all route via p
    daemon = start_daemon(upstream + '[[rules]]\naction = "allow"\nvia = "p"\n')
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", daemon.port)
    sock.close()
    assert rep == 2
    assert daemon.access()["reason"] == "own_listener"
    # an exposed daemon: private addresses given, or resolved for address rules
    hosts = hosts_file(tmp_path, "127.0.0.1 db.test\n")
    rules = (
        '[[rules]]\naction = "allow"\ndestinations = ["0.0.0.0/0", "::/0"]\nvia = "p"\n'
        '[[rules]]\naction = "allow"\nvia = "p"\n'
    )
    daemon = start_daemon(EXPOSED + upstream + rules, hosts=hosts)
    for host in ("10.1.2.3", "127.0.0.1", "::ffff:127.0.0.1", "db.test"):
        sock, rep = socks5_via_balancer(daemon, host, watched.port)
        sock.close()
        assert rep == 2, host
        line = daemon.access(lambda e, h=host: (e["target"] or "").startswith((h, f"[{h}]")))
        assert line["reason"] == "private_destination", line
    assert asked == []  # the parent was never asked


def udp_port_free_for_tcp() -> socket.socket:
    """A UDP socket on a loopback port whose TCP number is free too (at this moment)."""
    for _ in range(20):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", udp.getsockname()[1]))
            except OSError:
                udp.close()
                continue
        return udp
    raise RuntimeError("no loopback port free for both UDP and TCP")


def test_a_datagram_to_the_daemons_own_port_is_denied(start_daemon):
    """On a loopback-only daemon private destinations are allowed, but a datagram to
    a port of the daemon's own listeners is not sent."""
    # the UDP port first, then the daemon's TCP listener on the same number (the other
    # way round, a test running alongside may hold that UDP port already)
    with udp_port_free_for_tcp() as own:
        daemon = start_daemon(listen=f"127.0.0.1:{own.getsockname()[1]}")
        own.settimeout(1.0)
        sock = socket.create_connection(daemon.address, timeout=10)
        with sock:
            sock.sendall(b"\x05\x01\x00")
            assert recv_exact(sock, 2) == b"\x05\x00"
            sock.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
            rep, relay_host, relay_port = socks5client.read_reply(sock)
            assert rep == 0
            with udp_client() as udp:
                for host in ("127.0.0.1", "::ffff:127.0.0.1"):
                    udp.sendto(udp_header(host, daemon.port) + b"x", (relay_host, relay_port))
                with pytest.raises(TimeoutError):
                    own.recvfrom(64)
        line = daemon.access(lambda e: e["command"] == "udp_associate")
        assert line.get("datagrams_denied") == 2, json.dumps(line)


def test_deny_and_allow_are_the_operators_choice(start_daemon, watched, tmp_path):
    # "deny" on a loopback-only daemon
    daemon = start_daemon('[server]\nprivate_destinations = "deny"\n')
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", watched.port)
    sock.close()
    assert rep == 2
    # "allow" on an exposed one: as asked, with a warning from check-config
    config = EXPOSED + 'private_destinations = "allow"\n'
    daemon = start_daemon(config)
    sock, rep = socks5_via_balancer(daemon, "127.0.0.1", watched.port)
    sock.close()
    assert rep == 0
    path = tmp_path / "allow.toml"
    path.write_text(config)
    checked = proxyd("check-config", "--config", str(path))
    assert checked.returncode == 0, checked.stderr
    assert "private_destinations" in checked.stdout + checked.stderr


# --- a lookup failure never changes a denial -------------------------------------------


def test_a_denied_name_is_denied_whether_it_exists_or_not(start_daemon, tmp_path):
    hosts = hosts_file(tmp_path, "198.51.100.1 here.internal\n")
    rules = (
        '[[rules]]\naction = "allow"\ndestinations = ["192.0.2.0/24"]\n'
        '[[rules]]\naction = "deny"\ndestinations = ["*.internal"]\n'
    )
    daemon = start_daemon(rules, hosts=hosts)
    for name in ("here.internal", "gone.internal"):
        sock, rep, _, _ = socks5client.connect(daemon.address, name, 80)
        sock.close()
        assert rep == 2, name
        line = daemon.access(lambda e, n=name: e["target"] == f"{n}:80")
        assert (line["status"], line["rule"]) == ("denied", 1)
    # a name that is allowed but does not exist is still unreachable
    sock, rep, _, _ = socks5client.connect(daemon.address, "gone.example", 80)
    sock.close()
    assert rep == 4
