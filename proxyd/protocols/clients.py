"""Our side of the handshake with a parent proxy, sans-I/O: SOCKS5, SOCKS4a and
HTTP CONNECT clients over one interface.

A driver (proxyd.chain) sends what `start()` returns, feeds what the parent
sends to `receive_data` and pulls events with `next_event`: NEED_DATA, Send
(bytes to send next), Established (granted: the tunnel begins, and
`trailing_data` holds what came with the answer) or Refused (the parent could
not or would not reach the target). A fault of the parent itself raises
ParentProtocolError. What these mean for a session is the driver's to say. The
server sides of these protocols are proxyd.protocols.socks5, socks4 and http.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Final, NoReturn

import h11

from proxyd.errors import (
    REP_CONNECTION_REFUSED,
    REP_GENERAL_FAILURE,
    REP_HOST_UNREACHABLE,
    REP_NETWORK_UNREACHABLE,
    REP_NOT_ALLOWED,
    REP_SUCCEEDED,
    REP_TTL_EXPIRED,
    LocalProtocolError,
    ParentProtocolError,
    ProtocolError,
)
from proxyd.protocols import socks4, socks5
from proxyd.protocols.common import (
    NEED_DATA,
    Credentials,
    NeedData,
    check_hostname,
    format_hostport,
    ipv4_text,
)
from proxyd.protocols.http import DEFAULT_MAX_HEAD, basic_authorization

# --- events, states and what the clients share -------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes for the driver to send to the parent next."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Established:
    """The parent granted the request; its bound address (BND.ADDR/PORT; for SOCKS5
    UDP ASSOCIATE the relay to send datagrams to; ("0.0.0.0", 0) where the protocol gives none)."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Refused:
    """The parent reports a failure about the target: `code` is the SOCKS5 reply that
    says what happened (a SOCKS5 parent's own, or the nearest one to another
    protocol's answer), `message` names the target. Nothing follows it."""

    code: int
    message: str


ClientEvent = NeedData | Send | Established | Refused


class ClientState(enum.Enum):
    """Where our handshake with a parent proxy is (the SOCKS5, SOCKS4a and HTTP
    clients share these; only SOCKS5 has a method choice and a login)."""

    START = enum.auto()  # nothing handed out yet
    AWAIT_METHOD = enum.auto()  # SOCKS5: the parent's method choice
    AWAIT_AUTH_STATUS = enum.auto()  # SOCKS5: the answer to our login
    AWAIT_REPLY = enum.auto()  # the answer to the request for the target
    ESTABLISHED = enum.auto()  # granted: further bytes belong to the tunnel
    FAILED = enum.auto()  # refused, or an error was raised; nothing more may happen


_AWAITING: Final = frozenset(
    {ClientState.AWAIT_METHOD, ClientState.AWAIT_AUTH_STATUS, ClientState.AWAIT_REPLY}
)


class ParentClient:
    """What the parent clients share: the guards around their states and the end of
    the handshake. A subclass reads the parent's next message in `_next`, takes the
    parent's bytes in `receive_data` and keeps what came after its answer for
    `trailing_data`. `start` here sends the whole request at once (SOCKS4, HTTP);
    SOCKS5 starts with its greeting instead."""

    state: ClientState = ClientState.START
    _request: bytes = b""

    def start(self) -> bytes:
        """The first bytes to send: for a protocol without a greeting, the request."""
        self._expect(ClientState.START)
        self.state = ClientState.AWAIT_REPLY
        return self._request

    def receive_data(self, data: bytes) -> None:
        raise NotImplementedError

    @property
    def trailing_data(self) -> bytes:
        raise NotImplementedError

    def next_event(self) -> ClientEvent:
        if self.state not in _AWAITING:
            raise LocalProtocolError(f"no event to read in state {self.state.name}")
        try:
            event = self._next()
        except ParentProtocolError:
            self.state = ClientState.FAILED
            raise
        if isinstance(event, Refused):
            self.state = ClientState.FAILED
        return event

    def _next(self) -> ClientEvent:
        raise NotImplementedError

    def connection_closed(self) -> NoReturn:
        """The parent closed before the handshake ended."""
        if self.state is ClientState.ESTABLISHED:
            raise LocalProtocolError("the handshake is over: the parent's EOF is the relay's")
        self.state = ClientState.FAILED
        raise ParentProtocolError("the parent proxy closed the connection during the handshake")

    @property
    def request_sent(self) -> bool:
        """Whether the request for the target went out (a failure may now be the
        target's); for a protocol without a greeting, from `start` on."""
        return self.state is not ClientState.START

    def _expect(self, state: ClientState) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"expected state {state.name}, in {self.state.name}")

    def _expect_input(self) -> None:
        if self.state not in _AWAITING:
            raise LocalProtocolError(f"no input expected in state {self.state.name}")


# --- SOCKS5 ------------------------------------------------------------------------


def _pack_credentials(credentials: Credentials) -> bytes:
    """The RFC 1929 request; ValueError (naming no value) when a field does not fit."""
    username = credentials.username.encode("utf-8")
    password = credentials.password.encode("utf-8")
    if len(username) > 255:
        raise ValueError("SOCKS5 username longer than 255 bytes (UTF-8)")
    if len(password) > 255:
        raise ValueError("SOCKS5 password longer than 255 bytes (UTF-8)")
    return (
        bytes((socks5.AUTH_VERSION, len(username))) + username + bytes((len(password),)) + password
    )


class Socks5Client(ParentClient):
    """Our SOCKS5 handshake with a parent proxy: greeting, optional RFC 1929 auth,
    the request for `host:port`, and the parent's reply to it.

    BIND is refused at construction: its second reply (the peer) does not fit
    an interface that ends at the first.
    """

    def __init__(
        self, command: socks5.Command, host: str, port: int, credentials: Credentials | None = None
    ) -> None:
        if command is socks5.Command.BIND:
            raise ValueError("BIND cannot be chained through a parent proxy")
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is out of range")
        address = socks5.pack_address(host, port)
        if address[0] == socks5.AddressType.DOMAIN:
            check_hostname(host)  # a NUL or space would make the parent look up another name
        self._request = bytes((socks5.VERSION, command, 0x00)) + address
        self._auth = None if credentials is None else _pack_credentials(credentials)
        self._methods = bytes((socks5.METHOD_NO_AUTH,))
        if self._auth is not None:
            self._methods += bytes((socks5.METHOD_USERNAME_PASSWORD,))
        self._target = format_hostport(host, port)
        self._buffer = bytearray()
        self._request_sent = False
        self.state = ClientState.START

    def start(self) -> bytes:
        """The greeting: the methods we offer."""
        self._expect(ClientState.START)
        self.state = ClientState.AWAIT_METHOD
        return bytes((socks5.VERSION, len(self._methods))) + self._methods

    def receive_data(self, data: bytes) -> None:
        self._expect_input()
        # A driver pulls events after each chunk, and every state decides within
        # 262 bytes, so the buffer stays bounded; the rest is tunnel data, kept whole.
        self._buffer += data

    def _next(self) -> ClientEvent:
        if self.state is ClientState.AWAIT_METHOD:
            return self._read_method()
        if self.state is ClientState.AWAIT_AUTH_STATUS:
            return self._read_auth_status()
        return self._read_reply()

    @property
    def request_sent(self) -> bool:
        """Whether the request for the target went out: a failure may now be the target's."""
        return self._request_sent

    @property
    def trailing_data(self) -> bytes:
        """Bytes the parent sent after its reply: the target's first bytes."""
        self._expect(ClientState.ESTABLISHED)
        return bytes(self._buffer)

    def _send_request(self) -> Send:
        self.state = ClientState.AWAIT_REPLY
        self._request_sent = True
        return Send(self._request)

    def _read_method(self) -> ClientEvent:
        buf = self._buffer
        if not buf:
            return NEED_DATA
        _check_parent_version(buf[0], socks5.VERSION, "method choice")
        if len(buf) < 2:
            return NEED_DATA
        method = buf[1]
        del buf[:2]
        if method == socks5.METHOD_NO_AUTH:
            return self._send_request()
        if method == socks5.METHOD_USERNAME_PASSWORD and self._auth is not None:
            self.state = ClientState.AWAIT_AUTH_STATUS
            return Send(self._auth)
        if method == socks5.METHOD_NO_ACCEPTABLE:
            raise ParentProtocolError("the parent proxy accepts none of the offered SOCKS5 methods")
        raise ParentProtocolError(
            f"the parent proxy chose SOCKS5 method {method:#04x}, not offered"
        )

    def _read_auth_status(self) -> ClientEvent:
        buf = self._buffer
        if not buf:
            return NEED_DATA
        _check_parent_version(buf[0], socks5.AUTH_VERSION, "username/password status")
        if len(buf) < 2:
            return NEED_DATA
        status = buf[1]
        del buf[:2]
        if status != 0x00:
            raise ParentProtocolError("the parent proxy refused our credentials")
        return self._send_request()

    def _read_reply(self) -> ClientEvent:
        buf = self._buffer
        if not buf:
            return NEED_DATA
        _check_parent_version(buf[0], socks5.VERSION, "reply")
        if len(buf) < 2:
            return NEED_DATA
        # A refusal ends the connection, so it is final before its address arrives
        # (some parents close without sending one).
        if buf[1] != REP_SUCCEEDED:
            return Refused(buf[1], f"{self._target}: {_socks5_refusal(buf[1])}")
        if len(buf) < 3:
            return NEED_DATA
        if buf[2] != 0x00:
            raise ParentProtocolError(
                f"SOCKS5 reply from the parent proxy has reserved byte {buf[2]:#04x}"
            )
        try:
            parsed = socks5.unpack_address(buf, 3)
        except ProtocolError as exc:
            raise ParentProtocolError(f"SOCKS5 reply from the parent proxy: {exc}") from exc
        if parsed is None:
            return NEED_DATA
        host, port, _atyp, end = parsed
        del buf[:end]
        self.state = ClientState.ESTABLISHED
        return Established(host, port)


_SOCKS5_REFUSALS: Final = {
    REP_CONNECTION_REFUSED: "the parent proxy says the connection was refused",
    REP_NETWORK_UNREACHABLE: "the parent proxy says the network is unreachable",
    REP_HOST_UNREACHABLE: "the parent proxy says the host is unreachable",
    REP_TTL_EXPIRED: "the parent proxy says the connection timed out",
    REP_NOT_ALLOWED: "the parent proxy's rules do not allow it",
}


def _socks5_refusal(code: int) -> str:
    """What a SOCKS5 parent's failure reply says, in words."""
    return _SOCKS5_REFUSALS.get(code) or f"the parent proxy failed (SOCKS5 reply {code:#04x})"


def _check_parent_version(version: int, expected: int, what: str) -> None:
    if version != expected:
        raise ParentProtocolError(
            f"SOCKS5 {what} from the parent proxy has version {version:#04x}, "
            f"expected {expected:#04x}"
        )


# --- SOCKS4 and SOCKS4a -------------------------------------------------------------

# the reply's VN is 0, but some servers echo the request's 4
_SOCKS4_REPLY_VERSIONS: Final = (socks4.REPLY_VERSION, socks4.VERSION)


class Socks4Client(ParentClient):
    """Our SOCKS4 (IPv4 literal) or SOCKS4a (host name) CONNECT to a parent proxy."""

    def __init__(self, host: str, port: int, user_id: str = "") -> None:
        if not 0 < port <= 0xFFFF:
            raise ValueError(f"port {port} is out of range")
        userid = user_id.encode("utf-8")
        if b"\0" in userid or len(userid) > socks4.MAX_FIELD:
            raise ValueError(
                f"SOCKS4 user id must be at most {socks4.MAX_FIELD} bytes, without NUL"
            )
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if isinstance(address, ipaddress.IPv6Address):
            raise ValueError("SOCKS4 cannot carry an IPv6 address")
        head = socks4.HEAD.pack(
            socks4.VERSION, socks4.Command.CONNECT, port, socks4.SOCKS4A_ADDRESS
        )
        if address is None or address.packed[:3] == bytes(3):
            # 0.0.0.x would read as the SOCKS4a marker, so such a literal goes as a name too.
            name = check_hostname(host).encode("idna")
            if len(name) > socks4.MAX_FIELD:
                raise ValueError(f"SOCKS4a host name longer than {socks4.MAX_FIELD} bytes")
            self._request = head + userid + b"\0" + name + b"\0"
        else:
            head = socks4.HEAD.pack(socks4.VERSION, socks4.Command.CONNECT, port, address.packed)
            self._request = head + userid + b"\0"
        self._target = format_hostport(host, port)
        self._buffer = bytearray()
        self.state = ClientState.START

    def receive_data(self, data: bytes) -> None:
        self._expect_input()
        # The driver pulls an event after each chunk and the reply is decided
        # within 8 bytes, so the buffer stays bounded; the rest is tunnel data.
        self._buffer += data

    @property
    def trailing_data(self) -> bytes:
        """Bytes the parent sent after its reply: the target's first bytes."""
        self._expect(ClientState.ESTABLISHED)
        return bytes(self._buffer)

    def _next(self) -> NeedData | Established | Refused:
        buf = self._buffer
        if not buf:
            return NEED_DATA
        if buf[0] not in _SOCKS4_REPLY_VERSIONS:
            raise ParentProtocolError(
                f"SOCKS4 reply from the parent proxy has version {buf[0]:#04x}"
            )
        if len(buf) < 2:
            return NEED_DATA
        # A refusal ends the connection, so it is final before the rest of the reply.
        code = buf[1]
        if code == socks4.REJECTED:  # SOCKS4 says no more than that
            return Refused(
                REP_GENERAL_FAILURE,
                f"{self._target}: the parent proxy rejected or failed the request",
            )
        if code in (socks4.IDENTD_UNREACHABLE, socks4.IDENTD_MISMATCH):
            raise ParentProtocolError(
                f"the parent proxy could not confirm our user id by identd ({code})"
            )
        if code != socks4.GRANTED:
            raise ParentProtocolError(
                f"SOCKS4 reply from the parent proxy has unknown code {code:#04x}"
            )
        if len(buf) < socks4.HEAD.size:
            return NEED_DATA
        _version, _code, port, ip = socks4.HEAD.unpack_from(buf)
        del buf[: socks4.HEAD.size]
        self.state = ClientState.ESTABLISHED
        return Established(ipv4_text(ip), port)


# --- HTTP CONNECT ------------------------------------------------------------------

# characters that would end or split the host part of a CONNECT authority
_URI_DELIMITERS: Final = frozenset(":/?#[]@")


class ConnectClient(ParentClient):
    """Our CONNECT request to a parent HTTP proxy and its answer, on h11 as the client."""

    def __init__(
        self,
        host: str,
        port: int,
        credentials: Credentials | None = None,
        max_head: int = DEFAULT_MAX_HEAD,
    ) -> None:
        if not 0 < port <= 0xFFFF:
            raise ValueError(f"port {port} is out of range")
        try:
            ipaddress.ip_address(host)
            authority = format_hostport(host, port)
        except ValueError:
            if not _URI_DELIMITERS.isdisjoint(host):
                raise ValueError("host name cannot be written in a CONNECT request") from None
            authority = format_hostport(check_hostname(host).encode("idna").decode("ascii"), port)
        headers = [("Host", authority)]
        if credentials is not None:
            headers.append(("Proxy-Authorization", basic_authorization(credentials)))
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        request = h11.Request(method="CONNECT", target=authority, headers=headers)
        self._request = self._conn.send(request) + self._conn.send(h11.EndOfMessage())
        self._target = format_hostport(host, port)
        self._max_head = max_head
        self._has_credentials = credentials is not None
        self.state = ClientState.START

    def receive_data(self, data: bytes) -> None:
        self._expect_input()
        # h11 takes b"" for EOF, which the driver reports with `connection_closed`.
        if data:
            self._conn.receive_data(data)

    @property
    def trailing_data(self) -> bytes:
        """Bytes the parent sent after its response head: the target's first bytes."""
        self._expect(ClientState.ESTABLISHED)
        data, _closed = self._conn.trailing_data
        return bytes(data)

    def _next(self) -> NeedData | Established | Refused:
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:  # h11's mark for max_incomplete_event_size
                    raise ParentProtocolError(
                        f"the parent proxy's response head is longer than {self._max_head} bytes"
                    ) from exc
                raise ParentProtocolError("malformed HTTP response from the parent proxy") from exc
            if event is h11.NEED_DATA:
                return NEED_DATA
            if isinstance(event, h11.Response):
                break
            # 1xx answers come before the real one and say nothing about the tunnel.
            if not isinstance(event, h11.InformationalResponse):
                raise LocalProtocolError(f"unexpected h11 event {type(event).__name__}")
        if 200 <= event.status_code < 300:  # h11 has switched protocols: the rest is tunnel
            self.state = ClientState.ESTABLISHED
            return Established("0.0.0.0", 0)
        return self._refusal(event.status_code)

    def _refusal(self, status: int) -> Refused:
        """What a non-2xx answer says about the target; ParentProtocolError when it is
        the parent's own failure."""
        target = self._target
        if status == 407:
            if self._has_credentials:
                raise ParentProtocolError("the parent proxy refused our credentials (407)")
            raise ParentProtocolError(
                "the parent proxy wants credentials and none are configured (407)"
            )
        if status == 503:  # Squid and gost say so when the target fails: not the parent's fault
            return Refused(
                REP_GENERAL_FAILURE, f"{target}: the parent proxy could not connect (503)"
            )
        if status == 403:
            return Refused(
                REP_NOT_ALLOWED, f"{target}: the parent proxy's rules do not allow it (403)"
            )
        if status == 504:
            return Refused(
                REP_TTL_EXPIRED, f"{target}: the parent proxy timed out connecting (504)"
            )
        if status == 502:
            return Refused(
                REP_GENERAL_FAILURE, f"{target}: the parent proxy could not connect (502)"
            )
        if status >= 400:
            return Refused(
                REP_GENERAL_FAILURE, f"{target}: the parent proxy answered CONNECT with {status}"
            )
        # a 3xx grants no tunnel and is not about the target: the parent misbehaves
        raise ParentProtocolError(f"the parent proxy answered CONNECT with {status}")
