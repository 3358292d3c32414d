"""The protocol handlers: what each protocol's handshake asks of the connection's
driver (the session), from the client's first bytes to the request.

Before any protocol, a trusted load balancer's PROXY header names the client
(`ProxyHeader`), and the first bytes show the protocol (`Front`). A handler then
feeds the bytes read to its sans-I/O parser (proxyd.protocols) and turns the
events into calls on a Driver: send a reply, check credentials, then connect,
bind, associate or forward. It also turns the outcome into that protocol's own
answer (a SOCKS reply, an HTTP status). It never touches a socket; everything
common to the protocols lives in the driver.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any, Protocol

from proxyd import gate
from proxyd.context import Conn, Context
from proxyd.errors import (
    REP_SUCCEEDED,
    AuthFailed,
    ClientClosed,
    LocalProtocolError,
    ProtocolError,
    SessionError,
)
from proxyd.protocols import http as http_proto
from proxyd.protocols import proxy_protocol, socks4, socks5
from proxyd.protocols.common import NEED_DATA, Credentials
from proxyd.protocols.detect import Kind, sniff

Answer = Callable[[str, int], None]  # a reply naming an address (BIND's first, UDP's)


class ProxyHeader:
    """The PROXY protocol header (v1 or v2) a trusted load balancer sends before
    anything else: once whole, the client it names is the connection's client."""

    __slots__ = ("conn", "parser")

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.parser = proxy_protocol.ProxyHeaderParser()

    def received(self, data: bytes) -> bytes | None:
        """The bytes that came after the header once it is whole; None until then."""
        conn = self.conn
        if conn.proxied_by is None:  # the first bytes: they must start a header
            conn.proxied_by = conn.client
            if proxy_protocol.starts_like_header(data) is False:
                raise ProtocolError(
                    f"no PROXY protocol header from {conn.peer_ip} "
                    "(server.proxy_protocol_from requires one)"
                )
        self.parser.receive_data(data)
        header = self.parser.next_event()
        if header is NEED_DATA:
            return None
        assert isinstance(header, proxy_protocol.ProxyHeader)
        if header.source is not None:
            ip = ipaddress.ip_address(header.source[0])
            # an IPv4 client a dual-stack balancer names as ::ffff:a.b.c.d is that
            # IPv4 address to the logs, the limits and the UDP relay
            mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
            conn.named(str(mapped or ip), header.source[1])
        return self.parser.trailing_data


class Front:
    """Every connection's first handler: a trusted balancer's PROXY header (then the
    client is counted for the limits), TLS when the client starts with it, and the
    protocol the first bytes show, whose handler takes over."""

    __slots__ = ("admission", "conn", "driver", "header", "in_tls")
    protocol = "unknown"

    def __init__(self, driver: Driver, conn: Conn, admission: gate.Admission) -> None:
        self.driver = driver
        self.conn = conn
        self.admission = admission
        self.header = ProxyHeader(conn) if admission.awaits_header else None
        self.in_tls = False

    def received(self, data: bytes) -> None:
        if self.header is not None:
            rest = self.header.received(data)
            if rest is None:
                return
            self.header = None
            self.admission.count_client(self.conn.peer_ip)
            if not rest:
                return
            data = rest
        if not self.in_tls and proxy_protocol.starts_like_header(data):
            raise ProtocolError(
                f"a PROXY protocol header from {self.conn.peer_ip}, "
                "which server.proxy_protocol_from does not trust"
                if self.conn.proxied_by is None
                else "a second PROXY protocol header"
            )
        kind = sniff(data)
        handler: Handler
        if kind is Kind.SOCKS5:
            handler = Socks5Handler(self.driver)
        elif kind is Kind.HTTP:
            handler = HttpHandler(self.driver)
        elif kind is Kind.SOCKS4:
            handler = Socks4Handler(self.driver)
        elif kind is Kind.TLS and not self.in_tls and self.driver.ctx.tls is not None:
            self.in_tls = True
            self.driver.start_tls(data)
            return
        elif kind is Kind.TLS:
            raise ProtocolError(
                "a TLS handshake inside TLS" if self.in_tls else "TLS, but no [tls] certificate"
            )
        else:
            raise ProtocolError(f"unknown protocol (first byte {data[0]:#04x})")
        self.driver.detected(handler)
        handler.received(data)

    def established(self, bound: tuple[str, int]) -> bytes:
        raise LocalProtocolError("no request has been made yet")

    def said_more(self) -> bool:
        return False

    def refusal(self, error: SessionError) -> bytes | None:
        return None  # no protocol to answer in


class Driver(Protocol):
    """What a handler may ask of the connection it serves."""

    @property
    def ctx(self) -> Context: ...

    def start_tls(self, first: bytes) -> None:
        """The client starts a TLS handshake with `first`."""

    def detected(self, handler: Handler) -> None:
        """The first bytes showed the protocol: `handler` takes over."""

    def send(self, data: bytes) -> None:
        """A handshake reply, now."""

    def authenticate(self, credentials: Credentials | None, then: Callable[[], None]) -> None:
        """Check the credentials (or their absence) by the gate, then go on with `then`."""

    def requested(self, command: str, host: str | None, port: int) -> None:
        """The request is whole: `command` to host:port (the access line's)."""

    def connect(self, host: str, port: int) -> None:
        """Reach host:port and relay; `Handler.established` answers the client."""

    def bind(self, host: str, port: int, listening: Answer) -> None:
        """Listen for the peer `host` names; `listening` tells the client where."""

    def associate(self, host: str, port: int, reply: Answer) -> None:
        """Relay the client's datagrams; `reply` gives it the relay's address."""

    def forward(self, parser: http_proto.HttpProxyServer) -> None:
        """Serve plain HTTP requests from this one on."""


class Worker(Protocol):
    """What takes a connection over once its request is whole: a tunnel, forwarding,
    a UDP association. The session reads these to end the connection."""

    @property
    def answered(self) -> bool:
        """Whether the request was answered: until then a failure is the session's
        to answer, with the protocol's own refusal."""

    @property
    def between_requests(self) -> bool:
        """Idle between a client's requests: closed at once when the daemon drains."""

    @property
    def cut(self) -> bool:
        """Its stream was broken off: the client's connection is reset, not ended."""

    @property
    def logged(self) -> bool:
        """Whether it wrote the access lines itself."""

    def usage(self) -> tuple[int, int, int, int]:
        """Bytes up and down, datagrams up and down, relayed so far."""

    def fields(self) -> dict[str, Any]:
        """What the connection's access line says of it (bytes, datagrams, route)."""


class Handler(Protocol):
    protocol: str

    def received(self, data: bytes) -> None:
        """Bytes from the client, during the handshake."""

    def established(self, bound: tuple[str, int]) -> bytes:
        """Tell the client the tunnel is up (`bound`: our end, or BIND's peer); the
        bytes it sent after its request, for the target."""

    def said_more(self) -> bool:
        """Whether the client sent bytes after its request, read with it."""

    def refusal(self, error: SessionError) -> bytes | None:
        """The protocol's answer to a failure, if it still has one to give."""


class Socks5Handler:
    __slots__ = ("driver", "parser")
    protocol = "socks5"

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.parser = socks5.Socks5Server()

    def received(self, data: bytes) -> None:
        self.parser.receive_data(data)
        self._advance()

    def _advance(self) -> None:
        """Act on each complete message the client has sent, until one needs a wait."""
        while (event := self.parser.next_event()) is not NEED_DATA:
            if isinstance(event, socks5.Greeting):
                self._greeting(event)
            elif isinstance(event, Credentials):
                self.driver.authenticate(event, self._authenticated)
                return
            else:
                assert isinstance(event, socks5.Request)
                self._request(event)
                return

    def _greeting(self, greeting: socks5.Greeting) -> None:
        driver, parser = self.driver, self.parser
        required = gate.credentials_required(driver.ctx)
        wanted = socks5.METHOD_USERNAME_PASSWORD if required else socks5.METHOD_NO_AUTH
        method = wanted if wanted in greeting.methods else socks5.METHOD_NO_ACCEPTABLE
        driver.send(parser.choose_method(method))
        if method == socks5.METHOD_NO_ACCEPTABLE:
            if required:
                raise AuthFailed("client offered no username/password method")
            raise ProtocolError("client did not offer the no-authentication method")

    def _authenticated(self) -> None:
        self.driver.send(self.parser.auth_result(True))
        self._advance()  # the request may have come along with the credentials

    def _request(self, request: socks5.Request) -> None:
        driver, command = self.driver, request.command
        driver.requested(command.name.lower(), request.host, request.port)
        if command is socks5.Command.UDP_ASSOCIATE:
            driver.associate(request.host, request.port, self._reply)
        elif command is socks5.Command.BIND:
            driver.bind(request.host, request.port, self._listening)
        else:
            driver.connect(request.host, request.port)

    def _listening(self, host: str, port: int) -> None:
        self.driver.send(self.parser.bind_listening(host, port))

    def _reply(self, host: str, port: int) -> None:
        self.driver.send(self.parser.reply(REP_SUCCEEDED, host, port))

    def established(self, bound: tuple[str, int]) -> bytes:
        self.driver.send(self.parser.reply(REP_SUCCEEDED, *bound))
        return self.parser.trailing_data

    def said_more(self) -> bool:
        return self.parser.said_more

    def refusal(self, error: SessionError) -> bytes | None:
        state = self.parser.state
        if state is socks5.State.CHECK_AUTH:  # RFC 1929: a failure status, then close
            return self.parser.auth_result(False)
        if state in (socks5.State.AWAIT_REQUEST, socks5.State.REPLY):
            return self.parser.reply(error.socks_reply)
        return None


class Socks4Handler:
    """SOCKS4 and 4a: one request, one reply. There is no password: the gate decides
    whether that is acceptable (`auth.allow_socks4`)."""

    __slots__ = ("driver", "parser")
    protocol = "socks4"

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.parser = socks4.Socks4Server()

    def received(self, data: bytes) -> None:
        self.parser.receive_data(data)
        request = self.parser.next_event()
        if request is NEED_DATA:
            return
        assert isinstance(request, socks4.Request)
        driver = self.driver
        driver.requested(request.command.name.lower(), request.host, request.port)
        if request.command is socks4.Command.BIND:
            driver.authenticate(
                None, lambda: driver.bind(request.host, request.port, self._listening)
            )
        else:
            driver.authenticate(None, lambda: driver.connect(request.host, request.port))

    def _listening(self, host: str, port: int) -> None:
        self.driver.send(self.parser.bind_listening(host, port))

    def established(self, bound: tuple[str, int]) -> bytes:
        self.driver.send(self.parser.reply(True, *bound))
        return self.parser.trailing_data

    def said_more(self) -> bool:
        return self.parser.said_more

    def refusal(self, error: SessionError) -> bytes | None:
        if self.parser.state in (socks4.State.AWAIT_REQUEST, socks4.State.REPLY):
            return self.parser.reply(False)
        return None


class HttpHandler:
    """The first request of an HTTP connection: a CONNECT is a tunnel; any other is
    handed to forwarding, which checks credentials and reads bodies itself."""

    __slots__ = ("driver", "parser")
    protocol = "http"

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.parser = http_proto.HttpProxyServer()

    def received(self, data: bytes) -> None:
        driver, parser = self.driver, self.parser
        parser.receive_data(data)
        event = parser.next_event()
        if event is NEED_DATA:
            return
        if isinstance(event, http_proto.ConnectRequest):
            connect = event
            driver.requested("connect", connect.host, connect.port)
            driver.authenticate(
                connect.credentials, lambda: driver.connect(connect.host, connect.port)
            )
            return
        assert isinstance(event, http_proto.ForwardRequest)
        origin = http_proto.absolute_origin(event.target)
        driver.requested(event.method, *(origin or (None, 0)))
        driver.forward(parser)

    def established(self, bound: tuple[str, int]) -> bytes:
        self.driver.send(self.parser.established())
        return self.parser.trailing_data

    def said_more(self) -> bool:
        return self.parser.said_more

    def refusal(self, error: SessionError) -> bytes | None:
        if isinstance(error, ClientClosed):
            return None
        return self.parser.error_response(
            error.http_status, str(error), retry_after=error.retry_after
        )
