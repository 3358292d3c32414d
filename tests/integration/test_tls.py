"""The TLS listener (HTTPS proxy): a client that starts with a TLS handshake gets TLS on
any listener, and the protocol inside is detected again. Certificates come from
`proxyd gen-cert`; clients are curl and Python's ssl module."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import PASSWORD, USER, proxyd, request_head
from integration import socks5client
from integration.socks5client import recv_exact


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """cert.pem and key.pem for "localhost", made by `proxyd gen-cert`."""
    out = tmp_path_factory.mktemp("tls")
    result = proxyd("gen-cert", "--out", str(out), "--name", "localhost")
    assert result.returncode == 0, result.stderr
    cert, key = out / "cert.pem", out / "key.pem"
    assert f'cert = "{cert}"' in result.stdout
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    return cert, key


def tls_config(cert: tuple[Path, Path], extra: str = "") -> str:
    return f'[tls]\ncert = "{cert[0]}"\nkey = "{cert[1]}"\n{extra}'


def client_context(cert: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert[0]))


def tls_connect(daemon, cert: tuple[Path, Path]) -> ssl.SSLSocket:
    raw = socket.create_connection(daemon.address, timeout=10)
    return client_context(cert).wrap_socket(raw, server_hostname="localhost")


def test_curl_https_proxy_connect_and_forward(start_daemon, cert, origin, users_file):
    daemon = start_daemon(tls_config(cert, f'[auth]\nusers_file = "{users_file}"\n'))
    proxy = f"https://{USER}:{PASSWORD}@localhost:{daemon.port}"
    common = ["--proxy", proxy, "--proxy-cacert", str(cert[0])]
    tunnel = curl(*common, "--proxytunnel", origin.url)
    assert tunnel.returncode == 0, tunnel.stderr
    assert tunnel.stdout == origin.body
    forwarded = curl(*common, origin.url)
    assert forwarded.returncode == 0, forwarded.stderr
    assert forwarded.stdout == origin.body
    lines = [daemon.access(lambda e, i=i: e["conn_id"] == i) for i in (1, 2)]
    assert [line["command"] for line in lines] == ["connect", "GET"]
    for line in lines:
        assert (line["protocol"], line["status"], line["user"]) == ("http", "ok", USER)
        assert line["tls"].startswith("TLSv1.")
        assert line["client"].startswith("127.0.0.1:")
    assert lines[0]["bytes_down"] > len(origin.body)  # the origin's head and body
    assert lines[1]["bytes_down"] == len(origin.body)
    # a client that does not trust the certificate gets no answer, and is logged
    untrusted = curl("--proxy", proxy, origin.url)
    assert untrusted.returncode != 0
    line = daemon.access(lambda e: e["conn_id"] == 3)
    assert line["status"] == "bad_request" and "TLS handshake" in line["error"]
    assert PASSWORD not in daemon.output()


def test_plain_and_tls_clients_share_the_listener(start_daemon, cert, tcp_server):
    """SOCKS5 inside TLS and SOCKS5 without it, on one port; echo both ways."""
    daemon = start_daemon(tls_config(cert))
    server = tcp_server()
    with tls_connect(daemon, cert) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00" + socks5client.address("127.0.0.1", server.port))
        rep, host, _port = socks5client.read_reply(sock)
        assert (rep, host) == (0, "127.0.0.1")  # where the client reached us, not ""
        sock.sendall(b"inside TLS")
        assert recv_exact(sock, 10) == b"inside TLS"
    plain, rep, _, _ = socks5client.connect(daemon.address, "127.0.0.1", server.port)
    with plain:
        assert rep == 0
        plain.sendall(b"no TLS")
        assert recv_exact(plain, 6) == b"no TLS"
    lines = [daemon.access(lambda e, i=i: e["conn_id"] == i) for i in (1, 2)]
    assert [line["protocol"] for line in lines] == ["socks5", "socks5"]
    assert lines[0]["tls"].startswith("TLSv1.") and "tls" not in lines[1]
    assert lines[0]["bytes_up"] == 10


def sink_then_answer(conn: socket.socket) -> None:
    """Read until the client's EOF, then send back the SHA-256 of what came and 4 MiB."""
    digest = hashlib.sha256()
    while data := conn.recv(65536):
        digest.update(data)
    conn.sendall(digest.digest() + DOWN)


DOWN = os.urandom(4 * 1024 * 1024)


class BioClient:
    """A TLS client driven through memory BIOs over a socket of its own: it sees how
    the connection itself ends (a reset, or a FIN), not only what TLS makes of it."""

    def __init__(self, daemon, cert: tuple[Path, Path], timeout: float = 20.0) -> None:
        self.raw = socket.create_connection(daemon.address, timeout=timeout)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        context = client_context(cert)
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                self.feed()
        self.flush()

    def flush(self) -> None:
        if data := self.outgoing.read():
            self.raw.sendall(data)

    def feed(self) -> bool:
        data = self.raw.recv(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        return bool(data)

    def write(self, data: bytes) -> None:
        self.tls.write(data)
        self.flush()

    def close_notify(self) -> None:
        """We send no more (TLS half-close), and go on reading."""
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        self.flush()

    def read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            try:
                data += self.tls.read(n - len(data))
            except ssl.SSLWantReadError:
                assert self.feed(), f"closed after {len(data)} of {n} bytes"
        return data

    def read_to_end(self) -> tuple[bytes, str]:
        """Everything until the end, and how it ended: "close_notify", "eof" (a FIN
        without close_notify) or "reset" (the connection was reset)."""
        received = bytearray()
        while True:
            try:
                received += self.tls.read(65536)
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return bytes(received), "close_notify"
            except ssl.SSLEOFError:
                return bytes(received), "eof"
            try:
                self.feed()
            except ConnectionResetError:
                return bytes(received), "reset"

    def close(self) -> None:
        self.raw.close()


def test_bulk_and_half_close_over_tls(start_daemon, cert, tcp_server):
    """8 MiB up, then close_notify (TLS half-close), then 4 MiB down with its
    close_notify: every byte arrives, in both directions, intact."""
    daemon = start_daemon(tls_config(cert))
    server = tcp_server(sink_then_answer)
    up = os.urandom(8 * 1024 * 1024)
    client = BioClient(daemon, cert)
    target = f"127.0.0.1:{server.port}"
    client.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += client.read_exact(1)
    assert answer.startswith(b"HTTP/1.1 200 ")

    def upload() -> None:
        for i in range(0, len(up), 65536):
            client.write(up[i : i + 65536])
        client.close_notify()

    # the origin answers only after our EOF, so the upload cannot block on the download
    writer = threading.Thread(target=upload)
    writer.start()
    writer.join(60)
    assert not writer.is_alive()
    received, how = client.read_to_end()
    client.close()
    assert how == "close_notify"
    assert received[:32] == hashlib.sha256(up).digest()
    assert hashlib.sha256(received[32:]).digest() == hashlib.sha256(DOWN).digest()
    line = daemon.access()
    assert (line["status"], line["bytes_up"], line["tls"]) == ("ok", len(up), "TLSv1.3")
    assert line["bytes_down"] == 32 + len(DOWN)


def test_tls_failures_are_logged_and_harm_no_one(start_daemon, cert, tcp_server):
    daemon = start_daemon(tls_config(cert, "[timeouts]\nhandshake = 1\n"))
    server = tcp_server()
    # a handshake record that is no ClientHello
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05hello")
        assert sock.recv(4096)[:1] in (b"\x15", b"")  # a TLS alert, or just the close
        assert sock.recv(4096) == b""
    line = daemon.access(lambda e: e["conn_id"] == 1)
    assert line["status"] == "bad_request" and "TLS handshake failed" in line["error"]
    # half a ClientHello, then silence: cut at timeouts.handshake
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01")
        assert sock.recv(4096) == b""
    assert daemon.access(lambda e: e["conn_id"] == 2)["status"] == "handshake_timeout"
    # TLS inside TLS is not a protocol
    with tls_connect(daemon, cert) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05hello")
        assert sock.recv(4096) == b""
    line = daemon.access(lambda e: e["conn_id"] == 3)
    assert line["status"] == "bad_request" and "TLS handshake inside TLS" in line["error"]
    # and the listener goes on serving
    with tls_connect(daemon, cert) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00" + socks5client.address("127.0.0.1", server.port))
        assert socks5client.read_reply(sock)[0] == 0


def test_tls_without_a_certificate_is_refused(start_daemon):
    daemon = start_daemon()
    with socket.create_connection(daemon.address, timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05hello")
        assert sock.recv(4096) == b""
    line = daemon.access()
    assert line["status"] == "bad_request" and "no [tls] certificate" in line["error"]


def test_secrets_stay_out_of_the_log_under_tls(start_daemon, cert, users_file, tcp_server):
    daemon = start_daemon(
        tls_config(cert, f'[auth]\nusers_file = "{users_file}"\n'), "--log-level", "debug"
    )
    server = tcp_server()
    for password in (PASSWORD, "tls-wrong-secret"):
        with tls_connect(daemon, cert) as sock:
            sock.sendall(request_head("CONNECT", f"127.0.0.1:{server.port}", password=password))
            sock.recv(4096)
    daemon.access(lambda e: e["conn_id"] == 2)
    daemon.stop()
    output = daemon.output()
    key_body = "".join(cert[1].read_text().splitlines()[1:-1])
    for secret in (PASSWORD, "tls-wrong-secret", key_body[:40]):
        assert secret not in output


def test_gen_cert_for_an_address_and_check_config(start_daemon, tmp_path, origin):
    out = tmp_path / "ip"
    made = proxyd("gen-cert", "--out", str(out), "--name", "127.0.0.1")
    assert made.returncode == 0, made.stderr
    pair = (out / "cert.pem", out / "key.pem")
    config = tmp_path / "tls.toml"
    config.write_text(tls_config(pair))
    checked = proxyd("check-config", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    daemon = start_daemon(tls_config(pair))
    result = curl(
        "--proxy", f"https://127.0.0.1:{daemon.port}", "--proxy-cacert", str(pair[0]), origin.url
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == origin.body


@pytest.mark.parametrize(
    ("tls", "problem"),
    [
        ('cert = "{missing}"\nkey = "{key}"', "tls.cert: "),
        ('cert = "{cert}"\nkey = "{cert}"', "tls.cert, tls.key: "),
        ('cert = "{cert}"', "tls: cert and key must be set together"),
    ],
)
def test_check_config_reports_tls_problems(tmp_path, cert, tls, problem):
    config = tmp_path / "bad.toml"
    text = tls.format(missing=tmp_path / "nope.pem", cert=cert[0], key=cert[1])
    config.write_text(f"[tls]\n{text}\n")
    result = proxyd("check-config", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{config}: {problem}"), result.stderr
    assert "PRIVATE KEY" not in result.stderr


def test_udp_associate_with_its_control_connection_in_tls(start_daemon, cert):
    """The UDP relay is bound where the client reached the listener (the TLS end of
    the session is a socket pair without an address), and ends with the control."""
    from integration.test_udp import UdpEcho, header, udp_client

    echo = UdpEcho()
    daemon = start_daemon(tls_config(cert))
    try:
        with tls_connect(daemon, cert) as control, udp_client() as client:
            control.sendall(b"\x05\x01\x00")
            assert recv_exact(control, 2) == b"\x05\x00"
            control.sendall(b"\x05\x03\x00" + socks5client.address("0.0.0.0", 0))
            rep, host, port = socks5client.read_reply(control)
            assert (rep, host) == (0, "127.0.0.1")
            client.sendto(header("127.0.0.1", echo.port) + b"ping", (host, port))
            data, _ = client.recvfrom(65535)
            assert data == header("127.0.0.1", echo.port) + b"echo:ping"
        line = daemon.access()
        assert (line["command"], line["status"], line["datagrams_up"]) == ("udp_associate", "ok", 1)
        assert line["tls"].startswith("TLSv1.")
    finally:
        echo.close()


def test_an_association_ends_with_a_tls_control_connection_reset_after_more_bytes(
    start_daemon, cert
):
    """Bytes after the UDP ASSOCIATE request, then a reset: each association ends at
    once (under uvloop the bridge read the bytes and never saw the reset after them)."""
    daemon = start_daemon(tls_config(cert))
    for n in range(1, 31):
        with tls_connect(daemon, cert) as control:
            control.sendall(b"\x05\x01\x00")
            assert recv_exact(control, 2) == b"\x05\x00"
            control.sendall(b"\x05\x03\x00" + socks5client.address("0.0.0.0", 0))
            assert socks5client.read_reply(control)[0] == 0
            control.sendall(b"after the request" * 100)
            control.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        deadline = time.monotonic() + 2.0
        while len(daemon.access_events()) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        lines = daemon.access_events()
        assert len(lines) == n, f"association {n}: no line within 2 s"
        assert (lines[-1]["command"], lines[-1]["status"]) == ("udp_associate", "ok")


def test_no_descriptor_outlives_its_tls_client(start_daemon, cert, tcp_server):
    """Finished, failed and abandoned TLS clients leave no socket pair or socket behind."""
    import time

    daemon = start_daemon(tls_config(cert, "[timeouts]\nhandshake = 1\n"))
    server = tcp_server()
    fds = f"/proc/{daemon.proc.pid}/fd"
    baseline = len(os.listdir(fds))
    for _ in range(5):
        with tls_connect(daemon, cert) as sock:  # a tunnel, closed by the client
            sock.sendall(b"\x05\x01\x00")
            recv_exact(sock, 2)
            sock.sendall(b"\x05\x01\x00" + socks5client.address("127.0.0.1", server.port))
            socks5client.read_reply(sock)
            sock.sendall(b"x")
            recv_exact(sock, 1)
        with tls_connect(daemon, cert):  # TLS, then nothing: cut at the handshake timeout
            pass
        with socket.create_connection(daemon.address) as sock:  # gone mid-handshake
            sock.sendall(b"\x16\x03\x01\x02\x00\x01")
    deadline = time.monotonic() + 10
    while len(os.listdir(fds)) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(os.listdir(fds)) == baseline
    daemon.access(lambda e: e["conn_id"] == 15)
    assert len(daemon.access_events()) == 15


def test_reload_turns_tls_on_and_refuses_a_bad_key(start_daemon, cert, origin, tmp_path):
    """[tls] is read again on SIGHUP: new clients get TLS from then on; a certificate
    that cannot be loaded fails the reload and the running settings stay."""
    daemon = start_daemon("")
    proxy = ["--proxy", f"https://localhost:{daemon.port}", "--proxy-cacert", str(cert[0])]
    assert curl(*proxy, origin.url).returncode != 0  # no certificate yet
    (outcome,) = daemon.reload(tls_config(cert))
    assert outcome["event"] == "reloaded"
    done = curl(*proxy, origin.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == origin.body
    wrong = tmp_path / "wrong.pem"
    wrong.write_text("not a key\n")
    (outcome,) = daemon.reload(tls_config((cert[0], wrong)))
    assert outcome["event"] == "reload_failed"
    assert outcome["problems"][0].startswith("tls.cert, tls.key:")
    assert "not a key" not in daemon.output()
    assert curl(*proxy, origin.url).stdout == origin.body  # the old certificate serves on


def tls_socks5_tunnel(daemon, cert: tuple[Path, Path], port: int) -> BioClient:
    """A SOCKS5 tunnel inside TLS."""
    client = BioClient(daemon, cert, timeout=10)
    client.write(b"\x05\x01\x00" + b"\x05\x01\x00" + socks5client.address("127.0.0.1", port))
    assert client.read_exact(2) == b"\x05\x00"
    reply = client.read_exact(10)
    assert reply[:2] == b"\x05\x00", reply
    return client


def reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


@pytest.mark.parametrize("together", [True, False], ids=["together", "apart"])
def test_a_target_reset_resets_the_tls_client(start_daemon, cert, tcp_server, together):
    """A tunnel cut off by its target ends the client's TLS connection with a reset,
    not with close_notify, which would say the stream was whole; what the target sent
    before its reset still reaches the client, even when the daemon finds the bytes
    and the reset together (it is stopped meanwhile)."""
    go, sent = threading.Event(), threading.Event()

    def send_then_reset(conn: socket.socket) -> None:
        go.wait(10)
        conn.sendall(b"r" * 60000)
        if not together:
            time.sleep(0.2)
        reset(conn)
        sent.set()

    daemon = start_daemon(tls_config(cert))
    server = tcp_server(send_then_reset)
    client = tls_socks5_tunnel(daemon, cert, server.port)
    try:
        if together:
            os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            go.set()
            assert sent.wait(10)
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        received, how = client.read_to_end()
    finally:
        client.close()
    assert (len(received), how) == (60000, "reset")
    assert daemon.access()["status"] == "reset"


def test_a_tls_client_reset_resets_the_target(start_daemon, cert, tcp_server):
    """The other way: a TLS client that resets mid-upload is a reset at the target
    too, not an orderly end that would make the cut-off upload look whole."""
    outcome: list[str] = []

    def sink(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")

    daemon = start_daemon(tls_config(cert))
    server = tcp_server(sink)
    client = tls_socks5_tunnel(daemon, cert, server.port)
    client.write(b"u" * 10000)
    time.sleep(0.2)
    reset(client.raw)
    assert daemon.access()["status"] == "reset"
    deadline = time.monotonic() + 5
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outcome == ["reset"]
