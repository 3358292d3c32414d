"""SOCKS4 and SOCKS4a server side, sans-I/O.

A request is VN=4, CD (1 CONNECT, 2 BIND), DSTPORT, DSTIP, a NUL-terminated
USERID and, for SOCKS4a (DSTIP 0.0.0.x with x != 0), a NUL-terminated host
name. The one reply is VN=0, CD 90 (granted) or 91 (rejected or failed),
DSTPORT, DSTIP. SOCKS4 has no password: USERID is whatever the client claims.
The other side, for a parent proxy that speaks SOCKS4/4a, is
proxyd.protocols.clients.Socks4Client.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from proxyd.errors import LocalProtocolError, ProtocolError, Status
from proxyd.protocols.common import (
    NEED_DATA,
    NeedData,
    canonical_host,
    ipv4_text,
    packed_ip,
)

VERSION: Final = 0x04
REPLY_VERSION: Final = 0x00
GRANTED: Final = 90
REJECTED: Final = 91
# what a server that asks identd for the client's USERID answers when that fails
IDENTD_UNREACHABLE: Final = 92
IDENTD_MISMATCH: Final = 93
# DSTIP 0.0.0.1: "the name follows the user id" (SOCKS4a)
SOCKS4A_ADDRESS: Final = b"\0\0\0\x01"
# USERID and host name are each at most this long; a longer one is refused
MAX_FIELD: Final = 255
# VN CD DSTPORT DSTIP: the start of a request, and the whole reply
HEAD: Final = struct.Struct("!BBH4s")


class Command(enum.IntEnum):
    CONNECT = 0x01
    BIND = 0x02


_COMMANDS: Final = {int(c): c for c in Command}


class State(enum.Enum):
    AWAIT_REQUEST = enum.auto()
    REPLY = enum.auto()  # request parsed; the driver answers it
    ESTABLISHED = enum.auto()
    CLOSED = enum.auto()


@dataclass(frozen=True, slots=True)
class Request:
    command: Command
    host: str
    port: int
    userid: str
    socks4a: bool  # the client sent a name for the proxy to resolve


Event = Request | NeedData


class Socks4Server:
    """One client's SOCKS4/4a request and the reply to it."""

    def __init__(self) -> None:
        self.state = State.AWAIT_REQUEST
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        if self.state is not State.AWAIT_REQUEST and self.state is not State.REPLY:
            raise LocalProtocolError(f"no input expected in state {self.state.name}")
        self._buffer += data
        if self.state is State.AWAIT_REQUEST and len(self._buffer) > HEAD.size + 2 * (
            MAX_FIELD + 1
        ):
            raise ProtocolError("SOCKS4 request too long")

    def next_event(self) -> Event:
        if self.state is not State.AWAIT_REQUEST:
            raise LocalProtocolError(f"no event to read in state {self.state.name}")
        buf = self._buffer
        if len(buf) < HEAD.size:
            return NEED_DATA
        version, code, port, ip = HEAD.unpack_from(buf)
        if version != VERSION:
            raise ProtocolError(f"SOCKS version {version:#04x}, expected 0x04")
        command = _COMMANDS.get(code)
        if command is None:
            raise ProtocolError(
                f"SOCKS4 command {code:#04x} is not supported", status=Status.UNSUPPORTED
            )
        userid_end = self._field_end(HEAD.size, "user id")
        if userid_end < 0:
            return NEED_DATA
        userid = self._text(HEAD.size, userid_end, "user id")
        socks4a = ip[:3] == b"\0\0\0" and ip[3] != 0
        end = userid_end + 1
        if socks4a:
            name_end = self._field_end(end, "host name")
            if name_end < 0:
                return NEED_DATA
            try:
                host = canonical_host(self._text(end, name_end, "host name"))
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
            end = name_end + 1
        else:
            host = ipv4_text(ip)
        if port == 0 and command is Command.CONNECT:
            # (BIND's port is only informational: where the peer will connect from)
            raise ProtocolError("SOCKS4 CONNECT to port 0")
        del buf[:end]
        self.state = State.REPLY
        return Request(command, host, port, userid, socks4a)

    def reply(self, granted: bool, host: str = "0.0.0.0", port: int = 0) -> bytes:
        """The reply; only a grant leaves the connection open. An IPv6 address
        cannot be carried and goes out as 0.0.0.0."""
        refusing_early = not granted and self.state is State.AWAIT_REQUEST  # bad request
        if self.state is not State.REPLY and not refusing_early:
            raise LocalProtocolError(f"cannot reply in state {self.state.name}")
        self.state = State.ESTABLISHED if granted else State.CLOSED
        packed = packed_ip(host)
        if packed is None or len(packed) != 4:
            packed, port = bytes(4), 0
        return HEAD.pack(REPLY_VERSION, GRANTED if granted else REJECTED, port, packed)

    def bind_listening(self, host: str, port: int) -> bytes:
        """BIND's first reply (90 and the listening address); the second, `reply`,
        follows when the peer connects."""
        if self.state is not State.REPLY:
            raise LocalProtocolError(f"cannot reply in state {self.state.name}")
        packed = packed_ip(host)
        if packed is None or len(packed) != 4:
            packed = bytes(4)
        return HEAD.pack(REPLY_VERSION, GRANTED, port, packed)

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

    def _field_end(self, start: int, what: str) -> int:
        """Index of the NUL ending the field at `start`, or -1 while it is incomplete."""
        end = self._buffer.find(b"\0", start, start + MAX_FIELD + 1)
        if end < 0 and len(self._buffer) > start + MAX_FIELD:
            raise ProtocolError(f"SOCKS4 {what} longer than {MAX_FIELD} bytes")
        return end

    def _text(self, start: int, end: int, what: str) -> str:
        try:
            return bytes(self._buffer[start:end]).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"SOCKS4 {what} is not valid UTF-8") from None
