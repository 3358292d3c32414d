"""Access rules against the real daemon: SOCKS5, SOCKS4, HTTP CONNECT and forwarding,
UDP datagrams; names resolved once and connected to only where allowed."""

from __future__ import annotations

import http.client
import socket

from conftest import ROOT, USER, basic_token, listening_socket
from integration import socks5client
from integration.socks5client import recv_exact


def deny_second_loopback() -> str:
    return '[[rules]]\naction = "deny"\ndestinations = ["127.0.0.2/32"]\n'


def test_a_denied_destination_is_0x02_403_and_logged_with_its_rule(start_daemon, tcp_server):
    server = tcp_server()
    daemon = start_daemon(deny_second_loopback())
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.2", server.port)
    sock.close()
    assert rep == 0x02
    line = daemon.access()
    assert (line["status"], line["rule"]) == ("denied", 0)
    with socket.create_connection(daemon.address, timeout=5) as s:
        s.sendall(f"CONNECT 127.0.0.2:{server.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 403 ")
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    with sock:
        assert rep == 0
        sock.sendall(b"allowed")
        assert recv_exact(sock, 7) == b"allowed"
    assert server.peers and all(p[0] == "127.0.0.1" for p in server.peers)


def test_an_allow_list_with_default_deny(start_daemon, tcp_server):
    server = tcp_server()
    other = tcp_server()
    config = (
        '[server]\ndefault_action = "deny"\n'
        f'[[rules]]\naction = "allow"\nprotocols = ["socks5"]\nports = ["{server.port}"]\n'
    )
    daemon = start_daemon(config)
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    sock.close()
    assert rep == 0
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", other.port)
    sock.close()
    assert rep == 0x02
    line = daemon.access(lambda e: e["status"] == "denied")
    assert line["rule"] is None  # the default action, not a rule
    request = b"\x04\x01" + server.port.to_bytes(2, "big") + bytes((127, 0, 0, 1)) + b"\0"
    with socket.create_connection(daemon.address, timeout=5) as s:  # SOCKS4 is not listed
        s.sendall(request)
        assert recv_exact(s, 8)[1] == 0x5B


def test_names_are_matched_before_any_lookup(start_daemon):
    """A denied name pattern is refused without resolving it (no query at all)."""
    daemon = start_daemon('[[rules]]\naction = "deny"\ndestinations = ["*.blocked.test"]\n')
    sock, rep, _, _ = socks5client.connect(daemon.address, "ads.blocked.test", 80)
    sock.close()
    assert rep == 0x02
    assert daemon.access()["status"] == "denied"


def test_a_name_goes_only_to_its_allowed_addresses(start_daemon, tmp_path):
    """No DNS rebinding around a deny: the name is resolved once, each address
    judged, and only the allowed one is connected to."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.2 mixed.test\n127.0.0.1 mixed.test\n127.0.0.2 inside.test\n")
    allowed = listening_socket(also_free_on="127.0.0.2")
    port = allowed.getsockname()[1]
    denied = listening_socket("127.0.0.2", port)
    denied.setblocking(False)
    with allowed, denied:
        daemon = start_daemon(deny_second_loopback(), hosts=hosts)
        sock, rep, _, _ = socks5client.connect(daemon.address, "mixed.test", port)
        sock.close()
        assert rep == 0
        allowed.settimeout(5)
        allowed.accept()[0].close()
        try:
            denied.accept()
            raise AssertionError("the denied address was connected to")
        except BlockingIOError:
            pass
        sock, rep, _, _ = socks5client.connect(daemon.address, "inside.test", port)
        sock.close()
        assert rep == 0x02


def test_forwarded_requests_are_checked_each(start_daemon, users_file, origin):
    config = (
        f'[auth]\nusers_file = "{users_file}"\n'
        f'[[rules]]\naction = "deny"\nusers = ["{USER}"]\ncommands = ["POST"]\n'
    )
    daemon = start_daemon(config)
    conn = http.client.HTTPConnection(*daemon.address, timeout=10)
    headers = {"Proxy-Authorization": f"Basic {basic_token()}"}
    conn.request("GET", origin.url, headers=headers)
    response = conn.getresponse()
    assert response.status == 200
    assert response.read() == origin.body
    conn.request("POST", origin.url, body=b"x", headers=headers)
    response = conn.getresponse()
    assert response.status == 403
    response.read()
    line = daemon.access(lambda e: e["status"] == "denied")
    assert (line["command"], line["user"], line["rule"]) == ("POST", USER, 0)


def test_udp_datagrams_to_denied_destinations_are_dropped(start_daemon):
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    daemon = start_daemon(deny_second_loopback())
    control, rep, host, port = socks5client.connect(daemon.address, "0.0.0.0", 0, command=3)
    assert rep == 0
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    with control, client, echo:
        client.sendto(b"\0\0\0" + socks5client.address("127.0.0.2", 9) + b"no", (host, port))
        client.sendto(
            b"\0\0\0" + socks5client.address("127.0.0.1", echo.getsockname()[1]) + b"yes",
            (host, port),
        )
        echo.settimeout(5)
        assert echo.recvfrom(100)[0] == b"yes"
    line = daemon.access()
    assert (line["datagrams_up"], line["datagrams_denied"]) == (1, 1)


def test_the_proxy_never_connects_to_its_own_listener(start_daemon):
    daemon = start_daemon()
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", daemon.port)
    sock.close()
    assert rep == 0x02
    line = daemon.access()
    assert line["status"] == "denied"
    assert "own listener" in line["error"]
    conn = http.client.HTTPConnection(*daemon.address, timeout=10)
    conn.request("GET", f"http://127.0.0.1:{daemon.port}/")
    response = conn.getresponse()
    assert response.status == 403
    response.read()


def test_a_wildcard_listener_is_its_own_on_loopback_too(start_daemon):
    daemon = start_daemon("[server]\nallow_open_proxy = true\n", listen="0.0.0.0:0")
    sock, rep, _, _ = socks5client.connect(("127.0.0.1", daemon.port), "127.0.0.1", daemon.port)
    sock.close()
    assert rep == 0x02


def test_the_example_rule_set_keeps_clients_off_this_host(start_daemon, tcp_server):
    server = tcp_server()
    example = (ROOT / "config" / "rules-example.toml").read_text()
    daemon = start_daemon(example)
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    sock.close()
    assert rep == 0x02
    assert daemon.access()["rule"] == 1
    assert server.peers == []


def test_udp_associate_under_destination_rules(start_daemon):
    """The association is not judged by its own DST (0.0.0.0:0 here) as if it were a
    destination: with 0.0.0.0/8 denied and an allow list of ports, it is made, and
    its datagrams meet the destination rules."""
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo_port = echo.getsockname()[1]
    daemon = start_daemon(
        '[server]\ndefault_action = "deny"\n'
        '[[rules]]\naction = "deny"\ndestinations = ["0.0.0.0/8"]\n'
        f'[[rules]]\naction = "allow"\nports = [{echo_port}]\n'
    )
    control, rep, host, port = socks5client.connect(daemon.address, "0.0.0.0", 0, command=3)
    assert rep == 0
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    with control, client, echo:
        client.sendto(b"\0\0\0" + socks5client.address("127.0.0.1", 9) + b"no", (host, port))
        client.sendto(
            b"\0\0\0" + socks5client.address("127.0.0.1", echo_port) + b"yes", (host, port)
        )
        echo.settimeout(5)
        assert echo.recvfrom(100)[0] == b"yes"
    line = daemon.access()
    assert (line["status"], line["datagrams_up"], line["datagrams_denied"]) == ("ok", 1, 1)


def test_udp_associate_refused_by_a_rule_about_who_asks(start_daemon):
    daemon = start_daemon('[[rules]]\naction = "deny"\ncommands = ["udp_associate"]\n')
    control, rep, _, _ = socks5client.connect(daemon.address, "0.0.0.0", 0, command=3)
    control.close()
    assert rep == 0x02
    line = daemon.access()
    assert (line["status"], line["rule"]) == ("denied", 0)
