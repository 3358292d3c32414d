"""A minimal SOCKS5 client for tests where the exact reply bytes matter."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def address(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode()
        return b"\x03" + bytes([len(name)]) + name + struct.pack("!H", port)
    atyp = b"\x01" if ip.version == 4 else b"\x04"
    return atyp + ip.packed + struct.pack("!H", port)


def read_reply(sock: socket.socket) -> tuple[int, str, int]:
    """(REP, BND.ADDR, BND.PORT) of a SOCKS5 reply."""
    ver, rep, _rsv, atyp = recv_exact(sock, 4)
    assert ver == 5
    if atyp == 1:
        host = str(ipaddress.IPv4Address(recv_exact(sock, 4)))
    elif atyp == 4:
        host = str(ipaddress.IPv6Address(recv_exact(sock, 16)))
    else:
        host = recv_exact(sock, recv_exact(sock, 1)[0]).decode()
    (port,) = struct.unpack("!H", recv_exact(sock, 2))
    return rep, host, port


def connect(
    proxy: tuple[str, int],
    host: str,
    port: int,
    *,
    auth: tuple[str, str] | None = None,
    command: int = 1,
    timeout: float = 10.0,
    source: str | None = None,
) -> tuple[socket.socket, int, str, int]:
    """Open a tunnel; returns (socket, REP, BND.ADDR, BND.PORT), or REP -1 when the
    credentials are refused. The socket stays open. `source`: the client's own address."""
    sock = socket.create_connection(
        proxy, timeout=timeout, source_address=None if source is None else (source, 0)
    )
    try:
        sock.sendall(b"\x05\x01\x02" if auth else b"\x05\x01\x00")
        method = recv_exact(sock, 2)
        if auth:
            assert method == b"\x05\x02", method
            user, password = (s.encode() for s in auth)
            sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            status = recv_exact(sock, 2)
            if status != b"\x01\x00":
                return sock, -1, "", 0
        else:
            assert method == b"\x05\x00", method
        sock.sendall(b"\x05" + bytes([command]) + b"\x00" + address(host, port))
        rep, bnd_host, bnd_port = read_reply(sock)
    except BaseException:
        sock.close()
        raise
    return sock, rep, bnd_host, bnd_port


def open_tunnel(proxy: tuple[str, int], host: str, port: int, **kwargs: Any) -> socket.socket:
    """A tunnel that must be granted (REP 0), as `connect` opens it; the socket stays open."""
    sock, rep, _, _ = connect(proxy, host, port, **kwargs)
    if rep != 0:
        sock.close()
        raise AssertionError(f"tunnel to {host}:{port} refused: REP {rep}")
    return sock
