"""SOCKS5 UDP ASSOCIATE (RFC 1928 section 7), on asyncio-dgram.

One relay socket per association, bound on the local address of the TCP control
connection, so the BND.ADDR in the reply is one the client can reach (or
`server.udp_advertise` behind NAT). Datagrams are taken only from the client's
IP address (and port, when the request named one; else the first datagram's port
is kept), fragments and malformed headers are dropped, each datagram's
destination is judged by the gate like any request, and replies come back
wrapped with their sender's address, from the targets the client sent to and no
one else. The association ends with its control connection or after
`timeouts.udp_idle` without a datagram either way; its access line (written by
the session) counts datagrams and bytes each way.

Datagrams the rules route through an upstream group go to a SOCKS5 parent's
relay instead (ParentRelay); answers are then taken from that relay only, and
which targets may answer through it is the parent's to judge.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Final

import asyncio_dgram

from proxyd import gate
from proxyd.chain import ChainConnector, Lease
from proxyd.context import Conn, Context
from proxyd.dial import Route, dial
from proxyd.dns import AddrInfo, Lookup
from proxyd.egress import Egress, EgressError
from proxyd.errors import Denied, ProtocolError, SessionError, Status, UpstreamError
from proxyd.protocols import socks5, socks5_udp

# Targets an association remembers (replies are accepted from these), least recent out.
MAX_PEERS: Final = 1024
# Names being looked up at once per association; datagrams beyond are dropped.
MAX_LOOKUPS: Final = 16
# Datagrams held for a parent proxy's relay while it is being reached; beyond, dropped.
MAX_WAITING: Final = 64
# What a control connection carries after the request is read and dropped this much
# at a time, at most this many times before other callbacks get their turn.
CONTROL_READ: Final = 65536
CONTROL_READS: Final = 16
Address = tuple[str, int]


class Association:
    def __init__(
        self,
        ctx: Context,
        conn: Conn,
        control: socket.socket,
        client_port: int,
        reply: Callable[[str, int], None],
    ) -> None:
        self.ctx = ctx
        self.conn = conn
        self.control = control  # the client's TCP connection: its end ends the association
        self.loop = asyncio.get_running_loop()
        cfg = ctx.config
        self.idle = cfg.timeouts.udp_idle
        self.advertise = cfg.server.udp_advertise
        self.client_ip = conn.peer_ip
        self.client_port = client_port or None  # the port the request named, if any
        self.client: Address | None = None  # where the client's datagrams come from
        self.reply = reply
        self.relay: Any = None  # asyncio_dgram.DatagramServer on the control's local address
        self.other: Any = None  # for targets of the other address family, made when needed
        # with an egress: the sockets datagrams leave from, by family and way out
        self.outs: dict[tuple[int, Egress], Any] = {}
        self.egress: str | None = None  # the first egress address datagrams left from
        # one socket made at a time: a datagram after a lookup (a task of its own) and
        # one from the pump may want the same new socket at once
        self._opening = asyncio.Lock()
        self.peers: OrderedDict[Address, None] = OrderedDict()
        self.last_activity = self.loop.time()
        # Status.OK when the control connection closes
        self.ended: asyncio.Future[Status] = self.loop.create_future()
        self.pumps: list[asyncio.Task[None]] = []
        self.lookups: set[asyncio.Task[None]] = set()  # datagrams waiting for a lookup
        self.datagrams_up = self.datagrams_down = 0
        self.bytes_up = self.bytes_down = 0
        self.dropped = 0
        self.denied = 0  # datagrams to destinations the rules deny
        self.over_rate = 0  # datagrams beyond the user's rate (limits.per_user_rate)
        self.rate = gate.rate_for(ctx, conn.user)
        self.over_quota = 0  # datagrams beyond the user's quota ([[quotas]])
        self.account = gate.account_for(ctx, conn.user)
        self.established = False  # the reply went out
        self.parents: dict[str, ParentRelay] = {}  # upstream group -> its parent's relay
        self.via: list[str] = []  # the groups datagrams went through, for the access line

    async def run(self) -> Status:
        """Open the relay, answer the request, relay until the end; the access status.
        A SessionError before the answer is for the session to refuse with."""
        sock = self.control
        try:
            self.relay = await asyncio_dgram.bind((self.conn.local_address()[0], 0))
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
            for endpoint in (self.relay, self.other, *self.outs.values()):
                if endpoint is not None:
                    endpoint.close()
            for parent in self.parents.values():
                parent.close()

    # what the session asks of the worker that took its connection over
    between_requests: Final = False
    cut: Final = False
    logged: Final = False  # the session writes the association's access line

    @property
    def answered(self) -> bool:
        """The request was answered: a failure from now on is no refusal."""
        return self.established

    def usage(self) -> tuple[int, int, int, int]:
        """Bytes up and down, datagrams up and down, relayed so far."""
        return (self.bytes_up, self.bytes_down, self.datagrams_up, self.datagrams_down)

    def fields(self) -> dict[str, int | str]:
        """The access line's byte and datagram counts (and the groups used), once the
        request was answered."""
        if not self.established:
            return {}
        fields: dict[str, int | str] = {
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
        if self.over_quota:
            fields["datagrams_over_quota"] = self.over_quota
        if self.via:
            fields["via"] = ",".join(self.via)
        if self.egress is not None:
            fields["egress"] = self.egress
        return fields

    def _over_limit(self, direction: int, size: int) -> bool:
        """Whether a datagram is beyond the user's quota or rate (then it is dropped:
        UDP is policed, not queued); else it is charged to both."""
        account = self.account
        if account is not None and account.allowance(direction) < size:
            self.over_quota += 1
            return True
        if self.rate is not None and not self.rate[direction].try_take(size):
            self.over_rate += 1
            return True
        if account is not None:
            account.charge(direction, size)
        return False

    async def _relay(self) -> Status:
        """Pump datagrams until the control connection closes or nothing moves for
        `udp_idle`; the access status."""
        self._start_pump(self.relay, relay=True)
        try:
            while True:
                left = self.last_activity + self.idle - self.loop.time()
                if left <= 0:
                    return Status.IDLE_TIMEOUT
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

    def _start_pump(self, endpoint: Any, *, relay: bool = False) -> None:
        """Read `endpoint` for the association: the relay takes the client's datagrams
        and its targets' answers, the other sockets only the answers."""
        task = self.loop.create_task(self._pump(endpoint, relay))
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
        if self.ended.done():
            return  # (a continuation after the end)
        ended = _read_to_end(self.control)
        if ended is None:
            self.loop.call_soon(self._on_control)
        elif ended:
            self.loop.remove_reader(self.control.fileno())
            self.ended.set_result(Status.OK)

    async def _pump(self, endpoint: Any, relay: bool) -> None:
        while True:
            try:
                data, sender = await endpoint.recv()
            except asyncio_dgram.TransportClosed:
                return
            except OSError:  # an ICMP error for an earlier datagram: not ours to end on
                continue
            await self._dispatch(data, sender[:2], relay)

    async def _dispatch(self, data: bytes, sender: Address, relay: bool = True) -> None:
        if relay and self._from_client(sender):
            try:
                datagram = socks5_udp.parse_udp(data)
            except ProtocolError:
                self.dropped += 1
                return
            if not self._over_limit(0, len(datagram.payload)):
                await self._send_out(datagram)
        elif sender in self.peers and self.client is not None:
            if self._over_limit(1, len(data)):
                return
            self.peers.move_to_end(sender)
            header = socks5_udp.udp_header(*sender)
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

    async def _send_out(self, datagram: socks5_udp.UdpDatagram) -> None:
        """Send a client's datagram where the gate lets it go. A name to look up waits in
        a task of its own, so a slow resolver does not hold up the datagrams behind it;
        a few at a time, the rest dropped."""
        decided: asyncio.Future[tuple[Route | None, SessionError | None]] | None = None

        def settled(route: Route | None, error: SessionError | None) -> None:
            if decided is not None and not decided.done():
                decided.set_result((route, error))

        conn, host, port = self.conn, datagram.host, datagram.port
        if len(self.lookups) >= MAX_LOOKUPS and self.ctx.resolver.known(host, port) is None:
            self.dropped += 1  # a name to look up, with enough of them under way already
            return
        try:
            outcome = gate.decide(
                self.ctx, conn, "udp_associate", host, port, settled, need_addresses=True
            )
        except SessionError as exc:
            await self._send_routed(datagram, None, exc)
            return
        if isinstance(outcome, Route):
            await self._send_routed(datagram, outcome, None)
        else:
            decided = self.loop.create_future()
            task = self.loop.create_task(self._send_after_lookup(datagram, decided, outcome))
            self.lookups.add(task)
            task.add_done_callback(self.lookups.discard)

    async def _send_after_lookup(
        self,
        datagram: socks5_udp.UdpDatagram,
        decided: asyncio.Future[tuple[Route | None, SessionError | None]],
        lookup: Lookup,
    ) -> None:
        try:
            route, error = await decided
        finally:
            lookup.cancel()
        await self._send_routed(datagram, route, error)

    async def _send_routed(
        self, datagram: socks5_udp.UdpDatagram, route: Route | None, error: SessionError | None
    ) -> None:
        if error is not None or route is None:
            if isinstance(error, Denied):
                self.denied += 1
            else:
                self.dropped += 1
            return
        addresses = route.addresses
        if route.via is not None:
            self._send_via(route.via, datagram, addresses[0][1][0] if addresses else None)
            return
        if not addresses:
            self.dropped += 1
            return
        way_out = route.egress
        if way_out is not None:  # the first address of a family the egress serves
            addresses = [a for a in addresses if way_out.serves(a[0])] or addresses
        family, addr = addresses[0]
        if route.refuse is not None and route.refuse(addr[0], addr[1]) is not None:
            self.denied += 1  # the daemon itself (its listener or metrics port)
            return
        if way_out is None:
            endpoint = await self._endpoint_for(family)
        else:
            endpoint = await self._egress_endpoint(family, way_out, route.sticky_key)
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
        async with self._opening:
            if self.other is None:
                wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
                with contextlib.suppress(OSError):
                    self.other = await asyncio_dgram.bind((wildcard, 0))
                    self._start_pump(self.other)
        return self.other

    async def _egress_endpoint(self, family: int, way_out: Egress, key: str) -> Any:
        """The socket datagrams to a target of `family` leave from when an egress says
        where: one per association and way out, its address picked once (a sticky one
        the same as the user's tunnels get); None when the family has no egress
        address (the datagram is dropped: never sent from an address not named)."""
        endpoint = self.outs.get((family, way_out))
        if endpoint is not None:
            return endpoint
        async with self._opening:
            return self.outs.get((family, way_out)) or await self._open_egress(family, way_out, key)

    async def _open_egress(self, family: int, way_out: Egress, key: str) -> Any:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            address = way_out.bind(sock, family, key)
            sock.setblocking(False)
            endpoint = await asyncio_dgram.from_socket(sock)
        except (OSError, EgressError):
            sock.close()
            return None
        self.outs[family, way_out] = endpoint
        self._start_pump(endpoint)
        if self.egress is None and address is not None:
            self.egress = address
        return endpoint

    def _send_via(
        self, group: str, datagram: socks5_udp.UdpDatagram, address: str | None = None
    ) -> None:
        """A datagram the rules route through `group`: to its parent's relay, which is
        reached on the first such datagram (and again after it went away)."""
        relay = self.parents.get(group)
        if relay is None or relay.closed:
            try:
                # the first datagram's destination is what the hash strategy hashes
                relay = ParentRelay(self, group, datagram.host)
            except SessionError:  # a reload removed the group meanwhile
                self.dropped += 1
                return
            self.parents[group] = relay
            if group not in self.via:
                self.via.append(group)
        relay.send(datagram, address)

    async def reply_from_parent(self, data: bytes, payload: int) -> None:
        """A parent relay's datagram (already in SOCKS5 UDP form, with the target as
        sender) for the client; awaited, so a slow client slows the parent's pump."""
        if self.client is None or self._over_limit(1, payload):
            return
        try:
            await self.relay.send(data, self.client)
        except (OSError, asyncio_dgram.TransportClosed):
            self.dropped += 1
            return
        self.datagrams_down += 1
        self.bytes_down += payload
        self.last_activity = self.loop.time()

    def sent_through_parent(self, payload: int) -> None:
        self.datagrams_up += 1
        self.bytes_up += payload
        self.last_activity = self.loop.time()


class ParentRelay:
    """An association's datagrams for one upstream group, through the UDP relay of a
    SOCKS5 parent, as RFC 1928 section 7 has any client do it: a control connection
    asks the parent for UDP ASSOCIATE (our address all zeros: not known yet), and a
    socket of ours, on the control connection's local address, sends the datagrams
    wrapped in their SOCKS5 header to the relay the parent named and takes its
    answers (already wrapped with the target as sender) for the client.

    When the parent's control connection ends, so does this relay; the next datagram
    for the group reaches a parent again.
    """

    def __init__(self, association: Association, group: str, first_host: str) -> None:
        self.association = association
        self.group = group
        self.ctx = association.ctx
        self.loop = association.loop
        self.closed = False
        self.waiting: deque[tuple[socks5_udp.UdpDatagram, str | None]] = deque()
        self.lookups: set[Lookup] = set()  # names being resolved for a socks5:// parent
        self.control: socket.socket | None = None
        self.sock: socket.socket | None = None  # ours, for the parent's relay
        self.relay: tuple[Any, int] = ("", 0)  # the parent's relay: (ip_address, port)
        self.endpoint: Any = None  # asyncio_dgram's view of it, which receives
        self.lease: Lease | None = None
        self.parent: Any = None
        self.receiver: asyncio.Task[None] | None = None
        # the control connection: UDP ASSOCIATE asked of a parent of the group the gate
        # routed this datagram through (the address all zeros: not known yet)
        timeout = self.ctx.config.timeouts.connect
        route = Route("0.0.0.0", 0, None, group, None, self.loop.time() + timeout)
        connector = dial(
            self.ctx,
            route,
            self._on_connected,
            command=socks5.Command.UDP_ASSOCIATE,
            hash_key=first_host,
            timed=False,  # (not a target's connection: kept out of the connect times)
        )
        assert isinstance(connector, ChainConnector)  # (a route through a group)
        self.dial = connector

    def send(self, datagram: socks5_udp.UdpDatagram, address: str | None) -> None:
        """`address`: the target's address, when the rules already resolved it."""
        if self.endpoint is None:
            if len(self.waiting) >= MAX_WAITING:
                self.association.dropped += 1
            else:
                self.waiting.append((datagram, address))
            return
        self._forward(datagram, address)

    def _forward(self, datagram: socks5_udp.UdpDatagram, address: str | None) -> None:
        host = datagram.host
        if not self.parent.resolves_names:  # a socks5:// parent is sent addresses only
            if address is None:
                address = self._address_of(datagram)
                if address is None:
                    return
            host = address
        assert self.sock is not None
        try:
            # a datagram socket queues nothing of its own: a plain send is the whole job
            relay = (str(self.relay[0]), self.relay[1])
            self.sock.sendto(socks5_udp.udp_header(host, datagram.port) + datagram.payload, relay)
        except OSError:
            self.association.dropped += 1
            return
        self.association.sent_through_parent(len(datagram.payload))

    def _address_of(self, datagram: socks5_udp.UdpDatagram) -> str | None:
        """The target's address, when an IP literal or the resolver's cache has it at
        once; else the name is looked up (a few at a time) and its datagram sent once
        it is known."""
        resolver = self.ctx.resolver
        if (
            len(self.lookups) >= MAX_LOOKUPS
            and resolver.known(datagram.host, datagram.port) is None
        ):
            self.association.dropped += 1  # a name to look up, with enough under way
            return None
        found: list[str] = []

        def resolved(addresses: list[AddrInfo] | None, error: UpstreamError | None) -> None:
            if lookup is not None:
                self.lookups.discard(lookup)
            if error is not None or not addresses:
                self.association.dropped += 1  # no such name
            elif lookup is None:
                found.append(str(addresses[0][1][0]))
            elif not self.closed:
                self._forward(datagram, str(addresses[0][1][0]))

        lookup: Lookup | None = None
        timeout = self.ctx.config.timeouts.connect
        client = self.association.conn.peer_ip
        lookup = resolver.find(datagram.host, datagram.port, timeout, resolved, client)
        if lookup is not None:
            self.lookups.add(lookup)
        return found[0] if found else None

    def _on_connected(self, control: socket.socket | None, error: SessionError | None) -> None:
        if self.closed:
            if control is not None:
                control.close()
            return
        if error is not None or control is None:
            self._failed(error)
            return
        self.control = control
        self.lease = self.dial.lease
        assert self.lease is not None
        self.parent = self.lease.parent
        try:
            relay = _relay_address(self.dial.bound, control)
            family = socket.AF_INET6 if relay[0].version == 6 else socket.AF_INET
            local = control.getsockname()[0] if family == control.family else None
        except (OSError, ValueError) as exc:
            self._failed(SessionError(f"the parent's relay address: {exc}"))
            return
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            # on the control connection's address, which the parent takes datagrams from
            sock.bind((local or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))
        except OSError as exc:
            sock.close()
            self._failed(SessionError(f"cannot open a UDP socket: {exc.strerror}"))
            return
        # not connect()ed (asyncio_dgram cannot take a connected socket under uvloop):
        # answers are taken from the relay's address only, checked on receipt
        self.sock, self.relay = sock, relay
        self.receiver = self.loop.create_task(self._receive(sock))
        self.loop.add_reader(control.fileno(), self._on_control)

    def _failed(self, error: SessionError | None) -> None:
        """The parent's relay cannot be used: the waiting datagrams are dropped, and
        what was taken (the control connection, the lease) is given back now, since
        the next datagram for the group makes a new relay in this one's place."""
        self.association.dropped += len(self.waiting)
        self.waiting.clear()
        self.ctx.log.info(
            "udp_parent_failed",
            conn_id=self.association.conn.conn_id,
            group=self.group,
            error=str(error),
        )
        self.close()

    async def _receive(self, sock: socket.socket) -> None:
        self.endpoint = await asyncio_dgram.from_socket(sock)
        while self.waiting:
            self._forward(*self.waiting.popleft())
        while True:
            try:
                data, sender = await self.endpoint.recv()
            except asyncio_dgram.TransportClosed:
                return
            except OSError:  # an ICMP error for an earlier datagram
                continue
            if _same_address(sender, self.relay):
                try:
                    datagram = socks5_udp.parse_udp(data)
                except ProtocolError:
                    self.association.dropped += 1
                    continue
                await self.association.reply_from_parent(data, len(datagram.payload))
            else:
                self.association.dropped += 1  # from a stranger

    def _on_control(self) -> None:
        """The parent's control connection carries nothing: its end ends this relay."""
        if self.control is None:
            return  # (a continuation after the end)
        ended = _read_to_end(self.control)
        if ended is None:
            self.loop.call_soon(self._on_control)
        elif ended:
            self.close()

    def close(self) -> None:
        if self.closed and self.control is None:
            return
        self.closed = True
        self.dial.cancel()
        for lookup in self.lookups:
            lookup.cancel()
        self.lookups.clear()
        if self.receiver is not None:
            self.receiver.cancel()
        if self.endpoint is not None:
            self.endpoint.close()  # and the socket under it
        elif self.sock is not None:
            self.sock.close()
        if self.control is not None:
            self.loop.remove_reader(self.control.fileno())
            self.control.close()
            self.control = None
        if self.lease is not None:
            self.lease.release()


def _read_to_end(control: socket.socket) -> bool | None:
    """Read and drop what a control connection carries, to the end of what has come:
    True once it ended (EOF or an error), False when it has nothing more for now,
    None when it still had more after a batch of reads (then read it again soon).

    One read per readiness event is not enough: under uvloop, a reset socket's
    reader is called once and its watcher then closed, so bytes the client sent
    before the reset (after its request, say) would hide the end for good."""
    for _ in range(CONTROL_READS):
        try:
            if not control.recv(CONTROL_READ):
                return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
    return None


def _relay_address(bound: tuple[str, int], control: socket.socket) -> tuple[Any, int]:
    """The parent's relay as (ip_address, port): its BND.ADDR, or the address we reached
    the parent on when that is all zeros or a name (RFC 1928 leaves both possible)."""
    host, port = bound
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None or ip.is_unspecified:
        ip = ipaddress.ip_address(control.getpeername()[0])
    return _plain(ip), port


def _plain(ip: Any) -> Any:
    """An IPv4-mapped IPv6 address as the IPv4 address it is."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


def _same_address(sender: tuple[Any, ...], relay: tuple[Any, int]) -> bool:
    try:
        return bool(sender[1] == relay[1] and _plain(ipaddress.ip_address(sender[0])) == relay[0])
    except ValueError:
        return False
