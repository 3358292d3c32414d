"""proxyd.protocols.http without sockets: CONNECT heads in, typed events and answers out."""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Iterable, Iterator

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.errors import LocalProtocolError, ProtocolError
from proxyd.protocols import messages
from proxyd.protocols.common import NEED_DATA, Credentials, canonical_host
from proxyd.protocols.http import (
    DEFAULT_MAX_HEAD,
    ConnectRequest,
    ForwardRequest,
    HttpProxyServer,
    absolute_origin,
    ambiguous_framing,
    check_host_header,
    end_to_end,
    head_size,
    pac_file,
    parse_authority,
    parse_basic_credentials,
)

# Every test here runs on both of the head parsers HttpProxyServer may use.
PARSERS = [
    pytest.param(messages.H11Heads(), id="h11"),
    pytest.param(
        messages.HttptoolsHeads(),
        id="httptools",
        marks=pytest.mark.skipif(messages.httptools is None, reason="httptools not installed"),
    ),
]


@pytest.fixture(scope="module", autouse=True, params=PARSERS)
def head_parser(request: pytest.FixtureRequest) -> Iterator[None]:
    saved = messages.HEADS
    messages.HEADS = request.param  # type: ignore[misc]
    yield
    messages.HEADS = saved  # type: ignore[misc]


def basic(userpass: bytes) -> bytes:
    return b"Basic " + base64.b64encode(userpass)


def connect(authority: bytes, *headers: bytes, host: bytes | None = None) -> bytes:
    lines = [b"CONNECT " + authority + b" HTTP/1.1", b"Host: " + (host or authority), *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def parse(data: bytes, max_head: int = DEFAULT_MAX_HEAD) -> ConnectRequest | ForwardRequest:
    server = HttpProxyServer(max_head)
    server.receive_data(data)
    event = server.next_event()
    assert isinstance(event, ConnectRequest | ForwardRequest)
    return event


def parse_error(data: bytes, max_head: int = DEFAULT_MAX_HEAD) -> ProtocolError:
    server = HttpProxyServer(max_head)
    server.receive_data(data)
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    return info.value


def established_server(data: bytes) -> HttpProxyServer:
    server = HttpProxyServer()
    server.receive_data(data)
    assert isinstance(server.next_event(), ConnectRequest)
    return server


def read_response(
    raw: bytes, method: bytes = b"CONNECT"
) -> tuple[h11.Response, dict[bytes, list[bytes]], bytes]:
    """Parse our answer the way a client does, so framing errors show up."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="example.com:443", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    headers: dict[bytes, list[bytes]] = {}
    for name, value in response.headers:
        headers.setdefault(name, []).append(value)
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        else:
            break
    return response, headers, body


# --- CONNECT targets -------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "host", "port"),
    [
        ("example.com:443", "example.com", 443),
        ("example.com:1", "example.com", 1),
        ("example.com:65535", "example.com", 65535),
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("localhost:22", "localhost", 22),
        ("[::1]:443", "::1", 443),
        ("[2001:db8::1]:8443", "2001:db8::1", 8443),
        ("[::ffff:192.0.2.1]:80", "::ffff:192.0.2.1", 80),
        ("xn--bcher-kva.example:80", "xn--bcher-kva.example", 80),
        # the one canonical form of a name (UTS #46), as every parser gives it
        ("LOCALHOST.:22", "localhost", 22),
        ("Metadata.Google.Internal:80", "metadata.google.internal", 80),
    ],
)
def test_connect_target(authority: str, host: str, port: int) -> None:
    assert parse_authority(authority) == (host, port)
    event = parse(connect(authority.encode()))
    assert event == ConnectRequest(host, port, None)


BAD_AUTHORITIES = [
    "example.com",  # no port
    "example.com:",
    ":443",
    "example.com:0",
    "example.com:65536",
    "example.com:70000",
    "example.com:99999999999999999999",
    "example.com:-1",
    "example.com:+80",
    "example.com:http",
    "::1",  # unbracketed IPv6
    "::1:443",
    "2001:db8::1:443",
    "[::1]",
    "[::1:443",
    "[example.com]:443",
    "[192.0.2.1]:443",
    "[]:443",
    "evil.com\\@good.test:443",
    "evil.com\\:443",
    "a..b:443",
    "sp ace:443",
    "evil%2ecom:443",
    "xn--localhost-:443",
    "localhost..:443",
]


@pytest.mark.parametrize("authority", BAD_AUTHORITIES)
def test_bad_connect_target(authority: str) -> None:
    with pytest.raises(ProtocolError) as direct:
        parse_authority(authority)
    assert direct.value.http_status == 400
    error = parse_error(connect(authority.encode(), host=b"example.com"))
    assert error.http_status == 400
    assert error.status == "bad_request"


def test_bad_authority_error_hides_userinfo_password() -> None:
    # RFC 9110 forbids userinfo in a CONNECT target; some clients send it anyway.
    # session.py logs str(error), and DESIGN.md keeps passwords out of every log line.
    error = parse_error(connect(b"alice:s3cret-pw@example.com:443", host=b"example.com"))
    assert error.http_status == 400
    assert "s3cret-pw" not in str(error)


# --- Proxy-Authorization ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (basic(b"alice:secret"), Credentials("alice", "secret")),
        (b"basic " + base64.b64encode(b"alice:secret"), Credentials("alice", "secret")),
        (b"BASIC " + base64.b64encode(b"alice:secret"), Credentials("alice", "secret")),
        (b"  Basic   " + base64.b64encode(b"alice:secret") + b"  ", Credentials("alice", "secret")),
        (basic(b"alice:pa:ss:word"), Credentials("alice", "pa:ss:word")),
        (basic(b"alice:"), Credentials("alice", "")),
        (basic(b":secret"), Credentials("", "secret")),
        (basic("jürgen:pässwort€".encode()), Credentials("jürgen", "pässwort€")),
        (basic(b"bob:with space"), Credentials("bob", "with space")),
        # Not credentials at all: None, and the request goes on without them.
        (basic(b"alicesecret"), None),  # no colon
        (b"Basic !!!notbase64!!!", None),
        (b"Basic YWxpY2U6c2VjcmV0YQ", None),  # padding missing
        (b"Basic YWxp Y2U6c2VjcmV0", None),
        (basic(b"\xff\xfe:secret"), None),  # not UTF-8
        (b"Basic", None),
        (b"Basic ", None),
        (b"", None),
        (b"Bearer " + base64.b64encode(b"alice:secret"), None),
        (b'Digest username="alice", realm="proxyd", nonce="x", response="y"', None),
        (base64.b64encode(b"alice:secret"), None),  # no scheme
    ],
)
def test_basic_credentials(value: bytes, expected: Credentials | None) -> None:
    assert parse_basic_credentials(value) == expected
    event = parse(connect(b"example.com:443", b"Proxy-Authorization: " + value))
    assert event == ConnectRequest("example.com", 443, expected)


def test_no_proxy_authorization() -> None:
    assert parse(connect(b"example.com:443")).credentials is None


def test_two_proxy_authorization_headers_give_no_credentials() -> None:
    data = connect(
        b"example.com:443",
        b"Proxy-Authorization: " + basic(b"alice:secret"),
        b"Proxy-Authorization: " + basic(b"bob:other"),
    )
    assert parse(data).credentials is None


def test_two_identical_proxy_authorization_headers_give_no_credentials() -> None:
    value = b"Proxy-Authorization: " + basic(b"alice:secret")
    assert parse(connect(b"example.com:443", value, value)).credentials is None


def test_authorization_header_is_not_for_the_proxy() -> None:
    data = connect(b"example.com:443", b"Authorization: " + basic(b"alice:secret"))
    assert parse(data).credentials is None


def test_header_name_is_case_insensitive() -> None:
    data = connect(b"example.com:443", b"PROXY-AUTHORIZATION: " + basic(b"alice:secret"))
    assert parse(data).credentials == Credentials("alice", "secret")


def test_forward_request_carries_credentials() -> None:
    data = (
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n"
        b"Proxy-Authorization: " + basic(b"alice:secret") + b"\r\n\r\n"
    )
    assert parse(data) == ForwardRequest(
        "GET", "http://example.com/", Credentials("alice", "secret")
    )


# --- other requests -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            b"GET http://example.com/path?q=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
            ForwardRequest("GET", "http://example.com/path?q=1", None),
        ),
        (
            b"GET http://example.com/ HTTP/1.0\r\n\r\n",
            ForwardRequest("GET", "http://example.com/", None),
        ),
        (
            b"HEAD http://[::1]:8080/ HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
            ForwardRequest("HEAD", "http://[::1]:8080/", None),
        ),
        (
            b"POST http://example.com/form HTTP/1.1\r\nHost: example.com\r\n"
            b"Content-Length: 3\r\n\r\na=b",
            ForwardRequest("POST", "http://example.com/form", None),
        ),
        (
            b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n\r\n",
            ForwardRequest("OPTIONS", "*", None),
        ),
        (
            b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
            ForwardRequest("GET", "/", None),
        ),
    ],
)
def test_forward_request(data: bytes, expected: ForwardRequest) -> None:
    assert parse(data) == expected


# --- the answers ----------------------------------------------------------------------


def test_established() -> None:
    server = established_server(connect(b"example.com:443"))
    answer = server.established()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\n")
    assert answer.count(b"\r\n\r\n") == 1
    # RFC 9110 section 9.3.6: no body framing in a 2xx answer to CONNECT.
    head = answer.lower()
    assert b"content-length" not in head
    assert b"transfer-encoding" not in head
    assert b"connection: close" not in head
    response, _, _ = read_response(answer)
    assert response.status_code == 200


@pytest.mark.parametrize(
    "chunks",
    [
        [connect(b"example.com:443") + b"\x16\x03\x01\x00\x05hello"],
        [connect(b"example.com:443"), b"\x16\x03\x01\x00\x05hello"],
        [connect(b"example.com:443") + b"\x16\x03", b"\x01\x00\x05", b"hello"],
    ],
)
def test_trailing_data_is_what_followed_the_head(chunks: list[bytes]) -> None:
    server = HttpProxyServer()
    event = NEED_DATA
    for chunk in chunks:
        server.receive_data(chunk)
        if event is NEED_DATA:
            event = server.next_event()
    assert isinstance(event, ConnectRequest)
    server.established()
    assert server.trailing_data == b"\x16\x03\x01\x00\x05hello"


def test_trailing_data_includes_bytes_fed_after_established() -> None:
    server = established_server(connect(b"example.com:443") + b"early")
    server.established()
    server.receive_data(b"-late")
    assert server.trailing_data == b"early-late"


def test_no_trailing_data() -> None:
    server = established_server(connect(b"example.com:443"))
    server.established()
    assert server.trailing_data == b""


def test_established_only_once_and_only_for_connect() -> None:
    server = established_server(connect(b"example.com:443"))
    server.established()
    with pytest.raises(LocalProtocolError):
        server.established()
    forward = HttpProxyServer()
    forward.receive_data(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert isinstance(forward.next_event(), ForwardRequest)
    with pytest.raises(LocalProtocolError):
        forward.established()
    with pytest.raises(LocalProtocolError):
        HttpProxyServer().established()


def test_trailing_data_only_once_established() -> None:
    server = HttpProxyServer()
    with pytest.raises(LocalProtocolError):
        _ = server.trailing_data
    server = established_server(connect(b"example.com:443") + b"tunnel")
    with pytest.raises(LocalProtocolError):
        _ = server.trailing_data


def test_trailing_data_not_after_a_refusal() -> None:
    server = established_server(connect(b"example.com:443") + b"tunnel")
    server.error_response(403)
    with pytest.raises(LocalProtocolError):
        _ = server.trailing_data


def test_next_event_after_connect_is_a_driver_bug() -> None:
    server = established_server(connect(b"example.com:443") + b"tunnel")
    with pytest.raises(LocalProtocolError):
        server.next_event()


@pytest.mark.parametrize(
    ("status", "status_line"),
    [
        (400, b"HTTP/1.1 400 Bad Request\r\n"),
        (403, b"HTTP/1.1 403 Forbidden\r\n"),
        (407, b"HTTP/1.1 407 Proxy Authentication Required\r\n"),
        (408, b"HTTP/1.1 408 Request Timeout\r\n"),
        (501, b"HTTP/1.1 501 Not Implemented\r\n"),
        (502, b"HTTP/1.1 502 Bad Gateway\r\n"),
        (503, b"HTTP/1.1 503 Service Unavailable\r\n"),
        (504, b"HTTP/1.1 504 Gateway Timeout\r\n"),
    ],
)
def test_error_response(status: int, status_line: bytes) -> None:
    server = established_server(connect(b"example.com:443"))
    raw = server.error_response(status, "upstream said no")
    assert raw.startswith(status_line)
    response, headers, body = read_response(raw)
    assert response.status_code == status
    assert headers[b"connection"] == [b"close"]
    assert body.startswith(str(status).encode())
    assert b"upstream said no" in body
    assert headers[b"content-length"] == [str(len(body)).encode()]
    if status == 407:
        assert headers[b"proxy-authenticate"] == [b'Basic realm="proxyd", charset="UTF-8"']
    else:
        assert b"proxy-authenticate" not in headers


def test_407_exact_header() -> None:
    raw = established_server(connect(b"example.com:443")).error_response(407)
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert b'Proxy-Authenticate: Basic realm="proxyd", charset="UTF-8"' in head
    assert b"Connection: close" in head
    assert not any(line.startswith(b"Retry-After") for line in head)


def test_429_says_when_to_retry() -> None:
    raw = established_server(connect(b"example.com:443")).error_response(429, retry_after=17)
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 429 Too Many Requests"
    assert b"Retry-After: 17" in head


def test_error_response_without_message() -> None:
    raw = established_server(connect(b"example.com:443")).error_response(502)
    _, _, body = read_response(raw)
    assert body == b"502 Bad Gateway\n"


@pytest.mark.parametrize("status", [400, 501])
def test_error_response_to_a_forward_request(status: int) -> None:
    server = HttpProxyServer()
    server.receive_data(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert isinstance(server.next_event(), ForwardRequest)
    response, headers, _ = read_response(server.error_response(status), method=b"GET")
    assert response.status_code == status
    assert headers[b"connection"] == [b"close"]


# --- malformed input -------------------------------------------------------------------

SECRET = b"tok-5ecr3t-Zq9"

MALFORMED = {
    "garbage line": b"GARBAGE " + SECRET + b"\r\n\r\n",
    "no version": b"CONNECT " + SECRET + b":443\r\n\r\n",
    "leading space": b" CONNECT example.com:443 HTTP/1.1\r\nHost: " + SECRET + b"\r\n\r\n",
    "two spaces": b"CONNECT  example.com:443 HTTP/1.1\r\nX-Token: " + SECRET + b"\r\n\r\n",
    "header without colon": connect(b"example.com:443", SECRET),
    "NUL in header": connect(b"example.com:443", b"X-Token: " + SECRET + b"\x00"),
    "NUL in credentials": connect(
        b"example.com:443", b"Proxy-Authorization: Basic " + SECRET + b"\x00"
    ),
    "space before colon": connect(b"example.com:443", b"Proxy-Authorization : Basic " + SECRET),
    "no Host": b"CONNECT example.com:443 HTTP/1.1\r\nX-Token: " + SECRET + b"\r\n\r\n",
    "two Hosts": connect(b"example.com:443", b"Host: " + SECRET),
    "non-ASCII target": b"CONNECT \xff" + SECRET + b":443 HTTP/1.1\r\nHost: x\r\n\r\n",
    "CONNECT with a body": connect(b"example.com:443", b"Content-Length: 14") + SECRET,
    "CONNECT chunked": connect(b"example.com:443", b"Transfer-Encoding: chunked")
    + b"e\r\n"
    + SECRET
    + b"\r\n0\r\n\r\n",
    "bad Content-Length": connect(b"example.com:443", b"Content-Length: " + SECRET),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request(data: bytes) -> None:
    error = parse_error(data)
    assert error.http_status == 400
    assert error.status == "bad_request"
    for text in (str(error), repr(error), *map(str, error.args)):
        assert SECRET.decode() not in text
    # The driver can still answer it.
    server = HttpProxyServer()
    server.receive_data(data)
    with pytest.raises(ProtocolError):
        server.next_event()
    response, headers, _ = read_response(server.error_response(error.http_status))
    assert response.status_code == 400
    assert headers[b"connection"] == [b"close"]


@pytest.mark.parametrize("data", [b"", b"CONNECT example.com:443 HTTP/1.1\r\n", b"CONNECT exam"])
def test_connection_closed_before_the_head_ended(data: bytes) -> None:
    server = HttpProxyServer()
    if data:
        server.receive_data(data)
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")  # h11's way to say EOF
    with pytest.raises(ProtocolError):
        server.next_event()


# --- size limit ----------------------------------------------------------------------------


def test_oversized_head() -> None:
    data = connect(b"example.com:443", *[b"X-Filler-%d: %s" % (i, b"y" * 50) for i in range(30)])
    assert len(data) > 1024
    assert parse(data, max_head=4096) == ConnectRequest("example.com", 443, None)
    error = parse_error(data[:-4], max_head=1024)  # unfinished and too big
    assert error.http_status in (400, 431)


def test_oversized_head_by_default_limit() -> None:
    server = HttpProxyServer()
    head = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\nX-Long: "
    server.receive_data(head)
    assert server.next_event() is NEED_DATA
    fed = len(head)
    with pytest.raises(ProtocolError) as info:
        while True:
            server.receive_data(b"a" * 1000)
            fed += 1000
            assert server.next_event() is NEED_DATA
    assert info.value.http_status in (400, 431)
    assert DEFAULT_MAX_HEAD < fed <= DEFAULT_MAX_HEAD + 1000


def test_oversized_head_error_hides_the_head() -> None:
    data = b"CONNECT example.com:443 HTTP/1.1\r\nProxy-Authorization: Basic " + SECRET * 100
    error = parse_error(data, max_head=256)
    assert SECRET.decode() not in str(error)


# --- splitting ----------------------------------------------------------------------------

REQUESTS = {
    "connect with auth and tunnel bytes": connect(
        b"example.com:443",
        b"User-Agent: curl/8.5.0",
        b"Proxy-Authorization: " + basic(b"alice:wonder:land"),
        b"Proxy-Connection: Keep-Alive",
    )
    + b"\x16\x03\x01\x02\x00",
    "connect ipv6": connect(b"[2001:db8::7]:8443"),
    "connect bare LF": b"CONNECT example.com:443 HTTP/1.1\nHost: example.com\n\n",
    "forward": b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
}


def drive(chunks: Iterable[bytes], max_head: int = DEFAULT_MAX_HEAD) -> tuple[object, bytes]:
    """The event and, for CONNECT, the tunnel's first bytes."""
    server = HttpProxyServer(max_head)
    event: object = NEED_DATA
    for chunk in chunks:
        server.receive_data(chunk)
        if event is NEED_DATA:
            event = server.next_event()
    if isinstance(event, ConnectRequest):
        server.established()
        return event, server.trailing_data
    return event, b""


@pytest.mark.parametrize("data", REQUESTS.values(), ids=REQUESTS.keys())
def test_trickle(data: bytes) -> None:
    whole = drive([data])
    assert whole[0] is not NEED_DATA
    assert drive(data[i : i + 1] for i in range(len(data))) == whole


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_trickle_malformed(data: bytes) -> None:
    with pytest.raises(ProtocolError) as whole:
        drive([data])
    with pytest.raises(ProtocolError) as trickled:
        drive(data[i : i + 1] for i in range(len(data)))
    assert trickled.value.http_status == whole.value.http_status


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# not "xn--...": most such labels are invalid punycode, refused by canonical_host
labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20).filter(
    lambda label: not label.startswith("xn--")
)
hosts = st.one_of(
    st.lists(labels, min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30
)


@st.composite
def connect_requests(draw: st.DrawFn) -> tuple[bytes, ConnectRequest]:
    host = draw(hosts)
    port = draw(st.integers(1, 65535))
    authority = (f"[{host}]" if ":" in host else host) + f":{port}"
    headers = [
        f"X-H{i}: {v}".encode() for i, v in enumerate(draw(st.lists(header_values, max_size=4)))
    ]
    credentials = None
    if draw(st.booleans()):
        username = draw(st.text(max_size=20).filter(lambda u: ":" not in u))
        password = draw(st.text(max_size=20))
        credentials = Credentials(username, password)
        headers.append(b"Proxy-Authorization: " + basic(f"{username}:{password}".encode()))
    headers = draw(st.permutations(headers))
    return connect(authority.encode(), *headers), ConnectRequest(host, port, credentials)


@settings(max_examples=200, deadline=None)
@given(
    request=connect_requests(),
    tunnel=st.binary(max_size=64),
    cuts=st.lists(st.integers(1, 500), max_size=20),
)
def test_any_split_gives_the_same_event(
    request: tuple[bytes, ConnectRequest], tunnel: bytes, cuts: list[int]
) -> None:
    data, expected = request
    assert drive([data + tunnel]) == (expected, tunnel)
    assert drive(split(data + tunnel, cuts)) == (expected, tunnel)


@st.composite
def garbled(draw: st.DrawFn) -> bytes:
    """A request with a few bytes overwritten or cut short, then anything."""
    data = bytearray(
        draw(
            st.one_of(
                connect_requests().map(lambda r: r[0]), st.sampled_from(list(REQUESTS.values()))
            )
        )
    )
    for _ in range(draw(st.integers(0, 3))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.sampled_from(b"\x00\r\n :[]@/\x7f\xff%aZ0"))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data) + draw(st.binary(max_size=100))


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(st.binary(max_size=600), garbled()),
    cuts=st.lists(st.integers(1, 1000), max_size=30),
    max_head=st.sampled_from([64, 256, DEFAULT_MAX_HEAD]),
)
def test_random_bytes_give_an_event_or_protocol_error(
    data: bytes, cuts: list[int], max_head: int
) -> None:
    server = HttpProxyServer(max_head)
    fed = 0
    for chunk in split(data, cuts):
        server.receive_data(chunk)
        fed += len(chunk)
        try:
            event = server.next_event()
        except ProtocolError as exc:
            assert 400 <= exc.http_status < 600
            return
        if event is not NEED_DATA:
            assert isinstance(event, ConnectRequest | ForwardRequest)
            if isinstance(event, ConnectRequest):
                assert 0 < event.port < 65536
            return
        # Nothing consumed yet: all of it is buffered, and within the limit.
        assert fed <= max_head


# --- forwarding: the headers passed on, and the head's size ------------------------


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        # hop-by-hop ones go, the rest stay in order
        (
            [(b"host", b"h"), (b"connection", b"keep-alive"), (b"keep-alive", b"5"),
             (b"proxy-authorization", b"Basic x"), (b"accept", b"*/*")],
            [(b"host", b"h"), (b"accept", b"*/*")],
        ),
        # so do the headers Connection names, but never the framing or the host
        (
            [(b"connection", b"x-secret, Content-Length, host"), (b"x-secret", b"1"),
             (b"content-length", b"3"), (b"host", b"h")],
            [(b"content-length", b"3"), (b"host", b"h")],
        ),
        # with Transfer-Encoding a Content-Length is dropped: the former frames the body
        (
            [(b"transfer-encoding", b"chunked"), (b"content-length", b"10")],
            [(b"transfer-encoding", b"chunked")],
        ),
    ],
)  # fmt: skip
def test_end_to_end_headers(headers, kept) -> None:
    assert end_to_end(headers) == kept


def test_ambiguous_framing_is_both_lengths() -> None:
    assert ambiguous_framing([(b"content-length", b"1"), (b"transfer-encoding", b"chunked")])
    assert not ambiguous_framing([(b"content-length", b"1")])
    assert not ambiguous_framing([(b"transfer-encoding", b"chunked")])


def test_pac_file_names_the_listener() -> None:
    assert b'return "PROXY 127.0.0.1:1080";' in pac_file("127.0.0.1:1080")
    assert b'return "HTTPS proxy.example:443";' in pac_file("proxy.example:443", tls=True)


@pytest.mark.parametrize("filler", [0, 100, 20_000])
def test_head_size_is_about_the_bytes_on_the_wire(filler: int) -> None:
    raw = b"GET http://h/ HTTP/1.1\r\nHost: h\r\nX-Filler: " + b"f" * filler + b"\r\n\r\n"
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    assert abs(head_size(request) - len(raw)) <= 4


# -- item 11: the authority of a forwarded URL, and its Host header ------------------


@pytest.mark.parametrize(
    ("target", "origin"),
    [
        ("http://example.com/", ("example.com", 80)),
        ("http://example.com", ("example.com", 80)),
        ("http://example.com:8080/x?y#z", ("example.com", 8080)),
        ("http://example.com:/", ("example.com", 80)),  # an empty port is the default
        ("HTTP://EXAMPLE.COM./", ("example.com", 80)),
        ("http://127.0.0.1:81/", ("127.0.0.1", 81)),
        ("http://[::1]:8080/", ("::1", 8080)),
        ("http://user:p%40ss@example.com/", ("example.com", 80)),
        ("http://example.com?q", ("example.com", 80)),
        ("https://example.com/", ("example.com", 443)),
        ("http://xn--bcher-kva.example/", ("xn--bcher-kva.example", 80)),
        ("/proxy.pac", None),
        ("ftp://example.com/", None),
        ("*", None),
    ],
)
def test_absolute_origin(target: str, origin: tuple[str, int] | None) -> None:
    assert absolute_origin(target) == origin


BAD_URL_AUTHORITIES = [
    "http://evil.com\\@good.test/",  # WHATWG's host is evil.com, urlsplit's good.test
    "http://good.test\\evil.com/",
    "http://evil.com\\/",
    "http://a b/",
    'http://"a"/',
    "http://a<b>/",
    "http://a{b}/",
    "http://a|b/",
    "http://a^b/",
    "http://a`b/",
    "http://evil%2ecom/",  # a valid escape, but no name holds one
    "http://evil%zzcom/",
    "http://evil.com%/",
    "http://evil.com%4/",
    "http://u:p%zz@good.test/",  # a broken escape in the user information
    "http://a@b@good.test/",
    "http://[::1/",
    "http://[::1]x/",
    "http://[good.test]/",
    "http://[::1%25lo]/",
    "http://x[1]/",
    "http://good.test:8a/",
    "http://good.test:0/",
    "http://good.test:65536/",
    "http://good.test:80:80/",
    "http:///path",
    "http://@/",
    "http://a..b/",
    "http://xn--localhost-/",
    "http://localhost../",
]


@pytest.mark.parametrize("target", BAD_URL_AUTHORITIES)
def test_a_bad_url_authority_is_400(target: str) -> None:
    with pytest.raises(ProtocolError) as info:
        absolute_origin(target)
    assert (info.value.http_status, info.value.status) == (400, "bad_request")
    assert "good.test" not in str(info.value) and "p%zz" not in str(info.value)


@pytest.mark.parametrize(
    "value", [b"", b"example.com", b"EXAMPLE.com:8080", b"127.0.0.1", b"[::1]:80", b"a_b"]
)
def test_a_host_header_by_rfc_3986(value: bytes) -> None:
    check_host_header([(b"accept", b"*/*"), (b"host", value)])


@pytest.mark.parametrize(
    "value",
    [
        b"evil.com\\@good.test",
        b"user@good.test",  # no user information in Host
        b"a b",
        b"good.test:x",
        b"evil%2ecom",
        "ｌｏｃａｌｈｏｓｔ".encode(),  # noqa: RUF001 (non-ASCII bytes: not an authority)
        b"[::1",
        b"good.test/",
    ],
)
def test_a_bad_host_header_is_400(value: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        check_host_header([(b"host", b"good.test"), (b"host", value)])
    assert info.value.http_status == 400


@given(st.text(alphabet="ab.:@[]%0129\\/ -_~!$&'()*+,;=Aé\u3002", max_size=24))
def test_an_accepted_url_authority_is_the_one_urlsplit_reads(authority: str) -> None:
    """Whatever absolute_origin accepts, Python's urlsplit (which forward.py uses for
    the path) reads the same host and port from: no parser differential between them."""
    target = f"http://{authority}/p"
    try:
        origin = absolute_origin(target)
    except ProtocolError:
        return
    assert origin is not None
    parts = urllib.parse.urlsplit(target)
    assert parts.hostname is not None
    assert (canonical_host(parts.hostname), parts.port or 80) == origin
