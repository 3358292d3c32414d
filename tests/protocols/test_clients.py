"""The client side of the handshakes with a parent proxy, without sockets.

Socks5Client, Socks4Client and ConnectClient, byte for byte against wire bytes
written out here, then against proxyd's own server parsers. A client says what
the parent answered (Established, Refused, ParentProtocolError); what that
becomes for a session (error class, replies, log status) is tests/test_chain.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.errors import (
    REP_ADDRESS_TYPE_NOT_SUPPORTED,
    REP_COMMAND_NOT_SUPPORTED,
    REP_CONNECTION_REFUSED,
    REP_GENERAL_FAILURE,
    REP_HOST_UNREACHABLE,
    REP_NETWORK_UNREACHABLE,
    REP_NOT_ALLOWED,
    REP_SUCCEEDED,
    REP_TTL_EXPIRED,
    LocalProtocolError,
    ParentProtocolError,
)
from proxyd.protocols import socks4, socks5
from proxyd.protocols.clients import (
    ClientState,
    ConnectClient,
    Established,
    Refused,
    Send,
    Socks4Client,
    Socks5Client,
)
from proxyd.protocols.common import NEED_DATA, Credentials
from proxyd.protocols.http import ConnectRequest, HttpProxyServer
from proxyd.protocols.socks4 import Socks4Server
from proxyd.protocols.socks5 import (
    METHOD_NO_ACCEPTABLE,
    METHOD_NO_AUTH,
    METHOD_USERNAME_PASSWORD,
    AddressType,
    Command,
    Greeting,
    Socks5Server,
)

Client = Socks5Client | Socks4Client | ConnectClient

# --- wire bytes written out by hand, independent of the code under test ------

ALICE = Credentials("alice", "wonderland")
PASSWORD = "wonderland"

GREETING_NO_AUTH = b"\x05\x01\x00"
GREETING_AUTH = b"\x05\x02\x00\x02"
ALICE_AUTH = b"\x01\x05alice\x0awonderland"
CHOOSE_NO_AUTH = b"\x05\x00"
CHOOSE_AUTH = b"\x05\x02"
AUTH_OK = b"\x01\x00"
# a SOCKS5 success reply: BND 192.0.2.1:4321
REPLY_V4 = b"\x05\x00\x00\x01\xc0\x00\x02\x01\x10\xe1"
CONNECT_EXAMPLE = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
V6_1 = b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01"  # 2001:db8::1
V6_2 = b"\x20\x01\x0d\xb8" + bytes(11) + b"\x02"  # 2001:db8::2

SOCKS4_GRANTED = b"\x00\x5a\x01\xbb\xc0\x00\x02\x01"  # 192.0.2.1:443
HTTP_200 = b"HTTP/1.1 200 Connection established\r\n\r\n"
ALICE_BASIC = b"Proxy-Authorization: Basic YWxpY2U6d29uZGVybGFuZA==\r\n"

LONGEST_NAME = ".".join(["a" * 63] * 4)  # 255 bytes, DNS labels at most 63
NAME_256 = ".".join(["a" * 63] * 3 + ["a" * 62, "b"])
assert len(LONGEST_NAME) == 255 and len(NAME_256) == 256

TAIL = b"SSH-2.0-OpenSSH_9.6\r\n"


def socks5_reply(rep: int) -> bytes:
    return bytes((0x05, rep, 0x00)) + b"\x01\xc0\x00\x02\x01\x10\xe1"


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def chunks(data: bytes, trickle: bool) -> list[bytes]:
    return byte_by_byte(data) if trickle else [data]


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# --- a tiny driver: what upstream.py does, minus the sockets ----------------------


class Driver:
    """Feeds what the parent sends and records what the client asks to send, and
    its last event: Established or Refused."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.sent = [client.start()]
        self.established: Established | None = None
        self.refused: Refused | None = None
        self.leftover = b""  # chunks after Established (the relay's) or Refused

    def feed(self, chunks: Iterable[bytes]) -> Driver:
        for chunk in chunks:
            if self.established is not None or self.refused is not None:
                self.leftover += chunk
                continue
            self.client.receive_data(chunk)
            self.pump()
        return self

    def pump(self) -> None:
        while self.established is None and self.refused is None:
            event = self.client.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, Send):
                self.sent.append(event.data)
            elif isinstance(event, Refused):
                self.refused = event
            else:
                assert isinstance(event, Established)
                self.established = event

    @property
    def tunnel(self) -> bytes:
        """What the relay would see first: the client's trailing data, then later chunks."""
        return self.client.trailing_data + self.leftover


# --- SOCKS5: conversations that succeed ------------------------------------------------

SOCKS5_SUCCESS = [
    pytest.param(
        partial(Socks5Client, Command.CONNECT, "127.0.0.1", 80),
        [CHOOSE_NO_AUTH, REPLY_V4],
        [GREETING_NO_AUTH, b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"],
        Established("192.0.2.1", 4321),
        id="ipv4 without auth",
    ),
    pytest.param(
        partial(Socks5Client, Command.CONNECT, "example.com", 443, ALICE),
        [CHOOSE_AUTH, AUTH_OK, REPLY_V4],
        [GREETING_AUTH, ALICE_AUTH, CONNECT_EXAMPLE],
        Established("192.0.2.1", 4321),
        id="domain with auth",
    ),
    pytest.param(
        partial(Socks5Client, Command.CONNECT, "example.com", 443, ALICE),
        [CHOOSE_NO_AUTH, REPLY_V4],
        [GREETING_AUTH, CONNECT_EXAMPLE],
        Established("192.0.2.1", 4321),
        id="auth offered, parent needs none",
    ),
    pytest.param(
        partial(Socks5Client, Command.CONNECT, "2001:db8::1", 8080),
        [CHOOSE_NO_AUTH, b"\x05\x00\x00\x04" + V6_2 + b"\x04\x38"],
        [GREETING_NO_AUTH, b"\x05\x01\x00\x04" + V6_1 + b"\x1f\x90"],
        Established("2001:db8::2", 1080),
        id="ipv6, ipv6 bound address",
    ),
    pytest.param(
        partial(Socks5Client, Command.CONNECT, "bücher.example", 80),
        [CHOOSE_NO_AUTH, b"\x05\x00\x00\x03\x09relay.net\x04\x38"],
        [GREETING_NO_AUTH, b"\x05\x01\x00\x03\x15xn--bcher-kva.example\x00\x50"],
        Established("relay.net", 1080),
        id="idna name, domain bound address",
    ),
    pytest.param(
        partial(Socks5Client, Command.UDP_ASSOCIATE, "0.0.0.0", 0),
        [CHOOSE_NO_AUTH, REPLY_V4],
        [GREETING_NO_AUTH, b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"],
        Established("192.0.2.1", 4321),
        id="udp associate: the relay address",
    ),
    pytest.param(
        partial(
            Socks5Client, Command.CONNECT, LONGEST_NAME, 65535, Credentials("u" * 255, "p" * 255)
        ),
        [CHOOSE_AUTH, AUTH_OK, b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"],
        [
            GREETING_AUTH,
            b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255,
            b"\x05\x01\x00\x03\xff" + LONGEST_NAME.encode() + b"\xff\xff",
        ],
        Established("0.0.0.0", 0),
        id="longest fields",
    ),
    pytest.param(
        partial(Socks5Client, Command.CONNECT, "example.com", 443, Credentials("jürgen", "")),
        [CHOOSE_AUTH, AUTH_OK, REPLY_V4],
        [GREETING_AUTH, b"\x01\x07j\xc3\xbcrgen\x00", CONNECT_EXAMPLE],
        Established("192.0.2.1", 4321),
        id="utf-8 username, empty password",
    ),
]


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "byte by byte"])
@pytest.mark.parametrize(("make", "replies", "sent", "established"), SOCKS5_SUCCESS)
def test_socks5_success(
    make: Callable[[], Socks5Client],
    replies: list[bytes],
    sent: list[bytes],
    established: Established,
    trickle: bool,
) -> None:
    driver = Driver(make())
    for reply in replies:
        driver.feed(chunks(reply, trickle))
    assert driver.sent == sent
    assert driver.established == established
    assert driver.client.request_sent
    assert driver.client.trailing_data == b""


def test_socks5_request_sent_only_with_the_request() -> None:
    client = Socks5Client(Command.CONNECT, "example.com", 443, ALICE)
    client.start()
    assert not client.request_sent
    client.receive_data(CHOOSE_AUTH)
    assert client.next_event() == Send(ALICE_AUTH)
    assert not client.request_sent  # the credentials are not the request
    client.receive_data(AUTH_OK)
    assert client.next_event() == Send(CONNECT_EXAMPLE)
    assert client.request_sent


# --- SOCKS5: failures ------------------------------------------------------------------

PARENT_FAULT = None  # the parent's own failure: ParentProtocolError, no event

SOCKS5_FAILURES = [
    # (credentials, everything the parent sends, the Refused code or PARENT_FAULT,
    # request_sent)
    pytest.param(None, b"\x05\xff", PARENT_FAULT, False, id="no method"),
    pytest.param(None, b"\x05\x02", PARENT_FAULT, False, id="auth not offered"),
    pytest.param(None, b"\x05\x01", PARENT_FAULT, False, id="gssapi"),
    pytest.param(ALICE, b"\x05\x03", PARENT_FAULT, False, id="method 3"),
    pytest.param(ALICE, b"\x05\xff", PARENT_FAULT, False, id="no method, auth"),
    pytest.param(None, b"\x04\x00", PARENT_FAULT, False, id="method version 4"),
    pytest.param(None, b"\x00\x5a", PARENT_FAULT, False, id="a socks4 reply"),
    pytest.param(None, b"HTTP/1.1 400", PARENT_FAULT, False, id="http"),
    pytest.param(ALICE, b"\x05\x02\x01\x01", PARENT_FAULT, False, id="auth refused"),
    pytest.param(ALICE, b"\x05\x02\x01\xff", PARENT_FAULT, False, id="auth status ff"),
    pytest.param(ALICE, b"\x05\x02\x05\x00", PARENT_FAULT, False, id="auth version 5"),
    pytest.param(
        None,
        b"\x05\x00\x04\x00\x00\x01\xc0\x00\x02\x01\x10\xe1",
        PARENT_FAULT,
        True,
        id="reply version 4",
    ),
    pytest.param(
        None,
        b"\x05\x00\x05\x00\x01\x01\xc0\x00\x02\x01\x10\xe1",
        PARENT_FAULT,
        True,
        id="reserved byte set",
    ),
    pytest.param(
        None,
        b"\x05\x00\x05\x00\x00\x02\xc0\x00\x02\x01\x10\xe1",
        PARENT_FAULT,
        True,
        id="address type 2",
    ),
    pytest.param(
        None, b"\x05\x00\x05\x00\x00\x03\x00\x00\x50", PARENT_FAULT, True, id="empty bound name"
    ),
    pytest.param(
        None,
        b"\x05\x00\x05\x00\x00\x03\x03a b\x00\x50",
        PARENT_FAULT,
        True,
        id="bound name with a space",
    ),
    pytest.param(
        None,
        b"\x05\x00\x05\x00\x00\x03\x02\xff\xfe\x00\x50",
        PARENT_FAULT,
        True,
        id="bound name not utf-8",
    ),
    # failures the parent reports about the target: the code as the parent gave it
    *[
        pytest.param(None, b"\x05\x00" + socks5_reply(rep), rep, True, id=f"rep {rep:#04x}")
        for rep in [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0xFF]
    ],
    pytest.param(
        ALICE,
        b"\x05\x02\x01\x00" + socks5_reply(0x05),
        REP_CONNECTION_REFUSED,
        True,
        id="refused after auth",
    ),
    pytest.param(None, b"\x05\x00\x05\x04", REP_HOST_UNREACHABLE, True, id="refusal cut after REP"),
]


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "byte by byte"])
@pytest.mark.parametrize(("credentials", "data", "code", "request_sent"), SOCKS5_FAILURES)
def test_socks5_failure(
    credentials: Credentials | None,
    data: bytes,
    code: int | None,
    request_sent: bool,
    trickle: bool,
) -> None:
    # One chunk holds every answer here: the client must still read them in turn.
    driver = Driver(Socks5Client(Command.CONNECT, "example.com", 443, credentials))
    if code is PARENT_FAULT:
        with pytest.raises(ParentProtocolError) as info:
            driver.feed(chunks(data, trickle))
        message = str(info.value)
    else:
        driver.feed(chunks(data, trickle))
        assert driver.refused is not None
        assert driver.refused.code == code
        message = driver.refused.message
        assert "example.com:443" in message
    assert driver.client.state is ClientState.FAILED
    assert driver.client.request_sent is request_sent
    assert PASSWORD not in message


def test_socks5_target_error_names_an_ipv6_target_in_brackets() -> None:
    driver = Driver(Socks5Client(Command.CONNECT, "2001:db8::1", 443))
    driver.feed([CHOOSE_NO_AUTH, socks5_reply(0x05)])
    assert driver.refused == Refused(
        REP_CONNECTION_REFUSED,
        "[2001:db8::1]:443: the parent proxy says the connection was refused",
    )


@pytest.mark.parametrize(
    ("command", "host", "port", "credentials"),
    [
        pytest.param(Command.CONNECT, "example.com", 443, Credentials("u" * 256, "p"), id="user"),
        pytest.param(Command.CONNECT, "example.com", 443, Credentials("u", "p" * 256), id="pass"),
        pytest.param(Command.CONNECT, "example.com", 443, Credentials("é" * 128, "p"), id="utf8"),
        pytest.param(Command.CONNECT, NAME_256, 443, None, id="name of 256 bytes"),
        pytest.param(Command.CONNECT, "", 443, None, id="empty name"),
        pytest.param(Command.CONNECT, "a\x00b", 443, None, id="nul in name"),
        pytest.param(Command.CONNECT, "a b", 443, None, id="space in name"),
        pytest.param(Command.CONNECT, "example.com", 65536, None, id="port too big"),
        pytest.param(Command.CONNECT, "example.com", -1, None, id="negative port"),
        pytest.param(Command.BIND, "192.0.2.1", 21, None, id="bind"),
    ],
)
def test_socks5_client_refuses_what_cannot_be_sent(
    command: Command, host: str, port: int, credentials: Credentials | None
) -> None:
    with pytest.raises(ValueError) as info:
        Socks5Client(command, host, port, credentials)
    assert PASSWORD not in str(info.value)


# --- SOCKS4 and SOCKS4a ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "user_id", "expected"),
    [
        pytest.param("192.0.2.7", 80, "", b"\x04\x01\x00\x50\xc0\x00\x02\x07\x00", id="socks4"),
        pytest.param(
            "192.0.2.7", 80, "bob", b"\x04\x01\x00\x50\xc0\x00\x02\x07bob\x00", id="socks4 user"
        ),
        pytest.param(
            "example.com",
            443,
            "",
            b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00example.com\x00",
            id="socks4a",
        ),
        pytest.param(
            "example.com",
            443,
            "bob",
            b"\x04\x01\x01\xbb\x00\x00\x00\x01bob\x00example.com\x00",
            id="socks4a user",
        ),
        pytest.param(
            "bücher.example",
            80,
            "",
            b"\x04\x01\x00\x50\x00\x00\x00\x01\x00xn--bcher-kva.example\x00",
            id="socks4a idna",
        ),
        pytest.param(
            "localhost",
            65535,
            "ü",
            b"\x04\x01\xff\xff\x00\x00\x00\x01\xc3\xbc\x00localhost\x00",
            id="utf-8 user id",
        ),
        pytest.param(
            "0.0.0.5",
            80,
            "",
            b"\x04\x01\x00\x50\x00\x00\x00\x01\x000.0.0.5\x00",
            id="0.0.0.x would read as 4a: sent as a name",
        ),
    ],
)
def test_socks4_request(host: str, port: int, user_id: str, expected: bytes) -> None:
    client = Socks4Client(host, port, user_id)
    assert not client.request_sent
    assert client.start() == expected
    assert client.request_sent  # SOCKS4 has no greeting: the first bytes are the request


@pytest.mark.parametrize("host", ["2001:db8::1", "::1", "::ffff:192.0.2.1"])
def test_socks4_cannot_carry_ipv6(host: str) -> None:
    # a ValueError like any request the client cannot write: chain.client_for makes
    # it AddressNotSupported (tests/test_chain.py), not the parent's failure
    with pytest.raises(ValueError) as info:
        Socks4Client(host, 443)
    assert str(info.value) == "SOCKS4 cannot carry an IPv6 address"


@pytest.mark.parametrize(
    ("host", "port", "user_id"),
    [
        pytest.param("example.com", 0, "", id="port 0"),
        pytest.param("example.com", 65536, "", id="port too big"),
        pytest.param("example.com", 80, "a\x00b", id="nul in user id"),
        pytest.param("example.com", 80, "u" * 256, id="user id of 256 bytes"),
        pytest.param("example.com", 80, "é" * 128, id="user id of 256 utf-8 bytes"),
        pytest.param(NAME_256, 80, "", id="name of 256 bytes"),
        pytest.param("", 80, "", id="empty name"),
        pytest.param("a b", 80, "", id="space in name"),
    ],
)
def test_socks4_client_refuses_what_cannot_be_sent(host: str, port: int, user_id: str) -> None:
    with pytest.raises(ValueError):
        Socks4Client(host, port, user_id)


def test_socks4_longest_fields() -> None:
    request = Socks4Client(LONGEST_NAME, 80, "u" * 255).start()
    assert request == (
        b"\x04\x01\x00\x50\x00\x00\x00\x01" + b"u" * 255 + b"\x00" + LONGEST_NAME.encode() + b"\x00"
    )


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "byte by byte"])
@pytest.mark.parametrize(
    ("reply", "established"),
    [
        (SOCKS4_GRANTED, Established("192.0.2.1", 443)),
        (b"\x00\x5a\x00\x00\x00\x00\x00\x00", Established("0.0.0.0", 0)),
        pytest.param(b"\x04\x5a\x1f\x90\x0a\x00\x00\x01", Established("10.0.0.1", 8080), id="VN 4"),
    ],
)
def test_socks4_granted(reply: bytes, established: Established, trickle: bool) -> None:
    driver = Driver(Socks4Client("example.com", 443)).feed(chunks(reply, trickle))
    assert driver.established == established
    assert driver.sent == [b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00example.com\x00"]


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "byte by byte"])
@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"\x00\x5c\x01\xbb\xc0\x00\x02\x01", id="identd unreachable"),
        pytest.param(b"\x00\x5d\x01\xbb\xc0\x00\x02\x01", id="identd mismatch"),
        pytest.param(b"\x00\x5e\x01\xbb\xc0\x00\x02\x01", id="code 0x5e"),
        pytest.param(b"\x00\x00\x01\xbb\xc0\x00\x02\x01", id="code 0"),
        pytest.param(b"\x00\x90\x01\xbb\xc0\x00\x02\x01", id="code 0x90"),
        pytest.param(b"\x05\x5a\x01\xbb\xc0\x00\x02\x01", id="VN 5"),
        pytest.param(b"\x01\x5a\x01\xbb\xc0\x00\x02\x01", id="VN 1"),
        pytest.param(b"\x05\x00", id="a socks5 method choice"),
    ],
)
def test_socks4_parent_failure(reply: bytes, trickle: bool) -> None:
    driver = Driver(Socks4Client("example.com", 443, "bob"))
    with pytest.raises(ParentProtocolError):
        driver.feed(chunks(reply, trickle))
    assert driver.client.state is ClientState.FAILED


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "byte by byte"])
@pytest.mark.parametrize(
    "reply", [b"\x00\x5b\x01\xbb\xc0\x00\x02\x01", b"\x00\x5b"], ids=["whole reply", "cut"]
)
def test_socks4_rejected(reply: bytes, trickle: bool) -> None:
    driver = Driver(Socks4Client("example.com", 443, "bob")).feed(chunks(reply, trickle))
    assert driver.refused == Refused(
        REP_GENERAL_FAILURE, "example.com:443: the parent proxy rejected or failed the request"
    )
    assert driver.client.state is ClientState.FAILED


# --- HTTP CONNECT ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "credentials", "expected"),
    [
        pytest.param(
            "example.com",
            443,
            None,
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            id="name",
        ),
        pytest.param(
            "example.com",
            443,
            ALICE,
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
            + ALICE_BASIC
            + b"\r\n",
            id="name with auth",
        ),
        pytest.param(
            "2001:db8::1",
            8443,
            None,
            b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n\r\n",
            id="ipv6 in brackets",
        ),
        pytest.param(
            "192.0.2.1",
            22,
            None,
            b"CONNECT 192.0.2.1:22 HTTP/1.1\r\nHost: 192.0.2.1:22\r\n\r\n",
            id="ipv4",
        ),
        pytest.param(
            "bücher.example",
            443,
            None,
            b"CONNECT xn--bcher-kva.example:443 HTTP/1.1\r\nHost: xn--bcher-kva.example:443\r\n\r\n",
            id="idna",
        ),
        pytest.param(
            "example.com",
            443,
            Credentials("jürgen", "pä:ss"),
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
            b"Proxy-Authorization: Basic asO8cmdlbjpww6Q6c3M=\r\n\r\n",
            id="utf-8 credentials, colon in password",
        ),
        pytest.param(
            "example.com",
            443,
            Credentials("bob", ""),
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
            b"Proxy-Authorization: Basic Ym9iOg==\r\n\r\n",
            id="empty password",
        ),
    ],
)
def test_connect_request(
    host: str, port: int, credentials: Credentials | None, expected: bytes
) -> None:
    client = ConnectClient(host, port, credentials)
    assert not client.request_sent
    assert client.start() == expected
    assert client.request_sent


@pytest.mark.parametrize(
    ("host", "port", "credentials"),
    [
        pytest.param("example.com", 443, Credentials("a:b", "c"), id="colon in username"),
        pytest.param("example.com", 0, None, id="port 0"),
        pytest.param("example.com", 65536, None, id="port too big"),
        pytest.param("a:b", 443, None, id="colon in a name"),
        pytest.param("user@example.com", 443, None, id="userinfo"),
        pytest.param("example.com/x", 443, None, id="slash"),
        pytest.param("", 443, None, id="empty name"),
        pytest.param("a b", 443, None, id="space in name"),
        pytest.param("a\r\nX-Injected: 1", 443, None, id="header injection"),
    ],
)
def test_connect_client_refuses_what_cannot_be_sent(
    host: str, port: int, credentials: Credentials | None
) -> None:
    with pytest.raises(ValueError):
        ConnectClient(host, port, credentials)


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "byte by byte"])
@pytest.mark.parametrize(
    "response",
    [
        HTTP_200,
        b"HTTP/1.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 \r\n\r\n",
        b"HTTP/1.1 200 OK\r\nProxy-Agent: squid\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\n\n",
    ],
)
def test_connect_established(response: bytes, trickle: bool) -> None:
    driver = Driver(ConnectClient("example.com", 443, ALICE)).feed(chunks(response, trickle))
    assert driver.established == Established("0.0.0.0", 0)
    assert driver.tunnel == b""


@pytest.mark.parametrize(
    ("response", "tail"),
    [
        (HTTP_200, TAIL),
        # a 2xx to CONNECT has no body (RFC 9110 section 9.3.6), whatever it says
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"hello, world"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n"),
    ],
)
def test_connect_trailing_data_in_the_same_chunk(response: bytes, tail: bytes) -> None:
    driver = Driver(ConnectClient("example.com", 443)).feed([response + tail])
    assert driver.established == Established("0.0.0.0", 0)
    assert driver.client.trailing_data == tail


HTTP_FAILURES = [
    # (status line and headers, the Refused code or PARENT_FAULT)
    pytest.param(
        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
        b'Proxy-Authenticate: Basic realm="parent"\r\nContent-Length: 0\r\n\r\n',
        PARENT_FAULT,
        id="407",
    ),
    pytest.param(b"HTTP/1.1 403 Forbidden\r\n\r\n", REP_NOT_ALLOWED, id="403"),
    pytest.param(b"HTTP/1.1 502 Bad Gateway\r\n\r\n", REP_GENERAL_FAILURE, id="502"),
    pytest.param(b"HTTP/1.1 504 Gateway Timeout\r\n\r\n", REP_TTL_EXPIRED, id="504"),
    pytest.param(
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\n\r\n",
        REP_GENERAL_FAILURE,
        id="503",
    ),
    pytest.param(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
        REP_GENERAL_FAILURE,
        id="404",
    ),
    pytest.param(b"HTTP/1.1 500 Internal Server Error\r\n\r\n", REP_GENERAL_FAILURE, id="500"),
    pytest.param(b"HTTP/1.0 405 Method Not Allowed\r\n\r\n", REP_GENERAL_FAILURE, id="405"),
    pytest.param(
        b"HTTP/1.1 301 Moved Permanently\r\nLocation: http://x/\r\n\r\n",
        PARENT_FAULT,
        id="301",
    ),
    pytest.param(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\n\r\n",
        REP_NOT_ALLOWED,
        id="100 then 403",
    ),
]


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "byte by byte"])
@pytest.mark.parametrize(("response", "code"), HTTP_FAILURES)
def test_connect_failure(response: bytes, code: int | None, trickle: bool) -> None:
    driver = Driver(ConnectClient("example.com", 443, ALICE))
    if code is PARENT_FAULT:
        with pytest.raises(ParentProtocolError) as info:
            driver.feed(chunks(response, trickle))
        message = str(info.value)
    else:
        driver.feed(chunks(response, trickle))
        assert driver.refused is not None
        assert driver.refused.code == code
        message = driver.refused.message
        assert "example.com:443" in message
    assert driver.client.state is ClientState.FAILED
    assert PASSWORD not in message
    final_status = response.rsplit(b"HTTP/1.", 1)[1].split(b" ")[1].decode()
    assert final_status in message


def test_407_message_says_whether_we_sent_credentials() -> None:
    response = b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"
    with pytest.raises(ParentProtocolError) as info:
        Driver(ConnectClient("example.com", 443, ALICE)).feed([response])
    assert str(info.value) == "the parent proxy refused our credentials (407)"
    with pytest.raises(ParentProtocolError) as info:
        Driver(ConnectClient("example.com", 443)).feed([response])
    assert "407" in str(info.value) and "none are configured" in str(info.value)


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "byte by byte"])
@pytest.mark.parametrize(
    "response",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
        b"\x05\x00",  # a SOCKS5 parent: NEED_DATA until it makes no sense
        b"\x00\x5a\x01\xbb\xc0\x00\x02\x01\r\n\r\n",
    ],
)
def test_connect_malformed_response(response: bytes, trickle: bool) -> None:
    driver = Driver(ConnectClient("example.com", 443, ALICE))
    with pytest.raises(ParentProtocolError) as info:
        driver.feed(chunks(response, trickle))
        driver.client.connection_closed()  # what the driver does when the parent hangs up
    assert PASSWORD not in str(info.value)


def test_connect_oversize_head() -> None:
    client = ConnectClient("example.com", 443, ALICE)
    driver = Driver(client).feed([b"HTTP/1.1 200 OK\r\nX-Pad: "])
    fed = 0
    with pytest.raises(ParentProtocolError, match="longer than 16384 bytes") as info:
        while True:
            driver.feed([b"a" * 1000])
            fed += 1000
    assert 16384 - 1000 < fed <= 16384 + 1000
    assert PASSWORD not in str(info.value)


def test_connect_head_just_under_the_cap() -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 16000 + b"\r\n\r\n"
    driver = Driver(ConnectClient("example.com", 443)).feed(split(head, range(0, len(head), 999)))
    assert driver.established == Established("0.0.0.0", 0)


def test_connect_head_cap_is_a_parameter() -> None:
    with pytest.raises(ParentProtocolError, match="longer than 64 bytes"):
        Driver(ConnectClient("example.com", 443, max_head=64)).feed([b"HTTP/1.1 200 OK\r\n" * 5])


# --- what every client shares: trailing data, EOF, illegal transitions ------------------

# a fresh client, and the parent's bytes up to and including its success reply
CLIENTS: dict[str, tuple[Callable[[], Client], bytes]] = {
    "socks5": (partial(Socks5Client, Command.CONNECT, "example.com", 443), b"\x05\x00" + REPLY_V4),
    "socks5 auth": (
        partial(Socks5Client, Command.CONNECT, "example.com", 443, ALICE),
        CHOOSE_AUTH + AUTH_OK + REPLY_V4,
    ),
    "socks4": (partial(Socks4Client, "example.com", 443), SOCKS4_GRANTED),
    "http": (partial(ConnectClient, "example.com", 443), HTTP_200),
    "http auth": (partial(ConnectClient, "example.com", 443, ALICE), HTTP_200),
}
# a first byte each parent kind could not send
BAD_FIRST_BYTE = {"socks5": b"\x04", "socks4": b"\x05", "http": b"\x00\r\n\r\n"}


def bad_reply(name: str) -> bytes:
    return BAD_FIRST_BYTE[name.split()[0]]


@pytest.mark.parametrize("tail", [TAIL, bytes(range(256)) * 4], ids=["short", "1024 bytes"])
@pytest.mark.parametrize("name", CLIENTS)
def test_trailing_data_exact(name: str, tail: bytes) -> None:
    make, reply = CLIENTS[name]
    whole = Driver(make()).feed([reply + tail])
    assert whole.client.trailing_data == tail
    trickled = Driver(make()).feed(byte_by_byte(reply + tail))
    assert trickled.client.trailing_data == b""  # Established came with the reply's last byte
    assert trickled.tunnel == tail
    cut = Driver(make()).feed([reply[:-1], reply[-1:] + tail[:5], tail[5:]])
    assert cut.tunnel == tail


@pytest.mark.parametrize("name", CLIENTS)
def test_connection_closed_during_the_handshake(name: str) -> None:
    make, reply = CLIENTS[name]
    for end in range(len(reply)):
        driver = Driver(make()).feed([reply[:end]])
        assert driver.established is None
        with pytest.raises(ParentProtocolError) as info:
            driver.client.connection_closed()
        assert str(info.value) == "the parent proxy closed the connection during the handshake"
        with pytest.raises(LocalProtocolError):
            driver.client.next_event()


@pytest.mark.parametrize("name", CLIENTS)
def test_illegal_transitions(name: str) -> None:
    make, reply = CLIENTS[name]
    client = make()
    with pytest.raises(LocalProtocolError):
        client.receive_data(reply)  # before start()
    with pytest.raises(LocalProtocolError):
        client.next_event()
    with pytest.raises(LocalProtocolError):
        client.trailing_data  # noqa: B018
    driver = Driver(client)
    with pytest.raises(LocalProtocolError):
        client.start()  # only once
    with pytest.raises(LocalProtocolError):
        client.trailing_data  # noqa: B018
    driver.feed([reply])
    assert driver.established is not None
    with pytest.raises(LocalProtocolError):
        client.next_event()
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        client.connection_closed()  # the relay's business now
    assert client.trailing_data == b""


@pytest.mark.parametrize("name", CLIENTS)
def test_nothing_after_a_failure(name: str) -> None:
    client = CLIENTS[name][0]()
    driver = Driver(client)
    with pytest.raises(ParentProtocolError):
        driver.feed([bad_reply(name)])
    with pytest.raises(LocalProtocolError):
        client.next_event()
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        client.trailing_data  # noqa: B018


# what each parent kind sends, up to its refusal of the target
REFUSALS = {
    "socks5": b"\x05\x00" + socks5_reply(0x05),
    "socks5 auth": CHOOSE_AUTH + AUTH_OK + socks5_reply(0x05),
    "socks4": b"\x00\x5b\x00\x00\x00\x00\x00\x00",
    "http": b"HTTP/1.1 503 Service Unavailable\r\n\r\n",
    "http auth": b"HTTP/1.1 403 Forbidden\r\n\r\n",
}


@pytest.mark.parametrize("name", CLIENTS)
def test_nothing_after_a_refusal(name: str) -> None:
    client = CLIENTS[name][0]()
    driver = Driver(client).feed([REFUSALS[name]])
    assert driver.refused is not None and client.state is ClientState.FAILED
    assert client.request_sent
    with pytest.raises(LocalProtocolError):
        client.next_event()
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        client.trailing_data  # noqa: B018


@pytest.mark.parametrize("name", CLIENTS)
def test_empty_chunks_change_nothing(name: str) -> None:
    make, reply = CLIENTS[name]
    driver = Driver(make()).feed([b"", *byte_by_byte(reply), b""])
    assert driver.established is not None
    assert driver.tunnel == b""


# --- every kind of answer, exactly: a Refused about the target, or the parent's fault ----

EX = "example.com:443"
MAKERS: dict[str, Callable[[], Client]] = {
    **{name: make for name, (make, _reply) in CLIENTS.items()},
    "socks5 to 127.0.0.1:9": partial(Socks5Client, Command.CONNECT, "127.0.0.1", 9),
    "socks5 to 2001:db8::1": partial(Socks5Client, Command.CONNECT, "2001:db8::1", 443),
}


def refused(code: int, what: str, target: str = EX) -> Refused:
    return Refused(code, f"{target}: {what}")


# (client, everything the parent sends, the Refused it gives or the message of the
# ParentProtocolError it raises); the same texts as the errors the clients raised before
ANSWERS: list[tuple[str, bytes, Refused | str]] = [
    ("socks5", b"\x05\xff", "the parent proxy accepts none of the offered SOCKS5 methods"),
    ("socks5", b"\x05\x03", "the parent proxy chose SOCKS5 method 0x03, not offered"),
    ("socks5", b"\x05\x02", "the parent proxy chose SOCKS5 method 0x02, not offered"),
    (
        "socks5",
        b"\x04\x00",
        "SOCKS5 method choice from the parent proxy has version 0x04, expected 0x05",
    ),
    ("socks5 auth", b"\x05\x02\x01\x01", "the parent proxy refused our credentials"),
    (
        "socks5 auth",
        b"\x05\x02\x05\x00",
        "SOCKS5 username/password status from the parent proxy has version 0x05, expected 0x01",
    ),
    (
        "socks5",
        b"\x05\x00\x04\x00",
        "SOCKS5 reply from the parent proxy has version 0x04, expected 0x05",
    ),
    (
        "socks5",
        b"\x05\x00\x05\x00\x01",
        "SOCKS5 reply from the parent proxy has reserved byte 0x01",
    ),
    (
        "socks5",
        b"\x05\x00\x05\x00\x00\x02",
        "SOCKS5 reply from the parent proxy: address type 0x02 is not supported",
    ),
    (
        "socks5",
        b"\x05\x00\x05\x00\x00\x03\x00",
        "SOCKS5 reply from the parent proxy: empty domain name",
    ),
    ("socks5", b"\x05\x00\x05", "the parent proxy closed the connection during the handshake"),
    (
        "socks5",
        b"\x05\x00\x05\x01",
        refused(REP_GENERAL_FAILURE, "the parent proxy failed (SOCKS5 reply 0x01)"),
    ),
    (
        "socks5",
        b"\x05\x00\x05\x02",
        refused(REP_NOT_ALLOWED, "the parent proxy's rules do not allow it"),
    ),
    (
        "socks5",
        b"\x05\x00\x05\x03",
        refused(REP_NETWORK_UNREACHABLE, "the parent proxy says the network is unreachable"),
    ),
    (
        "socks5",
        b"\x05\x00\x05\x04",
        refused(REP_HOST_UNREACHABLE, "the parent proxy says the host is unreachable"),
    ),
    (
        "socks5",
        b"\x05\x00\x05\x05",
        refused(REP_CONNECTION_REFUSED, "the parent proxy says the connection was refused"),
    ),
    (
        "socks5",
        b"\x05\x00\x05\x06",
        refused(REP_TTL_EXPIRED, "the parent proxy says the connection timed out"),
    ),
    (
        "socks5",
        b"\x05\x00\x05\x07",
        refused(REP_COMMAND_NOT_SUPPORTED, "the parent proxy failed (SOCKS5 reply 0x07)"),
    ),
    (
        "socks5",
        b"\x05\x00\x05\x08",
        refused(REP_ADDRESS_TYPE_NOT_SUPPORTED, "the parent proxy failed (SOCKS5 reply 0x08)"),
    ),
    ("socks5", b"\x05\x00\x05\xff", refused(0xFF, "the parent proxy failed (SOCKS5 reply 0xff)")),
    (
        "socks5 auth",
        b"\x05\x02\x01\x00\x05\x05",
        refused(REP_CONNECTION_REFUSED, "the parent proxy says the connection was refused"),
    ),
    (
        "socks5 to 127.0.0.1:9",
        b"\x05\x00" + socks5_reply(0x05),
        Refused(
            REP_CONNECTION_REFUSED, "127.0.0.1:9: the parent proxy says the connection was refused"
        ),
    ),
    (
        "socks5 to 2001:db8::1",
        b"\x05\x00" + socks5_reply(0x04),
        refused(
            REP_HOST_UNREACHABLE,
            "the parent proxy says the host is unreachable",
            "[2001:db8::1]:443",
        ),
    ),
    (
        "socks4",
        b"\x00\x5b",
        refused(REP_GENERAL_FAILURE, "the parent proxy rejected or failed the request"),
    ),
    ("socks4", b"\x00\x5c", "the parent proxy could not confirm our user id by identd (92)"),
    ("socks4", b"\x00\x5d", "the parent proxy could not confirm our user id by identd (93)"),
    ("socks4", b"\x00\x5e", "SOCKS4 reply from the parent proxy has unknown code 0x5e"),
    ("socks4", b"\x05\x5a", "SOCKS4 reply from the parent proxy has version 0x05"),
    ("socks4", b"\x00\x5a\x01", "the parent proxy closed the connection during the handshake"),
    (
        "http auth",
        b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
        "the parent proxy refused our credentials (407)",
    ),
    (
        "http",
        b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
        "the parent proxy wants credentials and none are configured (407)",
    ),
    (
        "http",
        b"HTTP/1.1 403 Forbidden\r\n\r\n",
        refused(REP_NOT_ALLOWED, "the parent proxy's rules do not allow it (403)"),
    ),
    (
        "http",
        b"HTTP/1.1 504 Gateway Timeout\r\n\r\n",
        refused(REP_TTL_EXPIRED, "the parent proxy timed out connecting (504)"),
    ),
    (
        "http",
        b"HTTP/1.1 502 Bad Gateway\r\n\r\n",
        refused(REP_GENERAL_FAILURE, "the parent proxy could not connect (502)"),
    ),
    (
        "http",
        b"HTTP/1.1 503 Service Unavailable\r\n\r\n",
        refused(REP_GENERAL_FAILURE, "the parent proxy could not connect (503)"),
    ),
    (
        "http",
        b"HTTP/1.1 500 Internal Server Error\r\n\r\n",
        refused(REP_GENERAL_FAILURE, "the parent proxy answered CONNECT with 500"),
    ),
    (
        "http",
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        refused(REP_GENERAL_FAILURE, "the parent proxy answered CONNECT with 400"),
    ),
    (
        "http",
        b"HTTP/1.1 301 Moved Permanently\r\n\r\n",
        "the parent proxy answered CONNECT with 301",
    ),
    ("http", b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "malformed HTTP response from the parent proxy"),
    (
        "http",
        b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 17000,
        "the parent proxy's response head is longer than 16384 bytes",
    ),
    ("http", b"HTTP/1.1 200", "the parent proxy closed the connection during the handshake"),
]


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "byte by byte"])
@pytest.mark.parametrize(
    ("kind", "answer", "outcome"),
    [pytest.param(*case, id=f"{case[0]}: {case[1][:20]!r}") for case in ANSWERS],
)
def test_what_each_answer_gives(
    kind: str, answer: bytes, outcome: Refused | str, trickle: bool
) -> None:
    driver = Driver(MAKERS[kind]())
    if isinstance(outcome, Refused):
        driver.feed(chunks(answer, trickle))
        assert driver.refused == outcome
    else:
        with pytest.raises(ParentProtocolError) as info:
            driver.feed(chunks(answer, trickle))
            driver.client.connection_closed()  # the parent hangs up after its answer
        assert str(info.value) == outcome
    assert driver.client.state is ClientState.FAILED


# --- against proxyd's own server parsers ------------------------------------------------


@pytest.mark.parametrize(
    ("command", "host", "port", "credentials", "parsed_host", "address_type"),
    [
        (Command.CONNECT, "example.com", 443, None, "example.com", AddressType.DOMAIN),
        (Command.CONNECT, "192.0.2.1", 80, ALICE, "192.0.2.1", AddressType.IPV4),
        (Command.CONNECT, "2001:db8::1", 8443, ALICE, "2001:db8::1", AddressType.IPV6),
        (Command.CONNECT, "bücher.example", 80, None, "xn--bcher-kva.example", AddressType.DOMAIN),
        (Command.UDP_ASSOCIATE, "0.0.0.0", 0, None, "0.0.0.0", AddressType.IPV4),
        (
            Command.CONNECT,
            LONGEST_NAME,
            65535,
            Credentials("ü" * 127 + "u", "p" * 255),
            LONGEST_NAME,
            AddressType.DOMAIN,
        ),
    ],
)
@pytest.mark.parametrize("bound", [("198.51.100.4", 1081), ("2001:db8::9", 0)])
def test_socks5_client_against_our_server(
    command: Command,
    host: str,
    port: int,
    credentials: Credentials | None,
    parsed_host: str,
    address_type: AddressType,
    bound: tuple[str, int],
) -> None:
    client = Socks5Client(command, host, port, credentials)
    server = Socks5Server()
    server.receive_data(client.start())
    offered = b"\x00\x02" if credentials else b"\x00"
    assert server.next_event() == Greeting(offered)
    method = METHOD_USERNAME_PASSWORD if credentials else METHOD_NO_AUTH
    client.receive_data(server.choose_method(method))
    event = client.next_event()
    assert isinstance(event, Send)
    if credentials is not None:
        server.receive_data(event.data)
        assert server.next_event() == credentials
        client.receive_data(server.auth_result(True))
        event = client.next_event()
        assert isinstance(event, Send)
    server.receive_data(event.data)
    assert server.next_event() == socks5.Request(command, parsed_host, port, address_type)
    client.receive_data(server.reply(REP_SUCCEEDED, *bound) + TAIL)
    assert client.next_event() == Established(*bound)
    assert client.trailing_data == TAIL


def socks5_to_request(credentials: Credentials | None) -> tuple[Socks5Client, Socks5Server]:
    """A client and our server, run up to the server's reply to the request."""
    client = Socks5Client(Command.CONNECT, "example.com", 443, credentials)
    server = Socks5Server()
    server.receive_data(client.start())
    server.next_event()
    client.receive_data(server.choose_method(METHOD_USERNAME_PASSWORD))
    event = client.next_event()
    assert isinstance(event, Send)
    server.receive_data(event.data)
    server.next_event()
    client.receive_data(server.auth_result(True))
    event = client.next_event()
    assert isinstance(event, Send)
    server.receive_data(event.data)
    assert isinstance(server.next_event(), socks5.Request)
    return client, server


def test_socks5_our_server_refuses_every_method() -> None:
    client = Socks5Client(Command.CONNECT, "example.com", 443)
    server = Socks5Server()
    server.receive_data(client.start())
    server.next_event()
    client.receive_data(server.choose_method(METHOD_NO_ACCEPTABLE))
    with pytest.raises(ParentProtocolError, match="none of the offered"):
        client.next_event()
    assert not client.request_sent


def test_socks5_our_server_refuses_the_credentials() -> None:
    client = Socks5Client(Command.CONNECT, "example.com", 443, ALICE)
    server = Socks5Server()
    server.receive_data(client.start())
    server.next_event()
    client.receive_data(server.choose_method(METHOD_USERNAME_PASSWORD))
    event = client.next_event()
    assert isinstance(event, Send)
    server.receive_data(event.data)
    assert server.next_event() == ALICE
    client.receive_data(server.auth_result(False))
    with pytest.raises(ParentProtocolError, match="refused our credentials") as info:
        client.next_event()
    assert PASSWORD not in str(info.value)
    assert not client.request_sent


@pytest.mark.parametrize(
    "code",
    [
        REP_GENERAL_FAILURE,
        REP_NOT_ALLOWED,
        REP_NETWORK_UNREACHABLE,
        REP_HOST_UNREACHABLE,
        REP_CONNECTION_REFUSED,
        REP_TTL_EXPIRED,
        REP_COMMAND_NOT_SUPPORTED,
        REP_ADDRESS_TYPE_NOT_SUPPORTED,
    ],
)
def test_socks5_our_server_fails_the_request(code: int) -> None:
    client, server = socks5_to_request(ALICE)
    client.receive_data(server.reply(code))
    event = client.next_event()
    assert isinstance(event, Refused) and event.code == code
    assert client.request_sent


@pytest.mark.parametrize(
    ("host", "port", "user_id", "expected"),
    [
        ("192.0.2.7", 80, "", socks4.Request(socks4.Command.CONNECT, "192.0.2.7", 80, "", False)),
        (
            "example.com",
            443,
            "bob",
            socks4.Request(socks4.Command.CONNECT, "example.com", 443, "bob", True),
        ),
        (
            "bücher.example",
            443,
            "ü",
            socks4.Request(socks4.Command.CONNECT, "xn--bcher-kva.example", 443, "ü", True),
        ),
        (
            LONGEST_NAME,
            1,
            "u" * 255,
            socks4.Request(socks4.Command.CONNECT, LONGEST_NAME, 1, "u" * 255, True),
        ),
    ],
)
def test_socks4_client_against_our_server(
    host: str, port: int, user_id: str, expected: socks4.Request
) -> None:
    client = Socks4Client(host, port, user_id)
    server = Socks4Server()
    server.receive_data(client.start())
    assert server.next_event() == expected
    client.receive_data(server.reply(True, "198.51.100.4", 1081) + TAIL)
    assert client.next_event() == Established("198.51.100.4", 1081)
    assert client.trailing_data == TAIL


def test_socks4_our_server_refuses() -> None:
    client = Socks4Client("example.com", 443)
    server = Socks4Server()
    server.receive_data(client.start())
    server.next_event()
    client.receive_data(server.reply(False))
    assert client.next_event() == Refused(
        REP_GENERAL_FAILURE, "example.com:443: the parent proxy rejected or failed the request"
    )


@pytest.mark.parametrize(
    ("host", "port", "credentials", "parsed_host"),
    [
        ("example.com", 443, None, "example.com"),
        ("example.com", 443, ALICE, "example.com"),
        ("2001:db8::1", 8443, ALICE, "2001:db8::1"),
        ("192.0.2.1", 22, Credentials("jürgen", "pä:ss"), "192.0.2.1"),
        ("bücher.example", 443, Credentials("bob", ""), "xn--bcher-kva.example"),
    ],
)
def test_connect_client_against_our_server(
    host: str, port: int, credentials: Credentials | None, parsed_host: str
) -> None:
    client = ConnectClient(host, port, credentials)
    server = HttpProxyServer()
    server.receive_data(client.start())
    assert server.next_event() == ConnectRequest(parsed_host, port, credentials)
    client.receive_data(server.established() + TAIL)
    assert client.next_event() == Established("0.0.0.0", 0)
    assert client.trailing_data == TAIL


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (407, PARENT_FAULT),
        (403, REP_NOT_ALLOWED),
        (502, REP_GENERAL_FAILURE),
        (503, REP_GENERAL_FAILURE),
        (504, REP_TTL_EXPIRED),
        (500, REP_GENERAL_FAILURE),
        (400, REP_GENERAL_FAILURE),
    ],
)
def test_connect_our_server_refuses(status: int, code: int | None) -> None:
    client = ConnectClient("example.com", 443, ALICE)
    server = HttpProxyServer()
    server.receive_data(client.start())
    server.next_event()
    client.receive_data(server.error_response(status, "no"))
    if code is PARENT_FAULT:
        with pytest.raises(ParentProtocolError):
            client.next_event()
    else:
        event = client.next_event()
        assert isinstance(event, Refused) and event.code == code


# --- anything a parent may send --------------------------------------------------------


@st.composite
def parent_bytes(draw: st.DrawFn) -> tuple[str, bytes]:
    """A client, and what its parent sends: noise, or a valid answer a little garbled."""
    name = draw(st.sampled_from(sorted(CLIENTS)))
    if draw(st.booleans()):
        return name, draw(st.binary(max_size=400))
    data = bytearray(CLIENTS[name][1])
    for _ in range(draw(st.integers(0, 3))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.sampled_from(b"\x00\x01\x02\x03\x04\x05\x5a\x5b\xff\r\n :1"))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return name, bytes(data) + draw(st.binary(max_size=100))


@settings(max_examples=500, deadline=None)
@given(case=parent_bytes(), cuts=st.lists(st.integers(1, 600), max_size=30))
def test_any_reply_gives_events_or_a_parent_protocol_error(
    case: tuple[str, bytes], cuts: list[int]
) -> None:
    name, data = case
    driver = Driver(CLIENTS[name][0]())
    try:
        driver.feed(split(data, cuts))
        if driver.established is None and driver.refused is None:
            driver.client.connection_closed()
    except ParentProtocolError:
        return  # anything else escapes and fails the test
    if driver.refused is not None:
        assert driver.client.state is ClientState.FAILED
        return
    assert driver.established is not None
    assert data.endswith(driver.tunnel)
