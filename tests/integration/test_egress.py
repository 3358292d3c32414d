"""Where connections leave from: `egress` in [server] and in rules. Every address of
127.0.0.0/8 is local, so an origin on loopback sees the address each connection
left from."""

from __future__ import annotations

import ipaddress
import json
import socket
import time

import pytest

from conftest import PASSWORD, USER, basic_token, proxyd
from integration import socks5client
from integration.socks5client import read_reply, recv_exact
from integration.test_bind import BIND, peer_from
from integration.test_http_forward import read_to_end
from integration.test_udp import associate, header, no_datagram, udp_client
from integration.test_upstream_faults import dns_server


def tunnel_from(daemon, port: int, auth=None) -> int:
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", port, auth=auth)
    sock.close()
    return rep


def sources(origin, count: int) -> list[str]:
    """The addresses the origin's first `count` connections came from (its accept
    thread records them: wait for it, at most 5 s)."""
    deadline = time.monotonic() + 5
    while len(origin.peers) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(origin.peers) >= count, origin.peers
    return [peer[0] for peer in origin.peers[:count]]


def test_a_fixed_egress_address(start_daemon, tcp_server):
    """An origin sees 127.0.0.2, through SOCKS5 and through forwarding, and the
    access line names it."""
    origin = tcp_server(lambda conn: conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n"))
    daemon = start_daemon('[server]\negress = "127.0.0.2"\n')
    assert tunnel_from(daemon, origin.port) == 0
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(
            f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: a\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        assert read_to_end(sock).startswith(b"HTTP/1.1 204 ")
    assert sources(origin, 2) == ["127.0.0.2", "127.0.0.2"]
    lines = [daemon.access(lambda e, p=p: e["protocol"] == p) for p in ("socks5", "http")]
    assert [line["egress"] for line in lines] == ["127.0.0.2", "127.0.0.2"]


def test_a_cidr_gives_an_address_of_it_per_connection(start_daemon, tcp_server):
    origin = tcp_server()
    daemon = start_daemon('[server]\negress = "127.0.5.0/24"\n')
    for _ in range(12):
        assert tunnel_from(daemon, origin.port) == 0
    seen = set(sources(origin, 12))
    network = ipaddress.ip_network("127.0.5.0/24")
    assert all(ipaddress.ip_address(a) in network for a in seen), seen
    assert "127.0.5.0" not in seen and "127.0.5.255" not in seen
    assert len(seen) > 1  # 12 random picks of 254 are not all one (p < 1e-26)


def test_sticky_keeps_each_user_on_one_address(start_daemon, tcp_server, users_file, tmp_path):
    origin = tcp_server()
    other_users = tmp_path / "users"
    other_users.write_text(users_file.read_text())
    assert proxyd("passwd", "--file", str(other_users), "bob", stdin=b"bob-pass\n").returncode == 0
    daemon = start_daemon(
        f'[server]\negress = "127.0.6.0/24"\negress_pick = "sticky"\n'
        f'[auth]\nusers_file = "{other_users}"\n'
    )
    for _ in range(4):
        assert tunnel_from(daemon, origin.port, auth=(USER, PASSWORD)) == 0
    for _ in range(4):
        assert tunnel_from(daemon, origin.port, auth=("bob", "bob-pass")) == 0
    seen = sources(origin, 8)
    alice, bob = set(seen[:4]), set(seen[4:])
    assert len(alice) == 1 and len(bob) == 1, (alice, bob)
    # the same address again after a restart: the hash is stable
    daemon.stop()
    again = start_daemon(
        f'[server]\negress = "127.0.6.0/24"\negress_pick = "sticky"\n'
        f'[auth]\nusers_file = "{other_users}"\n'
    )
    assert tunnel_from(again, origin.port, auth=(USER, PASSWORD)) == 0
    assert sources(origin, 9)[-1] in alice


def test_a_rule_gives_its_own_way_out(start_daemon, tcp_server, users_file):
    origin = tcp_server(lambda conn: conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n"))
    daemon = start_daemon(
        f'[server]\negress = "127.0.0.2"\n[auth]\nusers_file = "{users_file}"\n'
        f'[[rules]]\naction = "allow"\nusers = ["{USER}"]\nports = [{origin.port}]\n'
        'egress = ["127.0.0.3", "::1"]\n'
    )
    assert tunnel_from(daemon, origin.port, auth=(USER, PASSWORD)) == 0
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(
            f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: a\r\n"
            f"Proxy-Authorization: Basic {basic_token()}\r\nConnection: close\r\n\r\n".encode()
        )
        assert read_to_end(sock).startswith(b"HTTP/1.1 204 ")
    assert sources(origin, 2) == ["127.0.0.3", "127.0.0.3"]


def test_a_target_of_a_family_without_egress_is_unreachable(start_daemon, tcp_server):
    """Only IPv4 egress: an IPv6 target is refused (0x04), never reached from an
    address the operator did not name."""
    origin = tcp_server(host="::1")
    daemon = start_daemon('[server]\negress = "127.0.0.2"\n')
    sock, rep, _, _ = socks5client.connect(daemon.address, "::1", origin.port)
    sock.close()
    assert rep == 0x04
    assert not origin.peers
    line = daemon.access()
    assert line["status"] == "unreachable"
    assert "no IPv6 egress address" in line["error"]


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ('[server]\negress = "127.0.5.1/24"', "server.egress: '127.0.5.1/24'"),
        ('[server]\negress = ["nonsense"]', "server.egress: 'nonsense'"),
        ('[server]\negress_interface = "a/b"', "server.egress_interface"),
        ('[server]\negress = "0.0.0.0"', "unspecified"),
        ('[server]\negress = "::/0"', "a /0"),
        ('[server]\negress = "224.0.0.1"', "multicast"),
        ('[server]\negress = "::ffff:127.0.0.5"', "IPv4-mapped"),
        ('[server]\negress = ["127.0.5.0/24", "127.0.5.9"]', "overlaps"),
        ('[[rules]]\naction = "deny"\negress = "127.0.0.2"', "rules[0].egress: only an allow"),
        (
            '[[upstreams]]\nname = "p"\nservers = ["socks5://127.0.0.1:1081"]\n'
            '[[rules]]\naction = "allow"\nvia = "p"\negress = "127.0.0.2"',
            "this rule routes through a parent",
        ),
    ],
)
def test_check_config_judges_egress(tmp_path, toml, problem):
    bad = tmp_path / "bad.toml"
    bad.write_text(toml + "\n")
    result = proxyd("check-config", "--config", str(bad))
    assert result.returncode == 1, result.stderr
    assert problem in result.stderr


def test_a_fixed_address_the_host_lacks_is_never_a_source(start_daemon, tcp_server):
    """A fixed egress address that is not on the host is not bound anyway (no
    FREEBIND: that is for CIDRs): the connection fails as unreachable, saying so,
    and check-config's warning named it first."""
    origin = tcp_server()
    daemon = start_daemon('[server]\negress = "192.0.2.77"\n')
    assert "egress_missing" in daemon.output()
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", origin.port)
    sock.close()
    assert rep == 0x04
    line = daemon.access()
    assert line["status"] == "unreachable"
    assert "egress 192.0.2.77: Cannot assign requested address" in line["error"]


def test_an_ipv4_mapped_target_leaves_from_the_ipv4_address(start_daemon, tcp_server):
    origin = tcp_server()
    daemon = start_daemon('[server]\negress = ["127.0.0.5", "::1"]\n')
    sock, rep, _, _ = socks5client.connect(daemon.address, "::ffff:127.0.0.1", origin.port)
    sock.close()
    assert rep == 0
    assert sources(origin, 1) == ["127.0.0.5"]


def test_a_rule_that_sets_only_the_pick_keeps_the_servers_addresses(start_daemon, tcp_server):
    origin = tcp_server()
    daemon = start_daemon(
        '[server]\negress = "127.0.8.0/24"\n[[rules]]\naction = "allow"\negress_pick = "sticky"\n'
    )
    for _ in range(5):
        assert tunnel_from(daemon, origin.port) == 0
    assert len(set(sources(origin, 5))) == 1


def test_a_reload_while_a_name_is_looked_up_keeps_the_egress_of_the_decision(
    start_daemon, tcp_server, tmp_path
):
    """The rule that allowed a request says where it leaves from, even when a reload
    replaces the rules while its name is looked up (a slow DNS server here)."""
    origin = tcp_server()
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    first = (
        '[[rules]]\naction = "allow"\ndestinations = ["127.0.0.0/8"]\negress = "127.0.0.9"\n'
        "[timeouts]\nconnect = 10\n"
    )
    second = '[server]\negress = "127.0.0.66"\n[timeouts]\nconnect = 10\n'
    with dns_server({"slow.test": "127.0.0.1"}, 1.5) as nameserver:
        daemon = start_daemon(first, hosts=hosts, nameserver=nameserver)
        sock = socket.create_connection(daemon.address, timeout=10)
        sock.sendall(b"\x05\x01\x00\x05\x01\x00" + socks5client.address("slow.test", origin.port))
        assert recv_exact(sock, 2) == b"\x05\x00"
        time.sleep(0.3)  # the lookup is under way
        (outcome,) = daemon.reload(second)
        assert outcome["event"] == "reloaded"
        assert socks5client.read_reply(sock)[0] == 0
        sock.close()
    assert sources(origin, 1) == ["127.0.0.9"]
    assert daemon.access()["egress"] == "127.0.0.9"


def test_udp_datagrams_leave_from_the_egress_address(start_daemon):
    """An association's datagrams reach the target from the egress address, its
    answers come back to the client through the relay; a target of a family with
    no egress address gets nothing (the datagram is dropped and counted)."""
    daemon = start_daemon('[server]\negress = "127.0.0.2"\n')
    control, relay = associate(daemon)
    with (
        control,
        udp_client() as client,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target,
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as target6,
    ):
        target.bind(("127.0.0.1", 0))
        target.settimeout(5)
        target6.bind(("::1", 0))
        for n in range(2):
            client.sendto(header("127.0.0.1", target.getsockname()[1]) + b"out%d" % n, relay)
            data, sender = target.recvfrom(65535)
            assert (data, sender[0]) == (b"out%d" % n, "127.0.0.2")
            target.sendto(b"back", sender)
            reply, _ = client.recvfrom(65535)
            assert reply == header("127.0.0.1", target.getsockname()[1]) + b"back"
        client.sendto(header("::1", target6.getsockname()[1]) + b"six", relay)
        assert no_datagram(target6)
    line = daemon.access()
    assert (line["egress"], line["datagrams_up"], line["datagrams_dropped"]) == ("127.0.0.2", 2, 1)


def test_bind_listens_on_the_egress_address(start_daemon):
    """BIND's listening socket is on the egress address (the first reply says so),
    and the peer reaches the client through it."""
    daemon = start_daemon('[server]\negress = "127.0.0.4"\n')
    control, rep, host, port = socks5client.connect(daemon.address, "127.0.0.1", 0, command=BIND)
    with control:
        assert (rep, host) == (0, "127.0.0.4")
        with peer_from("127.0.0.1", (host, port)) as peer:
            assert read_reply(control)[0] == 0
            peer.sendall(b"hello")
            assert recv_exact(control, 5) == b"hello"
    line = daemon.access()
    assert (line["command"], line["egress"]) == ("bind", "127.0.0.4")


def test_explain_names_the_address_a_sticky_egress_keeps(start_daemon, tcp_server, tmp_path):
    """`proxyd explain` says which address of the CIDR this client keeps, and the
    daemon then leaves from that one."""
    origin = tcp_server()
    config = '[server]\negress = "127.0.7.0/24"\negress_pick = "sticky"\n'
    path = tmp_path / "sticky.toml"
    path.write_text(config)
    result = proxyd("explain", "--config", str(path), "--json", f"127.0.0.1:{origin.port}")
    assert result.returncode == 0, result.stderr
    kept = json.loads(result.stdout)["route"]["egress"]["address"]
    daemon = start_daemon(config)
    assert tunnel_from(daemon, origin.port) == 0
    assert sources(origin, 1) == [kept]


def test_egress_interface_binds_the_device(start_daemon, tcp_server):
    """`egress_interface = "lo"` reaches a loopback origin; a device the host does not
    have fails the connection (and check-config warns of it)."""
    origin = tcp_server()
    daemon = start_daemon('[server]\negress_interface = "lo"\n')
    assert tunnel_from(daemon, origin.port) == 0
    assert daemon.access()["egress"] == "127.0.0.1"
    missing = start_daemon('[server]\negress_interface = "nosuch0"\n')
    assert tunnel_from(missing, origin.port) != 0
    line = missing.access()
    assert (line["status"], line["error"]) == (
        "unreachable",
        f"127.0.0.1:{origin.port}: egress_interface nosuch0: No such device (egress)",
    )
    assert "nosuch0: no such network device" in missing.output()  # (its warning at start)


def test_a_reload_changes_the_way_out(start_daemon, tcp_server):
    origin = tcp_server()
    daemon = start_daemon('[server]\negress = "127.0.0.2"\n')
    assert tunnel_from(daemon, origin.port) == 0
    (outcome,) = daemon.reload('[server]\negress = "127.0.0.3"\n')
    assert outcome["event"] == "reloaded", outcome
    assert tunnel_from(daemon, origin.port) == 0
    assert sources(origin, 2) == ["127.0.0.2", "127.0.0.3"]


def test_udp_takes_an_address_of_a_family_it_can_leave_from(start_daemon, tmp_path):
    """A name with an IPv6 address first and an IPv4 one after, IPv4 egress only: the
    datagram goes to the IPv4 address. The egress socket takes answers, never the
    client's datagrams (those go to the relay)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 dual.test\n127.0.0.1 dual.test\n")
    daemon = start_daemon('[server]\negress = "127.0.0.2"\n', hosts=hosts)
    control, relay = associate(daemon)
    with (
        control,
        udp_client() as client,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target,
    ):
        target.bind(("127.0.0.1", 0))
        target.settimeout(5)
        port = target.getsockname()[1]
        client.sendto(header("dual.test", port) + b"four", relay)
        data, egress_socket = target.recvfrom(65535)
        assert (data, egress_socket[0]) == (b"four", "127.0.0.2")
        client.sendto(header("127.0.0.1", port) + b"around the relay", egress_socket)
        assert no_datagram(target)


def test_a_name_s_addresses_allowed_by_rules_of_other_ways_out_are_not_mixed(
    start_daemon, tcp_server, tmp_path
):
    """A name resolves to 127.0.0.1 (rule 0: egress 127.0.0.5) and 127.0.0.2 (rule 1:
    egress 127.0.0.6), and only 127.0.0.2 listens. The dial tries only the addresses
    that go the first allowed one's way: 127.0.0.1 refuses, and 127.0.0.2 is never
    reached from rule 0's address (it used to be, by happy eyeballs)."""
    origin = tcp_server(host="127.0.0.2")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 two.test\n127.0.0.2 two.test\n")
    daemon = start_daemon(
        '[[rules]]\naction = "allow"\ndestinations = ["127.0.0.1/32"]\negress = "127.0.0.5"\n'
        '[[rules]]\naction = "allow"\ndestinations = ["127.0.0.2/32"]\negress = "127.0.0.6"\n',
        hosts=hosts,
    )
    sock, rep, _, _ = socks5client.connect(daemon.address, "two.test", origin.port)
    sock.close()
    assert rep == 0x05  # 127.0.0.1 refused the connection; 127.0.0.2 was not tried
    assert not origin.peers
    assert daemon.access()["rule"] == 0
