"""TLS on the listeners (an HTTPS proxy): the certificate, `proxyd gen-cert`, and the bridge.

A client whose first byte is a TLS handshake record gets TLS. The bridge ends
TLS with the standard library's ssl.SSLObject over memory buffers, driven by
loop callbacks like the relay, and hands the plaintext to the session through a
socket pair: the session reads its end as it reads any client, so everything
inside TLS (protocol detection, auth, rules, the relay, forwarding, UDP) is the
same code as without it. The bytes already read to sniff the protocol are fed to
TLS first; half-close works both ways (close_notify, then reading on, as TLS 1.3
allows).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Final

from proxyd.errors import ConfigError
from proxyd.relay import abort

READ_SIZE: Final = 65536
# Reads of the client's socket per wakeup; what is left waits for the next iteration.
READS_PER_WAKEUP: Final = 8
# Bytes a direction may hold before the bridge stops reading its source.
HIGH_WATER: Final = 256 * 1024
# Seconds the bridge may take, once the session has ended, to hand the client the
# last bytes and the close_notify; then it closes anyway.
LINGER: Final = 5.0
CERT_DAYS: Final = 365


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The listeners' TLS settings: TLS 1.2 and up, the standard library's ciphers,
    HTTP/1.1 by ALPN. ConfigError names the key whose file is wrong."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    for path, key_path in ((cert, "tls.cert"), (key, "tls.key")):
        if not path.is_file():
            raise ConfigError([f"{key_path}: {path} does not exist or is not a file"])
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        # the library's reason only: never the key file's content
        raise ConfigError(
            [f"tls.cert, tls.key: {cert} and {key} are not a matching PEM pair ({exc.reason})"]
        ) from None
    except OSError as exc:
        raise ConfigError([f"tls.cert, tls.key: cannot read: {exc.strerror}"]) from None
    return context


def generate(out: Path, name: str) -> tuple[Path, Path]:
    """Write a self-signed certificate for `name` (a host name or IP address) and its
    key (mode 0600) into `out`, for trials: cert.pem and key.pem."""
    # imported here: the daemon itself never needs them
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        alt = x509.DNSName(name)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / "cert.pem", out / "key.pem"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


class Bridge:
    """TLS for one client: ciphertext on the client's socket, plaintext on `inner`.

    A second byte mover beside the relay, because TLS records must pass through
    Python (ssl.SSLObject) to be read and written, where the relay hands bytes from
    socket to socket (splice, or one shared buffer). It keeps the relay's rules:
    reads stop while the other side has HIGH_WATER bytes unsent (backpressure),
    an end either way is passed on as one (close_notify, or shutdown of `inner`),
    and a reset as a reset (relay.abort); the relay behind `inner` keeps the idle timer.

    `ready(plain)` is called once the handshake is done, with the socket-pair end
    the session reads from now on; `failed(reason)` when the handshake fails. After
    `ready` the bridge runs by itself until both directions are done, an error, or
    `session_ended()` plus at most LINGER seconds. `broken(exc)`, when set, hears of
    a reset (or other failure) of the client's connection after the handshake, which
    the session's end of the pair would otherwise take for an orderly end.
    """

    __slots__ = (
        "_client_done",
        "_ended",
        "_in",
        "_linger",
        "_loop",
        "_out",
        "_reset",
        "_session_done",
        "_tls",
        "_to_client",
        "_to_inner",
        "_watching",
        "broken",
        "failed",
        "inner",
        "raw",
        "ready",
        "version",
    )

    def __init__(
        self,
        raw: socket.socket,
        context: ssl.SSLContext,
        *,
        ready: Callable[[socket.socket], object],
        failed: Callable[[str], object],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.raw = raw
        self.ready: Callable[[socket.socket], object] | None = ready
        self.failed: Callable[[str], object] | None = failed
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=True)
        self.inner: socket.socket | None = None  # our end of the pair, once ready
        self.version: str | None = None  # "TLSv1.3", once ready
        self._to_client = bytearray()
        self._to_inner = bytearray()
        self._client_done = False  # the client will send no more (close_notify or EOF)
        self._session_done = False  # the session's end sends no more
        self._ended = False
        self._watching: dict[tuple[int, bool], bool] = {}
        self._linger: asyncio.TimerHandle | None = None
        self._reset = False  # the session's stream was cut off: no close_notify, a reset
        self.broken: Callable[[OSError], object] | None = None

    def start(self, first: bytes) -> None:
        """Begin with the bytes already read from the client."""
        self._in.write(first)
        self._advance()
        if not self._ended:
            self._watch(self.raw, False, self._on_raw_readable)

    def session_ended(self, *, reset: bool = False) -> None:
        """The session is done with its end: finish what is under way, briefly. With
        `reset` its stream was cut off: what it sent still goes out, and then the
        client's connection is reset instead of ended with close_notify."""
        if self._ended:
            return
        self._reset = self._reset or reset
        if self.inner is None:  # still in the handshake: nothing to finish
            self._end()
            return
        self._linger = self._loop.call_later(LINGER, self._end)

    # -- readiness callbacks ------------------------------------------------------------

    def _on_raw_readable(self) -> None:
        # Read on while the client's socket has bytes and the bridge wants them: under
        # uvloop a reset socket's reader is called once and never again, so the bytes
        # that came before a reset must not hide it.
        for _ in range(READS_PER_WAKEUP):
            if self._ended or not self._watching.get((self.raw.fileno(), False)):
                return  # (ended, or paused by backpressure, or the client's EOF came)
            try:
                data = self.raw.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._break(exc)
                return
            if data:
                self._in.write(data)
            else:
                self._in.write_eof()
            self._advance()
            if not data:
                return
        self._loop.call_soon(self._on_raw_readable)  # still more: on the next iteration

    def _on_inner_readable(self) -> None:
        assert self.inner is not None
        try:
            data = self.inner.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            try:
                self._tls.write(data)
            except ssl.SSLError:
                self._end()
                return
        else:  # the session sends no more: tell the client with close_notify
            self._session_done = True
            self._unwatch(self.inner, False)
            if not self._reset:  # (a cut-off stream gets a reset instead, at the end)
                try:
                    self._tls.unwrap()
                except (ssl.SSLWantReadError, ssl.SSLError):
                    pass  # sent; the client's own close_notify may come later, or never
        self._flush_client()

    def _on_raw_writable(self) -> None:
        self._flush_client()

    def _on_inner_writable(self) -> None:
        self._flush_inner()

    # -- the work ---------------------------------------------------------------------

    def _advance(self) -> None:
        """Run TLS on what the client sent: the handshake, then decryption."""
        if self.inner is None:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush_client()
                if self._in.eof and not self._ended:
                    self._fail("the client closed the connection during the TLS handshake")
                return
            except (ssl.SSLError, OSError) as exc:
                self._flush_client()  # the alert, if TLS has one to send
                self._fail(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}")
                return
            self._established()
            if self._ended:
                return
        while not self._client_done:
            try:
                chunk = self._tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""  # close_notify, or EOF without it: the end either way
            except ssl.SSLError:
                self._end()
                return
            if not chunk:
                self._client_done = True
                self._unwatch(self.raw, False)
                break
            self._to_inner += chunk
        self._flush_client()  # TLS 1.3 sends tickets and key updates of its own
        self._flush_inner()

    def _established(self) -> None:
        self.version = self._tls.version()
        plain, self.inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        plain.setblocking(False)
        self.inner.setblocking(False)
        self._watch(self.inner, False, self._on_inner_readable)
        ready, self.ready, self.failed = self.ready, None, None
        assert ready is not None
        ready(plain)

    def _break(self, exc: OSError) -> None:
        """The client's connection failed: end, and say so."""
        broken = self.broken
        self._end()
        if broken is not None:
            broken(exc)

    def _fail(self, reason: str) -> None:
        failed = self.failed
        self._end()
        if failed is not None:
            failed(reason)

    def _flush_client(self) -> None:
        pending = self._out.read()
        if pending:
            self._to_client += pending
        if self._to_client and (error := _send(self.raw, self._to_client)) is not None:
            self._break(error)
            return
        if self._to_client:
            self._watch(self.raw, True, self._on_raw_writable)
        else:
            self._unwatch(self.raw, True)
        # backpressure: read the session only while the client takes what it sends
        if self.inner is not None and not self._session_done:
            if len(self._to_client) < HIGH_WATER:
                self._watch(self.inner, False, self._on_inner_readable)
            else:
                self._unwatch(self.inner, False)
        self._check_done()

    def _flush_inner(self) -> None:
        inner = self.inner
        if inner is None:
            return
        if self._to_inner and _send(inner, self._to_inner) is not None:
            self._to_inner.clear()  # the session closed its end: drop what the client sends
        if self._to_inner:
            self._watch(inner, True, self._on_inner_writable)
        else:
            self._unwatch(inner, True)
            if self._client_done:
                try:
                    inner.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        if not self._client_done:
            if len(self._to_inner) < HIGH_WATER:
                self._watch(self.raw, False, self._on_raw_readable)
            else:
                self._unwatch(self.raw, False)
        self._check_done()

    def _check_done(self) -> None:
        if self._ended or self._to_client or self._to_inner:
            return
        if self._session_done and (self._client_done or self._linger is not None):
            self._end()

    def _watch(self, sock: socket.socket, write: bool, callback: Callable[[], None]) -> None:
        if self._ended:
            return
        key = (sock.fileno(), write)
        if not self._watching.get(key):
            (self._loop.add_writer if write else self._loop.add_reader)(key[0], callback)
            self._watching[key] = True

    def _unwatch(self, sock: socket.socket, write: bool) -> None:
        key = (sock.fileno(), write)
        if self._watching.get(key):
            (self._loop.remove_writer if write else self._loop.remove_reader)(key[0])
            self._watching[key] = False

    def _end(self) -> None:
        if self._ended:
            return
        for sock in (self.raw, self.inner):
            if sock is not None and sock.fileno() >= 0:
                self._unwatch(sock, False)
                self._unwatch(sock, True)
        self._ended = True
        if self._linger is not None:
            self._linger.cancel()
        if self._reset:
            abort(self.raw)
        self.raw.close()
        if self.inner is not None:
            self.inner.close()
        self.ready = self.failed = self.broken = None


def _send(sock: socket.socket, pending: bytearray) -> OSError | None:
    """Send what the socket takes now and drop it from `pending`; the error when the
    connection has failed."""
    try:
        sent = sock.send(pending)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        return exc
    del pending[:sent]
    return None
