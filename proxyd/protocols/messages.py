"""HTTP/1.1 messages as forwarding sees them, sans-I/O: heads parsed whole, bodies
framed by counting (Content-Length) or by a small chunk scanner, never an event per
piece.

Heads are parsed by one of two implementations with the same results, chosen here
once (`HEADS`, named by `PARSER`): httptools (llhttp, in C) when it can be imported,
h11 otherwise. h11 is the reference: the httptools path takes only heads that a
strict pattern of h11's own grammar accepts and whose framing headers are plain (one
Host at most, one Content-Length of digits, Transfer-Encoding exactly "chunked");
any other head goes to h11, whose verdict (the head, or its refusal and status)
stands. So both give the same head or the same refusal for any bytes.

The body rules are h11's (`h11/_connection.py`'s `_body_framing` and
`_clean_up_response_headers_for_sending`): what frames a body, and how an answer's
head changes on its way to a client (chunked for an HTTP/1.1 client when the length
is unknown, the connection closed after it for an HTTP/1.0 one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

import h11

from proxyd.errors import ProtocolError


def _accelerator() -> Any:
    """httptools, or None where it is not installed (tests hide it with
    sys.modules["httptools"] = None, as they hide uvloop)."""
    try:
        import httptools
    except ImportError:
        return None
    return httptools


httptools: Any = _accelerator()


class MalformedResponse(ValueError):
    """An origin's answer that cannot be read as HTTP/1.1."""


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    version: bytes  # b"1.1", b"1.0"
    headers: list[tuple[bytes, bytes]]  # names in lower case, values without OWS


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]  # names in lower case
    # the fields with their names as the origin wrote them (for a 1xx passed on)
    raw: list[tuple[bytes, bytes]] = field(compare=False)


# -- where a head ends ---------------------------------------------------------------

_BLANK_LINE: Final = re.compile(rb"\n\r?\n")  # h11's: a bare LF ends a line too


def head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """The index just past the blank line that ends the head at the start of `buf`
    (searching from `start`), or -1 while it has not come. A head may not begin with a
    blank line (h11 refuses it): 0 then."""
    if buf[:1] == b"\n" or buf[:2] == b"\r\n":
        return 0
    match = _BLANK_LINE.search(buf, max(0, start - 2))
    return -1 if match is None else match.end()


def take_request_head(
    buf: bytes | bytearray, searched: int, max_head: int
) -> tuple[RequestHead, int] | None:
    """The request head at the start of `buf` and where it ends, once its blank line
    has come (searching from `searched`: what was searched before holds none); None
    while it has not. ProtocolError for a head longer than `max_head` (431) or one
    that starts with a blank line (400), and as HEADS.request refuses one."""
    end = head_end(buf, searched)
    if end > max_head or (end < 0 and len(buf) > max_head):
        raise ProtocolError(f"request head longer than {max_head} bytes", http_status=431)
    if end == 0:
        raise ProtocolError("malformed HTTP request")
    if end < 0:
        return None
    return HEADS.request(bytes(buf[:end])), end


# -- the heads: h11, the reference ----------------------------------------------------


def _h11_request(head: bytes) -> RequestHead:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 1)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        # h11's message may quote the request, headers included: never pass it on.
        raise ProtocolError("malformed HTTP request", http_status=exc.error_status_hint) from exc
    if not isinstance(event, h11.Request):  # (a whole head always gives one)
        raise ProtocolError("malformed HTTP request")
    return RequestHead(event.method, event.target, event.http_version, list(event.headers))


def _h11_response(head: bytes) -> ResponseHead:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=len(head) + 1)
    # (a request that offers an upgrade, so that a 101 reads as any other 1xx)
    headers = [(b"host", b"x"), (b"connection", b"upgrade"), (b"upgrade", b"x")]
    conn.send(h11.Request(method=b"GET", target=b"/", headers=headers))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise MalformedResponse("malformed response from the origin") from exc
    if not isinstance(event, h11.InformationalResponse | h11.Response):
        raise MalformedResponse("malformed response from the origin")
    return ResponseHead(
        event.status_code,
        event.reason,
        event.http_version,
        list(event.headers),
        event.headers.raw_items(),
    )


class H11Heads:
    """Heads parsed by h11 (pure Python): the fallback, and the reference."""

    name: Final = "h11"

    @staticmethod
    def request(head: bytes) -> RequestHead:
        """A whole request head (up to its blank line); ProtocolError with its status."""
        return _h11_request(head)

    @staticmethod
    def response(head: bytes) -> ResponseHead:
        """A whole answer head; MalformedResponse when it is not one."""
        return _h11_response(head)


# -- the heads: httptools, for the heads h11's grammar accepts as they are ----------

_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
# a header line by h11's grammar, narrowed: CRLF only, no control character in a value
_FIELDS: Final = rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*\r\n"
_REQUEST: Final = re.compile(_TOKEN + rb" [\x21-\x7e]+ HTTP/[0-9]\.[0-9]\r\n" + _FIELDS)
_RESPONSE: Final = re.compile(
    rb"HTTP/[0-9]\.[0-9] [0-9]{3}(?: [\t\x20-\x7e\x80-\xff]*)?\r\n" + _FIELDS
)


class _Collect:
    """httptools' callbacks: the target, the reason and the header fields."""

    __slots__ = ("complete", "fields", "status", "url")

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.status = b""
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, status: bytes) -> None:
        self.status += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


# the fields that the fast path takes only once (h11 refuses or merges a second)
_SINGLE: Final = frozenset({b"host", b"content-length", b"transfer-encoding"})


def _fields(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]] | None:
    """The fields with names in lower case and values without OWS, as h11 gives them;
    None when h11 would change or refuse them (a second Host or Content-Length, a
    Content-Length not all digits, a Transfer-Encoding other than one "chunked")."""
    out = []
    seen: set[bytes] = set()
    for name, value in fields:
        name = name.lower()
        value = value.strip(b" \t")
        if name in _SINGLE:
            if name in seen:
                return None
            seen.add(name)
            if name == b"content-length":
                if not value.isdigit():
                    return None
            elif name == b"transfer-encoding":
                value = value.lower()
                if value != b"chunked":
                    return None
        out.append((name, value))
    return out


def _httptools_request(head: bytes) -> RequestHead:
    if not _REQUEST.fullmatch(head):
        return _h11_request(head)
    collect = _Collect()
    parser = httptools.HttpRequestParser(collect)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # (CONNECT, or an Upgrade header: the head is whole all the same)
    except httptools.HttpParserError:
        return _h11_request(head)
    version = parser.get_http_version().encode()
    fields = _fields(collect.fields)
    if not collect.complete or fields is None:
        return _h11_request(head)
    if version == b"1.1" and not any(name == b"host" for name, _ in fields):
        return _h11_request(head)  # (h11 refuses it, with its own words)
    return RequestHead(parser.get_method(), collect.url, version, fields)


def _httptools_response(head: bytes) -> ResponseHead:
    if not _RESPONSE.fullmatch(head):
        return _h11_response(head)
    collect = _Collect()
    parser = httptools.HttpResponseParser(collect)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return _h11_response(head)
    fields = _fields(collect.fields)
    if not collect.complete or fields is None:
        return _h11_response(head)
    version = parser.get_http_version().encode()
    return ResponseHead(parser.get_status_code(), collect.status, version, fields, collect.fields)


class HttptoolsHeads:
    """Heads parsed by httptools (llhttp), h11 taking any head out of the ordinary."""

    name: Final = "httptools"

    @staticmethod
    def request(head: bytes) -> RequestHead:
        return _httptools_request(head)

    @staticmethod
    def response(head: bytes) -> ResponseHead:
        return _httptools_response(head)


Heads = H11Heads | HttptoolsHeads
# The one choice of parser: the accelerator when installed, h11 otherwise.
HEADS: Final[Heads] = HttptoolsHeads() if httptools is not None else H11Heads()
PARSER: Final = HEADS.name


# -- framing ----------------------------------------------------------------------------

# how a body is framed: its length, chunks, or (an answer only) the connection's end
LENGTH: Final = "length"
CHUNKED: Final = "chunked"
UNTIL_CLOSE: Final = "until-close"


def header_tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The comma-separated tokens of every `name` header, lower case."""
    return [
        token.strip().lower()
        for n, value in headers
        if n == name
        for token in value.split(b",")
        if token.strip()
    ]


def request_framing(head: RequestHead) -> tuple[str, int]:
    """(LENGTH, n) or (CHUNKED, 0): a request without either header has no body."""
    length = 0
    for name, value in head.headers:
        if name == b"transfer-encoding":
            return CHUNKED, 0
        if name == b"content-length":
            length = int(value)
    return LENGTH, length


def websocket_upgrade(request: RequestHead) -> bytes | None:
    """The Upgrade value of a request for a WebSocket (a GET in HTTP/1.1 whose
    `Connection` names `upgrade` and whose one `Upgrade` names `websocket`), to be
    passed on; None for any other request (other upgrades are dropped as
    hop-by-hop), and for one with a body (the origin's 101 could come while it is
    sent)."""
    if request.method != b"GET" or request.version != b"1.1":
        return None
    upgrade = [v for n, v in request.headers if n == b"upgrade"]
    if len(upgrade) != 1:  # (most requests: none)
        return None
    headers = request.headers
    if b"upgrade" not in header_tokens(headers, b"connection"):
        return None
    if b"websocket" not in header_tokens(headers, b"upgrade"):
        return None
    if request_framing(request) != (LENGTH, 0):
        return None  # (a handshake has no body: the tunnel would start mid-body)
    return upgrade[0]


def response_framing(
    method: bytes, status: int, headers: list[tuple[bytes, bytes]]
) -> tuple[str, int]:
    """How an answer to `method` with `status` and `headers` is framed (h11's rules:
    HEAD, 1xx, 204 and 304 answers have no body; chunked before Content-Length; with
    neither, the body runs to the connection's end)."""
    if status in (204, 304) or method == b"HEAD" or status < 200:
        return LENGTH, 0
    length = -1
    for name, value in headers:
        if name == b"transfer-encoding":
            return CHUNKED, 0
        if name == b"content-length" and length < 0:
            length = int(value.split(b",")[0])
    return (LENGTH, length) if length >= 0 else (UNTIL_CLOSE, 0)


def keep_alive(version: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a message lets its connection carry another (h11's `_keep_alive`)."""
    return version >= b"1.1" and b"close" not in header_tokens(headers, b"connection")


def request_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A request head as h11 writes it: HTTP/1.1, Host first."""
    lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
    lines += [b"%s: %s\r\n" % (n, v) for n, v in headers if n == b"host"]
    lines += [b"%s: %s\r\n" % (n, v) for n, v in headers if n != b"host"]
    lines.append(b"\r\n")
    return b"".join(lines)


def informational_bytes(head: ResponseHead) -> bytes:
    """A 1xx answer passed on as it came (h11 writes it so)."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (head.status, head.reason)]
    # (the names as written, the values as read: without OWS)
    lines += [
        b"%s: %s\r\n" % (raw[0], v) for raw, (_, v) in zip(head.raw, head.headers, strict=True)
    ]
    lines.append(b"\r\n")
    return b"".join(lines)


def response_bytes(
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    method: bytes,
    client_version: bytes,
    keep: bool,
) -> tuple[bytes, str, bool]:
    """An answer head for a client that sent `method` in HTTP/`client_version`, as h11
    writes it, and how its body goes out: (head, framing towards the client, whether
    the connection closes after it). A body of unknown length goes chunked to an
    HTTP/1.1 client and to the connection's end to an HTTP/1.0 one; `keep` False (or
    the latter) adds `Connection: close`."""
    framing, _ = response_framing(b"GET" if method == b"HEAD" else method, status, headers)
    close = not keep
    out_framing = LENGTH
    if framing != LENGTH:
        headers = [(n, v) for n, v in headers if n != b"content-length"]
        headers = [(n, v) for n, v in headers if n != b"transfer-encoding"]
        if client_version < b"1.1":
            out_framing = UNTIL_CLOSE
            if method != b"HEAD":
                close = True
        else:
            out_framing = CHUNKED
            headers.append((b"Transfer-Encoding", b"chunked"))
    if close:
        tokens = set(header_tokens(headers, b"connection"))
        tokens.discard(b"keep-alive")
        tokens.add(b"close")
        headers = [(n, v) for n, v in headers if n != b"connection"]
        headers.append((b"Connection", b", ".join(sorted(tokens))))
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    lines += [b"%s: %s\r\n" % (n, v) for n, v in headers if n == b"host"]
    lines += [b"%s: %s\r\n" % (n, v) for n, v in headers if n != b"host"]
    lines.append(b"\r\n")
    return b"".join(lines), out_framing, close


# -- chunked bodies ---------------------------------------------------------------------

_CHUNK_HEADER: Final = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*\r\n")
_TRAILER_LINE: Final = re.compile(_TOKEN + rb":[ \t]*[^\x00\s]*(?:[ \t]+[^\x00\s]+)*[ \t]*")
MAX_CHUNK_LINE: Final = 16384

_SIZE, _DATA, _CRLF, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """A chunked body's framing, read as h11 reads it: `feed` bytes, get the data
    they carry; `done` once the last chunk and the trailer came, with the bytes
    after it in `rest` and the trailer's lines (raw, each checked) in `trailer`.
    Malformed framing raises `error` (ProtocolError for a request's, else
    MalformedResponse)."""

    __slots__ = ("_error", "_left", "_pending", "_state", "done", "rest", "trailer")

    def __init__(self, error: type[Exception] = ProtocolError) -> None:
        self._state = _SIZE
        self._left = 0
        self._pending = b""
        self.done = False
        self.rest = b""
        self.trailer = b""
        self._error = error

    def _fail(self, what: str) -> Exception:
        if self._error is ProtocolError:
            return ProtocolError(f"malformed chunked body: {what}")
        return self._error(f"malformed chunked body from the origin: {what}")

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            self.rest += data
            return []
        buf = self._pending + data if self._pending else data
        pos, end, out = 0, len(buf), []
        state = self._state
        while pos < end:
            if state == _DATA:
                take = min(self._left, end - pos)
                out.append(buf[pos : pos + take] if take != end or pos else buf)
                pos += take
                self._left -= take
                if not self._left:
                    state = _CRLF
            elif state == _CRLF:
                if end - pos < 2:
                    if buf[pos:end] != b"\r"[: end - pos]:
                        raise self._fail("no CRLF after a chunk")
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise self._fail("no CRLF after a chunk")
                pos += 2
                state = _SIZE
            elif state == _SIZE:
                at = buf.find(b"\r\n", pos)
                if at < 0:
                    if end - pos > MAX_CHUNK_LINE:
                        raise self._fail("chunk header too long")
                    break
                match = _CHUNK_HEADER.fullmatch(buf, pos, at + 2)
                if match is None:
                    raise self._fail("bad chunk header")
                size = int(match[1], 16)
                pos = at + 2
                if size:
                    self._left = size
                    state = _DATA
                else:
                    state = _TRAILER
            else:  # _TRAILER
                if buf[pos : pos + 1] == b"\n":
                    pos += 1
                elif buf[pos : pos + 2] == b"\r\n":
                    pos += 2
                elif end - pos == 1 and buf[pos:end] == b"\r":
                    break
                else:
                    match = _BLANK_LINE.search(buf, pos)
                    if match is None:
                        if end - pos > MAX_CHUNK_LINE:
                            raise self._fail("trailer too long")
                        break
                    block = buf[pos : match.end()].split(b"\n")
                    lines = [line.removesuffix(b"\r") for line in block]
                    for line in lines[:-2]:
                        if not _TRAILER_LINE.fullmatch(line):
                            raise self._fail("bad trailer field")
                    self.trailer = b"".join(line + b"\r\n" for line in lines[:-2])
                    pos = match.end()
                state = _DONE
                self.done = True
                self.rest = buf[pos:]
                self._pending = b""
                self._state = state
                return out
        self._state = state
        self._pending = buf[pos:] if pos < end else b""
        return out


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (as h11 writes each piece)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"


def last_chunk(trailer: bytes = b"") -> bytes:
    """The end of a chunked body, with the trailer fields passed on."""
    return b"0\r\n" + trailer + b"\r\n" if trailer else LAST_CHUNK
