"""proxyd.protocols.socks5 without sockets: RFC 1928 handshakes and RFC 1929 auth, byte for byte."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxyd import errors
from proxyd.errors import (
    REP_ADDRESS_TYPE_NOT_SUPPORTED,
    REP_COMMAND_NOT_SUPPORTED,
    REP_GENERAL_FAILURE,
    REP_SUCCEEDED,
    LocalProtocolError,
    ProtocolError,
)
from proxyd.protocols.common import NEED_DATA, Credentials
from proxyd.protocols.socks5 import (
    DEFAULT_MAX_BUFFER,
    METHOD_NO_ACCEPTABLE,
    METHOD_NO_AUTH,
    METHOD_USERNAME_PASSWORD,
    AddressType,
    Command,
    Greeting,
    Request,
    Socks5Server,
    State,
    pack_address,
    unpack_address,
)

# --- wire bytes written out by hand, independent of the code under test ------

LONGEST_NAME = ".".join(["a" * 63] * 4)  # 255 bytes, DNS labels at most 63
assert len(LONGEST_NAME) == 255


def greeting(methods: bytes) -> bytes:
    return bytes((0x05, len(methods))) + methods


def auth(username: bytes, password: bytes) -> bytes:
    return bytes((0x01, len(username))) + username + bytes((len(password),)) + password


def ipv4(host: str) -> bytes:
    return b"\x01" + ipaddress.IPv4Address(host).packed


def ipv6(host: str) -> bytes:
    return b"\x04" + ipaddress.IPv6Address(host).packed


def domain(name: bytes) -> bytes:
    return bytes((0x03, len(name))) + name


def request(command: int, address: bytes, port: int) -> bytes:
    return bytes((0x05, command, 0x00)) + address + struct.pack("!H", port)


NO_AUTH_GREETING = greeting(b"\x00")
AUTH_GREETING = greeting(b"\x00\x02")
ALICE = auth(b"alice", b"wonderland")
CONNECT_LOCAL = request(0x01, ipv4("127.0.0.1"), 80)


# --- a tiny driver: what session.py does, minus the sockets ------------------

AWAITING = (State.AWAIT_GREETING, State.AWAIT_AUTH, State.AWAIT_REQUEST)


class Run:
    """Feeds chunks to a server and answers each event, recording everything."""

    def __init__(
        self,
        server: Socks5Server | None = None,
        *,
        method: int | None = None,
        auth_ok: bool = True,
        reply_code: int = REP_SUCCEEDED,
    ) -> None:
        self.server = server or Socks5Server()
        self.method = method
        self.auth_ok = auth_ok
        self.reply_code = reply_code
        self.events: list[Any] = []
        self.sent = b""
        self.leftover = b""  # chunks after the handshake ended: tunnel bytes

    def feed(self, chunks: Iterable[bytes]) -> Run:
        for chunk in chunks:
            if self.server.state in (State.ESTABLISHED, State.CLOSED):
                self.leftover += chunk
                continue
            self.server.receive_data(chunk)
            self.pump()
        return self

    def pump(self) -> None:
        while self.server.state in AWAITING:
            event = self.server.next_event()
            if event is NEED_DATA:
                return
            self.events.append(event)
            self.answer(event)

    def answer(self, event: Any) -> None:
        if isinstance(event, Greeting):
            method = self.method
            if method is None:
                if METHOD_USERNAME_PASSWORD in event.methods:
                    method = METHOD_USERNAME_PASSWORD
                elif METHOD_NO_AUTH in event.methods:
                    method = METHOD_NO_AUTH
                else:
                    method = METHOD_NO_ACCEPTABLE
            self.sent += self.server.choose_method(method)
        elif isinstance(event, Credentials):
            self.sent += self.server.auth_result(self.auth_ok)
        elif isinstance(event, Request):
            self.sent += self.server.reply(self.reply_code, "192.0.2.1", 4321)
        else:
            raise AssertionError(f"unexpected event {event!r}")

    @property
    def tunnel(self) -> bytes:
        """Everything the relay would see first: parser's trailing data, then later chunks."""
        return self.server.trailing_data + self.leftover


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def server_in(state: State) -> Socks5Server:
    """A server driven by valid input into `state`."""
    server = Socks5Server()
    steps: list[tuple[State, Any]] = [
        (State.CHOOSE_METHOD, lambda: (server.receive_data(AUTH_GREETING), server.next_event())),
        (State.AWAIT_AUTH, lambda: server.choose_method(METHOD_USERNAME_PASSWORD)),
        (State.CHECK_AUTH, lambda: (server.receive_data(ALICE), server.next_event())),
        (State.AWAIT_REQUEST, lambda: server.auth_result(True)),
        (State.REPLY, lambda: (server.receive_data(CONNECT_LOCAL), server.next_event())),
        (State.ESTABLISHED, lambda: server.reply(REP_SUCCEEDED, "127.0.0.1", 5000)),
    ]
    if state is State.CLOSED:
        server_closed = server_in(State.CHOOSE_METHOD)
        server_closed.choose_method(METHOD_NO_ACCEPTABLE)
        return server_closed
    for reached, step in steps:
        if server.state is state:
            break
        step()
        assert server.state is reached
    assert server.state is state
    return server


# --- greeting and method selection --------------------------------------------


@pytest.mark.parametrize(
    ("data", "methods"),
    [
        (b"\x05\x01\x00", b"\x00"),
        (b"\x05\x01\x02", b"\x02"),
        (b"\x05\x02\x00\x02", b"\x00\x02"),
        (b"\x05\x03\x00\x01\x02", b"\x00\x01\x02"),
        (greeting(bytes(range(255))), bytes(range(255))),
    ],
)
def test_greeting(data: bytes, methods: bytes) -> None:
    server = Socks5Server()
    server.receive_data(data)
    assert server.next_event() == Greeting(methods)
    assert server.state is State.CHOOSE_METHOD


@pytest.mark.parametrize(
    "data", [b"", b"\x05", b"\x05\x02", b"\x05\x02\x00", b"\x05\xff" + bytes(254)]
)
def test_incomplete_greeting_needs_data(data: bytes) -> None:
    server = Socks5Server()
    server.receive_data(data)
    assert server.next_event() is NEED_DATA
    assert server.state is State.AWAIT_GREETING


@pytest.mark.parametrize(
    "data", [b"\x04\x01\x00", b"\x00\x01\x00", b"\x06\x01\x00", b"GET / HTTP/1.1\r\n", b"\x01\x01"]
)
def test_greeting_with_wrong_version(data: bytes) -> None:
    server = Socks5Server()
    server.receive_data(data)
    with pytest.raises(ProtocolError):
        server.next_event()


@pytest.mark.parametrize(
    ("method", "answer", "state"),
    [
        (METHOD_NO_AUTH, b"\x05\x00", State.AWAIT_REQUEST),
        (METHOD_USERNAME_PASSWORD, b"\x05\x02", State.AWAIT_AUTH),
        (METHOD_NO_ACCEPTABLE, b"\x05\xff", State.CLOSED),
    ],
)
def test_choose_method(method: int, answer: bytes, state: State) -> None:
    server = server_in(State.CHOOSE_METHOD)
    assert server.choose_method(method) == answer
    assert server.state is state


@pytest.mark.parametrize("method", [0x01, 0x03, 0x80, 0xFE])
def test_choose_unimplemented_method_is_our_bug(method: int) -> None:
    server = server_in(State.CHOOSE_METHOD)
    with pytest.raises(LocalProtocolError):
        server.choose_method(method)


def test_no_acceptable_method_ends_the_handshake() -> None:
    server = server_in(State.CHOOSE_METHOD)
    server.choose_method(METHOD_NO_ACCEPTABLE)
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"\x01\x01a\x01b")
    with pytest.raises(LocalProtocolError):
        server.next_event()
    with pytest.raises(LocalProtocolError):
        server.reply(REP_GENERAL_FAILURE)


# --- username/password sub-negotiation (RFC 1929) -----------------------------


@pytest.mark.parametrize(
    ("data", "credentials"),
    [
        (auth(b"alice", b"wonderland"), Credentials("alice", "wonderland")),
        (auth(b"a", b"b"), Credentials("a", "b")),
        (auth(b"u", b""), Credentials("u", "")),
        (auth(b"x" * 255, b"y" * 255), Credentials("x" * 255, "y" * 255)),
        (auth("jürgen".encode(), "pässwörd€".encode()), Credentials("jürgen", "pässwörd€")),
        (auth(b"user", b"p:a s\x00s"), Credentials("user", "p:a s\x00s")),
    ],
)
def test_credentials(data: bytes, credentials: Credentials) -> None:
    server = server_in(State.AWAIT_AUTH)
    server.receive_data(data)
    assert server.next_event() == credentials
    assert server.state is State.CHECK_AUTH


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01", b"\x01\x05", b"\x01\x05alice", b"\x01\x05alice\x06", b"\x01\x05alice\x06wonde"],
)
def test_incomplete_credentials_need_data(data: bytes) -> None:
    server = server_in(State.AWAIT_AUTH)
    server.receive_data(data)
    assert server.next_event() is NEED_DATA
    assert server.state is State.AWAIT_AUTH


@pytest.mark.parametrize(
    "data",
    [
        b"\x05\x05alice\x06secret",  # SOCKS version where the auth version belongs
        b"\x00\x05alice\x06secret",
        b"\x02\x05alice\x06secret",
        auth(b"\xff\xfe", b"secret"),  # user name not UTF-8
        auth(b"alice", b"\xc3("),  # password not UTF-8
    ],
)
def test_bad_credentials_message(data: bytes) -> None:
    server = server_in(State.AWAIT_AUTH)
    server.receive_data(data)
    with pytest.raises(ProtocolError):
        server.next_event()


@pytest.mark.parametrize(
    ("ok", "answer", "state"),
    [(True, b"\x01\x00", State.AWAIT_REQUEST), (False, b"\x01\x01", State.CLOSED)],
)
def test_auth_result(ok: bool, answer: bytes, state: State) -> None:
    server = server_in(State.CHECK_AUTH)
    assert server.auth_result(ok) == answer
    assert server.state is state


def test_failed_auth_ends_the_handshake() -> None:
    server = server_in(State.CHECK_AUTH)
    server.auth_result(False)
    with pytest.raises(LocalProtocolError):
        server.receive_data(CONNECT_LOCAL)
    with pytest.raises(LocalProtocolError):
        server.reply(REP_GENERAL_FAILURE)


def test_credentials_repr_hides_the_password() -> None:
    creds = Credentials("alice", "hunter2-s3cret")
    for text in (repr(creds), str(creds), f"{creds}", repr([creds]), repr({"c": creds})):
        assert "hunter2-s3cret" not in text
        assert "alice" in text
    assert creds.password == "hunter2-s3cret"


def test_parsed_credentials_repr_hides_the_password() -> None:
    server = server_in(State.AWAIT_AUTH)
    server.receive_data(auth(b"bob", b"correct-horse"))
    event = server.next_event()
    assert "correct-horse" not in repr(event)


# --- requests -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            request(0x01, ipv4("127.0.0.1"), 80),
            Request(Command.CONNECT, "127.0.0.1", 80, AddressType.IPV4),
        ),
        (
            request(0x01, ipv4("203.0.113.254"), 65535),
            Request(Command.CONNECT, "203.0.113.254", 65535, AddressType.IPV4),
        ),
        (
            request(0x01, ipv6("::1"), 443),
            Request(Command.CONNECT, "::1", 443, AddressType.IPV6),
        ),
        (
            request(0x01, ipv6("2001:db8:0:0:0:0:0:1"), 8443),
            Request(Command.CONNECT, "2001:db8::1", 8443, AddressType.IPV6),
        ),
        (
            request(0x01, domain(b"example.com"), 443),
            Request(Command.CONNECT, "example.com", 443, AddressType.DOMAIN),
        ),
        (
            request(0x01, domain(LONGEST_NAME.encode()), 1),
            Request(Command.CONNECT, LONGEST_NAME, 1, AddressType.DOMAIN),
        ),
        (
            request(0x01, domain("bücher.example".encode()), 80),
            Request(Command.CONNECT, "xn--bcher-kva.example", 80, AddressType.DOMAIN),
        ),
        (
            request(0x02, ipv4("0.0.0.0"), 0),
            Request(Command.BIND, "0.0.0.0", 0, AddressType.IPV4),
        ),
        (
            request(0x02, ipv6("fe80::1"), 7000),
            Request(Command.BIND, "fe80::1", 7000, AddressType.IPV6),
        ),
        (
            request(0x02, domain(b"localhost"), 21),
            Request(Command.BIND, "localhost", 21, AddressType.DOMAIN),
        ),
        (
            request(0x03, ipv4("0.0.0.0"), 0),
            Request(Command.UDP_ASSOCIATE, "0.0.0.0", 0, AddressType.IPV4),
        ),
        (
            request(0x03, ipv6("::"), 0),
            Request(Command.UDP_ASSOCIATE, "::", 0, AddressType.IPV6),
        ),
        (
            request(0x03, domain(b"dns.example"), 53),
            Request(Command.UDP_ASSOCIATE, "dns.example", 53, AddressType.DOMAIN),
        ),
    ],
)
@pytest.mark.parametrize("with_auth", [False, True])
def test_request(data: bytes, expected: Request, with_auth: bool) -> None:
    if with_auth:
        server = server_in(State.AWAIT_REQUEST)
    else:
        server = server_in(State.CHOOSE_METHOD)
        server.choose_method(METHOD_NO_AUTH)
    server.receive_data(data)
    event = server.next_event()
    assert event == expected
    assert type(event.command) is Command
    assert type(event.address_type) is AddressType
    assert server.state is State.REPLY


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x05",
        b"\x05\x01\x00",
        b"\x05\x01\x00\x01",
        b"\x05\x01\x00\x01\x7f\x00\x00\x01",
        b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00",
        b"\x05\x01\x00\x04" + bytes(16),
        b"\x05\x01\x00\x04" + bytes(17),
        b"\x05\x01\x00\x03",
        b"\x05\x01\x00\x03\x0bexample.co",
        b"\x05\x01\x00\x03\x0bexample.com\x01",
    ],
)
def test_incomplete_request_needs_data(data: bytes) -> None:
    server = server_in(State.AWAIT_REQUEST)
    server.receive_data(data)
    assert server.next_event() is NEED_DATA
    assert server.state is State.AWAIT_REQUEST


@pytest.mark.parametrize(
    ("data", "socks_reply"),
    [
        (request(0x00, ipv4("127.0.0.1"), 80), REP_COMMAND_NOT_SUPPORTED),
        (request(0x04, ipv4("127.0.0.1"), 80), REP_COMMAND_NOT_SUPPORTED),
        (request(0x7F, domain(b"example.com"), 80), REP_COMMAND_NOT_SUPPORTED),
        (request(0xFF, ipv6("::1"), 80), REP_COMMAND_NOT_SUPPORTED),
        # The command is known as soon as the first four bytes are in.
        (b"\x05\x09\x00\x01", REP_COMMAND_NOT_SUPPORTED),
        (request(0x01, b"\x00" + bytes(6), 80), REP_ADDRESS_TYPE_NOT_SUPPORTED),
        (request(0x01, b"\x02" + bytes(6), 80), REP_ADDRESS_TYPE_NOT_SUPPORTED),
        (request(0x02, b"\x05" + bytes(6), 80), REP_ADDRESS_TYPE_NOT_SUPPORTED),
        (request(0x03, b"\xff" + bytes(6), 80), REP_ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x06", REP_ADDRESS_TYPE_NOT_SUPPORTED),
    ],
)
def test_request_error_carries_socks_reply(data: bytes, socks_reply: int) -> None:
    server = server_in(State.AWAIT_REQUEST)
    server.receive_data(data)
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.socks_reply == socks_reply
    # The driver can still refuse the request with that code.
    answer = server.reply(info.value.socks_reply)
    assert answer[:3] == bytes((0x05, socks_reply, 0x00))
    assert server.state is State.CLOSED


def test_unknown_command_is_logged_as_unsupported() -> None:
    server = server_in(State.AWAIT_REQUEST)
    server.receive_data(request(0x04, ipv4("127.0.0.1"), 80))
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.status == "unsupported"


@pytest.mark.parametrize(
    "data",
    [
        b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50",  # SOCKS4 version in a SOCKS5 request
        b"\x00\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
        b"\x01\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
        request(0x01, domain(b""), 80),  # empty domain name
        request(0x01, domain(b"\xff\xfe\xfd"), 80),  # domain name not UTF-8
    ],
)
def test_malformed_request(data: bytes) -> None:
    server = server_in(State.AWAIT_REQUEST)
    server.receive_data(data)
    with pytest.raises(ProtocolError):
        server.next_event()


def test_wrong_version_has_no_special_reply() -> None:
    server = server_in(State.AWAIT_REQUEST)
    server.receive_data(b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.socks_reply == REP_GENERAL_FAILURE


# --- replies ------------------------------------------------------------------

REPLY_CODES = sorted(
    value
    for name, value in vars(errors).items()
    if name.startswith("REP_") and isinstance(value, int)
)


def test_every_rfc_1928_reply_code_is_defined() -> None:
    assert list(range(0x00, 0x09)) == REPLY_CODES


@pytest.mark.parametrize("code", REPLY_CODES)
def test_reply_bytes(code: int) -> None:
    server = server_in(State.REPLY)
    answer = server.reply(code, "10.1.2.3", 1080)
    assert answer == bytes((0x05, code, 0x00, 0x01, 10, 1, 2, 3, 0x04, 0x38))
    assert server.state is (State.ESTABLISHED if code == REP_SUCCEEDED else State.CLOSED)


@pytest.mark.parametrize("code", [c for c in REPLY_CODES if c != REP_SUCCEEDED])
def test_failure_reply_before_a_request_was_parsed(code: int) -> None:
    server = server_in(State.AWAIT_REQUEST)
    assert server.reply(code) == bytes((0x05, code, 0x00, 0x01, 0, 0, 0, 0, 0, 0))
    assert server.state is State.CLOSED


@pytest.mark.parametrize(
    ("host", "port", "bnd"),
    [
        ("0.0.0.0", 0, b"\x01\x00\x00\x00\x00\x00\x00"),
        ("127.0.0.1", 54321, b"\x01\x7f\x00\x00\x01\xd4\x31"),
        ("192.0.2.200", 443, b"\x01\xc0\x00\x02\xc8\x01\xbb"),
        ("::1", 1080, b"\x04" + bytes(15) + b"\x01\x04\x38"),
        ("2001:db8::5", 65535, b"\x04\x20\x01\x0d\xb8" + bytes(11) + b"\x05\xff\xff"),
        ("::", 0, b"\x04" + bytes(16) + b"\x00\x00"),
    ],
)
def test_reply_bnd_address(host: str, port: int, bnd: bytes) -> None:
    server = server_in(State.REPLY)
    assert server.reply(REP_SUCCEEDED, host, port) == b"\x05\x00\x00" + bnd


def test_reply_defaults_to_ipv4_any() -> None:
    server = server_in(State.REPLY)
    assert server.reply(REP_SUCCEEDED) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


# --- the tunnel's first bytes ---------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [
        [NO_AUTH_GREETING + CONNECT_LOCAL + b"GET / HTTP/1.1\r\n\r\n"],
        [NO_AUTH_GREETING, CONNECT_LOCAL + b"GET / HTTP/1.1\r\n\r\n"],
        [NO_AUTH_GREETING + CONNECT_LOCAL, b"GET / HTTP/1.1\r\n\r\n"],
    ],
)
def test_trailing_data_after_success(chunks: list[bytes]) -> None:
    server = Socks5Server()
    for chunk in chunks:
        server.receive_data(chunk)
        while server.state in AWAITING and (event := server.next_event()) is not NEED_DATA:
            if isinstance(event, Greeting):
                server.choose_method(METHOD_NO_AUTH)
    assert server.state is State.REPLY  # the client sent ahead; the parser kept it
    server.reply(REP_SUCCEEDED, "127.0.0.1", 40000)
    assert server.trailing_data == b"GET / HTTP/1.1\r\n\r\n"


def test_trailing_data_with_auth_pipelined() -> None:
    run = Run().feed([AUTH_GREETING + ALICE + CONNECT_LOCAL + b"\x00\x01payload"])
    assert run.server.state is State.ESTABLISHED
    assert run.server.trailing_data == b"\x00\x01payload"


def test_no_trailing_data() -> None:
    run = Run().feed([NO_AUTH_GREETING, CONNECT_LOCAL])
    assert run.server.trailing_data == b""


@pytest.mark.parametrize("state", [s for s in State if s is not State.ESTABLISHED])
def test_trailing_data_only_once_established(state: State) -> None:
    server = server_in(state)
    with pytest.raises(LocalProtocolError):
        _ = server.trailing_data


def test_trailing_data_after_a_failure_reply_is_refused() -> None:
    server = server_in(State.REPLY)
    server.reply(errors.REP_CONNECTION_REFUSED)
    with pytest.raises(LocalProtocolError):
        _ = server.trailing_data


# --- illegal transitions ----------------------------------------------------------

ALL_STATES = list(State)


@pytest.mark.parametrize("state", [s for s in ALL_STATES if s is not State.CHOOSE_METHOD])
def test_choose_method_only_after_greeting(state: State) -> None:
    server = server_in(state)
    with pytest.raises(LocalProtocolError):
        server.choose_method(METHOD_NO_AUTH)
    assert server.state is state


@pytest.mark.parametrize("state", [s for s in ALL_STATES if s is not State.CHECK_AUTH])
@pytest.mark.parametrize("ok", [True, False])
def test_auth_result_only_after_credentials(state: State, ok: bool) -> None:
    server = server_in(state)
    with pytest.raises(LocalProtocolError):
        server.auth_result(ok)
    assert server.state is state


@pytest.mark.parametrize("state", [s for s in ALL_STATES if s is not State.REPLY])
def test_success_reply_only_after_request(state: State) -> None:
    server = server_in(state)
    with pytest.raises(LocalProtocolError):
        server.reply(REP_SUCCEEDED)
    assert server.state is state


@pytest.mark.parametrize(
    "state", [s for s in ALL_STATES if s not in (State.AWAIT_REQUEST, State.REPLY)]
)
def test_failure_reply_only_around_the_request(state: State) -> None:
    server = server_in(state)
    with pytest.raises(LocalProtocolError):
        server.reply(errors.REP_NOT_ALLOWED)
    assert server.state is state


@pytest.mark.parametrize("state", [s for s in ALL_STATES if s not in AWAITING])
def test_next_event_while_the_driver_must_answer(state: State) -> None:
    server = server_in(state)
    with pytest.raises(LocalProtocolError):
        server.next_event()


@pytest.mark.parametrize("state", [State.ESTABLISHED, State.CLOSED])
def test_no_input_once_done(state: State) -> None:
    server = server_in(state)
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"x")


@pytest.mark.parametrize("state", [State.CHOOSE_METHOD, State.CHECK_AUTH, State.REPLY])
def test_input_ahead_of_our_answer_is_kept(state: State) -> None:
    server = server_in(state)
    server.receive_data(b"early")
    assert server.state is state


# --- buffering is bounded -----------------------------------------------------------


def test_buffer_limit_whole() -> None:
    server = Socks5Server(max_buffer=16)
    server.receive_data(b"\x05\xff" + bytes(14))  # exactly the limit: fine
    with pytest.raises(ProtocolError):
        server.receive_data(b"\x00")


def test_buffer_limit_in_one_chunk() -> None:
    server = Socks5Server(max_buffer=16)
    with pytest.raises(ProtocolError):
        server.receive_data(b"\x05\xff" + bytes(15))


def test_buffer_limit_counts_only_unconsumed_bytes() -> None:
    server = Socks5Server(max_buffer=16)
    server.receive_data(b"\x05\x01\x00")
    assert server.next_event() == Greeting(b"\x00")
    server.choose_method(METHOD_NO_AUTH)
    server.receive_data(bytes(16))  # the greeting's 3 bytes were consumed
    with pytest.raises(ProtocolError):
        server.receive_data(b"\x00")


def test_buffer_limit_while_waiting_for_our_reply() -> None:
    server = server_in(State.REPLY)
    with pytest.raises(ProtocolError):
        server.receive_data(bytes(DEFAULT_MAX_BUFFER + 1))


def test_default_buffer_holds_the_largest_handshake() -> None:
    run = Run().feed(
        [
            greeting(bytes(range(255)))
            + auth(b"u" * 255, b"p" * 255)
            + request(0x01, domain(LONGEST_NAME.encode()), 443)
        ]
    )
    assert [type(e) for e in run.events] == [Greeting, Credentials, Request]
    assert run.server.state is State.ESTABLISHED


# --- pack_address / unpack_address --------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "packed", "atyp"),
    [
        ("127.0.0.1", 80, b"\x01\x7f\x00\x00\x01\x00\x50", AddressType.IPV4),
        ("255.255.255.255", 65535, b"\x01\xff\xff\xff\xff\xff\xff", AddressType.IPV4),
        ("::1", 443, b"\x04" + bytes(15) + b"\x01\x01\xbb", AddressType.IPV6),
        ("example.com", 443, b"\x03\x0bexample.com\x01\xbb", AddressType.DOMAIN),
        (LONGEST_NAME, 1, b"\x03\xff" + LONGEST_NAME.encode() + b"\x00\x01", AddressType.DOMAIN),
    ],
)
def test_pack_unpack_address(host: str, port: int, packed: bytes, atyp: AddressType) -> None:
    assert pack_address(host, port) == packed
    assert unpack_address(packed, 0) == (host, port, atyp, len(packed))
    # At an offset, with bytes after it, as inside a request or a UDP header.
    assert unpack_address(b"xyz" + packed + b"tail", 3) == (host, port, atyp, 3 + len(packed))
    for cut in range(len(packed)):
        assert unpack_address(packed[:cut], 0) is None


def test_pack_address_non_ascii_domain_uses_idna() -> None:
    assert pack_address("bücher.example", 80) == b"\x03\x15xn--bcher-kva.example\x00\x50"


@pytest.mark.parametrize("host", ["", LONGEST_NAME + "a", "a" * 64 + ".example", "a..b"])
def test_pack_address_rejects_unsendable_domain(host: str) -> None:
    with pytest.raises(ValueError):
        pack_address(host, 80)


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0x7F, 0xFF])
def test_unpack_unknown_address_type(atyp: int) -> None:
    with pytest.raises(ProtocolError) as info:
        unpack_address(bytes((atyp,)) + bytes(8), 0)
    assert info.value.socks_reply == REP_ADDRESS_TYPE_NOT_SUPPORTED


# A label that starts "xn--" claims to be punycode; most such strings are not, and
# canonical_host refuses them (tested in test_common), so the round trip leaves them out.
labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63).filter(
    lambda label: not label.startswith("xn--")
)
domains = st.lists(labels, min_size=1, max_size=8).map(".".join).filter(lambda d: len(d) <= 255)
ports = st.integers(0, 65535)


@given(
    host=st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(str),
        domains,
    ),
    port=ports,
    prefix=st.binary(max_size=8),
    suffix=st.binary(max_size=8),
)
def test_pack_unpack_round_trip(host: str, port: int, prefix: bytes, suffix: bytes) -> None:
    packed = pack_address(host, port)
    result = unpack_address(prefix + packed + suffix, len(prefix))
    assert result is not None
    got_host, got_port, atyp, end = result
    assert (got_port, end) == (port, len(prefix) + len(packed))
    try:
        assert ipaddress.ip_address(got_host) == ipaddress.ip_address(host)
        assert atyp is (
            AddressType.IPV4 if "." in got_host and ":" not in got_host else AddressType.IPV6
        )
    except ValueError:
        assert (got_host, atyp) == (host, AddressType.DOMAIN)
    assert pack_address(got_host, got_port) == packed


# The protocol code does without the socket module: its address texts must still be
# exactly what inet_pton reads and inet_ntop writes (logs, rules and tests compare them).

ADDRESS_TEXTS = [
    "::ffff:1.2.3.4",  # IPv4-mapped: inet_ntop ends it in dotted form, ipaddress 3.11 not
    "::ffff:0.0.0.0",
    "::1.2.3.4",  # IPv4-compatible: six zero groups, then a non-zero one
    "::0.1.0.0",
    "::102",  # ::0.0.1.2: the seventh group is zero, so no dotted form
    "::ffff:0:102:304",
    "64:ff9b::102:304",
    "::",
    "::1",
    "1::",
    "2001:db8::1",
    "1:0:0:1::1",  # the longest run of zeros is compressed
    "1::1:0:0:1",  # of equal runs, the first
    "1:0:1:0:1:0:1:0",  # a single zero group is not
    "::1:0:0",
    "fe80::1",
    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
]


def ntop(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def pton(host: str) -> bytes | None:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_pton(family, host)
        except OSError:
            pass
    return None


@pytest.mark.parametrize("text", ADDRESS_TEXTS)
def test_ipv6_texts_are_inet_ntops(text: str) -> None:
    packed = socket.inet_pton(socket.AF_INET6, text)
    assert ntop(packed) == text  # the table itself is inet_ntop's output
    assert unpack_address(b"\x04" + packed + b"\x00\x50", 0) == (text, 80, AddressType.IPV6, 19)
    assert pack_address(text, 80) == b"\x04" + packed + b"\x00\x50"


@given(packed=st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)))
def test_unpacked_addresses_are_written_as_inet_ntop_writes_them(packed: bytes) -> None:
    atyp = b"\x01" if len(packed) == 4 else b"\x04"
    parsed = unpack_address(atyp + packed + b"\x01\xbb", 0)
    assert parsed is not None
    assert parsed[0] == ntop(packed)
    assert pack_address(parsed[0], 443) == atyp + packed + b"\x01\xbb"


# zero groups are the interesting part of IPv6 text: runs, and the IPv4 forms
sparse_ipv6 = st.lists(
    st.sampled_from([0, 0, 0, 1, 0xFFFF, 0x102, 0xABCD]), min_size=8, max_size=8
).map(lambda groups: struct.pack("!8H", *groups))


@given(packed=sparse_ipv6)
def test_zero_runs_are_written_as_inet_ntop_writes_them(packed: bytes) -> None:
    assert unpack_address(b"\x04" + packed + b"\x00\x00", 0) == (
        ntop(packed),
        0,
        AddressType.IPV6,
        19,
    )


ADDRESS_LOOKALIKES = [
    "01.2.3.4",  # inet_pton reads no leading zeros
    "1.2.3.04",
    "1.2.3",
    "1.2.3.4.5",
    "256.1.1.1",
    "-1.2.3.4",
    "+1.2.3.4",
    " 1.2.3.4",
    "1.2.3.4 ",
    "1_0.2.3.4",
    "1.2.3.\u0664",  # an Arabic-Indic digit: int() reads it
    "0x1.2.3.4",
    "fe80::1%eth0",  # a zone: ipaddress reads it, inet_pton does not
    "1::2::3",
    "12345::",
    "::ffff:01.2.3.4",
    "1:2:3:4:5:6:7:8:9",
    "[::1]",
    "1.2.3.4::",
]


@pytest.mark.parametrize("host", ADDRESS_LOOKALIKES)
def test_what_inet_pton_does_not_read_is_a_name(host: str) -> None:
    assert pton(host) is None
    packed = pack_address(host, 80)
    assert packed[0] == AddressType.DOMAIN
    assert packed[2:-2] == host.encode("idna")


@settings(max_examples=500)
@given(host=st.text(alphabet="0123456789abcdefABCDEF:.%x +-_", max_size=24))
def test_pack_address_reads_what_inet_pton_reads(host: str) -> None:
    packed = pton(host)
    if packed is None:
        return  # a name, or nothing pack_address can send: the tests above
    atyp = b"\x01" if len(packed) == 4 else b"\x04"
    assert pack_address(host, 1) == atyp + packed + b"\x00\x01"


# --- splitting: byte at a time, and at arbitrary points --------------------------

HANDSHAKES = {
    "no-auth connect ipv4": (
        NO_AUTH_GREETING + CONNECT_LOCAL + b"hello",
        [Greeting(b"\x00"), Request(Command.CONNECT, "127.0.0.1", 80, AddressType.IPV4)],
    ),
    "auth connect domain": (
        AUTH_GREETING + ALICE + request(0x01, domain(b"example.com"), 443) + b"\x16\x03\x01",
        [
            Greeting(b"\x00\x02"),
            Credentials("alice", "wonderland"),
            Request(Command.CONNECT, "example.com", 443, AddressType.DOMAIN),
        ],
    ),
    "auth udp ipv6": (
        greeting(b"\x02") + auth("ü".encode(), b"") + request(0x03, ipv6("2001:db8::1"), 0),
        [
            Greeting(b"\x02"),
            Credentials("ü", ""),
            Request(Command.UDP_ASSOCIATE, "2001:db8::1", 0, AddressType.IPV6),
        ],
    ),
    "no-auth bind ipv4": (
        NO_AUTH_GREETING + request(0x02, ipv4("10.0.0.1"), 2121),
        [Greeting(b"\x00"), Request(Command.BIND, "10.0.0.1", 2121, AddressType.IPV4)],
    ),
    "no acceptable method": (
        greeting(b"\x01\x03"),
        [Greeting(b"\x01\x03")],
    ),
}


@pytest.mark.parametrize(("data", "expected"), HANDSHAKES.values(), ids=HANDSHAKES.keys())
def test_trickle(data: bytes, expected: list[Any]) -> None:
    whole = Run().feed([data])
    trickled = Run().feed(data[i : i + 1] for i in range(len(data)))
    assert whole.events == expected
    assert trickled.events == expected
    assert trickled.sent == whole.sent
    assert trickled.server.state is whole.server.state
    if whole.server.state is State.ESTABLISHED:
        assert trickled.tunnel == whole.tunnel == data[len(data) - len(whole.tunnel) :]


ERRORS = {
    "bad greeting version": (b"\x04\x01\x00", REP_GENERAL_FAILURE),
    "bad auth version": (AUTH_GREETING + b"\x05\x05alice\x01x", REP_GENERAL_FAILURE),
    "unknown command": (
        NO_AUTH_GREETING + request(0x09, ipv4("1.2.3.4"), 1),
        REP_COMMAND_NOT_SUPPORTED,
    ),
    "unknown address type": (
        NO_AUTH_GREETING + request(0x01, b"\x07" + bytes(4), 1),
        REP_ADDRESS_TYPE_NOT_SUPPORTED,
    ),
    "empty domain": (NO_AUTH_GREETING + request(0x01, domain(b""), 1), REP_GENERAL_FAILURE),
}


@pytest.mark.parametrize(("data", "socks_reply"), ERRORS.values(), ids=ERRORS.keys())
def test_trickle_errors(data: bytes, socks_reply: int) -> None:
    with pytest.raises(ProtocolError) as whole:
        Run().feed([data])
    run = Run()
    with pytest.raises(ProtocolError) as trickled:
        run.feed(data[i : i + 1] for i in range(len(data)))
    assert whole.value.socks_reply == trickled.value.socks_reply == socks_reply
    assert type(whole.value) is type(trickled.value)


def text_of_at_most(max_bytes: int) -> st.SearchStrategy[str]:
    return st.text(max_size=max_bytes).filter(lambda s: len(s.encode()) <= max_bytes)


@st.composite
def handshakes(draw: st.DrawFn) -> tuple[bytes, list[Any]]:
    """A valid handshake as wire bytes, with the events it must give."""
    use_auth = draw(st.booleans())
    chosen = METHOD_USERNAME_PASSWORD if use_auth else METHOD_NO_AUTH
    others = draw(st.lists(st.integers(0, 255).filter(lambda m: m not in (0, 2)), max_size=5))
    methods = bytes(draw(st.permutations([chosen, *others])))
    data = greeting(methods)
    events: list[Any] = [Greeting(methods)]
    if use_auth:
        username = draw(text_of_at_most(255))
        password = draw(text_of_at_most(255))
        data += auth(username.encode(), password.encode())
        events.append(Credentials(username, password))
    command = draw(st.sampled_from(Command))
    port = draw(ports)
    kind = draw(st.sampled_from(AddressType))
    if kind is AddressType.IPV4:
        address = draw(st.ip_addresses(v=4))
        wire = b"\x01" + address.packed
    elif kind is AddressType.IPV6:
        address = draw(st.ip_addresses(v=6))
        wire = b"\x04" + address.packed
    else:
        address = draw(domains)
        wire = domain(address.encode())
    data += request(command, wire, port)
    # addresses read as inet_ntop writes them (RFC 5952: ::ffff:1.2.3.4 for mapped IPv4)
    if isinstance(address, str):
        host = address
    else:
        family = socket.AF_INET if kind is AddressType.IPV4 else socket.AF_INET6
        host = socket.inet_ntop(family, address.packed)
    events.append(Request(command, host, port, kind))
    return data, events


@settings(max_examples=200, deadline=None)
@given(
    handshake=handshakes(),
    tunnel=st.binary(max_size=64),
    cuts=st.lists(st.integers(1, 2000), max_size=20),
)
def test_any_split_gives_the_same_events(
    handshake: tuple[bytes, list[Any]], tunnel: bytes, cuts: list[int]
) -> None:
    data, expected = handshake
    whole = Run().feed([data + tunnel])
    pieces = Run().feed(split(data + tunnel, cuts))
    assert whole.events == expected
    assert pieces.events == expected
    assert pieces.sent == whole.sent
    assert whole.server.state is pieces.server.state is State.ESTABLISHED
    assert whole.tunnel == pieces.tunnel == tunnel


FIELDS = ("ver", "nmethods", "auth_ver", "ulen", "plen", "req_ver", "cmd", "atyp", "dlen")


@st.composite
def garbled(draw: st.DrawFn) -> bytes:
    """Handshake messages field by field, a field or two wrong, cut off anywhere.

    Mostly valid input reaches every state and every length field, which purely
    random bytes (stopped at the first version byte) never do.
    """
    wrong = draw(st.sets(st.sampled_from(FIELDS), max_size=2))

    def field(name: str, valid: int) -> int:
        return draw(st.integers(0, 255)) if name in wrong else valid

    methods = draw(
        st.one_of(
            st.sampled_from([b"\x00", b"\x02", b"\x00\x02", b"\x02\x00"]), st.binary(max_size=4)
        )
    )
    data = bytes((field("ver", 0x05), field("nmethods", len(methods)))) + methods
    if METHOD_USERNAME_PASSWORD in methods:
        text = st.one_of(text_of_at_most(8).map(str.encode), st.binary(max_size=8))
        username, password = draw(text), draw(text)
        data += bytes((field("auth_ver", 0x01), field("ulen", len(username)))) + username
        data += bytes((field("plen", len(password)),)) + password
    command = draw(st.sampled_from(Command))
    data += bytes((field("req_ver", 0x05), field("cmd", command), 0x00))
    atyp = field("atyp", draw(st.sampled_from(AddressType)))
    address = draw(st.one_of(st.binary(max_size=20), text_of_at_most(20).map(str.encode)))
    if atyp == AddressType.DOMAIN:
        data += bytes((atyp, field("dlen", len(address)))) + address
    else:
        data += bytes((atyp,)) + address
    data += draw(st.binary(max_size=300))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(st.binary(max_size=600), garbled()),
    cuts=st.lists(st.integers(1, 1000), max_size=30),
    max_buffer=st.sampled_from([8, 32, 300, DEFAULT_MAX_BUFFER]),
)
@example(data=b"\x05\x01\x00\x05\x01\x00\x03\x02\xc3\x80\x00\x00", cuts=[], max_buffer=32)
def test_random_bytes_give_events_or_protocol_error(
    data: bytes, cuts: list[int], max_buffer: int
) -> None:
    run = Run(Socks5Server(max_buffer=max_buffer))
    pending = 0  # bytes fed and not yet turned into events
    try:
        for chunk in split(data, cuts):
            if run.server.state in (State.ESTABLISHED, State.CLOSED):
                break
            over = pending + len(chunk) > max_buffer
            try:
                run.server.receive_data(chunk)
            except ProtocolError:
                assert over, "refused input within the buffer limit"
                return
            assert not over, f"buffered {pending + len(chunk)} bytes, limit {max_buffer}"
            pending += len(chunk)
            run.pump()
            # what the parser still holds (an event cannot say how many bytes it stood
            # for: a name arrives as UTF-8 and leaves in its canonical form)
            pending = len(run.server._buffer)
            assert 0 <= pending <= max_buffer
    except ProtocolError as exc:
        assert 0 <= exc.socks_reply <= 0xFF


@pytest.mark.parametrize(
    "name",
    [b"127.0.0.1\x00.blocked.example", b"a..b", b"a" * 64 + b".example", b"tab\there", b"sp ace"],
)
def test_domain_a_resolver_would_misread_is_refused_with_0x04(name: bytes) -> None:
    """A NUL would make the resolver look up another name than the one checked and logged."""
    server = server_in(State.AWAIT_REQUEST)
    server.receive_data(request(0x01, domain(name), 80))
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.socks_reply == 0x04
