"""One client connection: detect its protocol, drive the handshake, connect, relay, log once.

The protocol handlers do the I/O their sans-I/O parser asks for; everything
common (timeouts, refusal on error, the relay, the access event) lives in
Session.run so every protocol behaves alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass
from typing import Any, Protocol

from proxyd import upstream
from proxyd.auth import Authenticator
from proxyd.config import Config
from proxyd.errors import (
    REP_SUCCEEDED,
    AuthFailed,
    OverLimit,
    ProtocolError,
    SessionError,
    Unsupported,
)
from proxyd.log import access
from proxyd.protocols import http as http_proto
from proxyd.protocols import socks5
from proxyd.protocols.common import NEED_DATA, Credentials, format_hostport
from proxyd.protocols.detect import Kind, sniff
from proxyd.relay import Tunnel

# Handshake reads are small: a request is at most a few KiB, and what a client
# sends beyond it stays in the kernel until the relay reads it.
HANDSHAKE_READ = 4096


class ClientClosed(SessionError):
    status = "client_closed"


class HandshakeTimeout(SessionError):
    status = "handshake_timeout"
    http_status = 408


@dataclass(slots=True)
class Context:
    """What every session of one daemon shares."""

    config: Config
    auth: Authenticator
    resolver: upstream.Resolver
    log: Any


class Handler(Protocol):
    protocol: str

    async def handshake(self, first: bytes) -> tuple[str, int]: ...
    async def established(self, bound: tuple[str, int]) -> bytes: ...
    def refusal(self, error: SessionError) -> bytes | None: ...


class Session:
    def __init__(
        self,
        ctx: Context,
        sock: socket.socket,
        peer: tuple[Any, ...],
        conn_id: int,
        *,
        over_limit: bool = False,
    ) -> None:
        self.ctx = ctx
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.conn_id = conn_id
        self.client = format_hostport(peer[0], peer[1])
        self.over_limit = over_limit
        self.user: str | None = None
        self.protocol: str | None = None
        self.command: str | None = None
        self.target: str | None = None

    async def recv(self) -> bytes:
        # The request is usually here already: try before asking the loop to wait
        # (uvloop's sock_recv always registers a reader first, two epoll_ctl calls).
        try:
            data = self.sock.recv(HANDSHAKE_READ)
        except (BlockingIOError, InterruptedError):
            data = await self.loop.sock_recv(self.sock, HANDSHAKE_READ)
        if not data:
            raise ClientClosed("client closed the connection during the handshake")
        return data

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def check_credentials(self, credentials: Credentials | None) -> None:
        """Require valid credentials when users are configured; record the user name."""
        if not self.ctx.auth.required:
            return
        if credentials is None:
            raise AuthFailed("credentials required")
        self.user = credentials.username
        if self.over_limit:
            return  # refused after the request anyway: spend no KDF on it
        if not await self.ctx.auth.verify(credentials):
            raise AuthFailed("wrong user name or password")

    def _handler(self, first: bytes) -> Handler:
        kind = sniff(first)
        if kind is Kind.SOCKS5:
            return Socks5Handler(self)
        if kind is Kind.HTTP:
            return HttpHandler(self)
        if kind is Kind.SOCKS4:
            self.protocol = "socks4"
            raise Unsupported("SOCKS4 is not supported yet")
        raise ProtocolError(f"unknown protocol (first byte {first[0]:#04x})")

    async def run(self) -> None:
        cfg = self.ctx.config
        started = time.monotonic()
        handler: Handler | None = None
        remote: socket.socket | None = None
        tunnel: Tunnel | None = None
        status, error = "ok", None
        try:
            deadline = asyncio.timeout(cfg.timeouts.handshake)
            try:
                async with deadline:
                    first = await self.recv()
                    handler = self._handler(first)
                    self.protocol = handler.protocol
                    host, port = await handler.handshake(first)
            except TimeoutError:
                if not deadline.expired():
                    raise  # the client's socket timed out, not our deadline
                raise HandshakeTimeout(
                    f"no complete request within {cfg.timeouts.handshake:g} s"
                ) from None
            if self.over_limit:
                raise OverLimit(f"server.max_connections ({cfg.server.max_connections}) reached")
            remote = await upstream.connect(
                host,
                port,
                resolver=self.ctx.resolver,
                timeout=cfg.timeouts.connect,
                buffers=cfg.buffers,
            )
            first_up = await handler.established(remote.getsockname()[:2])
            tunnel = Tunnel(
                self.sock,
                remote,
                read_size=cfg.buffers.read_size,
                idle=cfg.timeouts.idle,
                splice=cfg.buffers.splice,
            )
            await tunnel.run(first_up)
            status, error = tunnel.status, tunnel.error
        except SessionError as exc:
            status, error = exc.status, str(exc)
            answer = handler.refusal(exc) if handler is not None else None
            if answer:
                self._send_nowait(answer)
        except OSError as exc:  # the client's socket: upstream failures are SessionErrors
            status, error = "client_closed", exc.strerror or type(exc).__name__
        except asyncio.CancelledError:
            status = "shutdown"
            raise
        except Exception as exc:
            status, error = "error", f"internal error: {type(exc).__name__}"
            self.ctx.log.exception("session_error", conn_id=self.conn_id)
        finally:
            self.sock.close()
            if remote is not None:
                remote.close()
            if cfg.log.access:
                access(
                    conn_id=self.conn_id,
                    client=self.client,
                    user=self.user,
                    protocol=self.protocol,
                    command=self.command,
                    target=self.target,
                    status=status,
                    bytes_up=tunnel.bytes_up if tunnel else 0,
                    bytes_down=tunnel.bytes_down if tunnel else 0,
                    duration_ms=round((time.monotonic() - started) * 1000, 1),
                    **({"error": error} if error else {}),
                )

    def _send_nowait(self, data: bytes) -> None:
        """A refusal is a few bytes into an idle socket: one send, never a wait."""
        with contextlib.suppress(OSError):
            self.sock.send(data)


class Socks5Handler:
    protocol = "socks5"

    def __init__(self, session: Session) -> None:
        self.session = session
        self.parser = socks5.Socks5Server()

    async def _next_event(self) -> socks5.Event:
        while (event := self.parser.next_event()) is NEED_DATA:
            self.parser.receive_data(await self.session.recv())
        return event

    async def handshake(self, first: bytes) -> tuple[str, int]:
        session, parser = self.session, self.parser
        parser.receive_data(first)
        greeting = await self._next_event()
        assert isinstance(greeting, socks5.Greeting)
        required = session.ctx.auth.required
        wanted = socks5.METHOD_USERNAME_PASSWORD if required else socks5.METHOD_NO_AUTH
        method = wanted if wanted in greeting.methods else socks5.METHOD_NO_ACCEPTABLE
        await session.send(parser.choose_method(method))
        if method == socks5.METHOD_NO_ACCEPTABLE:
            if required:
                raise AuthFailed("client offered no username/password method")
            raise ProtocolError("client did not offer the no-authentication method")
        if method == socks5.METHOD_USERNAME_PASSWORD:
            credentials = await self._next_event()
            assert isinstance(credentials, Credentials)
            try:
                await session.check_credentials(credentials)
            except AuthFailed:
                await session.send(parser.auth_result(False))
                raise
            await session.send(parser.auth_result(True))
        request = await self._next_event()
        assert isinstance(request, socks5.Request)
        session.command = request.command.name.lower()
        session.target = format_hostport(request.host, request.port)
        if request.command is not socks5.Command.CONNECT:
            raise Unsupported(f"SOCKS5 {session.command} is not supported yet")
        return request.host, request.port

    async def established(self, bound: tuple[str, int]) -> bytes:
        await self.session.send(self.parser.reply(REP_SUCCEEDED, *bound))
        return self.parser.trailing_data

    def refusal(self, error: SessionError) -> bytes | None:
        if self.parser.state in (socks5.State.AWAIT_REQUEST, socks5.State.REPLY):
            return self.parser.reply(error.socks_reply)
        return None


class HttpHandler:
    protocol = "http"

    def __init__(self, session: Session) -> None:
        self.session = session
        self.parser = http_proto.HttpProxyServer()

    async def handshake(self, first: bytes) -> tuple[str, int]:
        session, parser = self.session, self.parser
        parser.receive_data(first)
        while (event := parser.next_event()) is NEED_DATA:
            parser.receive_data(await session.recv())
        assert isinstance(event, http_proto.ConnectRequest | http_proto.ForwardRequest)
        if isinstance(event, http_proto.ConnectRequest):
            session.command = "connect"
            session.target = format_hostport(event.host, event.port)
        else:
            session.command = event.method
            origin = http_proto.absolute_origin(event.target)
            if origin is not None:
                session.target = format_hostport(*origin)
        await session.check_credentials(event.credentials)
        if isinstance(event, http_proto.ForwardRequest):
            if session.target is not None:
                raise Unsupported("plain HTTP forwarding is not supported yet; use CONNECT")
            raise ProtocolError("this is a proxy: send CONNECT host:port")
        return event.host, event.port

    async def established(self, bound: tuple[str, int]) -> bytes:
        await self.session.send(self.parser.established())
        return self.parser.trailing_data

    def refusal(self, error: SessionError) -> bytes | None:
        if isinstance(error, ClientClosed):
            return None
        return self.parser.error_response(error.http_status, str(error))
