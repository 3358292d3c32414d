"""WebSocket through plain HTTP forwarding: a forwarded GET asking to upgrade to
`websocket` goes on with its Upgrade and Connection headers, and the origin's 101
turns the connection into a tunnel, both ways, until either side closes: one access
line (http_status 101) with every byte after the handshake counted. Other upgrades
are still dropped as hop-by-hop.

The server is the `websockets` package's; the client is its sans-I/O protocol,
which builds the handshake and the frames, over a socket to the proxy (its request
line put in absolute form, as a client of an HTTP proxy sends it)."""

from __future__ import annotations

import os
import socket
import time

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from conftest import basic_token
from integration.test_http_forward import access_lines, read_head, read_to_end


class Client:
    """websockets' client protocol over a connection to the proxy; counts the bytes it
    moves after the handshake (what the access line must count)."""

    def __init__(
        self, proxy: tuple[str, int], port: int, path: str = "/chat", headers: tuple[str, ...] = ()
    ) -> None:
        self.sock = socket.create_connection(proxy, timeout=10)
        self.protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}{path}"), max_size=None)
        self.protocol.send_request(self.protocol.connect())
        (request,) = self.protocol.data_to_send()
        line, rest = request.split(b"\r\n", 1)
        method, target, version = line.split(b" ")
        absolute = b"http://127.0.0.1:%d%s" % (port, target)
        extra = "".join(f"{h}\r\n" for h in headers).encode()
        self.sock.sendall(b" ".join((method, absolute, version)) + b"\r\n" + extra + rest)
        self.sent = self.received = 0
        self.head = b""
        while self.protocol.state is State.CONNECTING:
            data = self.sock.recv(65536)
            if not data:
                break
            if not self.head:
                end = (self.head + data).find(b"\r\n\r\n")
                self.head = data[: end + 4]
                self.received += len(data) - end - 4
            else:
                self.received += len(data)
            self.protocol.receive_data(data)
            if not data:
                break
        self.events = list(self.protocol.events_received())

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)
                self.sent += len(data)

    def exchange(self, message: bytes, *, text: bool = False) -> bytes:
        """Send one message; the echo's payload."""
        if text:
            self.protocol.send_text(message)
        else:
            self.protocol.send_binary(message)
        self._flush()
        while True:
            for event in self.protocol.events_received():
                if event.opcode in (Opcode.TEXT, Opcode.BINARY):
                    return event.data
            data = self.sock.recv(65536)
            assert data, "the tunnel closed before the echo"
            self.received += len(data)
            self.protocol.receive_data(data)

    def close(self) -> None:
        """The closing handshake, then the server's end of the connection."""
        self.protocol.send_close()
        self._flush()
        while data := self.sock.recv(65536):
            self.received += len(data)
            self.protocol.receive_data(data)
        self.sock.close()


def test_a_websocket_goes_through_forwarding_both_ways(start_daemon, ws_server):
    daemon = start_daemon()
    client = Client(daemon.address, ws_server)
    assert client.head.startswith(b"HTTP/1.1 101 "), client.head
    assert client.protocol.handshake_exc is None
    assert client.protocol.state is State.OPEN
    assert client.exchange(b"hello through the proxy", text=True) == b"hello through the proxy"
    big = os.urandom(1024 * 1024 + 3)
    assert client.exchange(big) == big
    client.close()
    line = daemon.access()
    assert (line["command"], line["status"], line["http_status"]) == ("GET", "ok", 101)
    assert line["url"] == f"http://127.0.0.1:{ws_server}/chat"
    assert (line["bytes_up"], line["bytes_down"]) == (client.sent, client.received)
    assert line["bytes_up"] > len(big) and line["bytes_down"] > len(big)
    assert len(daemon.access_events()) == 1


def test_a_websocket_closed_by_the_client_ends_at_once(start_daemon, ws_server):
    """No closing handshake: the client just closes its socket; the tunnel ends."""
    daemon = start_daemon()
    client = Client(daemon.address, ws_server)
    assert client.exchange(b"x" * 100) == b"x" * 100
    client.sock.close()
    line = daemon.access(timeout=5)
    assert line["http_status"] == 101
    assert line["bytes_up"] == client.sent


def test_a_refused_upgrade_is_an_ordinary_answer(start_daemon, tcp_server):
    """An origin that will not switch answers as it likes (426); the connection then
    carries the next request as usual."""
    heads: list[bytes] = []

    def refuse(conn: socket.socket) -> None:
        while head := read_head(conn):
            heads.append(head)
            conn.sendall(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 2\r\n\r\nno")

    origin = tcp_server(refuse)
    daemon = start_daemon()
    request = (
        f"GET http://127.0.0.1:{origin.port}/ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(request)
        sock.sendall(f"GET http://127.0.0.1:{origin.port}/next HTTP/1.1\r\nHost: a\r\n".encode())
        sock.sendall(b"Connection: close\r\n\r\n")
        answer = read_to_end(sock)
    assert answer.count(b"HTTP/1.1 426 ") == 2
    assert b"upgrade: websocket" in heads[0].lower()
    assert b"connection: upgrade" in heads[0].lower()
    assert b"upgrade:" not in heads[1].lower()
    assert [e["http_status"] for e in access_lines(daemon, 2)] == [426, 426]


def test_other_upgrades_are_dropped_as_before(start_daemon, tcp_server):
    """h2c, or a WebSocket asked for over HTTP/1.0, by POST or with a body (a
    handshake has none: the origin's 101 could come while it is sent), is not
    passed on."""
    heads: list[bytes] = []

    def record(conn: socket.socket) -> None:
        heads.append(read_head(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    origin = tcp_server(record)
    daemon = start_daemon()
    cases = [
        ("GET {} HTTP/1.1", "h2c", ""),
        ("GET {} HTTP/1.0", "websocket", ""),
        ("POST {} HTTP/1.1", "websocket", ""),
        ("GET {} HTTP/1.1", "websocket", "body"),
    ]
    for line, upgrade, body in cases:
        target = f"http://127.0.0.1:{origin.port}/"
        with socket.create_connection(daemon.address, timeout=10) as sock:
            sock.sendall(
                (
                    line.format(target) + f"\r\nHost: a\r\nConnection: Upgrade, close\r\n"
                    f"Upgrade: {upgrade}\r\nContent-Length: {len(body)}\r\n\r\n{body}"
                ).encode()
            )
            assert read_to_end(sock).startswith(b"HTTP/1.1 200 ")
    assert len(heads) == len(cases)
    for head in heads:
        assert b"upgrade" not in head.lower().replace(b"upgrade-insecure", b"")


def test_a_websocket_asked_with_expect_100_continue_is_one_too(start_daemon, ws_server):
    """`Expect: 100-continue` on the handshake: the origin's 101 is the answer (the
    tunnel), not an interim one passed on as such."""
    daemon = start_daemon()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(
            f"GET http://127.0.0.1:{ws_server}/chat HTTP/1.1\r\nHost: a\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        head = read_head(sock)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in head.lower()
    assert daemon.access()["http_status"] == 101


@pytest.mark.parametrize(
    ("request_head", "answer"),
    [
        # a 101 to a request that asked for none, behind Expect: not passed on
        (
            "GET {url} HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
        ),
        # a WebSocket asked for, but the 101 names another protocol beside it
        (
            "GET {url} HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c, websocket\r\n"
            b"Connection: upgrade\r\n\r\n",
        ),
    ],
)
def test_a_101_not_for_a_websocket_asked_for_is_502(start_daemon, tcp_server, request_head, answer):
    def switch(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(answer + b"raw bytes of another protocol")
        time.sleep(0.5)

    origin = tcp_server(switch)
    daemon = start_daemon()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(request_head.format(url=f"http://127.0.0.1:{origin.port}/").encode())
        got = read_to_end(sock)
    assert got.startswith(b"HTTP/1.1 502 "), got[:200]
    assert b"raw bytes" not in got
    line = daemon.access()
    assert (line["status"], line["http_status"]) == ("upstream_closed", 502)


def test_a_websocket_counts_for_its_user(start_daemon, ws_server, users_file):
    """`limits.per_user = 1`: a user's open WebSocket is their one connection, so a
    second (or a CONNECT) is refused with 503 while it lasts."""
    daemon = start_daemon(f'[auth]\nusers_file = "{users_file}"\n[limits]\nper_user = 1\n')
    auth = f"Proxy-Authorization: Basic {basic_token()}"
    first = Client(daemon.address, ws_server, headers=(auth,))
    assert first.head.startswith(b"HTTP/1.1 101 ")
    second = Client(daemon.address, ws_server, headers=(auth,))
    assert second.head.startswith(b"HTTP/1.1 503 "), second.head
    with socket.create_connection(daemon.address, timeout=10) as sock:
        target = f"127.0.0.1:{ws_server}"
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 503 ")
    assert first.exchange(b"still here") == b"still here"
    first.close()
    refused = daemon.access(lambda e: e["http_status"] == 503 and e["command"] == "GET")
    assert refused["status"] == "limit"
