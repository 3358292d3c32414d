"""The first HTTP request of a proxy connection, sans-I/O.

Feed bytes with `receive_data` and pull a ConnectRequest or ForwardRequest with
`next_event`. A CONNECT is answered with `established()` (200, the tunnel
begins) or `error_response(status)`, which closes the connection; a forwarding
connection is handed, with its head and what followed it, to proxyd.forward.
proxyd.protocols.clients.ConnectClient is the other side: our CONNECT through
a parent HTTP proxy.
"""

from __future__ import annotations

import binascii
import functools
import http
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import h11

from proxyd.errors import LocalProtocolError, ProtocolError
from proxyd.protocols import messages
from proxyd.protocols.common import (
    NEED_DATA,
    Credentials,
    NeedData,
    canonical_host,
)

DEFAULT_MAX_HEAD: Final = 16384
REALM: Final = "proxyd"
ESTABLISHED: Final = b"HTTP/1.1 200 Connection established\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    host: str
    port: int
    credentials: Credentials | None


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """Any request other than CONNECT; `target` is as the client wrote it."""

    method: str
    target: str
    credentials: Credentials | None


Event = ConnectRequest | ForwardRequest | NeedData


def parse_authority(authority: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` as in a CONNECT request line (RFC 9110 section 9.3.6),
    the host in its canonical form (proxyd.protocols.common.canonical_host).

    Error messages never quote the target: a client may have put a password in it.
    """
    host, sep, port_text = authority.rpartition(":")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ProtocolError("CONNECT target is not host:port")
    if "@" in host:
        raise ProtocolError("CONNECT target must not carry user information")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ProtocolError(f"CONNECT target port {port} is out of range")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ProtocolError("CONNECT target has an unclosed bracket")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ProtocolError("CONNECT target in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise ProtocolError("CONNECT target: IPv6 addresses need brackets")
    else:
        try:
            host = canonical_host(host)
        except ValueError as exc:
            raise ProtocolError(f"CONNECT target: {exc}") from None
    return host, port


DEFAULT_PORTS: Final = {"http": 80, "https": 443}

# What RFC 3986 (section 3.2) lets an authority hold: unreserved characters,
# sub-delims, ":" and "@" (userinfo), "[" "]" (an IP literal) and "%" in a %HH escape.
# Anything else (a "\\", a space, a quote) is read differently by different URL parsers
# (WHATWG ends the host at "\\", Python's urlsplit at "@"): such a request is refused,
# not guessed at.
_AUTHORITY: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@[]%"
)
_HEX: Final = frozenset("0123456789abcdefABCDEF")


def _bad_escape(text: str) -> bool:
    """Whether a "%" in `text` is not followed by two hex digits."""
    at = text.find("%")
    while at >= 0:
        digits = text[at + 1 : at + 3]
        if len(digits) != 2 or not _HEX.issuperset(digits):
            return True
        at = text.find("%", at + 3)
    return False


def split_authority(authority: str, *, userinfo: bool) -> tuple[str, int | None]:
    """`_split_authority`, its answers for short authorities kept (a client names the
    same few origins again and again: checking one costs about as much as parsing its
    request head)."""
    if len(authority) <= _CACHED_AUTHORITY:
        return _split_cached(authority, userinfo)
    return _split_authority(authority, userinfo=userinfo)


_CACHED_AUTHORITY: Final = 260  # (bounds the cache to about 1024 x 260 characters)


@functools.lru_cache(maxsize=1024)
def _split_cached(authority: str, userinfo: bool) -> tuple[str, int | None]:
    return _split_authority(authority, userinfo=userinfo)


def _split_authority(authority: str, *, userinfo: bool) -> tuple[str, int | None]:
    """(host, port or None) of an RFC 3986 authority (`userinfo`: a `user@` part may
    come first), the host canonical (a name by UTS #46, an IPv6 literal without its
    brackets); ValueError when it is not one. The host of a name or IPv4 address may
    hold none of the characters an authority allows beyond letters, digits, ".", "-"
    and "_", so a `%` escape in it is refused too."""
    if not _AUTHORITY.issuperset(authority) or _bad_escape(authority):
        raise ValueError("has a character an RFC 3986 authority does not allow")
    user, at, hostport = authority.rpartition("@")
    if at and (not userinfo or "@" in user or "[" in user or "]" in user):
        raise ValueError("has user information where none may be, or two '@'")
    if hostport.startswith("["):
        end = hostport.find("]")
        host, rest = hostport[1:end], hostport[end + 1 :]
        try:
            if end < 0 or "%" in host:
                raise ValueError
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("has a bracketed host that is not an IPv6 address") from None
    else:
        end = hostport.find(":")
        host, rest = (hostport, "") if end < 0 else (hostport[:end], hostport[end:])
        if "[" in host or "]" in host:
            raise ValueError("has a bracket outside an IPv6 literal")
        if not host:
            raise ValueError("has no host")
        try:
            host = canonical_host(host)
        except ValueError as exc:
            raise ValueError(f"has a bad {exc}") from None
    if not rest:
        return host, None
    port_text = rest[1:]
    if rest[0] != ":" or not (port_text.isdigit() or not port_text):
        raise ValueError("has a port that is not a number")
    if not port_text:
        return host, None  # "host:" is the default port (RFC 3986 section 6.2.3)
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"has port {port}, out of range")
    return host, port


def absolute_origin(target: str) -> tuple[str, int] | None:
    """(host, port) of an absolute-form `http://host[:port]/...` target; None for other
    forms. The host is canonical; an authority that is not an RFC 3986 one is a
    ProtocolError (400).

    Errors never quote the target: it may carry `user:password@`.
    """
    scheme, sep, rest = target.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        return None
    end = len(rest)
    for delimiter in "/?#":
        if (at := rest.find(delimiter, 0, end)) >= 0:
            end = at
    try:
        host, port = split_authority(rest[:end], userinfo=True)
    except ValueError as exc:
        raise ProtocolError(f"request target: the authority {exc}") from None
    return host, port or DEFAULT_PORTS[scheme]


def check_host_header(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """A forwarded request's Host (which the URL's authority replaces on the way on)
    must still be one host[:port] by RFC 3986, so that no hop after us reads it as
    another: ProtocolError (400) when not."""
    for name, value in headers:
        if name == b"host" and value:
            try:
                split_authority(value.decode("ascii"), userinfo=False)
            except (ValueError, UnicodeDecodeError):
                raise ProtocolError("the Host header is not an RFC 3986 host[:port]") from None


def parse_basic_credentials(value: bytes) -> Credentials | None:
    """Credentials from a `Basic` Proxy-Authorization value, or None when it is not one."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = binascii.a2b_base64(token.strip(), strict_mode=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    if not sep:
        return None
    return Credentials(username, password)


def client_event(conn: h11.Connection) -> Any:
    """The client's next h11 event (or h11.NEED_DATA); a malformed request is a
    ProtocolError with h11's status for it (400, 431, 501, ...)."""
    try:
        return conn.next_event()
    except h11.RemoteProtocolError as exc:
        # h11's message may quote the request, headers included: never pass it on.
        raise ProtocolError("malformed HTTP request", http_status=exc.error_status_hint) from exc


class HttpProxyServer:
    """One client connection's request head, and our answer to it.

    The head is read by proxyd.protocols.messages (httptools when installed, h11
    otherwise: the same head or the same refusal either way), whole once its blank
    line has come; an h11 connection per client cost a CONNECT a sixth of its
    handshake."""

    __slots__ = (
        "_buffer",
        "_closed",
        "_established",
        "_head_end",
        "_max_head",
        "_refused",
        "_request",
        "_scanned",
    )

    def __init__(self, max_head: int = DEFAULT_MAX_HEAD) -> None:
        self._max_head = max_head
        self._buffer = bytearray()  # what the client sent: the head, then what followed it
        self._scanned = 0  # searched for the head's end up to here (a trickled head)
        self._head_end = -1
        self._request: messages.RequestHead | None = None
        self._established = False
        self._refused = False
        self._closed = False

    def receive_data(self, data: bytes) -> None:
        """Bytes the client sent; b"" when it closed its side."""
        if not data:
            self._closed = True
        self._buffer += data

    @property
    def request(self) -> messages.RequestHead:
        """The request head `next_event` reported."""
        if self._request is None:
            raise LocalProtocolError("no request has been read yet")
        return self._request

    @property
    def rest(self) -> bytes:
        """What the client sent behind its request head (a forwarded request's body
        and those after it; the first bytes of a tunnel)."""
        return bytes(self._buffer[self._head_end :]) if self._request is not None else b""

    def next_event(self) -> Event:
        if self._request is not None:
            raise LocalProtocolError("the request was read already: one per connection")
        request = self._read_head()
        if request is None:
            if self._closed:
                raise ProtocolError("connection closed before the request was complete")
            return NEED_DATA
        credentials = self._credentials(request)
        method = request.method.decode("ascii")
        target = request.target.decode("ascii", "replace")
        if method == "CONNECT":
            host, port = parse_authority(target)
            return ConnectRequest(host, port, credentials)
        return ForwardRequest(method, target, credentials)

    def _read_head(self) -> messages.RequestHead | None:
        """The request head once it is whole (and CONNECT's empty body checked)."""
        taken = messages.take_request_head(self._buffer, self._scanned, self._max_head)
        self._scanned = len(self._buffer)
        if taken is None:
            return None
        request, end = taken
        if request.method == b"CONNECT":
            lengths = [v for n, v in request.headers if n == b"content-length"]
            if any(v != b"0" for v in lengths) or any(
                n == b"transfer-encoding" for n, _ in request.headers
            ):
                raise ProtocolError("CONNECT request with a body")
        self._request, self._head_end = request, end
        return request

    @staticmethod
    def _credentials(request: messages.RequestHead) -> Credentials | None:
        values = [v for k, v in request.headers if k == b"proxy-authorization"]
        if len(values) != 1:
            return None
        return parse_basic_credentials(values[0])

    def established(self) -> bytes:
        """The 200 answer to CONNECT; bytes after it belong to the tunnel."""
        request = self._request
        if request is None or request.method != b"CONNECT" or self._established:
            raise LocalProtocolError("only a CONNECT request is answered with 200 once")
        self._established = True
        return ESTABLISHED

    @property
    def said_more(self) -> bool:
        """Whether the client sent bytes after its CONNECT head (read with it)."""
        return self._request is not None and len(self._buffer) > self._head_end

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after its CONNECT head: the first bytes of the tunnel."""
        if not self._established or self._refused:
            raise LocalProtocolError("trailing data exists only once the tunnel is established")
        return self.rest

    def error_response(
        self, status: int, message: str = "", *, retry_after: int | None = None
    ) -> bytes:
        """A short text/plain answer that closes the connection; `retry_after`: the
        seconds a client should wait before it asks again (a 429's, a 503's)."""
        self._refused = True
        phrase = http.HTTPStatus(status).phrase
        body = f"{status} {phrase}{': ' if message else ''}{message}\n".encode()
        head = (
            f"HTTP/1.1 {status} {phrase}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n"
        )
        if status == 407:
            head += f'Proxy-Authenticate: Basic realm="{REALM}", charset="UTF-8"\r\n'
        if retry_after is not None:
            head += f"Retry-After: {retry_after}\r\n"
        return (head + "\r\n").encode("ascii") + body


# --- our credentials for a parent HTTP proxy (forwarding, and ConnectClient) --------


def basic_authorization(credentials: Credentials) -> str:
    """A `Basic` Proxy-Authorization value (RFC 7617, UTF-8); parse_basic_credentials reads it."""
    if ":" in credentials.username:
        raise ValueError("a username for HTTP Basic auth cannot contain ':'")
    userpass = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + binascii.b2a_base64(userpass, newline=False).decode("ascii")


# -- forwarding: what a proxy passes on, and what it answers itself ------------------

VIA: Final = b"1.1 proxyd"
# RFC 9110 section 7.6.1, plus the proxy's own credentials. Transfer-Encoding is
# hop-by-hop as well, but each side's body is framed anew from it. (`Trailer`, which
# names the trailer fields, is end to end: the trailers are passed on both ways.)
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
PAC_PATH: Final = "/proxy.pac"


# Headers a `Connection` token must not remove: the message framing and the host.
FRAMING: Final = frozenset({b"content-length", b"transfer-encoding", b"host"})


def end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers without the hop-by-hop ones, including those `Connection` names
    (but never the framing). With Transfer-Encoding, a Content-Length is dropped:
    the body is framed by the former (RFC 9112 section 6.3), and passing both on
    would let the next hop read the message differently."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    } - FRAMING
    chunked = any(n == b"transfer-encoding" for n, _ in headers)
    return [
        (n, v)
        for n, v in headers
        if n not in HOP_BY_HOP and n not in named and not (chunked and n == b"content-length")
    ]


def ambiguous_framing(headers: list[tuple[bytes, bytes]]) -> bool:
    """Both Content-Length and Transfer-Encoding: the classic request smuggling."""
    names = {n for n, _ in headers}
    return b"content-length" in names and b"transfer-encoding" in names


def pac_file(address: str, *, tls: bool = False) -> bytes:
    """A proxy auto-config file pointing browsers at this listener (over TLS when
    the PAC file itself was fetched over TLS)."""
    kind = "HTTPS" if tls else "PROXY"
    return f'function FindProxyForURL(url, host) {{\n  return "{kind} {address}";\n}}\n'.encode()


def head_size(request: h11.Request) -> int:
    """About the bytes a request head took on the wire (h11 keeps no count): its
    request line and header lines. h11 bounds a head only while it is incomplete."""
    size = len(request.method) + len(request.target) + 12
    return size + sum(len(name) + len(value) + 4 for name, value in request.headers)
