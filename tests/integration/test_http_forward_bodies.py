"""Forwarding's bodies against a real daemon and scripted loopback origins: moved
byte-exact both ways by their framing (Content-Length or chunked, large, in odd
splits), trailers, pipelining behind a body, interim answers, answers without a
body or without a length, an origin that breaks off, and the connection reused
after all of them. h11 reads what the daemon sends on each side, so a framing
mistake fails here even when the bytes look right."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import h11
import pytest

from conftest import STOCK_LOOP

Answer = Callable[[h11.Request, bytes, list[tuple[bytes, bytes]]], bytes | list[bytes]]


class Origin:
    """An HTTP/1.1 origin on loopback that reads requests with h11 and answers each
    with the raw bytes `answer(request, body, trailers)` gives (a list: sent piece by
    piece); what it received is in `seen`."""

    def __init__(self, tcp_server, answer: Answer) -> None:
        self.answer = answer
        self.seen: list[dict[str, Any]] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.server = tcp_server(self._handle)
        self.base = f"http://127.0.0.1:{self.server.port}"

    def _handle(self, conn: socket.socket) -> None:
        with self.lock:
            self.connections += 1
        conn.settimeout(10)
        parser = h11.Connection(h11.SERVER)
        while True:
            request, body, trailers = None, b"", []
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    data = conn.recv(65536)
                    parser.receive_data(data)
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Request):
                    request = event
                    if any(n == b"expect" for n, _ in event.headers):
                        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    trailers = list(event.headers)
                    break
            assert request is not None
            self.seen.append({"request": request, "body": body, "trailers": trailers})
            answer = self.answer(request, body, trailers)
            for piece in [answer] if isinstance(answer, bytes) else answer:
                if piece == b"<close>":
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                conn.sendall(piece)
            # the origin's own side of h11: it sent the answer as raw bytes
            parser = h11.Connection(h11.SERVER)


def read_answer(
    sock: socket.socket, client: h11.Connection
) -> tuple[h11.Response, bytes, list[h11.InformationalResponse]]:
    """One answer as h11 reads it: the final head, the body, interim answers."""
    interim, head, body = [], None, b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(sock.recv(65536))
            continue
        if isinstance(event, h11.InformationalResponse):
            interim.append(event)
        elif isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, body, interim
        else:
            raise AssertionError(event)


def send_in_odd_pieces(sock: socket.socket, data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    at = 0
    while at < len(data):
        step = rng.choice([1, 2, 3, 17, 1000, 4095, 65537])
        sock.sendall(data[at : at + step])
        at += step


def chunked(body: bytes, seed: int) -> bytes:
    rng = random.Random(seed)
    out, at = [], 0
    while at < len(body):
        size = rng.choice([1, 5, 16, 4000, 70_000])
        piece = body[at : at + size]
        ext = b";x=y" if rng.random() < 0.3 else b""
        out.append(b"%x%s\r\n%s\r\n" % (len(piece), ext, piece))
        at += size
    return b"".join(out) + b"0\r\n\r\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_started_names_the_http_parser(start_daemon) -> None:
    daemon = start_daemon()
    started = daemon.wait_for(lambda e: e.get("event") == "started")
    assert started["http_parser"] == ("h11" if STOCK_LOOP else "httptools")


@pytest.mark.parametrize("up", ["length", "chunked"])
@pytest.mark.parametrize("down", ["length", "chunked"])
def test_bodies_move_byte_exact_both_ways_and_the_connection_is_reused(
    start_daemon, tcp_server, up: str, down: str
) -> None:
    upload = os.urandom(2 * 1024 * 1024 + 3)
    download = os.urandom(3 * 1024 * 1024 + 7)

    def answer(request, body, trailers):
        if request.method == b"GET":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        if down == "length":
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(download)
            wire = head + download
        else:
            wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(download, 5)
        rng = random.Random(9)
        pieces, at = [], 0
        while at < len(wire):
            step = rng.choice([1, 7, 1000, 65536, 300_000])
            pieces.append(wire[at : at + step])
            at += step
        return pieces

    origin = Origin(tcp_server, answer)
    daemon = start_daemon()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        framing = (
            b"Content-Length: %d\r\n" % len(upload)
            if up == "length"
            else b"Transfer-Encoding: chunked\r\n"
        )
        head = b"POST %s/up HTTP/1.1\r\nHost: x\r\n%s\r\n" % (origin.base.encode(), framing)
        wire = head + (upload if up == "length" else chunked(upload, 3))
        sender = threading.Thread(target=send_in_odd_pieces, args=(sock, wire, 1))
        sender.start()
        client = h11_client("POST")
        response, body, _ = read_answer(sock, client)
        sender.join()
        assert response.status_code == 200
        assert sha(body) == sha(download)
        # keep-alive after a body: the next request goes on the same connections
        sock.sendall(b"GET %s/next HTTP/1.1\r\nHost: x\r\n\r\n" % origin.base.encode())
        client.start_next_cycle()
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        response, body, _ = read_answer(sock, client)
        assert (response.status_code, body) == (200, b"ok")
    assert sha(origin.seen[0]["body"]) == sha(upload)
    assert origin.connections == 1
    lines = access_lines(daemon)  # (the second request's line may still be on its way)
    assert [(e["status"], e["bytes_up"], e["bytes_down"]) for e in lines[:2]] == [
        ("ok", len(upload), len(download)),
        ("ok", 0, 2),
    ]


def test_a_chunked_request_reaches_the_origin_with_its_trailer(start_daemon, tcp_server):
    origin = Origin(tcp_server, lambda r, b, t: b"HTTP/1.1 204 No Content\r\n\r\n")
    daemon = start_daemon()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(
            b"POST %s/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n"
            % origin.base.encode()
        )
        response, body, _ = read_answer(sock, h11_client("POST", chunked_body=True))
    assert (response.status_code, body) == (204, b"")
    assert origin.seen[0]["body"] == b"hello world"
    assert origin.seen[0]["trailers"] == [(b"x-checksum", b"abc")]
    assert daemon.access()["bytes_up"] == 11


def h11_client(method: str = "GET", *, chunked_body: bool = False) -> h11.Connection:
    """An h11 client that has sent `method`'s request (as the raw bytes did)."""
    client = h11.Connection(h11.CLIENT)
    headers = [("Host", "x")]
    if chunked_body:
        headers.append(("Transfer-Encoding", "chunked"))
    client.send(h11.Request(method=method, target="/", headers=headers))
    client.send(h11.EndOfMessage())
    return client


def test_an_answer_with_both_lengths_goes_on_chunked_without_its_length(start_daemon, tcp_server):
    """The origin's Content-Length loses to its Transfer-Encoding (RFC 9112 section 6.3)
    and is not passed on beside it."""
    origin = Origin(
        tcp_server,
        lambda r, b, t: (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"a\r\n0123456789\r\n0\r\n\r\n"
        ),
    )
    daemon = start_daemon()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(b"GET %s/both HTTP/1.1\r\nHost: x\r\n\r\n" % origin.base.encode())
        response, body, _ = read_answer(sock, h11_client())
    assert body == b"0123456789"
    names = [n for n, _ in response.headers]
    assert b"content-length" not in names and b"transfer-encoding" in names


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_request_pipelined_behind_a_body_is_answered_next(start_daemon, tcp_server, framing):
    origin = Origin(
        tcp_server,
        lambda r, b, t: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(b) + 1, b + b"!"),
    )
    daemon = start_daemon()
    base = origin.base.encode()
    if framing == "length":
        first = b"POST %s/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" % base
    else:
        first = (
            b"POST %s/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n" % base
        )
    second = b"POST %s/2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" % base
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(first + second)  # in one piece: the second behind the first's body
        client = h11_client("POST")
        assert read_answer(sock, client)[1] == b"hello!"
        client.start_next_cycle()
        client.send(h11.Request(method="POST", target="/", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        assert read_answer(sock, client)[1] == b"abc!"
    assert [s["body"] for s in origin.seen] == [b"hello", b"abc"]
    assert origin.connections == 1


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_origin_closing_mid_body_resets_the_client(start_daemon, tcp_server, framing):
    if framing == "length":
        answer = [b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000, b"<close>"]
    else:
        answer = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000,
            b"<close>",
        ]
    origin = Origin(tcp_server, lambda r, b, t: answer)
    daemon = start_daemon()
    data = b""
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(b"GET %s/cut HTTP/1.1\r\nHost: x\r\n\r\n" % origin.base.encode())
        with pytest.raises(ConnectionResetError):
            while piece := sock.recv(65536):
                data += piece
    assert data.startswith(b"HTTP/1.1 200 ")
    line = daemon.access()
    assert line["status"] == "upstream_closed"
    assert "before its answer was whole" in line["error"]
    assert line["bytes_down"] == 1000


def test_interim_answers_and_100_continue_are_passed_on(start_daemon, tcp_server):
    """An origin's 103 goes to the client before the answer; a client that expects
    100-continue gets the origin's 100, then sends its body."""
    origin = Origin(
        tcp_server,
        lambda r, b, t: [
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b),
        ],
    )
    daemon = start_daemon()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(
            b"POST %s/c HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
            % origin.base.encode()
        )
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(b"body")
        client = h11.Connection(h11.CLIENT)
        client.send(
            h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "4")])
        )
        client.send(h11.Data(data=b"body"))
        client.send(h11.EndOfMessage())
        client.receive_data(first)
        response, body, interim = read_answer(sock, client)
    assert [i.status_code for i in interim] == [100, 103]
    assert (response.status_code, body) == (200, b"body")
    assert origin.seen[0]["body"] == b"body"


def test_head_204_and_304_answers_end_at_their_head(start_daemon, tcp_server):
    """A HEAD answer naming a length or chunks, a 204 and a 304: no body is waited for,
    and the connection carries the next request."""

    def answer(request, body, trailers):
        if request.method == b"HEAD":
            if request.target == b"/chunked":
                return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"
        if request.target == b"/204":
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        if request.target == b"/304":
            return b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast"

    origin = Origin(tcp_server, answer)
    daemon = start_daemon()
    base = origin.base.encode()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        for method, path, status in [
            ("HEAD", "/length", 200),
            ("HEAD", "/chunked", 200),
            ("GET", "/204", 204),
            ("GET", "/304", 304),
            ("GET", "/last", 200),
        ]:
            sock.sendall(
                b"%s %s%s HTTP/1.1\r\nHost: x\r\n\r\n" % (method.encode(), base, path.encode())
            )
            response, body, _ = read_answer(sock, h11_client(method))
            assert response.status_code == status
            assert body == (b"last" if path == "/last" else b"")
    assert origin.connections == 1


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_an_answer_without_a_length_runs_to_the_origins_close(start_daemon, tcp_server, version):
    """To an HTTP/1.1 client it goes chunked and the connection stays; to an HTTP/1.0
    one it goes as it came, and the connection closes after it."""
    payload = os.urandom(200_000)
    origin = Origin(
        tcp_server,
        lambda r, b, t: [b"HTTP/1.0 200 OK\r\n\r\n", payload[:1000], payload[1000:], b"<close>"],
    )
    daemon = start_daemon()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(
            b"GET %s/all HTTP/%s\r\nHost: x\r\n\r\n" % (origin.base.encode(), version.encode())
        )
        if version == "1.1":
            client = h11_client()
            response, body, _ = read_answer(sock, client)
            assert sha(body) == sha(payload)
            assert (b"transfer-encoding", b"chunked") in list(response.headers)
            assert client.our_state is h11.DONE and client.their_state is h11.DONE
        else:  # (h11 speaks only HTTP/1.1): the answer as it comes, to the close
            data = b""
            while piece := sock.recv(65536):
                data += piece
            head, _, body = data.partition(b"\r\n\r\n")
            assert b"transfer-encoding" not in head.lower()
            assert head.endswith(b"\r\nConnection: close")
            assert sha(body) == sha(payload)
    assert daemon.access()["bytes_down"] == len(payload)


SMUGGLING = {
    "both-lengths": (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400),
    "two-lengths": (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400),
    "length-list": (b"Content-Length: 5, 6\r\n", 400),
    "signed-length": (b"Content-Length: +5\r\n", 400),
    "gzip-then-chunked": (b"Transfer-Encoding: gzip, chunked\r\n", 501),
    "two-encodings": (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 501),
    "space-before-colon": (b"Transfer-Encoding : chunked\r\n", 400),
    "encoding-with-ctl": (b"Transfer-Encoding: \x0bchunked\r\n", 400),
}


@pytest.mark.parametrize(("fields", "status"), SMUGGLING.values(), ids=SMUGGLING.keys())
def test_a_smuggling_shape_behind_a_first_request_is_refused(
    start_daemon, tcp_server, fields: bytes, status: int
):
    """The framing defences hold for every request of a kept-alive connection (read
    by forwarding's own parser, not the first request's): refused with its status,
    and nothing of it reaches the origin."""
    origin = Origin(tcp_server, lambda r, b, t: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    daemon = start_daemon()
    base = origin.base.encode()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(b"GET %s/first HTTP/1.1\r\nHost: x\r\n\r\n" % base)
        assert read_answer(sock, h11_client())[1] == b"ok"
        sock.sendall(
            b"POST %s/second HTTP/1.1\r\nHost: x\r\n%s\r\n5\r\nhello\r\n0\r\n\r\n" % (base, fields)
        )
        answer = b""
        while piece := sock.recv(65536):
            answer += piece
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    assert [s["request"].target for s in origin.seen] == [b"/first"]
    lines = access_lines(daemon)
    assert [line["status"] for line in lines] == ["ok", "bad_request"]


def access_lines(daemon, count: int = 2) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while len(lines := daemon.access_events()) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return lines
