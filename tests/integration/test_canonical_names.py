"""One canonical form of a name, against the real daemon: a name-only deny is not
passed by a look-alike spelling (full-width letters, capitals, ideographic full
stops, a trailing dot) over any protocol, and the access line, the lookup and a
parent proxy all get the one plain ASCII form. A name with no such form is a
bad_request. The daemon resolves from a hosts file of the test's own, in which the
denied names are an origin on 127.0.0.1: a deny that was passed would reach it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from conftest import request_head
from integration import socks5client
from integration.socks5client import recv_exact
from integration.test_chain import group, url, via
from integration.test_udp import associate, header, no_datagram, udp_client

DENY = """
[[rules]]
action = "deny"
destinations = ["metadata.google.internal", "*.internal", "localhost"]
"""
RULES = DENY + '[[rules]]\naction = "allow"\n'


# Each denied name, and spellings of it that UTS #46 maps back to it.
LOOK_ALIKES = {
    "metadata.google.internal": [
        "metadata\u3002google\u3002internal",  # ideographic full stops
        "metadata\uff0egoogle\uff61internal",  # full-width and halfwidth ideographic ones
        "ＭＥＴＡＤＡＴＡ.ｇｏｏｇｌｅ.ｉｎｔｅｒｎａｌ",  # noqa: RUF001 (the look-alike is the point)
        "Metadata.Google.Internal.",
        "metadata.google.internal\u3002",
    ],
    "db.internal": ["db.ｉｎｔｅｒｎａｌ", "DB.INTERNAL.", "db\u3002internal"],  # noqa: RUF001
    "localhost": [
        "ｌｏｃａｌｈｏｓｔ",  # noqa: RUF001
        "ＬＯＣＡＬＨＯＳＴ",  # noqa: RUF001
        "LocalHost",
        "localhost.",
        "localhost\uff0e",
        "local\u00adhost",  # a soft hyphen, which UTS #46 drops
    ],
}
FORMS = [(plain, form) for plain, forms in LOOK_ALIKES.items() for form in [plain, *forms]]
ASCII_FORMS = [(plain, form) for plain, form in FORMS if form.isascii()]
UNICODE_FORMS = [(plain, form) for plain, form in FORMS if not form.isascii()]
# names with no canonical form: invalid IDNA, an empty label, a character no name has
UNMAPPABLE = ["xn--localhost-", "local..host", "local host", "evil\\localhost", "a\u200db.test"]


@pytest.fixture
def hosts(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_text(
        "127.0.0.1 localhost metadata.google.internal db.internal allowed.test\n"
        "127.0.0.1 xn--zca.test\n"  # ß.test by UTS #46 (IDNA 2003 made it ss.test)
    )
    return path


@pytest.fixture
def daemon(start_daemon, hosts):
    return start_daemon(RULES, hosts=hosts)


def nth_access(daemon, index: int) -> dict:
    """The access line of the `index`-th connection (they are made one after another)."""
    daemon.wait_for(lambda _e: len(daemon.access_events()) > index)
    return daemon.access_events()[index]


def socks4a(name: str, port: int, command: int = 1) -> bytes:
    return (
        bytes((4, command))
        + port.to_bytes(2, "big")
        + b"\0\0\0\x01"
        + b"\0"
        + name.encode()
        + b"\0"
    )


def socks4a_reply(daemon, name: str, port: int) -> int:
    with socket.create_connection(daemon.address, timeout=5) as sock:
        sock.sendall(socks4a(name, port))
        return recv_exact(sock, 8)[1]


def http_status(daemon, head: bytes) -> int:
    with socket.create_connection(daemon.address, timeout=5) as sock:
        sock.sendall(head)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 "), answer
    return int(answer.split(b" ", 2)[1])


def reached_and_replied(daemon, name: str, port: int) -> int:
    sock, rep, _, _ = socks5client.connect(daemon.address, name, port)
    sock.close()
    return rep


def test_every_look_alike_is_denied_over_socks5_and_socks4a(daemon, tcp_server):
    origin = tcp_server()
    lines = 0
    for plain, form in FORMS:
        assert reached_and_replied(daemon, form, origin.port) == 0x02, form
        line = nth_access(daemon, lines)
        lines += 1
        assert (line["protocol"], line["status"], line["rule"]) == ("socks5", "denied", 0), form
        assert line["target"] == f"{plain}:{origin.port}", form
        assert socks4a_reply(daemon, form, origin.port) == 91, form
        line = nth_access(daemon, lines)
        lines += 1
        assert (line["protocol"], line["status"], line["rule"]) == ("socks4", "denied", 0), form
        assert line["target"] == f"{plain}:{origin.port}", form
    assert origin.peers == []
    # the same origin by an allowed name (full width too) is reached: the denials above
    # were the rules', not a hosts file or a server that could not be reached
    for name in ("allowed.test", "ＡＬＬＯＷＥＤ\u3002test"):  # noqa: RUF001
        sock = socks5client.open_tunnel(daemon.address, name, origin.port)
        sock.close()
        line = nth_access(daemon, lines)
        lines += 1
        assert line["target"] == f"allowed.test:{origin.port}"
    assert len(origin.peers) == 2


def test_every_look_alike_is_denied_over_http_connect_and_forwarding(daemon, tcp_server):
    """Capitals and a trailing dot are what an HTTP request line can carry: 403, with
    the plain name logged. Other spellings are no RFC 3986 host (raw UTF-8, which h11
    refuses, or %-escaped): 400, bad_request. Either way the origin is never reached."""
    origin = tcp_server()
    lines = 0
    for plain, form in ASCII_FORMS:
        authority = f"{form}:{origin.port}"
        connect = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
        forward = request_head("GET", f"http://{authority}/secret", host=authority)
        for head, command in ((connect, "connect"), (forward, "GET")):
            assert http_status(daemon, head) == 403, (form, command)
            line = nth_access(daemon, lines)
            lines += 1
            assert (line["status"], line["rule"], line["command"]) == ("denied", 0, command)
            assert line["target"] == f"{plain}:{origin.port}", form
    for _plain, form in UNICODE_FORMS:
        authority = f"{form}:{origin.port}"
        escaped = "".join(c if c.isascii() else f"%{b:02X}" for c in form for b in c.encode())
        heads = [
            f"CONNECT {authority} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            f"GET http://{authority}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            f"GET http://{escaped}:{origin.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        ]
        for head in heads:
            assert http_status(daemon, head) == 400, form
            assert nth_access(daemon, lines)["status"] == "bad_request", form
            lines += 1
    assert origin.peers == []


def reached_and_replied_bind(daemon, name: str) -> int:
    sock, rep, _, _ = socks5client.connect(daemon.address, name, 0, command=2)
    sock.close()
    return rep


def test_a_bind_for_a_look_alike_peer_is_denied(daemon):
    for _plain, form in UNICODE_FORMS[:4]:
        assert reached_and_replied_bind(daemon, form) == 0x02, form
    daemon.wait_for(lambda _e: len(daemon.access_events()) >= 4)
    lines = daemon.access_events()
    assert [(e["command"], e["status"], e["rule"]) for e in lines] == [("bind", "denied", 0)] * 4


def test_datagrams_to_look_alikes_are_dropped(daemon):
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(0.5)
    port = echo.getsockname()[1]
    control, relay = associate(daemon)
    with control, echo, udp_client() as client:
        for _plain, form in FORMS:
            client.sendto(header(form, port) + b"denied", relay)
        client.sendto(header("ａｌｌｏｗｅｄ.test", port) + b"allowed", relay)  # noqa: RUF001
        assert echo.recvfrom(100)[0] == b"allowed"
        assert no_datagram(echo)  # (the denied ones came first: none is left behind)
    line = daemon.access()
    assert (line["datagrams_up"], line["datagrams_denied"]) == (1, len(FORMS))


def test_the_canonical_name_is_what_is_looked_up(daemon, tcp_server):
    """ß.test is xn--zca.test by UTS #46, which the hosts file has; the resolver's own
    IDNA 2003 would have looked up ss.test."""
    origin = tcp_server()
    sock = socks5client.open_tunnel(daemon.address, "ß.test", origin.port)
    sock.close()
    assert daemon.access()["target"] == f"xn--zca.test:{origin.port}"
    assert len(origin.peers) == 1


@pytest.mark.parametrize("name", UNMAPPABLE)
def test_a_name_with_no_canonical_form_is_a_bad_request(daemon, tcp_server, name):
    origin = tcp_server()
    assert reached_and_replied(daemon, name, origin.port) == 0x04
    assert socks4a_reply(daemon, name, origin.port) == 91
    expected = ["bad_request", "bad_request"]
    if name.isascii():  # HTTP carries no raw UTF-8 at all (see above)
        authority = f"{name}:{origin.port}".replace(" ", "%20")
        connect = f"CONNECT {authority} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        assert http_status(daemon, connect) == 400
        forward = f"GET http://{authority}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        assert http_status(daemon, forward) == 400
        expected += ["bad_request", "bad_request"]
    daemon.wait_for(lambda _e: len(daemon.access_events()) >= len(expected))
    assert [e["status"] for e in daemon.access_events()] == expected
    assert origin.peers == []


# -- what a parent proxy is sent ----------------------------------------------------


@pytest.mark.parametrize("scheme", ["socks5h", "socks4a", "http"])
def test_a_parent_is_sent_the_canonical_name(start_daemon, hosts, tcp_server, scheme):
    origin = tcp_server()
    parent = start_daemon(hosts=hosts)
    child = start_daemon(DENY + group("p", [url(scheme, parent)]) + via("p"), hosts=hosts)
    for form in ("ＡＬＬＯＷＥＤ\u3002test", "Allowed.Test."):  # noqa: RUF001
        socks5client.open_tunnel(child.address, form, origin.port).close()
    for daemon in (parent, child):
        daemon.wait_for(lambda _e, d=daemon: len(d.access_events()) >= 2)
    assert [e["target"] for e in parent.access_events()] == [f"allowed.test:{origin.port}"] * 2
    assert [e["target"] for e in child.access_events()] == [f"allowed.test:{origin.port}"] * 2
    # and a look-alike of a denied name is denied here, never sent on
    assert reached_and_replied(child, "ｌｏｃａｌｈｏｓｔ", origin.port) == 0x02  # noqa: RUF001
    assert len(parent.access_events()) == 2


def test_a_forwarded_request_reaches_an_http_parent_by_the_canonical_name(
    start_daemon, hosts, origin
):
    parent = start_daemon(hosts=hosts)
    child = start_daemon(DENY + group("p", [url("http", parent)]) + via("p"), hosts=hosts)
    authority = f"Allowed.TEST.:{origin.port}"
    with socket.create_connection(child.address, timeout=5) as sock:
        sock.sendall(request_head("GET", f"http://{authority}/", host=authority))
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    assert parent.access()["target"] == f"allowed.test:{origin.port}"
    assert child.access()["target"] == f"allowed.test:{origin.port}"
