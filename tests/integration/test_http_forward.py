"""Plain HTTP forwarding (absolute-form requests) against a real origin on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import PASSWORD, USER, basic_token, closed_port, silent_listener


class _OriginHandler(http.server.BaseHTTPRequestHandler):
    """An HTTP/1.1 origin (keep-alive, 100-continue) that reports what it received."""

    protocol_version = "HTTP/1.1"
    server: RecordingOrigin

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(self.rfile.readline().strip(), 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def _report(self) -> None:
        body = self._body()
        report = {
            "method": self.command,
            "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_length": len(body),
        }
        self.server.requests.append(report)
        extra = {"Connection": "X-Hop", "X-Hop": "private", "Keep-Alive": "timeout=5"}
        self._reply(200, json.dumps(report).encode(), extra)

    def do_GET(self) -> None:
        if self.path == "/big":
            self._reply(200, self.server.big)
        elif self.path == "/204":
            self._reply(204, b"")
        elif self.path == "/304":
            self._reply(304, b"")
        elif self.path == "/cut":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        else:
            self._report()

    do_POST = do_PUT = do_DELETE = _report

    def do_HEAD(self) -> None:
        self._reply(200, b"y" * 5000)

    def log_message(self, *args: Any) -> None:
        pass


class RecordingOrigin(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OriginHandler)
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[dict[str, Any]] = []
        self.big = os.urandom(3 * 1024 * 1024)
        self.port = self.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def web() -> Iterator[RecordingOrigin]:
    server = RecordingOrigin()
    yield server
    server.shutdown()
    server.server_close()


def via(daemon) -> http.client.HTTPConnection:
    """A keep-alive client connection to the proxy (absolute-form targets are passed as is)."""
    return http.client.HTTPConnection(*daemon.address, timeout=10)


def curl_via(daemon, *args: str) -> subprocess.CompletedProcess[bytes]:
    proxy = f"http://{daemon.address[0]}:{daemon.address[1]}"
    return subprocess.run(
        ["curl", "-sS", "-v", "--max-time", "10", "-x", proxy, *args],
        capture_output=True,
        timeout=30,
    )


def access_lines(daemon, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The first `count` access lines, waiting for them to be written."""
    deadline = time.monotonic() + timeout
    while len(lines := daemon.access_events()) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(lines) >= count, lines
    return lines[:count]


def test_curl_get_through_the_proxy(start_daemon, web):
    daemon = start_daemon()
    result = curl_via(daemon, "-o", "-", f"{web.base}/big")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert hashlib.sha256(out).digest() == hashlib.sha256(web.big).digest()
    line = daemon.access()
    assert line["protocol"] == "http"
    assert (line["command"], line["target"]) == ("GET", f"127.0.0.1:{web.port}")
    assert (line["status"], line["bytes_down"]) == ("ok", len(web.big))


def test_keep_alive_reuses_one_upstream_connection_and_logs_each_request(start_daemon, web):
    daemon = start_daemon()
    conn = via(daemon)
    for path in ("/a", "/b?x=1", "/c"):
        conn.request("GET", web.base + path)
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["path"] == path  # sent on in origin form
    conn.close()
    assert web.connections == 1
    lines = access_lines(daemon, 3)
    assert [(e["conn_id"], e["status"]) for e in lines] == [(1, "ok")] * 3


def test_a_new_origin_on_the_same_connection_gets_its_own_upstream(start_daemon, web):
    other = RecordingOrigin()
    try:
        daemon = start_daemon()
        conn = via(daemon)
        for base in (web.base, other.base, web.base):
            conn.request("GET", base + "/x")
            response = conn.getresponse()
            assert response.status == 200
            response.read()
        assert (len(web.requests), len(other.requests)) == (2, 1)
    finally:
        other.shutdown()
        other.server_close()


def test_hop_by_hop_headers_stay_on_their_hop(start_daemon, web):
    daemon = start_daemon()
    conn = via(daemon)
    conn.putrequest("GET", web.base + "/h", skip_host=True)
    for name, value in [
        ("Host", f"127.0.0.1:{web.port}"),
        ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "hop"),
        ("Proxy-Connection", "keep-alive"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Upgrade", "websocket"),
        ("X-End-To-End", "kept"),
    ]:
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    seen = dict(json.loads(response.read())["headers"])
    for name in ("connection", "x-secret", "proxy-connection", "keep-alive", "te", "upgrade"):
        assert name not in seen, name
    assert seen["x-end-to-end"] == "kept"
    assert seen["via"] == "1.1 proxyd"
    assert seen["host"] == f"127.0.0.1:{web.port}"
    # and on the way back: the origin's Connection-named and Keep-Alive headers are dropped
    assert response.getheader("X-Hop") is None
    assert response.getheader("Keep-Alive") is None
    assert response.getheader("Via") == "1.1 proxyd"


@pytest.mark.parametrize("chunked", [False, True])
def test_request_bodies_stream_to_the_origin(start_daemon, web, chunked):
    daemon = start_daemon()
    body = os.urandom(2 * 1024 * 1024 + 7)
    conn = via(daemon)
    if chunked:
        pieces = (body[i : i + 100_000] for i in range(0, len(body), 100_000))
        conn.request("POST", web.base + "/upload", body=pieces, encode_chunked=True)
    else:
        conn.request("POST", web.base + "/upload", body=body)
    report = json.loads(conn.getresponse().read())
    assert report["body_sha256"] == hashlib.sha256(body).hexdigest()
    line = daemon.access()
    assert (line["command"], line["bytes_up"]) == ("POST", len(body))


def test_expect_100_continue_with_curl(start_daemon, web, tmp_path):
    daemon = start_daemon()
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(300_000))
    out = curl_via(
        daemon, "-H", "Expect: 100-continue", "--data-binary", f"@{payload}", f"{web.base}/upload"
    )
    assert out.returncode == 0, out.stderr
    assert b"HTTP/1.1 100 Continue" in out.stderr
    report = json.loads(out.stdout)
    assert report["body_sha256"] == hashlib.sha256(payload.read_bytes()).hexdigest()


def test_head_204_304_have_no_body_and_keep_the_connection(start_daemon, web):
    daemon = start_daemon()
    conn = via(daemon)
    for method, path, status in [
        ("HEAD", "/head", 200),
        ("GET", "/204", 204),
        ("GET", "/304", 304),
        ("GET", "/after", 200),
    ]:
        conn.request(method, web.base + path)
        response = conn.getresponse()
        assert response.status == status
        body = response.read()
        assert body == b"" if path != "/after" else json.loads(body)["path"] == "/after"
    assert web.connections == 1


def test_upstream_refused_is_502(start_daemon):
    daemon = start_daemon()
    conn = via(daemon)
    conn.request("GET", f"http://127.0.0.1:{closed_port()}/")
    response = conn.getresponse()
    assert response.status == 502
    assert daemon.access()["status"] == "refused"


def test_origin_cut_off_mid_response_closes_the_client(start_daemon, web):
    daemon = start_daemon()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(f"GET {web.base}/cut HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        # what the origin sent, then a reset: an HTTP/1.0 client, whose answers end
        # with the connection, must not take a cut-off answer for a whole one
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")
    assert len(data.partition(b"\r\n\r\n")[2]) == 1000
    assert daemon.access()["status"] == "upstream_closed"


def test_auth_is_asked_for_and_not_passed_on(start_daemon, web, users_file):
    daemon = start_daemon(f'[auth]\nusers_file = "{users_file}"\n')
    conn = via(daemon)
    conn.request("GET", web.base + "/secret")
    response = conn.getresponse()
    response.read()
    assert response.status == 407
    assert response.getheader("Proxy-Authenticate") == 'Basic realm="proxyd", charset="UTF-8"'
    result = curl_via(daemon, "-U", f"{USER}:{PASSWORD}", f"{web.base}/secret")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    seen = dict(json.loads(out)["headers"])
    assert "proxy-authorization" not in seen
    assert daemon.access(lambda e: e["status"] == "ok")["user"] == USER
    assert PASSWORD not in daemon.output()


def test_pac_file_points_at_the_listener(start_daemon):
    daemon = start_daemon()
    host, port = daemon.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/proxy.pac")
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/x-ns-proxy-autoconfig"
    body = response.read().decode()
    assert "function FindProxyForURL(url, host)" in body
    assert f'"PROXY {host}:{port}"' in body
    conn.request("GET", "/index.html")
    response = conn.getresponse()
    assert response.status == 400
    response.read()


def test_origin_that_never_answers_the_connect_is_504(start_daemon):
    """An origin whose accept queue is full never completes the handshake."""
    with silent_listener() as port:
        daemon = start_daemon("[timeouts]\nconnect = 1\n")
        conn = via(daemon)
        conn.request("GET", f"http://127.0.0.1:{port}/")
        response = conn.getresponse()
        assert response.status == 504
        assert daemon.access()["status"] == "timeout"


def test_a_client_that_stops_reading_is_cut_after_the_idle_timeout(start_daemon, web):
    daemon = start_daemon("[timeouts]\nidle = 1\n[buffers]\nso_sndbuf = 65536\n")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with sock:
        sock.settimeout(10)
        sock.connect(daemon.address)
        sock.sendall(f"GET {web.base}/big HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        line = daemon.access(timeout=15)  # nothing is read: the response cannot finish
        assert line["status"] == "timeout"
        assert 0 < line["bytes_down"] < len(web.big)
        received = 0
        try:
            while chunk := sock.recv(65536):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert received < len(web.big)


def test_curl_two_urls_in_one_run_reuse_one_connection(start_daemon, web):
    daemon = start_daemon()
    result = curl_via(daemon, f"{web.base}/one", f"{web.base}/two")
    assert result.returncode == 0, result.stderr
    assert b"Re-using existing connection" in result.stderr
    assert web.connections == 1
    assert [r["path"] for r in web.requests] == ["/one", "/two"]
    lines = access_lines(daemon, 2)
    assert {e["conn_id"] for e in lines} == {1}


def test_curl_post_with_a_chunked_body(start_daemon, web, tmp_path):
    daemon = start_daemon()
    payload = tmp_path / "body"
    payload.write_bytes(os.urandom(500_000))
    result = curl_via(
        daemon,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{payload}",
        f"{web.base}/chunked",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["body_sha256"] == hashlib.sha256(payload.read_bytes()).hexdigest()
    assert ("transfer-encoding", "chunked") in [tuple(h) for h in report["headers"]]


def test_curl_head_and_304(start_daemon, web):
    daemon = start_daemon()
    head = curl_via(daemon, "-I", f"{web.base}/head")
    assert head.returncode == 0, head.stderr
    assert head.stdout.startswith(b"HTTP/1.1 200")
    assert b"content-length: 5000" in head.stdout.lower()
    not_modified = curl_via(daemon, "-o", "/dev/null", "-w", "%{http_code}", f"{web.base}/304")
    assert not_modified.returncode == 0, not_modified.stderr
    assert not_modified.stdout == b"304"


def test_both_content_length_and_transfer_encoding_is_refused(start_daemon, web):
    """The request-smuggling shape: answered 400, nothing reaches the origin."""
    daemon = start_daemon()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(
            f"POST {web.base}/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
    assert web.requests == []
    assert daemon.access()["status"] == "bad_request"


def test_connection_cannot_name_away_the_framing(start_daemon, web):
    daemon = start_daemon()
    conn = via(daemon)
    conn.request(
        "POST", web.base + "/f", body=b"12345", headers={"Connection": "content-length, host"}
    )
    report = json.loads(conn.getresponse().read())
    assert report["body_length"] == 5
    seen = dict(report["headers"])
    assert seen["content-length"] == "5"
    assert seen["host"] == f"127.0.0.1:{web.port}"


def one_answer_then_close(conn: socket.socket) -> None:
    """An origin that says keep-alive but closes its idle connection soon after."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    time.sleep(0.2)


def test_an_upstream_closed_while_idle_is_not_reused(start_daemon, tcp_server):
    daemon = start_daemon()
    origin = tcp_server(one_answer_then_close)
    conn = via(daemon)
    for _ in range(2):
        conn.request("GET", f"http://127.0.0.1:{origin.port}/")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"ok")
        time.sleep(0.5)  # the origin has closed its end by now
    assert len(origin.peers) == 2
    assert [e["status"] for e in access_lines(daemon, 2)] == ["ok", "ok"]


def test_a_later_request_gets_the_same_error_status_as_a_first(start_daemon, web):
    """A head over the size limit is 431 and an unknown Transfer-Encoding 501, on
    the second request of a kept-alive connection as on the first."""
    for bad, status in (
        (b"X-Big: " + b"x" * 100_000 + b"\r\n", b"431"),
        (b"Transfer-Encoding: gzip\r\n", b"501"),
    ):
        daemon = start_daemon()
        with socket.create_connection(daemon.address, timeout=10) as sock:
            sock.sendall(f"GET {web.base}/a HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 ")
            sock.sendall(f"GET {web.base}/b HTTP/1.1\r\nHost: x\r\n".encode() + bad + b"\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 " + status + b" ")


@pytest.mark.parametrize("origin_closes", ["at_once", "after_reading", "client_waits"])
def test_an_early_answer_to_an_upload_reaches_the_client(start_daemon, tcp_server, origin_closes):
    """An origin that answers before it has the body (413 after the head of a 20 MiB
    upload) has its answer passed on with Connection: close, not a 502, whether it
    then closes at once (a reset: the body is unread) or reads the rest first, and
    also to a client that sends no body byte before it sees an answer; the rest of
    the body is not sent on, and the client's connection closes after the answer."""
    got = {"body": 0}

    def refuse_upload(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(65536)
        got["body"] = len(head.partition(b"\r\n\r\n")[2])
        conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\n\r\ntoo large")
        if origin_closes == "after_reading":
            time.sleep(0.5)  # (the answer is on its way before the body could all go)
            conn.settimeout(10)
            while data := conn.recv(65536):
                got["body"] += len(data)

    size = 20 * 1024 * 1024
    daemon = start_daemon()
    server = tcp_server(refuse_upload)
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(
            f"POST http://127.0.0.1:{server.port}/up HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )

        def upload() -> None:
            with contextlib.suppress(OSError):  # the daemon stops taking it
                for _ in range(size // 65536):
                    sock.sendall(b"u" * 65536)

        uploader = threading.Thread(target=upload)
        if origin_closes != "client_waits":
            uploader.start()
        answer = b""
        # an orderly end: the daemon took what was still coming before it closed, so
        # no reset (which may overtake the answer on a real network) was sent
        while chunk := sock.recv(65536):
            answer += chunk
        if origin_closes != "client_waits":
            uploader.join(20)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert b"\r\nconnection: close\r\n" in answer.lower()
    assert answer.endswith(b"\r\n\r\ntoo large")
    line = daemon.access()
    assert (line["status"], line["command"]) == ("ok", "POST")
    assert line["bytes_up"] < size  # the rest of the body was not sent on


def test_an_upload_refused_for_credentials_gets_its_407(start_daemon, users_file):
    """A 20 MiB upload without credentials: the 407 reaches the client, which is still
    sending, and its connection then closes."""
    daemon = start_daemon(f'[auth]\nusers_file = "{users_file}"\n')
    size = 20 * 1024 * 1024
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(
            f"POST http://127.0.0.1:{closed_port()}/up HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )

        def upload() -> None:
            with contextlib.suppress(OSError):
                for _ in range(size // 65536):
                    sock.sendall(b"u" * 65536)

        uploader = threading.Thread(target=upload)
        uploader.start()
        answer = b""
        # an orderly end: the daemon took what was still coming before it closed, so
        # no reset (which may overtake the answer on a real network) was sent
        while chunk := sock.recv(65536):
            answer += chunk
        uploader.join(20)
    assert answer.startswith(b"HTTP/1.1 407 "), answer[:100]
    assert daemon.access()["status"] == "auth_failed"


def read_head(conn: socket.socket) -> bytes:
    """An origin's side: the request head the daemon sent (bounded in time)."""
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def read_to_end(sock: socket.socket) -> bytes:
    """What the daemon sends until it closes (the socket's timeout bounds each wait)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("ending", ["fin", "reset"])
def test_an_origin_that_ends_before_answering_is_502(start_daemon, tcp_server, ending):
    """An origin that takes the request and then closes (FIN) or resets (SO_LINGER 0)
    without a byte of answer: the client gets a 502, the access line a failure."""
    heads: list[bytes] = []

    def end_unanswered(conn: socket.socket) -> None:
        heads.append(read_head(conn))
        if ending == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    daemon = start_daemon()
    server = tcp_server(end_unanswered)
    conn = via(daemon)
    conn.request("GET", f"http://127.0.0.1:{server.port}/gone")
    response = conn.getresponse()
    assert response.status == 502
    assert response.read().startswith(b"502 Bad Gateway")
    assert heads and heads[0].startswith(b"GET /gone HTTP/1.1\r\n")  # it did reach the origin
    line = daemon.access()
    assert (line["status"], line["command"]) == ("upstream_closed", "GET")
    assert line["bytes_down"] == 0
    said = "closed the connection" if ending == "fin" else "Connection reset"
    assert said in line["error"]


def test_an_origin_that_never_answers_is_504_after_the_idle_timeout(start_daemon, tcp_server):
    """An origin that accepts and reads the request but stays silent: 504 once
    `timeouts.idle` has run out, not before, and the access line says timeout."""
    release = threading.Event()

    def silent(conn: socket.socket) -> None:
        read_head(conn)
        release.wait(10)

    daemon = start_daemon("[timeouts]\nidle = 1\n")
    server = tcp_server(silent)
    try:
        conn = via(daemon)
        started = time.monotonic()
        conn.request("GET", f"http://127.0.0.1:{server.port}/wait")
        response = conn.getresponse()
        waited = time.monotonic() - started
        assert response.status == 504
        response.read()
        assert 0.9 <= waited < 5, waited
        line = daemon.access()
        assert line["status"] == "timeout"
        assert line["target"] == f"127.0.0.1:{server.port}"
    finally:
        release.set()


def test_an_https_absolute_form_request_is_400(start_daemon, web):
    """`GET https://…` must use CONNECT: 400, nothing reaches the origin, and the
    daemon goes on serving the next client."""
    daemon = start_daemon()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(
            f"GET https://127.0.0.1:{web.port}/s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        answer = read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert web.connections == 0
    assert daemon.access()["status"] == "bad_request"
    conn = via(daemon)
    conn.request("GET", web.base + "/next")
    response = conn.getresponse()
    assert response.status == 200
    assert json.loads(response.read())["path"] == "/next"
    assert web.connections == 1
    assert [e["status"] for e in access_lines(daemon, 2)] == ["bad_request", "ok"]


def test_an_origin_that_switches_protocols_is_502(start_daemon, tcp_server):
    """An origin answering 101 to a forwarded request (which never asks to upgrade):
    the 101 is not relayed, nor what follows it; the client gets a 502."""

    def switch(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\nraw-bytes-after-the-switch"
        )
        time.sleep(0.5)

    daemon = start_daemon()
    server = tcp_server(switch)
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(f"GET http://127.0.0.1:{server.port}/ws HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:100]
    assert b"101" not in answer.partition(b"\r\n")[0]
    assert b"raw-bytes-after-the-switch" not in answer
    assert b"Switching Protocols" not in answer
    line = daemon.access()
    assert (line["status"], line["bytes_down"]) == ("upstream_closed", 0)


def test_credentials_are_checked_on_every_request_of_a_connection(start_daemon, web, users_file):
    """With users, a kept-alive connection whose first request had valid credentials
    gets a 407 for a second request without them; the origin sees only the first."""
    daemon = start_daemon(f'[auth]\nusers_file = "{users_file}"\n')
    conn = via(daemon)
    conn.request(
        "GET", web.base + "/first", headers={"Proxy-Authorization": f"Basic {basic_token()}"}
    )
    response = conn.getresponse()
    assert response.status == 200
    assert json.loads(response.read())["path"] == "/first"
    conn.request("GET", web.base + "/second")
    response = conn.getresponse()
    assert response.status == 407
    assert response.getheader("Proxy-Authenticate") == 'Basic realm="proxyd", charset="UTF-8"'
    response.read()
    assert [r["path"] for r in web.requests] == ["/first"]
    lines = access_lines(daemon, 2)
    assert [(e["status"], e["user"]) for e in lines] == [("ok", USER), ("auth_failed", None)]
    assert lines[0]["conn_id"] == lines[1]["conn_id"]


def test_a_url_or_host_header_that_is_no_rfc_3986_authority_is_400(start_daemon, web, tmp_path):
    """A host with a backslash, a space, a quote, a stray or escaped %, two @: each is
    read as another host by some URL parser (WHATWG ends the host at "\\", Python's
    urlsplit at the last "@"), so none is guessed at: 400, bad_request, and the origin,
    which both good.test and evil.test name, is never reached."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 good.test evil.test\n")
    daemon = start_daemon(hosts=hosts)
    port = web.port
    good = f"good.test:{port}"
    bad = [
        (f"http://evil.test:{port}\\@{good}/", good),
        (f"http://evil.test\\@{good}/", good),
        (f"http://{good}\\evil.test/", good),
        (f"http://u@v@{good}/", good),
        (f"http://u:p%zz@{good}/", good),
        (f"http://good%2etest:{port}/", good),
        (f"http://good.test%:{port}/", good),
        (f'http://"good.test":{port}/', good),
        (f"http://good.test|x:{port}/", good),
        (f"http://good.test:{port}:{port}/", good),
        (f"http://{good}/", f"evil.test\\@{good}"),  # the Host header too
        (f"http://{good}/", "good test"),
        (f"http://{good}/", f"user@{good}"),
    ]
    for target, host in bad:
        with socket.create_connection(daemon.address, timeout=10) as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            answer = read_to_end(sock)
        assert answer.startswith(b"HTTP/1.1 400 "), (target, host, answer[:100])
    lines = access_lines(daemon, len(bad))
    assert [e["status"] for e in lines] == ["bad_request"] * len(bad)
    assert web.connections == 0
    conn = via(daemon)  # the same origin by a well-formed URL is reached
    conn.request("GET", f"http://{good}/fine")
    assert conn.getresponse().status == 200
    assert web.connections == 1
