"""Forwarding's heads and bodies (proxyd.protocols.messages), without sockets: both
head parsers (httptools when installed, and h11) give the same head or the same
refusal for the same bytes, and the framing follows h11's rules byte for byte."""

from __future__ import annotations

import random

import h11
import pytest

from proxyd.errors import ProtocolError
from proxyd.protocols import messages
from proxyd.protocols.messages import (
    CHUNKED,
    LENGTH,
    UNTIL_CLOSE,
    ChunkedDecoder,
    H11Heads,
    HttptoolsHeads,
    MalformedResponse,
    chunk,
    head_end,
    keep_alive,
    last_chunk,
    request_bytes,
    request_framing,
    response_bytes,
    response_framing,
)

IMPLEMENTATIONS = [
    pytest.param(H11Heads(), id="h11"),
    pytest.param(
        HttptoolsHeads(),
        id="httptools",
        marks=pytest.mark.skipif(messages.httptools is None, reason="httptools not installed"),
    ),
]


@pytest.fixture(params=IMPLEMENTATIONS)
def heads(request: pytest.FixtureRequest) -> messages.Heads:
    return request.param  # type: ignore[no-any-return]


def outcome(parse, head: bytes) -> object:
    """What a parser makes of a head: the head, or its refusal and status."""
    try:
        return parse(head)
    except ProtocolError as exc:
        return ("refused", exc.http_status)
    except MalformedResponse:
        return ("malformed",)


def test_the_parser_in_use_is_named() -> None:
    expected = "httptools" if messages.httptools is not None else "h11"
    assert messages.PARSER == expected == messages.HEADS.name


GOOD_REQUESTS = {
    "get": b"GET http://a.test/p?q=1 HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\n",
    "post-length": b"POST http://a.test/ HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n",
    "chunked": b"PUT http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    "chunked-upper": b"PUT http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: CHUNKED\r\n\r\n",
    "http10-no-host": b"GET http://a/ HTTP/1.0\r\n\r\n",
    "ows": b"GET http://a/ HTTP/1.1\r\nHost:a\r\nX-A: \t v w \t\r\nX-Empty:\r\n\r\n",
    "obs-text": b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX-A: caf\xc3\xa9\r\n\r\n",
    "custom-method": b"FROBNICATE http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
    "bare-lf": b"GET http://a/ HTTP/1.1\nHost: a\nX: y\n\n",
    "obs-fold": b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX-A: one\r\n two\r\n\r\n",
    "same-lengths": b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
    "length-list": b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n",
    "ctl-in-value": b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX-A: a\x01b\r\n\r\n",
    "connect": b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n",
    "upgrade": b"GET http://a/ HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
    "both-lengths": (
        b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    ),
    "http12": b"GET http://a/ HTTP/1.2\r\nHost: a\r\n\r\n",
}

BAD_REQUESTS = {
    "no-host": b"GET http://a/ HTTP/1.1\r\nX: y\r\n\r\n",
    "two-hosts": b"GET http://a/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "two-lengths": b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    "length-not-digits": b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n",
    "length-hex": b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\n",
    "gzip-encoding": b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    "two-encodings": (
        b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    ),
    "space-before-colon": b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n",
    "nul-in-value": b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
    "cr-in-value": b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n",
    "two-spaces": b"GET  http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
    "no-version": b"GET http://a/\r\nHost: a\r\n\r\n",
    "bad-version": b"GET http://a/ HTTP/x.1\r\nHost: a\r\n\r\n",
    "space-in-target": b"GET http://a/ b HTTP/1.1\r\nHost: a\r\n\r\n",
    "fold-at-start": b"GET http://a/ HTTP/1.1\r\n Host: a\r\n\r\n",
    "no-colon": b"GET http://a/ HTTP/1.1\r\nHost a\r\n\r\n",
    "lower-http": b"GET http://a/ http/1.1\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("head", GOOD_REQUESTS.values(), ids=GOOD_REQUESTS.keys())
def test_a_request_head_reads_as_h11_reads_it(heads, head: bytes) -> None:
    assert heads.request(head) == H11Heads.request(head)


@pytest.mark.parametrize("head", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_bad_request_head_is_refused_with_h11s_status(heads, head: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        heads.request(head)
    with pytest.raises(ProtocolError) as reference:
        H11Heads.request(head)
    assert caught.value.http_status == reference.value.http_status
    assert str(caught.value) == "malformed HTTP request"  # (never the head's own bytes)


def test_an_unsupported_transfer_encoding_is_501(heads) -> None:
    with pytest.raises(ProtocolError) as caught:
        heads.request(BAD_REQUESTS["gzip-encoding"])
    assert caught.value.http_status == 501


def test_values_lose_their_ows_and_names_their_case(heads) -> None:
    parsed = heads.request(GOOD_REQUESTS["ows"])
    assert parsed.headers == [(b"host", b"a"), (b"x-a", b"v w"), (b"x-empty", b"")]
    assert (parsed.method, parsed.target, parsed.version) == (b"GET", b"http://a/", b"1.1")


GOOD_RESPONSES = {
    "ok": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\n",
    "no-reason": b"HTTP/1.1 204\r\n\r\n",
    "empty-reason": b"HTTP/1.1 304 \r\nETag: x\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n",
    "until-close": b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n",
    "continue": b"HTTP/1.1 100 Continue\r\n\r\n",
    "early-hints": b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
    "switching": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    "two-hosts": b"HTTP/1.1 200 OK\r\nHost: a\r\nHost: b\r\nContent-Length: 0\r\n\r\n",
    "both-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "reason-obs-text": b"HTTP/1.1 200 \xc3\xa9a\tb\r\nContent-Length: 0\r\n\r\n",
}
BAD_RESPONSES = {
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    "gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    "status-2-digits": b"HTTP/1.1 20 OK\r\n\r\n",
    "no-version": b"200 OK\r\n\r\n",
    "bad-header": b"HTTP/1.1 200 OK\r\nX y\r\n\r\n",
}


@pytest.mark.parametrize("head", GOOD_RESPONSES.values(), ids=GOOD_RESPONSES.keys())
def test_a_response_head_reads_as_h11_reads_it(heads, head: bytes) -> None:
    assert heads.response(head) == H11Heads.response(head)


@pytest.mark.parametrize("head", BAD_RESPONSES.values(), ids=BAD_RESPONSES.keys())
def test_a_bad_response_head_is_malformed(heads, head: bytes) -> None:
    with pytest.raises(MalformedResponse):
        heads.response(head)


def _mutants(seed: int, base: list[bytes], count: int) -> list[bytes]:
    """Heads with a byte changed, inserted or removed (their end kept)."""
    rng = random.Random(seed)
    alphabet = b" \t\r\n:,;\x00\x01\x7f\x80\xffaZ09-/.chunkedCONTENT-LENGTH"
    out = []
    for _ in range(count):
        head = bytearray(rng.choice(base)[:-4])
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(head))
            kind = rng.randrange(3)
            if kind == 0:
                head[at] = rng.choice(alphabet)
            elif kind == 1:
                head.insert(at, rng.choice(alphabet))
            elif len(head) > 1:
                del head[at]
        head += b"\r\n\r\n"
        end = head_end(bytes(head))
        if end > 0:
            out.append(bytes(head[:end]))
    return out


@pytest.mark.skipif(messages.httptools is None, reason="httptools not installed")
def test_mutated_heads_give_the_same_outcome_from_both_parsers() -> None:
    """Thousands of near-misses: httptools' path gives h11's head or h11's refusal."""
    requests = _mutants(18, list(GOOD_REQUESTS.values()), 3000)
    for head in requests:
        assert outcome(HttptoolsHeads.request, head) == outcome(H11Heads.request, head), head
    responses = _mutants(4, list(GOOD_RESPONSES.values()), 3000)
    for head in responses:
        got = outcome(HttptoolsHeads.response, head)
        assert got == outcome(H11Heads.response, head), head


@pytest.mark.parametrize(
    ("data", "end"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest", 27),
        (b"GET / HTTP/1.1\nHost: a\n\nrest", 24),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", -1),
        (b"\r\nGET / HTTP/1.1\r\n\r\n", 0),
        (b"\nGET / HTTP/1.1\r\n\r\n", 0),
    ],
)
def test_head_end(data: bytes, end: int) -> None:
    assert head_end(data) == end


def test_head_end_finds_a_blank_line_split_across_reads() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\n\r"
    assert head_end(data) == -1
    data += b"\n"
    assert head_end(data, len(data) - 1) == len(data)


# -- framing ----------------------------------------------------------------------------


def _request(head: bytes) -> messages.RequestHead:
    return H11Heads.request(head)


@pytest.mark.parametrize(
    ("head", "framing"),
    [
        (GOOD_REQUESTS["get"], (LENGTH, 0)),
        (GOOD_REQUESTS["post-length"], (LENGTH, 12)),
        (GOOD_REQUESTS["chunked"], (CHUNKED, 0)),
    ],
)
def test_request_framing(head: bytes, framing: tuple[str, int]) -> None:
    assert request_framing(_request(head)) == framing


@pytest.mark.parametrize(
    ("method", "status", "headers", "framing"),
    [
        (b"GET", 200, [(b"content-length", b"7")], (LENGTH, 7)),
        (b"GET", 200, [(b"transfer-encoding", b"chunked")], (CHUNKED, 0)),
        (
            b"GET",
            200,
            [(b"content-length", b"7"), (b"transfer-encoding", b"chunked")],
            (CHUNKED, 0),
        ),
        (b"GET", 200, [], (UNTIL_CLOSE, 0)),
        (b"HEAD", 200, [(b"content-length", b"7")], (LENGTH, 0)),
        (b"HEAD", 200, [(b"transfer-encoding", b"chunked")], (LENGTH, 0)),
        (b"GET", 204, [], (LENGTH, 0)),
        (b"GET", 304, [(b"content-length", b"7")], (LENGTH, 0)),
        (b"GET", 100, [], (LENGTH, 0)),
    ],
)
def test_response_framing(method, status, headers, framing) -> None:
    assert response_framing(method, status, headers) == framing


@pytest.mark.parametrize(
    ("version", "headers", "keep"),
    [
        (b"1.1", [], True),
        (b"1.1", [(b"connection", b"Keep-Alive, Close")], False),
        (b"1.0", [], False),
        (b"1.0", [(b"connection", b"keep-alive")], False),
    ],
)
def test_keep_alive(version, headers, keep) -> None:
    assert keep_alive(version, headers) is keep


def test_request_bytes_are_h11s() -> None:
    headers = [(b"accept", b"*/*"), (b"host", b"a.test"), (b"via", b"1.1 proxyd")]
    ours = request_bytes(b"GET", b"/p", headers)
    client = h11.Connection(h11.CLIENT)
    assert ours == client.send(h11.Request(method=b"GET", target=b"/p", headers=headers))


def _h11_answer(
    method: bytes, version: bytes, request_headers, status, headers, body: list[bytes]
) -> bytes:
    server = h11.Connection(h11.SERVER)
    line = b"%s / HTTP/%s\r\n" % (method, version)
    server.receive_data(line + b"".join(b"%s: %s\r\n" % h for h in request_headers) + b"\r\n")
    assert isinstance(server.next_event(), h11.Request)
    out = server.send(h11.Response(status_code=status, headers=headers, reason=b"R")) or b""
    for piece in body:
        out += server.send(h11.Data(data=piece)) or b""
    return out + (server.send(h11.EndOfMessage()) or b"")


CASES = [
    (b"GET", b"1.1", [(b"host", b"a")], 200, [(b"content-length", b"3")]),
    (b"GET", b"1.1", [(b"host", b"a")], 200, [(b"transfer-encoding", b"chunked")]),
    (b"GET", b"1.1", [(b"host", b"a")], 200, [(b"x", b"y")]),
    (b"GET", b"1.0", [], 200, [(b"transfer-encoding", b"chunked")]),
    (b"GET", b"1.0", [], 200, [(b"content-length", b"3")]),
    (
        b"GET",
        b"1.1",
        [(b"host", b"a"), (b"connection", b"close")],
        200,
        [(b"content-length", b"3")],
    ),
    (b"HEAD", b"1.1", [(b"host", b"a")], 200, [(b"transfer-encoding", b"chunked")]),
    (b"HEAD", b"1.0", [], 200, [(b"x", b"y")]),
    (b"GET", b"1.1", [(b"host", b"a")], 204, []),
    (b"GET", b"1.1", [(b"host", b"a")], 304, [(b"etag", b"e")]),
]


@pytest.mark.parametrize(("method", "version", "request_headers", "status", "headers"), CASES)
def test_an_answer_goes_out_as_h11_would_send_it(
    method, version, request_headers, status, headers
) -> None:
    """The head, the body's framing (chunked, or to the end for HTTP/1.0) and the end,
    byte for byte what h11 sends for the same answer."""
    keep = keep_alive(version, request_headers)
    head, framing, close = response_bytes(status, b"R", headers, method, version, keep)
    body = [b"abc"] if status == 200 and method != b"HEAD" else []
    if dict(headers).get(b"content-length") == b"3" or not body:
        out = head + b"".join(body)
    elif framing == CHUNKED:
        out = head + b"".join(chunk(p) for p in body) + last_chunk()
    else:
        out = head + b"".join(body)
    assert out == _h11_answer(method, version, request_headers, status, headers, body)
    assert close is (not keep or (framing == UNTIL_CLOSE and method != b"HEAD"))


def test_an_early_answer_closes_the_connection() -> None:
    head, _, close = response_bytes(413, b"Too Big", [], b"POST", b"1.1", False)
    assert close
    assert head.endswith(b"Connection: close\r\n\r\n")


# -- chunked bodies -----------------------------------------------------------------------

BODY = bytes(random.Random(7).randrange(256) for _ in range(70_000))


def _chunked(body: bytes, sizes: list[int], tail: bytes = b"0\r\n\r\n") -> bytes:
    out, at = b"", 0
    for size in sizes:
        piece = body[at : at + size]
        at += size
        out += b"%x;ext=1\r\n%s\r\n" % (len(piece), piece) if len(out) % 2 else chunk(piece)
    return out + tail


@pytest.mark.parametrize("seed", range(20))
def test_a_chunked_body_decodes_byte_exact_whatever_the_splits(seed: int) -> None:
    rng = random.Random(seed)
    sizes, left = [], len(BODY)
    while left:
        sizes.append(min(left, rng.choice([1, 2, 15, 16, 4096, 30_000])))
        left -= sizes[-1]
    wire = _chunked(BODY, sizes) + b"GET next"
    decoder = ChunkedDecoder()
    got, at = [], 0
    while at < len(wire):
        step = rng.choice([1, 2, 3, 7, 100, 5000, 65536])
        got += decoder.feed(wire[at : at + step])
        at += step
    assert decoder.done
    assert b"".join(got) == BODY
    assert decoder.rest == b"GET next"
    assert decoder.trailer == b""


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_a_chunked_trailer_is_kept_checked(step: int) -> None:
    wire = b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-Other: two words\r\n\r\nnext"
    decoder = ChunkedDecoder()
    got = []
    for at in range(0, len(wire), step):
        got += decoder.feed(wire[at : at + step])
    assert (b"".join(got), decoder.done, decoder.rest) == (b"abc", True, b"next")
    assert decoder.trailer == b"X-Sum: 1\r\nX-Other: two words\r\n"
    assert last_chunk(decoder.trailer) == b"0\r\nX-Sum: 1\r\nX-Other: two words\r\n\r\n"


@pytest.mark.parametrize(
    "wire",
    [
        b"x\r\n",  # not hex
        b"3\r\nabcX\r\n",  # no CRLF after the data
        b"3\r\nabc\rX",
        b"-3\r\nabc\r\n",
        b"0x3\r\nabc\r\n",
        b"123456789012345678901\r\n",  # more than 20 digits
        b"3 \t x\r\nabc\r\n",
        b"0\r\nbad trailer\r\n\r\n",
        b"0\r\nX: a\x00b\r\n\r\n",
    ],
)
def test_malformed_chunked_framing_is_refused(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(wire)
    with pytest.raises(MalformedResponse):
        ChunkedDecoder(MalformedResponse).feed(wire)


def test_an_endless_chunk_header_is_refused() -> None:
    decoder = ChunkedDecoder()
    with pytest.raises(ProtocolError):
        for _ in range(100):
            decoder.feed(b"1" * 1000)


def test_h11_reads_the_same_chunked_body() -> None:
    """Our scanner against h11's reader, on a body with extensions and odd sizes."""
    wire = _chunked(BODY[:5000], [1, 999, 3000, 1000])
    server = h11.Connection(h11.SERVER)
    server.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + wire)
    assert isinstance(server.next_event(), h11.Request)
    theirs = b""
    while isinstance(event := server.next_event(), h11.Data):
        theirs += event.data
    assert b"".join(ChunkedDecoder().feed(wire)) == theirs == BODY[:5000]


@pytest.mark.parametrize("head", [GOOD_RESPONSES["continue"], GOOD_RESPONSES["early-hints"]])
def test_an_interim_answer_is_passed_on_as_h11_writes_it(heads, head: bytes) -> None:
    """The names as the origin wrote them, the values without OWS, HTTP/1.1."""
    parsed = heads.response(head.replace(b": ", b":  "))
    expected = h11.Connection(h11.SERVER)
    expected.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    expected.next_event()
    event = H11Heads.response(head)
    reference = expected.send(
        h11.InformationalResponse(status_code=event.status, headers=event.raw, reason=event.reason)
    )
    assert messages.informational_bytes(parsed) == reference
