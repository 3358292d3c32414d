"""SOCKS5 (RFC 1928) with username/password auth (RFC 1929), sans-I/O.

Server side: feed bytes with `receive_data`, pull typed events with
`next_event`, and get the bytes to send from `choose_method`, `auth_result` and
`reply`. Every state transition lives in this class; an illegal one raises
LocalProtocolError. `pack_address` and `unpack_address` also serve the UDP
datagram header (proxyd.protocols.socks5_udp) and our client to a parent proxy
(proxyd.protocols.clients).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from proxyd.errors import (
    REP_ADDRESS_TYPE_NOT_SUPPORTED,
    REP_COMMAND_NOT_SUPPORTED,
    REP_GENERAL_FAILURE,
    REP_HOST_UNREACHABLE,
    REP_SUCCEEDED,
    LocalProtocolError,
    ProtocolError,
    Status,
)
from proxyd.protocols.common import (
    NEED_DATA,
    Credentials,
    NeedData,
    canonical_host,
    ipv4_text,
    ipv6_text,
    packed_ip,
)

VERSION: Final = 0x05
AUTH_VERSION: Final = 0x01

METHOD_NO_AUTH: Final = 0x00
METHOD_USERNAME_PASSWORD: Final = 0x02
METHOD_NO_ACCEPTABLE: Final = 0xFF


class Command(enum.IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(enum.IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class State(enum.Enum):
    AWAIT_GREETING = enum.auto()
    CHOOSE_METHOD = enum.auto()  # greeting parsed; the driver picks a method
    AWAIT_AUTH = enum.auto()
    CHECK_AUTH = enum.auto()  # credentials parsed; the driver verifies them
    AWAIT_REQUEST = enum.auto()
    REPLY = enum.auto()  # request parsed; the driver answers it
    ESTABLISHED = enum.auto()  # success reply sent; further bytes belong to the tunnel
    CLOSED = enum.auto()  # a refusal was sent; nothing more may happen


@dataclass(frozen=True, slots=True)
class Greeting:
    methods: bytes


@dataclass(frozen=True, slots=True)
class Request:
    command: Command
    host: str
    port: int
    address_type: AddressType


Event = Greeting | Credentials | Request | NeedData

# Largest unconsumed input we keep: every SOCKS5 message is at most 513 bytes,
# the rest is room for data a client sends ahead of our reply.
DEFAULT_MAX_BUFFER: Final = 16384


def _decode_text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not valid UTF-8") from exc


def pack_address(host: str, port: int) -> bytes:
    """ATYP, address and port as they appear in requests, replies and UDP headers."""
    packed = packed_ip(host)
    if packed is not None:
        return (_ATYP_IPV4 if len(packed) == 4 else _ATYP_IPV6) + packed + struct.pack("!H", port)
    name = host.encode("idna")
    if not 0 < len(name) <= 255:
        raise ValueError(f"domain name of {len(name)} bytes cannot be sent")
    return bytes((AddressType.DOMAIN, len(name))) + name + struct.pack("!H", port)


_ATYP_IPV4: Final = bytes((AddressType.IPV4,))
_ATYP_IPV6: Final = bytes((AddressType.IPV6,))
# the parsers look codes up in these rather than calling the enums (a third of their time)
_ADDRESS_TYPES: Final = {int(t): t for t in AddressType}
_COMMANDS: Final = {int(c): c for c in Command}


def unpack_address(
    data: bytes | bytearray, offset: int
) -> tuple[str, int, AddressType, int] | None:
    """Parse ATYP, address and port at `offset`.

    Returns (host, port, type, end offset), or None while incomplete.
    """
    if len(data) <= offset:
        return None
    atyp = _ADDRESS_TYPES.get(data[offset])
    if atyp is None:
        raise ProtocolError(
            f"address type {data[offset]:#04x} is not supported",
            socks_reply=REP_ADDRESS_TYPE_NOT_SUPPORTED,
        )
    start = offset + 1
    if atyp is AddressType.IPV4:
        end = start + 4
        if len(data) < end + 2:
            return None
        host = ipv4_text(data, start)
    elif atyp is AddressType.IPV6:
        end = start + 16
        if len(data) < end + 2:
            return None
        host = ipv6_text(bytes(data[start:end]))
    else:
        if len(data) <= start:
            return None
        length = data[start]
        if length == 0:
            raise ProtocolError("empty domain name", socks_reply=REP_GENERAL_FAILURE)
        start += 1
        end = start + length
        if len(data) < end + 2:
            return None
        try:
            host = canonical_host(_decode_text(bytes(data[start:end]), "domain name"))
        except ValueError as exc:
            raise ProtocolError(str(exc), socks_reply=REP_HOST_UNREACHABLE) from None
    (port,) = struct.unpack_from("!H", data, end)
    return host, port, atyp, end + 2


class Socks5Server:
    """One client's SOCKS5 handshake, from greeting to the reply to its request."""

    def __init__(self, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self.state = State.AWAIT_GREETING
        self._buffer = bytearray()
        self._max_buffer = max_buffer

    def receive_data(self, data: bytes) -> None:
        if self.state in (State.ESTABLISHED, State.CLOSED):
            raise LocalProtocolError(f"no input expected in state {self.state.name}")
        self._buffer += data
        if len(self._buffer) > self._max_buffer:
            raise ProtocolError(f"handshake larger than {self._max_buffer} bytes")

    def next_event(self) -> Event:
        if self.state is State.AWAIT_GREETING:
            return self._parse_greeting()
        if self.state is State.AWAIT_AUTH:
            return self._parse_credentials()
        if self.state is State.AWAIT_REQUEST:
            return self._parse_request()
        raise LocalProtocolError(f"no event to read in state {self.state.name}")

    def choose_method(self, method: int) -> bytes:
        """Answer the greeting; METHOD_NO_ACCEPTABLE ends the handshake."""
        self._expect(State.CHOOSE_METHOD)
        if method == METHOD_NO_AUTH:
            self.state = State.AWAIT_REQUEST
        elif method == METHOD_USERNAME_PASSWORD:
            self.state = State.AWAIT_AUTH
        elif method == METHOD_NO_ACCEPTABLE:
            self.state = State.CLOSED
        else:
            raise LocalProtocolError(f"method {method:#04x} is not implemented")
        return bytes((VERSION, method))

    def auth_result(self, ok: bool) -> bytes:
        """RFC 1929 status: 0x00 success, anything else failure (and the handshake ends)."""
        self._expect(State.CHECK_AUTH)
        self.state = State.AWAIT_REQUEST if ok else State.CLOSED
        return bytes((AUTH_VERSION, 0x00 if ok else 0x01))

    def reply(self, code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
        """The reply to a request; only success leaves the connection open for the tunnel.

        A failure may also answer a request that could not be parsed (bad command or
        address type), so it is allowed while the request is still awaited.
        """
        if code == REP_SUCCEEDED:
            self._expect(State.REPLY)
            self.state = State.ESTABLISHED
        else:
            if self.state not in (State.AWAIT_REQUEST, State.REPLY):
                raise LocalProtocolError(f"cannot reply in state {self.state.name}")
            self.state = State.CLOSED
        return bytes((VERSION, code, 0x00)) + pack_address(bind_host, bind_port)

    def bind_listening(self, bind_host: str, bind_port: int) -> bytes:
        """BIND's first reply: the address the proxy listens on for the peer. The
        request still awaits its second reply (`reply`: the peer, or a failure)."""
        self._expect(State.REPLY)
        return bytes((VERSION, REP_SUCCEEDED, 0x00)) + pack_address(bind_host, bind_port)

    @property
    def said_more(self) -> bool:
        """Whether the client sent bytes after its request (read with it)."""
        return bool(self._buffer) and self.state is not State.AWAIT_REQUEST

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after its request: the first bytes of the tunnel."""
        if self.state is not State.ESTABLISHED:
            raise LocalProtocolError("trailing data exists only once the tunnel is established")
        return bytes(self._buffer)

    def _expect(self, state: State) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"expected state {state.name}, in {self.state.name}")

    def _check_version(self, version: int, expected: int, what: str) -> None:
        if version != expected:
            raise ProtocolError(f"{what} version {version:#04x}, expected {expected:#04x}")

    def _parse_greeting(self) -> Event:
        buf = self._buffer
        if len(buf) < 2:
            return NEED_DATA
        self._check_version(buf[0], VERSION, "SOCKS")
        end = 2 + buf[1]
        if len(buf) < end:
            return NEED_DATA
        methods = bytes(buf[2:end])
        del buf[:end]
        self.state = State.CHOOSE_METHOD
        return Greeting(methods)

    def _parse_credentials(self) -> Event:
        buf = self._buffer
        if len(buf) < 2:
            return NEED_DATA
        self._check_version(buf[0], AUTH_VERSION, "username/password auth")
        ulen = buf[1]
        if len(buf) < 2 + ulen + 1:
            return NEED_DATA
        plen = buf[2 + ulen]
        end = 3 + ulen + plen
        if len(buf) < end:
            return NEED_DATA
        username = _decode_text(bytes(buf[2 : 2 + ulen]), "username")
        password = _decode_text(bytes(buf[3 + ulen : end]), "password")
        del buf[:end]
        self.state = State.CHECK_AUTH
        return Credentials(username, password)

    def _parse_request(self) -> Event:
        buf = self._buffer
        if len(buf) < 4:
            return NEED_DATA
        self._check_version(buf[0], VERSION, "SOCKS")
        command = _COMMANDS.get(buf[1])
        if command is None:
            raise ProtocolError(
                f"command {buf[1]:#04x} is not supported",
                socks_reply=REP_COMMAND_NOT_SUPPORTED,
                status=Status.UNSUPPORTED,
            )
        parsed = unpack_address(buf, 3)
        if parsed is None:
            return NEED_DATA
        host, port, atyp, end = parsed
        del buf[:end]
        self.state = State.REPLY
        return Request(command, host, port, atyp)
