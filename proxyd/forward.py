"""Plain HTTP forwarding: absolute-form requests (`GET http://host/path`) sent on to
their origin.

A client connection that sends such a request gets one task for as long as it
keeps the connection alive (unlike a tunnel, where the task would cost more than
the bytes). Heads are parsed whole on both sides (proxyd.protocols.messages:
httptools, or h11 without it) and checked; bodies are then moved by their framing,
never held whole: a Content-Length body is counted through in big reads, a chunked
one goes through a small chunk scanner. The upstream connection is kept for the
client's next request to the same origin; hop-by-hop headers are dropped and `Via`
added. Every request gets its own access line, under the connection's `conn_id`.

Unlike a tunnel, these bytes cannot go through the relay: every message is
parsed both ways (each request may go to another origin, and bodies are framed),
so this is a second byte mover. It keeps to the same rules as the relay:
the user's rate through the same bucket, `timeouts.idle` on every wait, a reset
passed on as a reset. A small request costs two reads and two sends: each socket's
reader stays on the loop between reads (`_Readable`), and a read that follows a
request or an answer just sent waits for the socket before it tries.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.parse
from collections.abc import Awaitable
from typing import Any, Final, TypeVar

from proxyd import access, gate
from proxyd.accounting import DOWN, UP
from proxyd.chain import ChainConnector, Lease, Pool
from proxyd.context import Conn, Context
from proxyd.dial import Route, connect
from proxyd.errors import (
    CUT_OFF,
    ClientClosed,
    Denied,
    ParentError,
    ProtocolError,
    QuotaExceeded,
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
    end_to_end,
    pac_file,
    parse_basic_credentials,
)
from proxyd.protocols.messages import (
    CHUNKED,
    HEADS,
    LAST_CHUNK,
    LENGTH,
    ChunkedDecoder,
    MalformedResponse,
    RequestHead,
    ResponseHead,
    chunk,
    head_end,
    header_tokens,
    informational_bytes,
    keep_alive,
    last_chunk,
    request_bytes,
    request_framing,
    response_bytes,
    response_framing,
    take_request_head,
    websocket_upgrade,
)
from proxyd.relay import LEASE_WAIT, Relay, abort
from proxyd.tunnel import relay_for

# Reads while a request head is awaited: small, as the first request's are (a head
# is bounded by DEFAULT_MAX_HEAD whether it comes in pieces or whole)
HEAD_READ: Final = 4096
# How long to wait for an origin's "100 Continue" before sending the body anyway
# (an HTTP/1.0 origin never answers one), as curl does.
CONTINUE_WAIT: Final = 1.0
# How long to take (and drop) a client's body after answering it early, before closing
LINGER: Final = 2.0
LINGER_QUIET: Final = 0.5  # ... or until it has sent nothing for this long

T = TypeVar("T")


def _url(parts: urllib.parse.SplitResult, hostport: str, query: bool) -> str:
    """The access line's `url`: scheme, the canonical host and port, the path (never
    the userinfo; the query only when `log.http_query` keeps it)."""
    tail = parts.path or "/"
    if query and parts.query:
        tail += "?" + parts.query
    return f"{parts.scheme.lower()}://{hostport}{tail}"


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Readable:
    """Waits until a socket has bytes (or its end) to read. Its reader stays on the
    loop between waits: adding and removing it around every read cost the loop two
    epoll_ctl calls and more per read, most of a small request's system calls. A
    socket found readable with no one waiting is let go (the poll is
    level-triggered) and taken up again by the next wait."""

    __slots__ = ("armed", "fd", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.fd = sock.fileno()
        self.waiter: asyncio.Future[None] | None = None
        self.armed = False

    def _ready(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            self.release()
        else:
            waiter.set_result(None)

    def arm(self, deadline: float) -> tuple[asyncio.Future[None], asyncio.TimerHandle]:
        """A future done once the socket is readable (TimeoutError at `deadline`, loop
        time), and its timer: the caller awaits the one, then cancels the other and
        clears `waiter` (not a coroutine of its own: one level less on every wait)."""
        loop = self.loop
        if not self.armed:
            loop.add_reader(self.fd, self._ready)
            self.armed = True
        waiter = self.waiter = loop.create_future()
        return waiter, loop.call_at(deadline, _expire, waiter)

    def release(self) -> None:
        """Off the loop (before anything else watches the socket, and before it closes)."""
        if self.armed:
            self.armed = False
            self.loop.remove_reader(self.fd)


class _Origin:
    """One upstream connection and what it sent beyond the answer read so far: to the
    origin itself, or through a parent proxy (`lease`); `proxy` is an HTTP parent that
    is sent the requests themselves, in absolute form."""

    def __init__(
        self,
        key: tuple[Any, ...],
        sock: socket.socket,
        lease: Lease | None = None,
        proxy: Parent | None = None,
        pool: Pool | None = None,
    ) -> None:
        self.key = key
        self.sock = sock
        self.readable = _Readable(asyncio.get_running_loop(), sock)
        self.inbuf = b""  # read from the origin, not yet passed on
        self.eof = False  # the origin closed its side
        self.lease = lease
        self.proxy = proxy
        self.pool = pool  # the group of the parent, which its failures count against
        self.whole = True  # every byte of our requests went out (none cut off mid-way)

    def quiet(self) -> bool:
        """Still open with nothing unasked-for to read: fit for the next request. An
        origin closes idle connections when it likes (or says 408 first)."""
        if self.inbuf or self.eof:
            return False
        if self.readable.armed:
            # still watched since the last answer was read, and not found readable
            # (a close or unasked bytes would have let the watch go): no peek needed
            return True
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
        self.readable.release()
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
        self.readable = _Readable(self.loop, sock)
        self.parser = parser
        # the first request came through the handshake's parser; what the client
        # sent behind its head is ours from here on
        self.first = parser.request
        self.inbuf = parser.rest  # read from the client, not yet taken
        self.client_eof = False
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
        # per request: its body still to read, and how far its answer went
        self.request = self.first
        self.keep = True  # the client lets its connection carry another request
        self.body_kind = LENGTH
        self.body_left = 0
        self.body_done = True  # the request's whole body was read
        self.decoder: ChunkedDecoder | None = None
        self.answering = False  # an answer's head went (or is queued) to the client
        self.answer_done = False  # ... and its whole body
        self.close_after = False  # the answer says the connection closes after it
        self.upgrade: bytes | None = None  # the request asks for a WebSocket (its Upgrade value)
        # per request, for its access line
        self.command: str | None = None
        self.target: str | None = None
        self.url: str | None = None
        self.http_status: int | None = None  # the answer the client got (its head went out)
        self.answer_out = False  # a byte of this request's answer reached the client's socket
        self.ended: tuple[Status, str | None] | None = None  # how a WebSocket tunnel ended
        self._relay: Relay | None = None  # the WebSocket tunnel's, while it runs
        self.bytes_up = 0
        self.bytes_down = 0

    # what the session asks of the worker that took its connection over
    answered: Final = True  # every request is answered (or its client reset) here

    @property
    def logged(self) -> bool:
        """Whether a request wrote its access line (else the connection writes one)."""
        return self.lines > 0

    def usage(self) -> tuple[int, int, int, int]:
        """What the metrics are told as it grows: a WebSocket tunnel's bytes while it
        runs; otherwise nothing new (each request counts its own, at its line)."""
        relay = self._relay
        if relay is None:
            return self.conn.metered
        return (relay.bytes_up, relay.bytes_down, 0, 0)

    def fields(self) -> dict[str, int | str]:
        return {}

    async def run(self) -> Status:
        """Serve requests until the client or an answer ends the connection (each wrote
        its own access line)."""
        await self._serve(self.first)
        return Status.OK

    async def _serve(self, request: RequestHead) -> None:
        try:
            while await self._exchange(request):
                if self.ctx.draining:
                    return  # the daemon is stopping: this answer was the last
                self.between_requests = True
                try:
                    next_request = await self._next_request()
                except ProtocolError as exc:
                    sent = self._send_client(self._error_page(exc.http_status, str(exc)))
                    self.command = self.target = self.url = self.conn.user = None
                    self.http_status = exc.http_status if sent else None
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
            if not self.cut and not self.body_done:
                await self._linger()  # answered (or refused) before its whole body came
        finally:
            self.readable.release()  # (the session closes the socket)
            if self.origin is not None:
                self.origin.close()

    async def _linger(self) -> None:
        """Close gently after an answer (an early one, or an error page such as a 407)
        sent while the client still sends its body:
        say we are done, then take (and drop) what it sends for a while. Closed with
        its bytes unread, the socket would be reset, and the reset can overtake the
        answer on its way to the client (nginx's lingering close does the same)."""
        self.readable.release()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        deadline = self.loop.time() + LINGER
        with contextlib.suppress(OSError, TimeoutError):
            while (left := deadline - self.loop.time()) > 0:
                async with asyncio.timeout(min(left, LINGER_QUIET)):
                    if not await self.loop.sock_recv(self.sock, self.read_size):
                        return  # the client's end: nothing is left unread

    @staticmethod
    def _error_page(status: int, message: str, retry_after: int | None = None) -> bytes:
        return HttpProxyServer().error_response(status, message, retry_after=retry_after)

    # -- one request and its answer -------------------------------------------------

    def _begin(self, request: RequestHead) -> None:
        """This request's state: its body to read, no answer yet."""
        self.request = request
        self.keep = keep_alive(request.version, request.headers)
        kind, length = request_framing(request)
        self.body_kind, self.body_left = kind, length
        self.body_done = kind == LENGTH and length == 0
        self.decoder = ChunkedDecoder() if kind == CHUNKED else None
        self.answering = self.answer_done = self.close_after = False
        self.upgrade = websocket_upgrade(request)
        self.http_status = None
        self.answer_out = False
        self.ended = None

    async def _exchange(self, request: RequestHead) -> bool:
        """Forward one request; True when the client connection can carry another."""
        started = time.monotonic()
        self.bytes_up = self.bytes_down = 0
        method = request.method.decode("ascii")
        target = request.target.decode("ascii", "replace")
        self.command = method
        self.target = self.url = None
        self.conn.user = None  # this request's own, not the connection's last one
        status, error = Status.OK, None
        extra: dict[str, Any] = {}
        try:
            self._begin(request)
            origin = absolute_origin(target)
            if origin is None:
                await self._answer_local(method, target)
                return self._reusable()
            self.target = format_hostport(*origin)
            parts = urllib.parse.urlsplit(target)  # (once: the request sent on uses it too)
            self.url = _url(parts, self.target, self.ctx.config.log.http_query)
            if target[:8].lower() == "https://":
                raise ProtocolError("https:// requests go through CONNECT", http_status=400)
            if ambiguous_framing(request.headers):
                raise ProtocolError("request has both Content-Length and Transfer-Encoding")
            check_host_header(request.headers)
            values = [v for k, v in request.headers if k == b"proxy-authorization"]
            credentials = parse_basic_credentials(values[0]) if len(values) == 1 else None
            # every request carries its own Proxy-Authorization (a browser repeats it)
            await gate.verify(self.ctx, self.conn, self.admission, credentials)
            self.trusted = True
            route = await self._route(method, *origin)
            if route.rule is not None:
                extra["rule"] = route.rule
            if route.via is not None:
                extra["via"] = route.via
            await self._forward(request, origin, parts, route, extra)
            if self.ended is not None:  # a WebSocket tunnel, ended by itself
                status, error = self.ended
                return False
        except SessionError as exc:
            status, error = exc.status, str(exc)
            if isinstance(exc, Denied):
                extra.update(exc.fields())
            if not self.answering:
                answer = self._error_page(exc.http_status, str(exc), exc.retry_after)
                if self._send_client(answer):
                    self.http_status = exc.http_status
            else:  # mid-answer: a reset, so that no client takes it for a whole one
                self.cut = True
            return False
        except OSError as exc:  # the client's socket
            status, error = Status.CLIENT_CLOSED, exc.strerror or type(exc).__name__
            if not self.answer_out:
                self.http_status = None  # (the answer never reached it)
            return False
        except asyncio.CancelledError:
            status = Status.SHUTDOWN
            if self.answering and not self.answer_done:
                self.cut = True  # stopped mid-answer: it must not look whole either
            raise
        finally:
            self._log(status, error, started, extra)
        return self._reusable()

    def _reusable(self) -> bool:
        return self.answer_done and self.body_done and self.keep and not self.close_after

    async def _forward(
        self,
        request: RequestHead,
        key: tuple[str, int],
        parts: urllib.parse.SplitResult,
        route: Route,
        extra: dict[str, Any],
    ) -> None:
        origin = await self._origin_for(key, route)
        if origin.lease is not None:
            extra["upstream"] = str(origin.lease.parent)
        elif route.egress is not None:
            extra["egress"] = origin.sock.getsockname()[0]
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        name = f"[{key[0]}]" if ":" in key[0] else key[0]
        host = name if key[1] == 80 else f"{name}:{key[1]}"
        host_value = host.encode("ascii")  # (absolute_origin gave the canonical, ASCII form)
        headers = [(b"host", host_value)]
        headers += [(n, v) for n, v in end_to_end(request.headers) if n != b"host"]
        headers.append((b"via", VIA))
        if self.upgrade is not None:  # the one upgrade passed on: hop-by-hop, asked anew
            headers += [(b"connection", b"upgrade"), (b"upgrade", self.upgrade)]
        if origin.proxy is not None:  # an HTTP parent is asked in absolute form, as we were
            path = "http://" + host_value.decode("ascii") + path
            if origin.proxy.credentials is not None:
                headers.append(
                    (b"proxy-authorization", basic_authorization(origin.proxy.credentials).encode())
                )
        expects_continue = any(
            n == b"expect" and v.lower() == b"100-continue" for n, v in request.headers
        )
        data = request_bytes(request.method, path.encode(), headers)
        await self._spend(UP, len(data))  # (heads count for the quota, not the access line)
        sent = self._origin_sent(origin, data)
        if sent < len(data):
            await self._origin_send(origin, data[sent:])
        early: ResponseHead | None = None
        if expects_continue:
            early = await self._await_continue(origin)
        if early is None:
            early = await self._send_body(origin)
        if early is None:
            early = await self._origin_head(origin)
            if early.status < 200:
                early = await self._final_answer(origin, early)
        await self._relay_response(origin, early)

    async def _await_continue(self, origin: _Origin) -> ResponseHead | None:
        """Wait briefly for the origin's 100 (passed on); a final answer instead is returned."""
        try:
            async with asyncio.timeout(CONTINUE_WAIT):
                head = await self._origin_head(origin)
        except TimeoutError:
            return None
        if head.status < 200 and head.status != 101:
            await self._pass_head(informational_bytes(head))
            await self._flush_client()
            return None
        return head  # (a 101 too: only a WebSocket asked for becomes a tunnel)

    async def _send_body(self, origin: _Origin) -> ResponseHead | None:
        """Send the request's body on; with one, the origin's answer (None: it is yet
        to be read). An origin may answer before it has taken the whole body (a 413,
        a 401, a redirect): the rest is then not sent, and the answer goes to the
        client, whose connection closes after it (its body was not all read)."""
        if self.body_done:  # no body (a GET): nothing to watch for
            return None
        # (the answer is watched for from the start: a client may pause after its head)
        sending = self.loop.create_task(self._send_rest(origin))
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
                # the body's end may not all have left: this connection carries no
                # other request
                origin.whole = False

    async def _client_body_data(self, most: int) -> bytes:
        """The next bytes of the client's body (what came behind the head first)."""
        data = self.inbuf
        if data:
            if len(data) > most:
                self.inbuf = data[most:]
                data = data[:most]
            else:
                self.inbuf = b""
            await self._charge(len(data))
            return data
        if not self.client_eof:
            data = await self._recv(self.sock, "the client", up=True, most=most)
            if data:
                return data
            self.client_eof = True
        raise ProtocolError("connection closed in the middle of a request body")

    async def _charge(self, size: int) -> None:
        """Body bytes that came in with a head (read before the user was known) pay
        the user's rate as any others do: taken from the bucket, and, while it is in
        debt, passed on only once it would have let them be read."""
        rate = gate.rate_for(self.ctx, self.conn.user) if size else None
        if rate is not None:
            bucket = rate[0]
            bucket.take(size)
            bucket.available()
            if (wait := bucket.delay(0)) > 0:
                await asyncio.sleep(wait)

    async def _spend(self, side: int, n: int) -> None:
        """Bytes about to pass on (a head, a body's), charged to the user's account;
        none beyond its quota pass (QuotaExceeded). With workers, past this worker's
        share of it, once it has learnt what the others moved."""
        account = gate.account_for(self.ctx, self.conn.user)
        if account is None:
            return
        deadline = self.loop.time() + self.idle
        while account.allowance(side) < n:
            if account.room(side) < n:
                raise QuotaExceeded("the user's traffic quota is used up")
            if self.loop.time() > deadline:
                raise UpstreamTimeout(f"no share of the user's quota for {self.idle:g} s")
            await asyncio.sleep(LEASE_WAIT)
        account.charge(side, n)

    async def _moved(self, side: int, n: int) -> None:
        """Body bytes about to pass on: charged (`_spend`), and counted for the access
        line's bytes_up/down."""
        await self._spend(side, n)
        if side == UP:
            self.bytes_up += n
        else:
            self.bytes_down += n

    async def _pass_head(self, head: bytes) -> None:
        """An interim answer (1xx) for the client, charged as any head."""
        await self._spend(DOWN, len(head))
        self._client_queue(head)

    async def _send_rest(self, origin: _Origin) -> None:
        """Move the request's body to the origin: counted through by its length, or
        its chunks read and written anew (as h11 would: extensions dropped)."""
        if self.decoder is None:
            while self.body_left:
                data = await self._client_body_data(min(self.body_left, self.read_size))
                self.body_left -= len(data)
                await self._moved(UP, len(data))
                await self._origin_send(origin, data)
            self.body_done = True
            return
        decoder = self.decoder
        data = self.inbuf
        self.inbuf = b""
        await self._charge(len(data))
        while True:
            if data:
                pieces = decoder.feed(data)
                out = b"".join([chunk(piece) for piece in pieces])
                await self._moved(UP, sum(map(len, pieces)))
                if decoder.done:
                    self.inbuf = decoder.rest  # (a request pipelined behind the body)
                    self.body_done = True
                    await self._origin_send(origin, out + last_chunk(decoder.trailer))
                    return
                if out:
                    await self._origin_send(origin, out)
            data = await self._client_body_data(self.read_size)

    async def _final_answer(
        self, origin: _Origin, head: ResponseHead | None = None
    ) -> ResponseHead:
        """The origin's answer, once its head is here (interim 1xx answers passed on;
        `head`: the first, read already)."""
        while True:
            if head is None:
                head = await self._origin_head(origin)
            if head.status >= 200:
                return head
            if head.status == 101:
                if self.upgrade is not None:
                    return head  # the WebSocket it was asked for: the answer, and a tunnel
                raise UpstreamBroken("the origin switched protocols unasked")
            await self._pass_head(informational_bytes(head))
            await self._flush_client()
            head = None

    async def _origin_head(self, origin: _Origin) -> ResponseHead:
        """The next answer head from the origin (1xx ones included)."""
        buf = origin.inbuf
        searched = 0
        while True:
            if buf:
                end = head_end(buf, searched)
                if end > 0:
                    origin.inbuf = buf[end:]
                    try:
                        return HEADS.response(buf[:end])
                    except MalformedResponse as exc:
                        raise UpstreamBroken(str(exc)) from None
                if end == 0 or len(buf) > DEFAULT_MAX_HEAD:
                    raise UpstreamBroken("malformed response from the origin")
                searched = len(buf)
            if origin.eof:
                raise UpstreamBroken(
                    "the origin closed the connection before its answer was whole"
                    if buf
                    else "the origin closed the connection"
                )
            if self._to_client:
                await self._flush_client()  # before waiting: the client has all there is
            # (the first read of an answer just asked for: nothing is likely there yet)
            try:
                data = await self._recv(
                    origin.sock, "the origin", readable=origin.readable, fresh=not buf
                )
            except OSError as exc:
                raise UpstreamBroken(f"the origin's connection failed: {exc.strerror}") from None
            if not data:
                origin.eof = True
            buf += data
            origin.inbuf = buf

    async def _origin_recv(self, origin: _Origin, most: int = 0, *, fresh: bool = False) -> bytes:
        try:
            data = await self._recv(
                origin.sock, "the origin", most=most, readable=origin.readable, fresh=fresh
            )
        except OSError as exc:
            raise UpstreamBroken(f"the origin's connection failed: {exc.strerror}") from None
        if not data:
            origin.eof = True
        return data

    async def _relay_response(self, origin: _Origin, head: ResponseHead) -> None:
        """Pass the origin's answer on, from its head (1xx ones are already passed)."""
        if head.status == 407 and origin.proxy is not None:
            # the HTTP parent refused our credentials: its failure, not the
            # client's to answer (it would ask the user for the parent's)
            raise self._parent_failed(origin, "refused our credentials (407)")
        request = self.request
        headers = [*end_to_end(head.headers), (b"via", VIA)]
        if head.status == 101:
            upgrade = [v for n, v in head.headers if n == b"upgrade"]
            websocket = header_tokens(head.headers, b"upgrade") == [b"websocket"]
            if self.upgrade is None or len(upgrade) != 1 or not websocket:
                raise UpstreamBroken("the origin switched to a protocol not asked for")
            # a tunnel from here on: it counts for the user as one does (limits.per_user)
            self.admission.count_user(self.conn.user)
            headers += [(b"connection", b"upgrade"), (b"upgrade", upgrade[0])]
        # an early answer (the body not all read): the client is told to stop, as we
        # close after it
        out_head, out_framing, self.close_after = response_bytes(
            head.status,
            head.reason,
            headers,
            request.method,
            request.version,
            self.keep and self.body_done,
        )
        await self._spend(DOWN, len(out_head))
        self.answering = True
        self.http_status = head.status
        self._client_queue(out_head)
        if head.status == 101:
            await self._tunnel(origin)
            return
        kind, length = response_framing(request.method, head.status, head.headers)
        reusable = keep_alive(head.version, head.headers)
        if kind == LENGTH:
            await self._move_length(origin, length)
        elif kind == CHUNKED:
            await self._move_chunked(origin, out_framing == CHUNKED)
        else:
            reusable = False
            await self._move_to_end(origin, out_framing == CHUNKED)
        if rest := self._flush_now():
            await self._sendall(self.sock, rest, "the client")
        self.answer_done = True
        self._keep_or_drop(origin, reusable)

    async def _tunnel(self, origin: _Origin) -> None:
        """After a 101 the connection speaks the protocol it switched to (WebSocket):
        the relay moves its bytes both ways, as in any tunnel, until it ends (`ended`);
        then the connection closes, whatever it was."""
        if rest := self._flush_now():
            await self._sendall(self.sock, rest, "the client")
        self.readable.release()  # the relay's pumps watch both sockets from here on
        origin.readable.release()
        origin.whole = False  # the origin's connection ends with the tunnel
        self.close_after = True
        ended: asyncio.Future[tuple[Status, str | None]] = self.loop.create_future()

        def on_end(status: Status, error: str | None) -> None:
            if not ended.done():
                ended.set_result((status, error))

        relay = relay_for(self.ctx, self.conn, self.sock, origin.sock, on_end)
        first_up, self.inbuf = self.inbuf, b""
        first_down, origin.inbuf = origin.inbuf, b""
        relay.start(first_up, first_down)  # (the first bytes pay the user's rate there)
        self._relay = relay  # (its bytes are metered as they go, as a tunnel's)
        try:
            self.ended = await ended
        finally:
            relay.stop()
            self._relay = None
            self.bytes_up += relay.bytes_up
            self.bytes_down += relay.bytes_down
        self.answer_done = True
        if self.ended[0] in CUT_OFF:  # a reset on one side is one on the other
            self.cut = True
            abort(origin.sock)

    async def _move_length(self, origin: _Origin, left: int) -> None:
        """A body of known length, counted through: what came with the head, then
        reads of at most what is left (nothing of a next answer is read)."""
        data = origin.inbuf
        if data:
            if len(data) > left:
                origin.inbuf = data[left:]
                data = data[:left]
            else:
                origin.inbuf = b""
            left -= len(data)
            await self._moved(DOWN, len(data))
            await self._client_send(data)
        while left:
            await self._flush_client()  # before waiting: the client has all there is
            data = await self._origin_recv(origin, min(left, self.read_size))
            if not data:
                raise UpstreamBroken("the origin closed the connection before its answer was whole")
            left -= len(data)
            await self._moved(DOWN, len(data))
            await self._client_send(data)

    async def _move_chunked(self, origin: _Origin, chunked: bool) -> None:
        """A chunked body, its chunks written anew with its trailer fields (`chunked`),
        or its data alone for an HTTP/1.0 client, whose connection then ends it."""
        decoder = ChunkedDecoder(MalformedResponse)
        data = origin.inbuf
        origin.inbuf = b""
        while True:
            if data:
                try:
                    pieces = decoder.feed(data)
                except MalformedResponse as exc:
                    raise UpstreamBroken(str(exc)) from None
                size = sum(map(len, pieces))
                await self._moved(DOWN, size)
                if pieces:
                    out = b"".join([chunk(p) for p in pieces] if chunked else pieces)
                    await self._client_send(out)
                if decoder.done:
                    origin.inbuf = decoder.rest
                    if chunked:
                        self._client_queue(last_chunk(decoder.trailer))
                    return
            await self._flush_client()
            data = await self._origin_recv(origin)
            if not data:
                raise UpstreamBroken("the origin closed the connection before its answer was whole")

    async def _move_to_end(self, origin: _Origin, chunked: bool) -> None:
        """A body that the origin's close ends (no length, not chunked)."""
        data = origin.inbuf
        origin.inbuf = b""
        while True:
            if data:
                await self._moved(DOWN, len(data))
                await self._client_send(chunk(data) if chunked else data)
            await self._flush_client()
            data = await self._origin_recv(origin)
            if not data:
                if chunked:
                    self._client_queue(LAST_CHUNK)
                return

    def _parent_failed(self, origin: _Origin, what: str) -> ParentError:
        error = ParentError(f"the parent proxy {origin.proxy} {what}")
        if origin.pool is not None and origin.lease is not None and origin.lease.state:
            origin.pool.failed(origin.lease.state, error)
        return error

    def _keep_or_drop(self, origin: _Origin, reusable: bool) -> None:
        """Keep the origin connection for the next request when both sides allow it
        (and it sent nothing beyond its answer)."""
        if not (reusable and origin.whole and not origin.inbuf and not origin.eof):
            origin.close()
            if self.origin is origin:
                self.origin = None

    async def _answer_local(self, method: str, target: str) -> None:
        """A request in origin form is for the proxy itself: the PAC file, or 400."""
        if method in ("GET", "HEAD") and urllib.parse.urlsplit(target).path == PAC_PATH:
            if not self.body_done:
                raise ProtocolError("a request for the PAC file has no body")
            host, port = self.conn.local_address()[:2]
            body = pac_file(format_hostport(host, port), tls=self.conn.tls is not None)
            self.target = None
            headers = [
                (b"content-type", b"application/x-ns-proxy-autoconfig"),
                (b"content-length", str(len(body)).encode()),
            ]
            request = self.request
            data, _, self.close_after = response_bytes(
                200, b"OK", headers, request.method, request.version, self.keep
            )
            self.answering = True
            self.http_status = 200
            if method == "GET":
                data += body
            await self._sendall(self.sock, data, "the client")
            self.answer_done = True
            self.bytes_down = len(body) if method == "GET" else 0
            return
        raise ProtocolError(
            "this is a proxy: send absolute-form requests (http://host/path) or CONNECT"
        )

    # -- connections ------------------------------------------------------------------

    async def _origin_for(self, origin_key: tuple[str, int], route: Route) -> _Origin:
        """The connection for this request: the one kept from the last request when
        it goes to the same origin the same way and is still fit, else a new one."""
        # a kept connection serves the next request that would leave the same way
        way_out = route.egress
        sticky = way_out is not None and way_out.pick == "sticky"
        key = (*origin_key, route.via, way_out, route.sticky_key if sticky else None)
        if self.origin is not None:
            if self.origin.key == key and self.origin.current() and self.origin.quiet():
                return self.origin
            self.origin.close()
            self.origin = None
        sock, connector = await self._watched(connect(self.ctx, route, plain_http=True))
        if isinstance(connector, ChainConnector):
            lease = connector.lease
            proxy = lease.parent if lease is not None and connector.plain else None
            self.origin = _Origin(key, sock, lease, proxy, connector.pool)
            if connector.trailing:  # the origin spoke first
                self.origin.inbuf = connector.trailing
        else:
            self.origin = _Origin(key, sock)
        return self.origin

    async def _route(self, method: str, host: str, port: int) -> Route:
        """`gate.route`, the client watched only while a lookup is awaited (the gate
        mostly decides at once: then no reader on the loop)."""
        return await gate.route(self.ctx, self.conn, method, host, port, watch=self._watched)

    async def _watched(self, work: Awaitable[T]) -> T:
        """`work` (the lookup, the connect) while the client is watched: a client that
        closes or resets its connection meanwhile ends the request at once
        (ClientClosed), its lookup and connect with it. Bytes from the client (a body,
        a pipelined request) end the watch, as its end cannot show behind them."""
        task = asyncio.current_task()
        assert task is not None
        self.readable.release()  # (the watch is the socket's reader meanwhile)
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

    async def _next_request(self) -> RequestHead | None:
        """The client's next request on this connection, or None once it closes. The
        whole head must come within `timeouts.idle` (`timeouts.handshake` until a
        request has passed the credentials check), not each piece of it."""
        wait = self.idle if self.trusted else self.ctx.config.timeouts.handshake
        try:
            return await self._request_head(self.loop.time() + wait)
        except TimeoutError:
            return None

    async def _request_head(self, deadline: float) -> RequestHead | None:
        buf = self.inbuf
        searched = 0
        while True:
            if buf:
                taken = take_request_head(buf, searched, DEFAULT_MAX_HEAD)
                if taken is not None:
                    head, end = taken
                    self.inbuf = buf[end:]
                    return head
                searched = len(buf)
            if self.client_eof:
                if buf:
                    raise ProtocolError("malformed HTTP request")
                return None
            # (the whole head has one deadline, not each read)
            # (with nothing read, an answer was just sent: the next request is not
            # likely there yet)
            data = await self._recv(
                self.sock, "the client", up=True, most=HEAD_READ, deadline=deadline, fresh=not buf
            )
            if not data:
                self.client_eof = True
            buf += data
            self.inbuf = buf

    async def _recv(
        self,
        sock: socket.socket,
        who: str,
        *,
        up: bool = False,
        most: int = 0,
        deadline: float = 0.0,
        readable: _Readable | None = None,
        fresh: bool = False,
    ) -> bytes:
        """What `sock` has (`most` bytes, else buffers.read_size at most), within
        `timeouts.idle` (or by `deadline`, loop time); no faster than the user's rate.
        `fresh`: nothing is likely there yet (an answer just asked for), so the first
        read waits for the socket to be readable rather than trying first."""
        size = most or self.read_size
        rate = gate.rate_for(self.ctx, self.conn.user)
        bucket = None if rate is None else rate[0 if up else 1]
        if bucket is not None:
            size = await bucket.reserve(size)
        if readable is None:
            readable = self.readable
        while True:
            if fresh:
                fresh = False
            else:
                try:
                    data = sock.recv(size)
                    break
                except (BlockingIOError, InterruptedError):
                    pass
            waiter, timer = readable.arm(deadline or self.loop.time() + self.idle)
            try:
                await waiter
            except TimeoutError:
                if deadline:
                    raise
                raise UpstreamTimeout(f"{who} sent nothing for {self.idle:g} s") from None
            finally:
                timer.cancel()
                readable.waiter = None
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
        if sent and sock is self.sock:
            self.answer_out = True
        if sent == len(data):
            return
        try:
            async with asyncio.timeout(self.idle):
                await self.loop.sock_sendall(sock, memoryview(data)[sent:])
            if sock is self.sock:
                self.answer_out = True
        except TimeoutError:
            raise UpstreamTimeout(f"{who} read nothing for {self.idle:g} s") from None

    def _origin_sent(self, origin: _Origin, data: bytes) -> int:
        """What the origin's socket takes of `data` now, without waiting."""
        try:
            return origin.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise UpstreamBroken(f"the origin's connection failed: {exc.strerror}") from None

    async def _origin_send(self, origin: _Origin, data: bytes) -> None:
        try:
            await self._sendall(origin.sock, data, "the origin")
        except OSError as exc:
            raise UpstreamBroken(f"the origin's connection failed: {exc.strerror}") from None

    def _client_queue(self, data: bytes) -> None:
        self._to_client.append(data)
        self._queued += len(data)

    async def _client_send(self, data: bytes) -> None:
        """Queue an answer's part; it goes out when the origin has nothing more at
        hand (so a small answer leaves in one send, not head and body apart)."""
        self._to_client.append(data)
        self._queued += len(data)
        if self._queued >= self.read_size:
            await self._flush_client()

    async def _flush_client(self) -> None:
        if rest := self._flush_now():
            await self._sendall(self.sock, rest, "the client")

    def _flush_now(self) -> bytes:
        """Send what is queued for the client as far as its socket takes it now; what
        is left (b"" once all went)."""
        queued = self._to_client
        if not queued:
            return b""
        data = queued[0] if len(queued) == 1 else b"".join(queued)
        queued.clear()
        self._queued = 0
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent:
            self.answer_out = True
        return data[sent:] if sent < len(data) else b""

    def _send_client(self, data: bytes) -> bool:
        """An error page before the connection closes: into an idle socket, best
        effort; whether it went."""
        try:
            return self.sock.send(data) > 0
        except OSError:
            return False

    def _log(
        self,
        status: Status,
        error: str | None,
        started: float,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.lines += 1
        if (metrics := self.ctx.metrics) is not None:
            told = self.conn.metered  # (a WebSocket tunnel's bytes told while it ran)
            metrics.request_done(status, self.bytes_up - told[0], self.bytes_down - told[1])
        access.record(
            self.conn,
            status,
            command=self.command,
            target=self.target,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            started=started,
            error=error,
            write=self.ctx.config.log.access,
            http_status=self.http_status,
            url=self.url,
            **(extra or {}),
        )
