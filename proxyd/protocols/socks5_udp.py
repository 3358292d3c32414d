"""The header of SOCKS5 UDP ASSOCIATE datagrams (RFC 1928 section 7), sans-I/O.

Each datagram between a client and its relay starts with RSV(2) FRAG ATYP
DST.ADDR DST.PORT: to the relay, where the payload goes; from it, where the
payload came from. proxyd.udp is the relay around these.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxyd.errors import ProtocolError
from proxyd.protocols.socks5 import pack_address, unpack_address


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    host: str
    port: int
    payload: bytes


def parse_udp(data: bytes) -> UdpDatagram:
    """RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA; ProtocolError when malformed or a
    fragment (FRAG != 0: proxyd, like most relays, does not reassemble)."""
    if len(data) < 4:
        raise ProtocolError("datagram shorter than a SOCKS5 UDP header")
    if data[0] or data[1]:
        raise ProtocolError("reserved bytes of a UDP header are not zero")
    if data[2]:
        raise ProtocolError(f"fragment {data[2]} (fragments are not reassembled)")
    parsed = unpack_address(data, 3)
    if parsed is None:
        raise ProtocolError("datagram cut off inside its address")
    host, port, _atyp, end = parsed
    return UdpDatagram(host, port, data[end:])


def udp_header(host: str, port: int) -> bytes:
    """The header that wraps a datagram sent to the client from host:port."""
    return b"\0\0\0" + pack_address(host, port)
