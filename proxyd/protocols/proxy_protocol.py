"""PROXY protocol v1 and v2 (HAProxy's proxy-protocol.txt), receiver side, sans-I/O.

A load balancer in front of proxyd may prepend one PROXY header to each
connection to say whom it accepted it from. Feed the first bytes with
`receive_data` and call `next_event` until it returns the `ProxyHeader`; what
follows the header is `trailing_data`, the start of the client's own protocol.
The header is parsed exactly once; asking for another event afterwards raises
LocalProtocolError.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

from proxyd.errors import LocalProtocolError, ProtocolError
from proxyd.protocols.common import NEED_DATA, NeedData

V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the longest v1 line, CRLF included (spec section 2.1)
SIGNATURE_V2: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED: Final = 16  # signature, version/command, family/transport, length
V2_MAX: Final = V2_FIXED + 0xFFFF  # the length field is 16 bits

# v2 type-length-value types the spec assigns (section 2.2.1 ff.); others pass through.
TLV_ALPN: Final = 0x01
TLV_AUTHORITY: Final = 0x02
TLV_CRC32C: Final = 0x03
TLV_NOOP: Final = 0x04
TLV_UNIQUE_ID: Final = 0x05
TLV_SSL: Final = 0x20
TLV_NETNS: Final = 0x30

_COMMAND_LOCAL: Final = 0x0
_COMMAND_PROXY: Final = 0x1
_FAMILY_UNSPEC: Final = 0x0
_FAMILY_INET: Final = 0x1
_FAMILY_INET6: Final = 0x2
_FAMILY_UNIX: Final = 0x3
_TRANSPORT_UNSPEC: Final = 0x0
_TRANSPORT_STREAM: Final = 0x1
_TRANSPORT_DGRAM: Final = 0x2
# address block sizes: two addresses, plus two ports for the IP families
_ADDRESS_LENGTHS: Final = {_FAMILY_INET: 12, _FAMILY_INET6: 36, _FAMILY_UNIX: 216}
_V1_FAMILIES: Final = {"TCP4": 4, "TCP6": 6}  # the IP version each word requires
_TLV_HEAD: Final = 3  # type (1 byte) and length (2 bytes, big-endian)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the balancer said about the connection it relays.

    `source` and `destination` are None for a LOCAL (v2) or UNKNOWN (v1) header,
    or for a family with no IP address (AF_UNIX, UNSPEC): the connection's own
    addresses then stand.
    """

    version: int  # 1 or 2
    source: tuple[str, int] | None  # the client as the balancer saw it: (ip, port)
    destination: tuple[str, int] | None  # the address the client connected to
    tlvs: tuple[tuple[int, bytes], ...] = ()  # v2 type-length-values, in order (v1: empty)

    @property
    def local(self) -> bool:
        return self.source is None


def starts_like_header(data: bytes) -> bool | None:
    """Whether the bytes a connection starts with are (the start of) a PROXY header.

    True once the full b"PROXY " or the full 12-byte v2 signature is there;
    None while `data` is a proper prefix of either (b"", b"PRO", b"\\r\\n\\r"), so
    the caller waits for more; False when it cannot be a PROXY header.
    """
    if data.startswith(V1_PREFIX) or data.startswith(SIGNATURE_V2):
        return True
    if V1_PREFIX.startswith(data) or SIGNATURE_V2.startswith(data):
        return None
    return False


class State(enum.Enum):
    AWAIT_HEADER = enum.auto()
    DONE = enum.auto()  # the header was returned; further bytes are trailing data


class ProxyHeaderParser:
    """One connection's PROXY header, v1 or v2, whichever its first bytes say."""

    def __init__(self) -> None:
        self.state = State.AWAIT_HEADER
        # Before the header is whole this holds at most V1_MAX or V2_MAX bytes of it
        # (more only when one chunk also brought the end); afterwards, trailing data.
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_event(self) -> ProxyHeader | NeedData:
        if self.state is not State.AWAIT_HEADER:
            raise LocalProtocolError(f"no event to read in state {self.state.name}")
        looks = starts_like_header(bytes(self._buffer[: len(SIGNATURE_V2)]))
        if looks is None:
            return NEED_DATA
        if not looks:
            raise ProtocolError("not a PROXY protocol header")
        if self._buffer[0] == V1_PREFIX[0]:
            return self._parse_v1()
        return self._parse_v2()

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after the header: the start of its own protocol."""
        if self.state is not State.DONE:
            raise LocalProtocolError("trailing data exists only once the header is parsed")
        return bytes(self._buffer)

    def _finish(self, length: int, header: ProxyHeader) -> ProxyHeader:
        del self._buffer[:length]
        self.state = State.DONE
        return header

    def _parse_v1(self) -> ProxyHeader | NeedData:
        buf = self._buffer
        end = buf.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            # A lone LF can never become part of a CRLF, so fail now rather than at 107.
            if buf.find(b"\n", 0, V1_MAX) >= 0:
                raise _v1_error("stray CR or LF")
            if len(buf) >= V1_MAX:
                raise _v1_error(f"no CRLF within {V1_MAX} bytes")
            return NEED_DATA
        return self._finish(end + 2, _parse_v1_line(bytes(buf[:end])))

    def _parse_v2(self) -> ProxyHeader | NeedData:
        buf = self._buffer
        # Check each fixed byte as soon as it is in, to refuse garbage before its body.
        _check_v2_fixed(buf)
        if len(buf) < V2_FIXED:
            return NEED_DATA
        command, family, transport = buf[12] & 0xF, buf[13] >> 4, buf[13] & 0xF
        (length,) = struct.unpack_from("!H", buf, 14)
        # The spec has UNSPEC mean "ignore the address information", and LOCAL discard
        # the whole block: only PROXY over a known family and STREAM carries addresses.
        has_addresses = (
            command == _COMMAND_PROXY
            and family != _FAMILY_UNSPEC
            and transport == _TRANSPORT_STREAM
        )
        needed = _ADDRESS_LENGTHS[family] if has_addresses else 0
        if length < needed:
            raise _v2_error(f"length {length} too short for address family {family}")
        total = V2_FIXED + length
        if len(buf) < total:
            return NEED_DATA
        if not has_addresses:
            return self._finish(total, ProxyHeader(2, None, None))
        block = bytes(buf[V2_FIXED:total])
        tlvs = _parse_tlvs(block, needed)
        if family == _FAMILY_UNIX:  # paths, not addresses a rule or the log could use
            return self._finish(total, ProxyHeader(2, None, None, tlvs))
        size = 4 if family == _FAMILY_INET else 16
        source_ip = ipaddress.ip_address(block[:size])
        dest_ip = ipaddress.ip_address(block[size : 2 * size])
        source_port, dest_port = struct.unpack_from("!HH", block, 2 * size)
        header = ProxyHeader(2, (str(source_ip), source_port), (str(dest_ip), dest_port), tlvs)
        return self._finish(total, header)


def _check_v2_fixed(buf: bytearray) -> None:
    """Refuse a bad version/command or family/transport byte among those that arrived."""
    if len(buf) > 12:
        version, command = buf[12] >> 4, buf[12] & 0xF
        if version != 2:
            raise _v2_error(f"version {version}, expected 2")
        if command not in (_COMMAND_LOCAL, _COMMAND_PROXY):
            raise _v2_error(f"unknown command {command}")
    if len(buf) > 13:
        family, transport = buf[13] >> 4, buf[13] & 0xF
        if family != _FAMILY_UNSPEC and family not in _ADDRESS_LENGTHS:
            raise _v2_error(f"unknown address family {family}")
        if transport not in (_TRANSPORT_UNSPEC, _TRANSPORT_STREAM, _TRANSPORT_DGRAM):
            raise _v2_error(f"unknown transport {transport}")
        if command == _COMMAND_PROXY and transport == _TRANSPORT_DGRAM:
            raise _v2_error("not a stream connection")


def _v1_error(problem: str) -> ProtocolError:
    return ProtocolError(f"malformed PROXY v1 header: {problem}")


def _v2_error(problem: str) -> ProtocolError:
    return ProtocolError(f"malformed PROXY v2 header: {problem}")


def _parse_v1_line(line: bytes) -> ProxyHeader:
    """A v1 line from b"PROXY " up to its CRLF (excluded)."""
    if not line.isascii():
        raise _v1_error("not ASCII")
    if b"\r" in line or b"\n" in line:
        raise _v1_error("stray CR or LF")
    fields = line.decode("ascii").split(" ")
    if fields[1] == "UNKNOWN":
        # The sender may put anything after UNKNOWN, and the receiver must ignore it.
        return ProxyHeader(1, None, None)
    if "" in fields:
        raise _v1_error("empty field (a double or trailing space)")
    version = _V1_FAMILIES.get(fields[1])
    if version is None:
        raise _v1_error("bad protocol family")
    if len(fields) != 6:
        raise _v1_error(f"{len(fields)} fields, expected 6")
    _, _, source, destination, source_port, dest_port = fields
    return ProxyHeader(
        1,
        (_v1_address(version, source, "source"), _v1_port(source_port, "source")),
        (_v1_address(version, destination, "destination"), _v1_port(dest_port, "destination")),
    )


def _v1_address(version: int, text: str, what: str) -> str:
    # ipaddress takes "fe80::1%eth0", but a scope means nothing to the receiver.
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise _v1_error(f"bad {what} address") from None
    if address.version != version or "%" in text:
        raise _v1_error(f"bad {what} address")
    return str(address)


def _v1_port(text: str, what: str) -> int:
    # Leading zeros are refused lest they be read as octal (spec section 2.1).
    if not text.isdigit() or len(text) > 5 or (text[0] == "0" and text != "0"):
        raise _v1_error(f"bad {what} port")
    port = int(text)
    if port > 0xFFFF:
        raise _v1_error(f"bad {what} port")
    return port


def _parse_tlvs(block: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    """The type-length-values filling `block` from `offset` to its end."""
    tlvs = []
    while offset < len(block):
        if len(block) - offset < _TLV_HEAD:
            raise _v2_error("TLV overruns the header")
        tlv_type = block[offset]
        (tlv_length,) = struct.unpack_from("!H", block, offset + 1)
        start = offset + _TLV_HEAD
        offset = start + tlv_length
        if offset > len(block):
            raise _v2_error("TLV overruns the header")
        tlvs.append((tlv_type, block[start:offset]))
    return tuple(tlvs)
