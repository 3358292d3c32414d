"""Where connections leave from: `egress` in [server] and in rules. Every address of
127.0.0.0/8 is local, so an origin on loopback sees the address each connection
left from."""

from __future__ import annotations

import ipaddress
import socket

from conftest import PASSWORD, USER, basic_token, proxyd
from integration import socks5client
from integration.test_http_forward import read_to_end


def tunnel_from(daemon, port: int, auth=None) -> int:
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", port, auth=auth)
    sock.close()
    return rep


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
    assert [peer[0] for peer in origin.peers] == ["127.0.0.2", "127.0.0.2"]
    lines = [daemon.access(lambda e, p=p: e["protocol"] == p) for p in ("socks5", "http")]
    assert [line["egress"] for line in lines] == ["127.0.0.2", "127.0.0.2"]


def test_a_cidr_gives_an_address_of_it_per_connection(start_daemon, tcp_server):
    origin = tcp_server()
    daemon = start_daemon('[server]\negress = "127.0.5.0/24"\n')
    for _ in range(12):
        assert tunnel_from(daemon, origin.port) == 0
    seen = {peer[0] for peer in origin.peers}
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
    alice, bob = {p[0] for p in origin.peers[:4]}, {p[0] for p in origin.peers[4:]}
    assert len(alice) == 1 and len(bob) == 1, (alice, bob)
    # the same address again after a restart: the hash is stable
    daemon.stop()
    again = start_daemon(
        f'[server]\negress = "127.0.6.0/24"\negress_pick = "sticky"\n'
        f'[auth]\nusers_file = "{other_users}"\n'
    )
    assert tunnel_from(again, origin.port, auth=(USER, PASSWORD)) == 0
    assert origin.peers[-1][0] in alice


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
    assert [peer[0] for peer in origin.peers] == ["127.0.0.3", "127.0.0.3"]


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


def test_check_config_judges_egress(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[server]\negress = ["127.0.5.1/24", "nonsense"]\negress_interface = "a/b"\n'
        '[[rules]]\naction = "deny"\negress = "127.0.0.2"\n'
    )
    result = proxyd("check-config", "--config", str(bad))
    assert result.returncode == 1
    assert "server.egress: '127.0.5.1/24'" in result.stderr
    assert "server.egress_interface" in result.stderr
    assert "rules[0].egress: only an allow rule" in result.stderr
