"""What an HTTP client got, in the access line: `http_status` (the origin's answer
for a forwarded request, proxyd's own for CONNECT and every refusal) and, for a
forwarded request, `url` (no userinfo; the query only with `log.http_query`).
Also the PAC file's status line, and a chunked answer's trailer fields passed on."""

from __future__ import annotations

import http.client
import socket
import struct
import time

import pytest

from conftest import PASSWORD, USER, basic_token, closed_port
from integration import socks5client
from integration.test_http_forward import access_lines, read_head, read_to_end, via


def answering(status: int, reason: bytes, body: bytes = b"answer"):
    """An origin that answers every request on its connection with `status`."""

    def handle(conn: socket.socket) -> None:
        while read_head(conn):
            conn.sendall(
                b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n\r\n%s"
                % (status, reason, len(body), body)
            )

    return handle


def connect_status(daemon, target: str, headers: str = "") -> bytes:
    """The status line a CONNECT to `target` gets (the connection then closed)."""
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n".encode())
        return sock.recv(4096).partition(b"\r\n")[0]


def test_the_origins_answer_and_the_url_are_in_the_line(start_daemon, tcp_server):
    """A 404 and a 501 from the origin are logged as such (the request itself went
    well: status ok), with the URL the client asked for: its query left out (it may
    carry tokens), never its userinfo."""
    missing = tcp_server(answering(404, b"Not Found"))
    unknown = tcp_server(answering(501, b"Not Implemented"))
    daemon = start_daemon()
    conn = via(daemon)
    conn.request("GET", f"http://127.0.0.1:{missing.port}/gone/page?token=s3cr3t#frag")
    assert conn.getresponse().read() == b"answer"
    url = f"http://someone:pa55@127.0.0.1:{unknown.port}/cache"
    conn.request("PURGE", url, headers={"Host": "origin"})
    response = conn.getresponse()
    assert (response.status, response.read()) == (501, b"answer")
    first, second = access_lines(daemon, 2)
    assert (first["status"], first["http_status"]) == ("ok", 404)
    assert first["url"] == f"http://127.0.0.1:{missing.port}/gone/page"
    assert (second["command"], second["http_status"]) == ("PURGE", 501)
    assert second["url"] == f"http://127.0.0.1:{unknown.port}/cache"
    output = daemon.output()
    assert "s3cr3t" not in output and "pa55" not in output and "frag" not in output


def test_log_http_query_keeps_the_query(start_daemon, tcp_server):
    origin = tcp_server(answering(200, b"OK"))
    daemon = start_daemon("[log]\nhttp_query = true\n")
    conn = via(daemon)
    conn.request("GET", f"http://127.0.0.1:{origin.port}/search?q=proxy&page=2")
    conn.getresponse().read()
    line = daemon.access()
    assert line["url"] == f"http://127.0.0.1:{origin.port}/search?q=proxy&page=2"
    assert line["http_status"] == 200


def test_proxyd_s_own_answers_are_in_the_line(start_daemon, tcp_server, users_file):
    """CONNECT's 200, a 407 without credentials, a 403 from a rule (CONNECT and a
    forwarded request alike), a 502 for a target that refuses, a 400 for nonsense:
    each line says the status the client read."""
    origin = tcp_server()
    denied = tcp_server()
    refusing = closed_port()
    daemon = start_daemon(
        f'[auth]\nusers_file = "{users_file}"\n'
        f'[[rules]]\naction = "deny"\ndestinations = ["127.0.0.1/32"]\nports = [{denied.port}]\n'
    )
    auth = f"Proxy-Authorization: Basic {basic_token()}\r\n"
    cases = [
        (f"127.0.0.1:{origin.port}", auth, 200, "ok"),
        (f"127.0.0.1:{origin.port}", "", 407, "auth_failed"),
        (f"127.0.0.1:{denied.port}", auth, 403, "denied"),
        (f"127.0.0.1:{refusing}", auth, 502, "refused"),
    ]
    for target, headers, code, _ in cases:
        assert connect_status(daemon, target, headers).startswith(b"HTTP/1.1 %d " % code)
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(
            f"GET http://127.0.0.1:{denied.port}/x HTTP/1.1\r\nHost: a\r\n{auth}\r\n".encode()
        )
        assert read_to_end(sock).startswith(b"HTTP/1.1 403 ")
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(b"GET nonsense\r\n\r\n")
        assert read_to_end(sock).startswith(b"HTTP/1.1 400 ")
    lines = access_lines(daemon, len(cases) + 2)
    by_target = [(e["target"], e["command"], e["http_status"], e["status"]) for e in lines]
    for target, _, code, status in cases:
        assert (target, "connect", code, status) in by_target
    forwarded = next(e for e in lines if e["command"] == "GET")
    assert (forwarded["http_status"], forwarded["status"]) == (403, "denied")
    assert forwarded["url"] == f"http://127.0.0.1:{denied.port}/x"
    assert any(e["http_status"] == 400 and e["status"] == "bad_request" for e in lines)
    assert PASSWORD not in daemon.output()


def test_a_socks_line_has_no_http_status(start_daemon, tcp_server):
    origin = tcp_server()
    daemon = start_daemon()
    sock, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", origin.port)
    sock.close()
    assert rep == 0
    line = daemon.access()
    assert "http_status" not in line and "url" not in line


def test_the_pac_file_is_200_ok(start_daemon):
    daemon = start_daemon()
    conn = http.client.HTTPConnection(*daemon.address, timeout=10)
    conn.request("GET", "/proxy.pac")
    response = conn.getresponse()
    assert (response.status, response.reason) == (200, "OK")
    response.read()
    line = daemon.access()
    assert (line["http_status"], line["url"]) == (200, None)


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_a_chunked_answers_trailer_is_passed_on(start_daemon, tcp_server, version):
    """The origin's trailer fields reach an HTTP/1.1 client after the last chunk, and
    `Trailer` (which names them) with the head; an HTTP/1.0 client, which cannot have
    them, gets the body to the connection's end."""

    def chunked(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc123\r\nX-More: 1\r\n\r\n"
        )

    origin = tcp_server(chunked)
    daemon = start_daemon()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(
            f"GET http://127.0.0.1:{origin.port}/t HTTP/{version}\r\nHost: a\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        answer = read_to_end(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    if version == "1.1":
        assert b"\r\ntrailer: x-checksum\r\n" in head.lower() + b"\r\n"
        assert body == (
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc123\r\nX-More: 1\r\n\r\n"
        )
    else:
        assert body == b"hello world"
    line = daemon.access()
    assert (line["http_status"], line["bytes_down"]) == (200, 11)


def test_listen_failed_names_the_address(start_daemon):
    """A listener that cannot be bound: the error line says which one."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        daemon = start_daemon(wait=False, listen=f"127.0.0.1:{port}")
        assert daemon.proc.wait(timeout=10) == 1
        line = daemon.wait_for(lambda e: e.get("event") == "listen_failed")
    assert line["address"] == f"127.0.0.1:{port}"
    assert f"127.0.0.1:{port}" in line["error"]


def test_credentials_in_a_forwarded_url_never_reach_the_log(start_daemon, tcp_server):
    origin = tcp_server(answering(200, b"OK"))
    daemon = start_daemon()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(
            f"GET http://{USER}:{PASSWORD}@127.0.0.1:{origin.port}/p HTTP/1.1\r\nHost: a\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        assert read_to_end(sock).startswith(b"HTTP/1.1 200 ")
    assert daemon.access()["url"] == f"http://127.0.0.1:{origin.port}/p"
    assert PASSWORD not in daemon.output()


def test_an_answer_that_never_reached_the_client_has_no_status(start_daemon, tcp_server):
    """The client resets its connection while the origin takes its time: the answer
    cannot be sent, and the line says so (client_closed, http_status null)."""

    def slow(conn: socket.socket) -> None:
        read_head(conn)
        time.sleep(0.5)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    origin = tcp_server(slow)
    daemon = start_daemon()
    sock = socket.create_connection(daemon.address, timeout=10)
    sock.sendall(f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    time.sleep(0.2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    line = daemon.access()
    assert (line["status"], line["http_status"]) == ("client_closed", None), line
