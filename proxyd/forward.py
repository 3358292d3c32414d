"""Plain HTTP forwarding: absolute-form requests (`GET http://host/path`) sent on to
their origin, with h11 on both sides.

A client connection that sends such a request gets one task for as long as it
keeps the connection alive (unlike a tunnel, where the task would cost more than
the bytes). Bodies stream both ways chunk by chunk, never held whole; the
upstream connection is kept for the client's next request to the same origin;
hop-by-hop headers are dropped and `Via` added. Every request gets its own
access line, under the connection's `conn_id`.

Unlike a tunnel, these bytes cannot go through the relay: every message is
parsed both ways (h11 frames the bodies and each request may go to another
origin), so this is a second byte mover. It keeps to the same rules as the relay:
the user's rate through the same bucket, `timeouts.idle` on every wait, a reset
passed on as a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.parse
from collections.abc import Awaitable
from typing import Any, Final, TypeVar

import h11

from proxyd import access, gate
from proxyd.chain import ChainConnector, Lease, Pool
from proxyd.context import Conn, Context
from proxyd.dial import Route, connect
from proxyd.errors import (
    ClientClosed,
    Denied,
    ParentError,
    ProtocolError,
    SessionError,
    Status,
    UpstreamBroken,
    UpstreamTimeout,
)
from proxyd.parents import Parent
from proxyd.protocols.common import format_hostport
from proxyd.protocols.http import (
    DEFAULT_MAX_HEAD,
    PAC_PATH,
    VIA,
    HttpProxyServer,
    absolute_origin,
    ambiguous_framing,
    basic_authorization,
    check_host_header,
    client_event,
    end_to_end,
    head_size,
    pac_file,
    parse_basic_credentials,
)

# Reads while a request head is awaited: small, as the first request's are, so that
# h11's limit on an incomplete head (16 KiB) also bounds a head that comes whole
HEAD_READ: Final = 4096
# How long to wait for an origin's "100 Continue" before sending the body anyway
# (an HTTP/1.0 origin never answers one), as curl does.
CONTINUE_WAIT: Final = 1.0
# How long to take (and drop) a client's body after answering it early, before closing
LINGER: Final = 2.0
LINGER_QUIET: Final = 0.5  # ... or until it has sent nothing for this long

T = TypeVar("T")


class _Origin:
    """One upstream connection and its h11 client state: to the origin itself, or
    through a parent proxy (`lease`); `proxy` is an HTTP parent that is sent the
    requests themselves, in absolute form."""

    def __init__(
        self,
        key: tuple[str, int, str | None],
        sock: socket.socket,
        lease: Lease | None = None,
        proxy: Parent | None = None,
        pool: Pool | None = None,
    ) -> None:
        self.key = key
        self.sock = sock
        self.conn = h11.Connection(h11.CLIENT)
        self.lease = lease
        self.proxy = proxy
        self.pool = pool  # the group of the parent, which its failures count against
        self.whole = True  # every byte of our requests went out (none cut off mid-way)

    def quiet(self) -> bool:
        """Still open with nothing unasked-for to read: fit for the next request. An
        origin closes idle connections when it likes (or says 408 first)."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)  # b"": closed; bytes: an unasked answer
        except (BlockingIOError, InterruptedError):
            return True  # nothing to read: still good
        except OSError:
            pass
        return False

    def current(self) -> bool:
        """Not through a parent that a reload removed (or whose URL it changed)."""
        state = self.lease.state if self.lease is not None else None
        return state is None or not state.retired

    def close(self) -> None:
        self.sock.close()
        if self.lease is not None:
            self.lease.release()


class Forwarder:
    """The requests of one client connection, one after another (HTTP/1.1 has no
    interleaving), each sent on to its origin and answered from it."""

    def __init__(
        self,
        ctx: Context,
        conn: Conn,
        sock: socket.socket,
        parser: HttpProxyServer,
        admission: gate.Admission,
    ) -> None:
        self.ctx = ctx
        self.conn = conn
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.client = parser.connection
        self.parser = parser
        self.admission = admission
        self.origin: _Origin | None = None
        cfg = ctx.config
        self.idle = cfg.timeouts.idle
        self.read_size = cfg.buffers.read_size
        self._to_client: list[bytes] = []  # answer bytes not sent yet
        self._queued = 0
        self.lines = 0  # access lines written
        self.between_requests = False  # waiting for the client's next request
        # a request passed the credentials check: until one has, the next request on
        # a kept-alive connection (after a PAC file) must come within
        # timeouts.handshake, so that no client holds a slot without credentials
        self.trusted = False
        self.cut = False  # an answer was broken off: the client's connection is reset
        # per request, for its access line
        self.command: str | None = None
        self.target: str | None = None
        self.bytes_up = 0
        self.bytes_down = 0

    # what the session asks of the worker that took its connection over
    answered: Final = True  # every request is answered (or its client reset) here

    @property
    def logged(self) -> bool:
        """Whether a request wrote its access line (else the connection writes one)."""
        return self.lines > 0

    def usage(self) -> tuple[int, int, int, int]:
        return (0, 0, 0, 0)  # each request counts its own bytes, in its own line

    def fields(self) -> dict[str, int | str]:
        return {}

    async def run(self) -> Status:
        """Serve requests until the client or an answer ends the connection (each wrote
        its own access line)."""
        await self._serve(self.parser.request)
        return Status.OK

    async def _serve(self, request: h11.Request) -> None:
        try:
            while await self._exchange(request):
                if self.ctx.draining:
                    return  # the daemon is stopping: this answer was the last
                self.client.start_next_cycle()
                self.between_requests = True
                try:
                    next_request = await self._next_request()
                except ProtocolError as exc:
                    self._send_client(self.parser.error_response(exc.http_status, str(exc)))
                    self.command = self.target = self.conn.user = None
                    self.bytes_up = self.bytes_down = 0
                    self._log(exc.status, str(exc), time.monotonic())
                    await self._linger()  # the rest of a refused head may still come
                    return
                except (SessionError, OSError):
                    return  # idle past timeouts.idle, or gone, between requests: just close
                finally:
                    self.between_requests = False
                if next_request is None:
                    return
                request = next_request
            if not self.cut and self._body_unread():
                await self._linger()  # answered (or refused) before its whole body came
        finally:
            if self.origin is not None:
                self.origin.close()

    def _body_unread(self) -> bool:
        """Whether the client may still be sending the request's body (a GET's empty
        one, already here, is not: its end is taken now)."""
        if self.client.their_state is not h11.SEND_BODY:
            return False
        try:
            return not isinstance(client_event(self.client), h11.EndOfMessage)
        except ProtocolError:
            return True

    async def _linger(self) -> None:
        """Close gently after an answer (an early one, or an error page such as a 407)
        sent while the client still sends its body:
        say we are done, then take (and drop) what it sends for a while. Closed with
        its bytes unread, the socket would be reset, and the reset can overtake the
        answer on its way to the client (nginx's lingering close does the same)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        deadline = self.loop.time() + LINGER
        with contextlib.suppress(OSError, TimeoutError):
            while (left := deadline - self.loop.time()) > 0:
                async with asyncio.timeout(min(left, LINGER_QUIET)):
                    if not await self.loop.sock_recv(self.sock, self.read_size):
                        return  # the client's end: nothing is left unread

    # -- one request and its answer -------------------------------------------------

    async def _exchange(self, request: h11.Request) -> bool:
        """Forward one request; True when the client connection can carry another."""
        started = time.monotonic()
        self.bytes_up = self.bytes_down = 0
        method = request.method.decode("ascii")
        target = request.target.decode("ascii", "replace")
        self.command = method
        self.target = None
        self.conn.user = None  # this request's own, not the connection's last one
        status, error = Status.OK, None
        extra: dict[str, Any] = {}
        try:
            origin = absolute_origin(target)
            if origin is None:
                await self._answer_local(method, target)
                return self._reusable()
            self.target = format_hostport(*origin)
            if target[:8].lower() == "https://":
                raise ProtocolError("https:// requests go through CONNECT", http_status=400)
            if ambiguous_framing(list(request.headers)):
                raise ProtocolError("request has both Content-Length and Transfer-Encoding")
            check_host_header(request.headers)
            values = [v for k, v in request.headers if k == b"proxy-authorization"]
            credentials = parse_basic_credentials(values[0]) if len(values) == 1 else None
            # every request carries its own Proxy-Authorization (a browser repeats it)
            await gate.verify(self.ctx, self.conn, self.admission, credentials)
            self.trusted = True
            route = await self._watched(gate.route(self.ctx, self.conn, method, *origin))
            if route.via is not None:
                extra["via"] = route.via
            await self._forward(request, origin, target, route, extra)
        except SessionError as exc:
            status, error = exc.status, str(exc)
            if isinstance(exc, Denied):
                extra.update(exc.fields())
            if self.client.our_state is h11.SEND_RESPONSE:
                answer = self.parser.error_response(
                    exc.http_status, str(exc), retry_after=exc.retry_after
                )
                self._send_client(answer)
            else:  # mid-answer: a reset, so that no client takes it for a whole one
                self.cut = True
            return False
        except OSError as exc:  # the client's socket
            status, error = Status.CLIENT_CLOSED, exc.strerror or type(exc).__name__
            return False
        except h11.LocalProtocolError as exc:  # a message h11 will not send on as it came
            # (h11's text may quote a header value: it stays out of the log)
            status = Status.BAD_REQUEST
            error = f"cannot forward this message ({type(exc).__name__})"
            if self.client.our_state is h11.SEND_RESPONSE:
                self._send_client(self.parser.error_response(502, "cannot forward this message"))
            else:
                self.cut = True
            return False
        except asyncio.CancelledError:
            status = Status.SHUTDOWN
            if self.client.our_state is h11.SEND_BODY:
                self.cut = True  # stopped mid-answer: it must not look whole either
            raise
        finally:
            self._log(status, error, started, extra)
        return self._reusable()

    def _reusable(self) -> bool:
        return self.client.our_state is h11.DONE and self.client.their_state is h11.DONE

    async def _forward(
        self,
        request: h11.Request,
        key: tuple[str, int],
        target: str,
        route: Route,
        extra: dict[str, Any],
    ) -> None:
        origin = await self._origin_for(key, route)
        if origin.lease is not None:
            extra["upstream"] = str(origin.lease.parent)
        parts = urllib.parse.urlsplit(target)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        name = f"[{key[0]}]" if ":" in key[0] else key[0]
        host = name if key[1] == 80 else f"{name}:{key[1]}"
        host_value = host.encode("ascii")  # (absolute_origin gave the canonical, ASCII form)
        headers = [(b"host", host_value)]
        headers += [(n, v) for n, v in end_to_end(list(request.headers)) if n != b"host"]
        headers.append((b"via", VIA))
        if origin.proxy is not None:  # an HTTP parent is asked in absolute form, as we were
            path = "http://" + host_value.decode("ascii") + path
            if origin.proxy.credentials is not None:
                headers.append(
                    (b"proxy-authorization", basic_authorization(origin.proxy.credentials).encode())
                )
        expects_continue = any(
            n == b"expect" and v.lower() == b"100-continue" for n, v in request.headers
        )
        head = h11.Request(method=request.method, target=path.encode(), headers=headers)
        await self._origin_send(origin, origin.conn.send(head) or b"")
        early: h11.Response | None = None
        if expects_continue:
            early = await self._await_continue(origin)
        if early is None:
            early = await self._send_body(origin)
        await self._relay_response(origin, early or await self._final_answer(origin))

    async def _await_continue(self, origin: _Origin) -> h11.Response | None:
        """Wait briefly for the origin's 100 (passed on); a final answer instead is returned."""
        try:
            async with asyncio.timeout(CONTINUE_WAIT):
                event = await self._origin_event(origin)
        except TimeoutError:
            return None
        if isinstance(event, h11.InformationalResponse):
            await self._client_send(event)
            await self._flush_client()
            return None
        assert isinstance(event, h11.Response)
        return event

    async def _send_body(self, origin: _Origin) -> h11.Response | None:
        """Send the request's body on; with one, the origin's answer (None: it is yet
        to be read). An origin may answer before it has taken the whole body (a 413,
        a 401, a redirect): the rest is then not sent, and the answer goes to the
        client, whose connection closes after it (its body was not all read)."""
        event = client_event(self.client)
        if isinstance(event, h11.EndOfMessage):  # no body (a GET): nothing to watch for
            await self._origin_send(origin, origin.conn.send(event) or b"")
            return None
        # (the answer is watched for from the start: a client may pause after its head)
        sending = self.loop.create_task(self._send_rest(origin, event))
        answering = self.loop.create_task(self._final_answer(origin))
        try:
            await asyncio.wait((sending, answering), return_when=asyncio.FIRST_COMPLETED)
            if not answering.done():
                error = sending.exception()
                # the origin broke off while we sent: it may have answered first
                if error is not None and not isinstance(error, UpstreamBroken):
                    raise error
            return await answering  # (an answer that came first leaves the body unsent)
        finally:
            for task in (sending, answering):
                task.cancel()
            await asyncio.gather(sending, answering, return_exceptions=True)
            if sending.cancelled() or sending.exception() is not None:
                # h11 counts the body's end as sent once it made the bytes, which may
                # not all have left: this connection carries no other request
                origin.whole = False

    async def _send_rest(self, origin: _Origin, event: h11.Event | type[h11.NEED_DATA]) -> None:
        while True:
            if event is h11.NEED_DATA:
                pass
            elif isinstance(event, h11.Data):
                self.bytes_up += len(event.data)
                await self._origin_send(origin, origin.conn.send(event) or b"")
            elif isinstance(event, h11.EndOfMessage):
                await self._origin_send(origin, origin.conn.send(event) or b"")
                return
            else:
                raise ProtocolError("connection closed in the middle of a request body")
            event = await self._client_event()

    async def _final_answer(self, origin: _Origin) -> h11.Response:
        """The origin's answer, once its head is here (interim 1xx answers passed on)."""
        while True:
            event = await self._origin_event(origin)
            if isinstance(event, h11.Response):
                return event
            assert isinstance(event, h11.InformationalResponse)
            if event.status_code == 101:
                raise UpstreamBroken("the origin switched protocols; not supported")
            await self._client_send(event)
            await self._flush_client()

    async def _relay_response(self, origin: _Origin, head: h11.Response) -> None:
        """Pass the origin's answer on, from its head (1xx ones are already passed)."""
        event: h11.Event = head
        while True:
            if isinstance(event, h11.Response):
                if event.status_code == 407 and origin.proxy is not None:
                    # the HTTP parent refused our credentials: its failure, not the
                    # client's to answer (it would ask the user for the parent's)
                    raise self._parent_failed(origin, "refused our credentials (407)")
                headers = [*end_to_end(list(event.headers)), (b"via", VIA)]
                if self.client.their_state is h11.SEND_BODY:
                    # an early answer: the client is told to stop, as we close after it
                    headers.append((b"connection", b"close"))
                await self._client_send(
                    h11.Response(
                        status_code=event.status_code, headers=headers, reason=event.reason
                    )
                )
            elif isinstance(event, h11.Data):
                self.bytes_down += len(event.data)
                await self._client_send(event)
            elif isinstance(event, h11.EndOfMessage):
                await self._client_send(h11.EndOfMessage())
                await self._flush_client()
                self._keep_or_drop(origin)
                return
            event = await self._origin_event(origin)

    def _parent_failed(self, origin: _Origin, what: str) -> ParentError:
        error = ParentError(f"the parent proxy {origin.proxy} {what}")
        if origin.pool is not None and origin.lease is not None and origin.lease.state:
            origin.pool.failed(origin.lease.state, error)
        return error

    def _keep_or_drop(self, origin: _Origin) -> None:
        """Keep the origin connection for the next request when both sides allow it."""
        conn = origin.conn
        if origin.whole and conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            origin.close()
            self.origin = None

    async def _answer_local(self, method: str, target: str) -> None:
        """A request in origin form is for the proxy itself: the PAC file, or 400."""
        if method in ("GET", "HEAD") and urllib.parse.urlsplit(target).path == PAC_PATH:
            # read the (empty) rest of the request, so the connection can carry another
            if not isinstance(await self._client_event(), h11.EndOfMessage):
                raise ProtocolError("a request for the PAC file has no body")
            host, port = self.conn.local_address()[:2]
            body = pac_file(format_hostport(host, port), tls=self.conn.tls is not None)
            self.target = None
            headers = [
                (b"content-type", b"application/x-ns-proxy-autoconfig"),
                (b"content-length", str(len(body)).encode()),
            ]
            data = self.client.send(h11.Response(status_code=200, headers=headers))
            if method == "GET":
                data = (data or b"") + (self.client.send(h11.Data(data=body)) or b"")
            data = (data or b"") + (self.client.send(h11.EndOfMessage()) or b"")
            await self._sendall(self.sock, data, "the client")
            self.bytes_down = len(body) if method == "GET" else 0
            return
        raise ProtocolError(
            "this is a proxy: send absolute-form requests (http://host/path) or CONNECT"
        )

    # -- connections ------------------------------------------------------------------

    async def _origin_for(self, origin_key: tuple[str, int], route: Route) -> _Origin:
        """The connection for this request: the one kept from the last request when
        it goes to the same origin the same way and is still fit, else a new one."""
        key = (*origin_key, route.via)
        if self.origin is not None:
            if (
                self.origin.key == key
                and self.origin.conn.our_state is h11.IDLE
                and self.origin.current()
                and self.origin.quiet()
            ):
                return self.origin
            self.origin.close()
            self.origin = None
        sock, connector = await self._watched(connect(self.ctx, route, plain_http=True))
        if isinstance(connector, ChainConnector):
            lease = connector.lease
            proxy = lease.parent if lease is not None and connector.plain else None
            self.origin = _Origin(key, sock, lease, proxy, connector.pool)
            if connector.trailing:  # the origin spoke first (b"" would tell h11 it closed)
                self.origin.conn.receive_data(connector.trailing)
        else:
            self.origin = _Origin(key, sock)
        return self.origin

    async def _watched(self, work: Awaitable[T]) -> T:
        """`work` (the lookup, the connect) while the client is watched: a client that
        closes or resets its connection meanwhile ends the request at once
        (ClientClosed), its lookup and connect with it. Bytes from the client (a body,
        a pipelined request) end the watch, as its end cannot show behind them."""
        task = asyncio.current_task()
        assert task is not None
        sock, fd = self.sock, self.sock.fileno()
        gone: list[str] = []

        def check() -> None:
            try:
                data = sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                data, why = b"", f"client connection failed while connecting: {exc.strerror}"
            else:
                why = "client closed the connection while connecting"
            self.loop.remove_reader(fd)
            if not data:
                gone.append(why)
                task.cancel()

        self.loop.add_reader(fd, check)
        try:
            return await work
        except asyncio.CancelledError:
            if gone and task.uncancel() == 0:  # (not also cancelled by the daemon's end)
                raise ClientClosed(gone[0]) from None
            raise
        finally:
            self.loop.remove_reader(fd)

    async def _next_request(self) -> h11.Request | None:
        """The client's next request on this connection, or None once it closes. The
        whole head must come within `timeouts.idle` (`timeouts.handshake` until a
        request has passed the credentials check), not each piece of it."""
        wait = self.idle if self.trusted else self.ctx.config.timeouts.handshake
        try:
            async with asyncio.timeout(wait):
                event = await self._client_event(most=HEAD_READ)
        except TimeoutError:
            return None
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise ProtocolError("expected a request")
        # one that came whole with a body read (pipelined) passed h11's limit
        if head_size(event) > DEFAULT_MAX_HEAD:
            raise ProtocolError(
                f"request head longer than {DEFAULT_MAX_HEAD} bytes", http_status=431
            )
        return event

    async def _client_event(self, most: int = 0) -> h11.Event:
        conn = self.client
        while True:
            event = client_event(conn)
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event)
                return event
            conn.receive_data(await self._recv(self.sock, "the client", up=True, most=most))

    async def _origin_event(self, origin: _Origin) -> h11.Event:
        conn = origin.conn
        ended = False
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if ended:  # h11's word for an end before the answer was whole
                    raise UpstreamBroken(
                        "the origin closed the connection before its answer was whole"
                    ) from exc
                raise UpstreamBroken("malformed response from the origin") from exc
            if isinstance(event, h11.ConnectionClosed):
                raise UpstreamBroken("the origin closed the connection")
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event)
                return event
            await self._flush_client()  # before waiting: the client has all there is
            try:
                data = await self._recv(origin.sock, "the origin")
            except OSError as exc:
                raise UpstreamBroken(f"the origin's connection failed: {exc.strerror}") from None
            ended = not data
            conn.receive_data(data)

    async def _recv(
        self, sock: socket.socket, who: str, *, up: bool = False, most: int = 0
    ) -> bytes:
        """What `sock` has (`most` bytes, else buffers.read_size at most), within
        `timeouts.idle`; no faster than the user's rate."""
        size = most or self.read_size
        rate = gate.rate_for(self.ctx, self.conn.user)
        bucket = None if rate is None else rate[0 if up else 1]
        if bucket is not None:
            size = await bucket.reserve(size)
        try:
            async with asyncio.timeout(self.idle):
                data = await self.loop.sock_recv(sock, size)
        except TimeoutError:
            raise UpstreamTimeout(f"{who} sent nothing for {self.idle:g} s") from None
        if bucket is not None:
            bucket.take(len(data))
        return data

    async def _sendall(self, sock: socket.socket, data: bytes, who: str) -> None:
        """Send everything, waiting while the receiver's window is full, at most
        `timeouts.idle` (a peer that stops reading must not hold the task forever)."""
        if not data:
            return
        try:  # most answers fit the socket's buffer: one send, no waiting
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent == len(data):
            return
        try:
            async with asyncio.timeout(self.idle):
                await self.loop.sock_sendall(sock, memoryview(data)[sent:])
        except TimeoutError:
            raise UpstreamTimeout(f"{who} read nothing for {self.idle:g} s") from None

    async def _origin_send(self, origin: _Origin, data: bytes) -> None:
        try:
            await self._sendall(origin.sock, data, "the origin")
        except OSError as exc:
            raise UpstreamBroken(f"the origin's connection failed: {exc.strerror}") from None

    async def _client_send(self, event: h11.Event) -> None:
        """Queue an answer's part; it goes out when the origin has nothing more at
        hand (so a small answer leaves in one send, not head, body and end apart)."""
        data = self.client.send(event)
        if data:
            self._to_client.append(data)
            self._queued += len(data)
            if self._queued >= self.read_size:
                await self._flush_client()

    async def _flush_client(self) -> None:
        if self._to_client:
            data = b"".join(self._to_client)
            self._to_client.clear()
            self._queued = 0
            await self._sendall(self.sock, data, "the client")

    def _send_client(self, data: bytes) -> None:
        """An error page before the connection closes: into an idle socket, best effort."""
        with contextlib.suppress(OSError):
            self.sock.send(data)

    def _log(
        self,
        status: Status,
        error: str | None,
        started: float,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.lines += 1
        if (metrics := self.ctx.metrics) is not None:
            metrics.request_done(status, self.bytes_up, self.bytes_down)
        if self.ctx.config.log.access:
            access.record(
                self.conn,
                status,
                command=self.command,
                target=self.target,
                bytes_up=self.bytes_up,
                bytes_down=self.bytes_down,
                started=started,
                error=error,
                **(extra or {}),
            )
