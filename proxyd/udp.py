"""SOCKS5 UDP ASSOCIATE (RFC 1928 section 7), on asyncio-dgram.

One relay socket per association, bound on the local address of the TCP control
connection, so the BND.ADDR in the reply is one the client can reach (or
`server.udp_advertise` behind NAT). Datagrams are taken only from the client's
IP address (and port, when the request named one; else the first datagram's port
is kept), fragments and malformed headers are dropped, and replies come back
wrapped with their sender's address, from the targets the client sent to and no
one else. The association ends with its control connection or after
`timeouts.udp_idle` without a datagram either way; its access line (written by
the session) counts datagrams and bytes each way.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import asyncio_dgram

from proxyd import upstream
from proxyd.errors import Denied, ProtocolError, SessionError
from proxyd.protocols import socks5
from proxyd.rules import allowed_addresses

if TYPE_CHECKING:
    from proxyd.session import Session

# Targets an association remembers (replies are accepted from these), least recent out.
MAX_PEERS: Final = 1024
# Names being looked up at once per association; datagrams beyond are dropped.
MAX_LOOKUPS: Final = 16
Address = tuple[str, int]


class Association:
    def __init__(
        self,
        session: Session,
        client_port: int,
        reply: Callable[[str, int], None],
    ) -> None:
        self.session = session
        self.loop = asyncio.get_running_loop()
        cfg = session.ctx.config
        self.idle = cfg.timeouts.udp_idle
        self.advertise = cfg.server.udp_advertise
        self.client_ip = session.peer_ip
        self.client_port = client_port or None  # the port the request named, if any
        self.client: Address | None = None  # where the client's datagrams come from
        self.reply = reply
        self.relay: Any = None  # asyncio_dgram.DatagramServer on the control's local address
        self.other: Any = None  # for targets of the other address family, made when needed
        self.peers: OrderedDict[Address, None] = OrderedDict()
        self.last_activity = self.loop.time()
        self.ended: asyncio.Future[str] = self.loop.create_future()  # "ok" when the control closes
        self.pumps: list[asyncio.Task[None]] = []
        self.lookups: set[asyncio.Task[None]] = set()  # names being resolved
        self.datagrams_up = self.datagrams_down = 0
        self.bytes_up = self.bytes_down = 0
        self.dropped = 0
        self.denied = 0  # datagrams to destinations the rules deny
        self.over_rate = 0  # datagrams beyond the user's rate (limits.per_user_rate)
        self.rate = session.ctx.rate_for(session.user)
        self.established = False  # the reply went out

    async def run(self) -> str:
        """Open the relay, answer the request, relay until the end; the access status.
        A SessionError before the answer is for the session to refuse with."""
        sock = self.session.sock
        try:
            self.relay = await asyncio_dgram.bind((self.session.local_address()[0], 0))
        except OSError as exc:
            raise SessionError(f"cannot open a UDP relay socket: {exc.strerror}") from None
        try:
            host, port = self.relay.sockname[:2]
            self.reply(self.advertise or host, port)
            self.established = True
            self.loop.add_reader(sock.fileno(), self._on_control)
            try:
                return await self._relay()
            finally:
                self.loop.remove_reader(sock.fileno())
        finally:
            for endpoint in (self.relay, self.other):
                if endpoint is not None:
                    endpoint.close()

    def counts(self) -> dict[str, int]:
        """The access line's byte and datagram counts."""
        fields = {
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "datagrams_up": self.datagrams_up,
            "datagrams_down": self.datagrams_down,
        }
        if self.dropped:
            fields["datagrams_dropped"] = self.dropped
        if self.denied:
            fields["datagrams_denied"] = self.denied
        if self.over_rate:
            fields["datagrams_over_rate"] = self.over_rate
        return fields

    def _over_rate(self, direction: int, size: int) -> bool:
        """Whether a datagram exceeds the user's rate (then it is dropped: UDP is
        policed, not queued); else it is counted against the rate."""
        if self.rate is None:
            return False
        if self.rate[direction].try_take(size):
            return False
        self.over_rate += 1
        return True

    async def _relay(self) -> str:
        """Pump datagrams until the control connection closes or nothing moves for
        `udp_idle`; the access status."""
        self._start_pump(self.relay)
        try:
            while True:
                left = self.last_activity + self.idle - self.loop.time()
                if left <= 0:
                    return "idle_timeout"
                try:
                    async with asyncio.timeout(left):
                        return await asyncio.shield(self.ended)
                except TimeoutError:
                    continue  # datagrams moved meanwhile: wait for what is left
        finally:
            tasks = [*self.pumps, *self.lookups]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start_pump(self, endpoint: Any) -> None:
        task = self.loop.create_task(self._pump(endpoint))
        self.pumps.append(task)

        def failed(task: asyncio.Task[None]) -> None:
            """A pump ends only by raising (a bug): the association ends with it."""
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not self.ended.done():
                self.ended.set_exception(exc)

        task.add_done_callback(failed)

    def _on_control(self) -> None:
        """The TCP connection carries nothing after the reply: EOF or an error ends
        the association, anything else is read and dropped."""
        try:
            data = self.session.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(self.session.sock.fileno())
            if not self.ended.done():
                self.ended.set_result("ok")

    async def _pump(self, endpoint: Any) -> None:
        while True:
            try:
                data, sender = await endpoint.recv()
            except asyncio_dgram.TransportClosed:
                return
            except OSError:  # an ICMP error for an earlier datagram: not ours to end on
                continue
            await self._dispatch(data, sender[:2])

    async def _dispatch(self, data: bytes, sender: Address) -> None:
        if self._from_client(sender):
            try:
                datagram = socks5.parse_udp(data)
            except ProtocolError:
                self.dropped += 1
                return
            if not self._over_rate(0, len(datagram.payload)):
                await self._send_out(datagram)
        elif sender in self.peers and self.client is not None:
            if self._over_rate(1, len(data)):
                return
            self.peers.move_to_end(sender)
            header = socks5.udp_header(*sender)
            try:
                await self.relay.send(header + data, self.client)
            except (OSError, asyncio_dgram.TransportClosed):
                self.dropped += 1  # e.g. too large for the client's family once wrapped
                return
            self.datagrams_down += 1
            self.bytes_down += len(data)
            self.last_activity = self.loop.time()
        else:
            self.dropped += 1  # from a stranger: no reply to anything the client sent

    def _from_client(self, sender: Address) -> bool:
        if self.client is not None:
            return sender == self.client
        if sender[0] != self.client_ip:
            return False
        if self.client_port is not None and sender[1] != self.client_port:
            return False
        self.client = sender  # the client's first datagram fixes its port
        return True

    async def _send_out(self, datagram: socks5.UdpDatagram) -> None:
        resolver = self.session.ctx.resolver
        addresses = upstream.literal_addresses(datagram.host, datagram.port)
        if addresses is None:
            cached = resolver.cached(datagram.host, datagram.port)
            if isinstance(cached, OSError):
                self.dropped += 1
                return
            if cached is None:
                # a name to look up: in a task of its own, so a slow resolver does not
                # hold up the datagrams behind this one; a few at a time, the rest dropped
                if len(self.lookups) >= MAX_LOOKUPS:
                    self.dropped += 1
                    return
                task = self.loop.create_task(self._resolve_and_send(datagram))
                self.lookups.add(task)
                task.add_done_callback(self.lookups.discard)
                return
            addresses = cached
        await self._send_to(datagram, addresses)

    async def _resolve_and_send(self, datagram: socks5.UdpDatagram) -> None:
        ctx = self.session.ctx
        try:
            addresses = await ctx.resolver.resolve(
                datagram.host, datagram.port, ctx.config.timeouts.connect
            )
        except SessionError:
            self.dropped += 1
            return
        await self._send_to(datagram, addresses)

    async def _send_to(
        self, datagram: socks5.UdpDatagram, addresses: list[upstream.AddrInfo]
    ) -> None:
        if not addresses:
            self.dropped += 1
            return
        rules = self.session.ctx.rules
        if not rules.trivial:  # every datagram's destination, each address on its own
            try:
                addresses = allowed_addresses(
                    rules, self.session.request_for(datagram.host, datagram.port), addresses
                )
            except Denied:
                self.denied += 1
                return
        family, addr = addresses[0]
        endpoint = await self._endpoint_for(family)
        if endpoint is None:
            self.dropped += 1
            return
        target: Address = (addr[0], addr[1])
        try:
            await endpoint.send(datagram.payload, addr)
        except OSError:
            self.dropped += 1
            return
        self.peers[target] = None
        self.peers.move_to_end(target)
        while len(self.peers) > MAX_PEERS:
            self.peers.popitem(last=False)
        self.datagrams_up += 1
        self.bytes_up += len(datagram.payload)
        self.last_activity = self.loop.time()

    async def _endpoint_for(self, family: int) -> Any:
        """The relay socket for its own family; another, bound to any address, for the
        other one (an IPv6 target reached from an IPv4 control connection)."""
        if self.relay.socket.family == family:
            return self.relay
        if self.other is None:
            wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
            with contextlib.suppress(OSError):
                self.other = await asyncio_dgram.bind((wildcard, 0))
                self._start_pump(self.other)
        return self.other
