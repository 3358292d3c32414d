"""proxyd.protocols.socks4 without sockets: SOCKS4 and SOCKS4a requests and replies."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.errors import LocalProtocolError, ProtocolError
from proxyd.protocols.common import NEED_DATA
from proxyd.protocols.socks4 import MAX_FIELD, Command, Request, Socks4Server, State

# --- wire bytes written out by hand ---------------------------------------------


def socks4(command: int, port: int, ip: bytes, userid: bytes = b"") -> bytes:
    return bytes((0x04, command)) + struct.pack("!H", port) + ip + userid + b"\0"


def socks4a(command: int, port: int, name: bytes, userid: bytes = b"") -> bytes:
    return socks4(command, port, b"\0\0\0\x07", userid) + name + b"\0"


def feed(chunks: Iterable[bytes]) -> tuple[Socks4Server, list[Request]]:
    server = Socks4Server()
    events: list[Request] = []
    for chunk in chunks:
        server.receive_data(chunk)
        if server.state is State.AWAIT_REQUEST:
            event = server.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Request)
                events.append(event)
    return server, events


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# --- requests -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            socks4(1, 80, bytes((192, 0, 2, 1))),
            Request(Command.CONNECT, "192.0.2.1", 80, "", socks4a=False),
        ),
        (
            socks4(1, 443, bytes((127, 0, 0, 1)), b"alice"),
            Request(Command.CONNECT, "127.0.0.1", 443, "alice", socks4a=False),
        ),
        (
            socks4(2, 21, bytes((10, 1, 2, 3)), b"ftp"),
            Request(Command.BIND, "10.1.2.3", 21, "ftp", socks4a=False),
        ),
        (
            socks4a(1, 8080, b"example.internal"),
            Request(Command.CONNECT, "example.internal", 8080, "", socks4a=True),
        ),
        (
            socks4a(1, 80, b"b\xc3\xbccher.example", b"bob"),
            Request(Command.CONNECT, "xn--bcher-kva.example", 80, "bob", socks4a=True),
        ),
        # BIND's port is informational: 0 is as good as any
        (
            socks4(2, 0, bytes((127, 0, 0, 1))),
            Request(Command.BIND, "127.0.0.1", 0, "", socks4a=False),
        ),
        (
            socks4a(2, 0, b"peer.internal"),
            Request(Command.BIND, "peer.internal", 0, "", socks4a=True),
        ),
        # 0.0.0.0 is not the 4a marker (the last byte must be non-zero)
        (
            socks4(1, 80, bytes(4)),
            Request(Command.CONNECT, "0.0.0.0", 80, "", socks4a=False),
        ),
    ],
)
def test_requests(data: bytes, expected: Request) -> None:
    assert feed([data])[1] == [expected]
    server, events = feed(bytes((b,)) for b in data)  # a byte at a time
    assert events == [expected]
    assert server.state is State.REPLY


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (socks4(3, 80, bytes(4)), "command 0x03"),
        (socks4(0, 80, bytes(4)), "command 0x00"),
        (socks4(1, 0, bytes((1, 2, 3, 4))), "CONNECT to port 0"),
        (socks4a(1, 0, b"example.internal"), "CONNECT to port 0"),
        (socks4(1, 80, bytes((1, 2, 3, 4)), b"\xff\xfe"), "user id is not valid UTF-8"),
        (socks4a(1, 80, b""), "empty"),
        (socks4a(1, 80, b"bad name"), "spaces or control"),
        (socks4a(1, 80, b"\xffname"), "host name is not valid UTF-8"),
        (b"\x04\x01\x00\x50\x01\x02\x03\x04" + b"u" * (MAX_FIELD + 1), "user id longer"),
        (socks4(1, 80, b"\0\0\0\x01") + b"n" * (MAX_FIELD + 1), "host name longer"),
    ],
)
def test_bad_requests(data: bytes, message: str) -> None:
    server = Socks4Server()
    with pytest.raises(ProtocolError, match=message):
        server.receive_data(data)
        server.next_event()


def test_unsupported_command_is_logged_as_unsupported() -> None:
    server = Socks4Server()
    server.receive_data(socks4(9, 80, bytes(4)))
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.status == "unsupported"


def test_incomplete_request_needs_data() -> None:
    data = socks4a(1, 80, b"example.internal", b"user")
    for end in range(len(data)):
        server = Socks4Server()
        server.receive_data(data[:end])
        assert server.next_event() is NEED_DATA


# --- replies --------------------------------------------------------------------


def test_grant_reply_and_trailing_data() -> None:
    server, _ = feed([socks4(1, 80, bytes((127, 0, 0, 1))) + b"GET / HTTP/1.0\r\n"])
    assert server.reply(True, "127.0.0.1", 40000) == b"\x00\x5a" + struct.pack("!H", 40000) + bytes(
        (127, 0, 0, 1)
    )
    assert server.state is State.ESTABLISHED
    assert server.trailing_data == b"GET / HTTP/1.0\r\n"


def test_reject_reply_closes() -> None:
    server, _ = feed([socks4(1, 80, bytes((127, 0, 0, 1)))])
    assert server.reply(False) == b"\x00\x5b\x00\x00\x00\x00\x00\x00"
    assert server.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"x")


def test_ipv6_bound_address_goes_out_as_zero() -> None:
    server, _ = feed([socks4a(1, 80, b"v6.example")])
    assert server.reply(True, "::1", 5555) == b"\x00\x5a" + bytes(6)


def test_a_bad_request_can_be_refused_before_it_parsed() -> None:
    server = Socks4Server()
    assert server.reply(False)[1] == 91
    with pytest.raises(LocalProtocolError):
        Socks4Server().reply(True)


def test_no_event_or_trailing_data_out_of_turn() -> None:
    server, _ = feed([socks4(1, 80, bytes((127, 0, 0, 1)))])
    with pytest.raises(LocalProtocolError):
        server.next_event()
    with pytest.raises(LocalProtocolError):
        _ = server.trailing_data
    server.reply(True)
    with pytest.raises(LocalProtocolError):
        server.reply(True)


# --- properties -----------------------------------------------------------------

names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,6}){0,3}", fullmatch=True)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, Request]:
    command = draw(st.sampled_from(Command))
    port = draw(st.integers(0 if command is Command.BIND else 1, 65535))
    userid = draw(
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
    )
    if draw(st.booleans()):
        name = draw(names)
        data = socks4a(command, port, name.encode(), userid.encode())
        return data, Request(command, name, port, userid, socks4a=True)
    ip = draw(st.binary(min_size=4, max_size=4).filter(lambda b: b[:3] != bytes(3) or b[3] == 0))
    host = ".".join(str(b) for b in ip)
    return socks4(command, port, ip, userid.encode()), Request(command, host, port, userid, False)


@settings(max_examples=200, deadline=None)
@given(request=requests(), tunnel=st.binary(max_size=64), cuts=st.lists(st.integers(1, 600)))
def test_any_split_gives_the_same_request(
    request: tuple[bytes, Request], tunnel: bytes, cuts: list[int]
) -> None:
    data, expected = request
    for chunks in ([data + tunnel], split(data + tunnel, cuts)):
        server, events = feed(chunks)
        assert events == [expected]
        server.reply(True)
        assert server.trailing_data == tunnel


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=700), cuts=st.lists(st.integers(1, 700)))
def test_arbitrary_bytes_give_a_request_or_a_protocol_error(data: bytes, cuts: list[int]) -> None:
    server = Socks4Server()
    try:
        for chunk in split(b"\x04" + data, cuts):
            server.receive_data(chunk)
            if server.next_event() is not NEED_DATA:
                return
    except ProtocolError:
        return
    assert len(server._buffer) <= 8 + 2 * (MAX_FIELD + 1)  # bounded while waiting
