"""Types shared by the protocol parsers."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, NoReturn

from proxyd.errors import LocalProtocolError, ParentError, SessionError


class NeedData:
    """Sentinel: more bytes are needed before the next event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # keep the password out of any traceback or log
        return f"Credentials(username={self.username!r}, password=<hidden>)"


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


def format_hostport(host: str, port: int) -> str:
    """`host:port`, with IPv6 addresses in brackets as URLs and logs write them."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


MAX_NAME_LENGTH: Final = 255  # what SOCKS5 can carry; the resolver refuses beyond 253


def check_hostname(host: str) -> str:
    """`host` if a resolver can be asked for it, else ValueError.

    The resolver would stop at a NUL (and so look up another name than the one
    logged and checked), and IDNA encoding fails on empty or over-long labels.
    """
    if not host or len(host.rstrip(".")) > MAX_NAME_LENGTH:
        raise ValueError("host name is empty or longer than 255 characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in host):
        raise ValueError("host name contains spaces or control characters")
    try:
        host.encode("idna")
    except UnicodeError:
        raise ValueError("host name has an empty or over-long label") from None
    return host


class ClientState(enum.Enum):
    """Where our handshake with a parent proxy is (the SOCKS5, SOCKS4a and HTTP
    clients share these; only SOCKS5 has a method choice and a login)."""

    START = enum.auto()  # nothing handed out yet
    AWAIT_METHOD = enum.auto()  # SOCKS5: the parent's method choice
    AWAIT_AUTH_STATUS = enum.auto()  # SOCKS5: the answer to our login
    AWAIT_REPLY = enum.auto()  # the answer to the request for the target
    ESTABLISHED = enum.auto()  # granted: further bytes belong to the tunnel
    FAILED = enum.auto()  # an error was raised; nothing more may happen


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

    def next_event(self) -> NeedData | Send | Established:
        if self.state not in _AWAITING:
            raise LocalProtocolError(f"no event to read in state {self.state.name}")
        try:
            return self._next()
        except SessionError:
            self.state = ClientState.FAILED
            raise

    def _next(self) -> NeedData | Send | Established:
        raise NotImplementedError

    def connection_closed(self) -> NoReturn:
        """The parent closed before the handshake ended."""
        if self.state is ClientState.ESTABLISHED:
            raise LocalProtocolError("the handshake is over: the parent's EOF is the relay's")
        self.state = ClientState.FAILED
        raise ParentError("the parent proxy closed the connection during the handshake")

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
