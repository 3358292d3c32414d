"""proxyd.parents and proxyd.chain without a network: server URLs, groups, the order in
which each strategy tries the parents, and what a parent's answer becomes (the
handshake over a socketpair)."""

from __future__ import annotations

import asyncio
import collections
import socket
from typing import Any

import pytest

from proxyd import config
from proxyd.chain import Handshake, Pool, _target_failure, client_for
from proxyd.errors import (
    REP_ADDRESS_TYPE_NOT_SUPPORTED,
    REP_COMMAND_NOT_SUPPORTED,
    REP_CONNECTION_REFUSED,
    REP_GENERAL_FAILURE,
    REP_HOST_UNREACHABLE,
    REP_NETWORK_UNREACHABLE,
    REP_NOT_ALLOWED,
    REP_TTL_EXPIRED,
    AddressNotSupported,
    ConfigError,
    HostUnreachable,
    NetworkUnreachable,
    ParentDenied,
    ParentError,
    SessionError,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
)
from proxyd.parents import Parent, UpstreamGroup, parse_parent
from proxyd.protocols import socks5
from proxyd.protocols.common import Credentials


@pytest.mark.parametrize(
    "url, parent",
    [
        ("socks5://127.0.0.1:1080", Parent("socks5", "127.0.0.1", 1080)),
        ("SOCKS5H://Proxy.Example:1081", Parent("socks5h", "proxy.example", 1081)),
        ("socks4a://[::1]:1080", Parent("socks4a", "::1", 1080)),
        ("http://proxy.example:3128/", Parent("http", "proxy.example", 3128)),
    ],
)
def test_server_urls(url: str, parent: Parent) -> None:
    assert parse_parent(url) == parent


def test_credentials_are_percent_decoded_and_hidden() -> None:
    parent = parse_parent("socks5://al%40ice:p%3Ass@h.example:1080")
    assert parent.credentials is not None
    assert (parent.credentials.username, parent.credentials.password) == ("al@ice", "p:ss")
    assert "p:ss" not in repr(parent) and "p:ss" not in str(parent)
    assert str(parent) == "socks5://h.example:1080"
    assert parse_parent("socks4a://ident@h.example:1080").credentials is not None


@pytest.mark.parametrize(
    "url, problem",
    [
        ("ftp://h:21", "scheme must be one of"),
        ("socks5://h", "must name a port"),
        ("socks5://h:0", "must name a port"),
        ("socks5://h:99999", "not a valid URL"),
        ("socks5://:1080", "names no host"),
        ("http://h:3128/path", "must be only"),
        ("http://h:3128?q=1", "must be only"),
        ("socks5://u@h:1080", "no password"),
        ("socks5://:secret@h:1080", "a password but no user name"),
        ("socks4a://u:secret@h:1080", "no password"),
        ("socks5://" + "u" * 256 + ":p@h:1080", "at most 255 bytes"),
        (1080, "must be a URL string"),
    ],
)
def test_bad_server_urls_never_quote_the_url(url: Any, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_parent(url)
    assert problem in str(info.value)
    assert "secret" not in str(info.value)


def load(text_tables: dict[str, Any]) -> config.Config:
    return config.from_mapping(text_tables)


def test_groups_and_rules_load_together() -> None:
    cfg = load(
        {
            "upstreams": [
                {
                    "name": "parents",
                    "servers": ["socks5h://a.example:1080", "http://b.example:3128"],
                    "strategy": "hash",
                    "max_fails": 5,
                    "fail_window": 10,
                    "down_time": 20.5,
                }
            ],
            "rules": [{"action": "allow", "via": "parents"}],
        }
    )
    group = cfg.upstream("parents")
    assert (group.strategy, group.max_fails, group.fail_window, group.down_time) == (
        "hash",
        5,
        10.0,
        20.5,
    )
    assert [str(s) for s in group.servers] == ["socks5h://a.example:1080", "http://b.example:3128"]
    assert cfg.rules[0].via == "parents"


@pytest.mark.parametrize(
    "data, problem",
    [
        ({"upstreams": {"name": "p"}}, "upstreams: must be an array of tables"),
        ({"upstreams": [{"servers": ["socks5://h:1"]}]}, "upstreams[0].name: must be a name"),
        ({"upstreams": [{"name": "direct", "servers": ["socks5://h:1"]}]}, "upstreams[0].name"),
        ({"upstreams": [{"name": "p"}]}, "upstreams[0].servers: must be a non-empty list"),
        ({"upstreams": [{"name": "p", "servers": []}]}, "upstreams[0].servers: must be"),
        (
            {"upstreams": [{"name": "p", "servers": ["socks5://h:1", "http://h:1"]}]},
            "upstreams[0].servers: the same host:port is listed twice",
        ),
        (
            {"upstreams": [{"name": "p", "servers": ["socks5://h:1"], "strategy": "fastest"}]},
            "upstreams[0].strategy: must be one of",
        ),
        (
            {"upstreams": [{"name": "p", "servers": ["socks5://h:1"], "max_fails": True}]},
            "upstreams[0].max_fails",
        ),
        (
            {"upstreams": [{"name": "p", "servers": ["socks5://h:1"], "down_time": 0}]},
            "upstreams[0].down_time",
        ),
        (
            {"upstreams": [{"name": "p", "servers": ["socks5://h:1"], "weight": 2}]},
            "upstreams[0].weight: unknown key",
        ),
        (
            {
                "upstreams": [
                    {"name": "p", "servers": ["socks5://h:1"]},
                    {"name": "p", "servers": ["socks5://h:2"]},
                ]
            },
            "upstreams[1].name: 'p' is used twice",
        ),
        (
            {"rules": [{"action": "allow", "via": "nowhere"}]},
            "rules[0].via: no [[upstreams]] group named 'nowhere'",
        ),
        (
            {"server": {"proxy_protocol_from": ["10.0.0.0/8", "not-a-cidr"]}},
            "server.proxy_protocol_from[1]: 'not-a-cidr' is not an IP address or CIDR",
        ),
        ({"server": {"proxy_protocol_from": "10.0.0.0/8"}}, "server.proxy_protocol_from: must"),
    ],
)
def test_bad_groups_name_their_key(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(data)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


# --- the order each strategy tries the parents in ---------------------------------------


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    warning = info


def pool(strategy: str, count: int = 3, **keys: Any) -> Pool:
    servers = tuple(Parent("socks5", f"10.0.0.{i + 1}", 1080) for i in range(count))
    return Pool(UpstreamGroup("p", servers, strategy, **keys), dialer=None, log=Log())  # type: ignore[arg-type]


def first(p: Pool, host: str = "example.com") -> str:
    return p.candidates(host)[0].parent.host


def test_round_robin_is_exact_and_offers_the_rest_in_turn() -> None:
    p = pool("round_robin")
    assert [first(p) for _ in range(6)] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2
    assert [s.parent.host for s in p.candidates("x")] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def test_least_connections_prefers_the_idle_parent() -> None:
    p = pool("least_connections")
    p.states[0].active, p.states[1].active, p.states[2].active = 2, 0, 1
    assert [s.parent.host for s in p.candidates("x")] == ["10.0.0.2", "10.0.0.3", "10.0.0.1"]
    p.states[1].active = 2  # ties go round in turn
    assert first(p) == "10.0.0.3"


def test_random_covers_every_parent() -> None:
    p = pool("random")
    assert {first(p) for _ in range(200)} == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}


def test_hash_is_stable_even_and_moves_only_the_removed_share() -> None:
    names = [f"host{i}.example" for i in range(3000)]
    three, two = pool("hash", 3), pool("hash", 2)
    before = {n: first(three, n) for n in names}
    assert before == {n: first(three, n) for n in names}  # stable
    counts = collections.Counter(before.values())
    assert min(counts.values()) > 700, counts  # an even split of 3000
    after = {n: first(two, n) for n in names}
    moved = [n for n in names if before[n] != after[n]]
    assert all(before[n] == "10.0.0.3" for n in moved)  # only the removed parent's hosts
    assert len(moved) == counts["10.0.0.3"]
    # a name is the same host whatever its case or trailing dot
    assert first(three, "HOST7.Example.") == before["host7.example"]


def test_a_down_parent_is_left_out_and_its_hosts_go_to_the_next() -> None:
    async def run() -> None:
        p = pool("hash", max_fails=2, fail_window=60.0, down_time=60.0)
        owner = p.candidates("a.example")[0]
        p.failed(owner, ParentError("refused"))
        assert not owner.down  # one failure of two
        p.failed(owner, ParentError("refused"))
        assert owner.down and owner not in p.candidates("a.example")
        events = [name for name, _ in p.log.events]
        assert events == ["upstream_failed", "upstream_failed", "upstream_down"]
        p.close()  # the probe timer goes with the group

    asyncio.run(run())


def test_a_reload_retires_removed_parents_and_groups() -> None:
    async def run() -> None:
        from proxyd.chain import Upstreams

        def cfg(*servers: str) -> config.Config:
            groups = [{"name": "p", "servers": list(servers), "max_fails": 1}] if servers else []
            return config.from_mapping({"upstreams": groups})

        upstreams = Upstreams(resolver=None, log=Log())  # type: ignore[arg-type]
        upstreams.configure(cfg("socks5://10.0.0.1:1080", "socks5://10.0.0.2:1080"))
        old = upstreams.pool("p")
        kept, removed = old.states
        upstreams.configure(cfg("socks5://10.0.0.1:1080"))
        new = upstreams.pool("p")
        assert new.states == [kept] and not kept.retired  # its health carries over
        # an attempt begun before the reload fails after it: nothing is marked or probed
        old.failed(removed, ParentError("refused"))
        assert removed.retired and not removed.down and removed.probe is None
        upstreams.configure(cfg())
        assert kept.retired
        with pytest.raises(ParentError, match="no longer configured"):
            upstreams.pool("p")

    asyncio.run(run())


# --- what a parent's answer becomes: the error class, what it answers, what it logs ------

ALICE = Credentials("alice", "wonderland")
REFUSED = ("refused", REP_CONNECTION_REFUSED, 502)
GENERAL = ("error", REP_GENERAL_FAILURE, 502)
PARENT = ("parent_failed", REP_GENERAL_FAILURE, 502)
DENIED = ("denied", REP_NOT_ALLOWED, 403)
TIMEOUT = ("timeout", REP_HOST_UNREACHABLE, 504)
UNREACHABLE_HOST = ("unreachable", REP_HOST_UNREACHABLE, 502)
UNREACHABLE_NET = ("unreachable", REP_NETWORK_UNREACHABLE, 502)
EX = "example.com:443"


def socks5_reply(rep: int) -> bytes:
    return bytes((0x05, rep, 0x00)) + b"\x01\xc0\x00\x02\x01\x10\xe1"


# (parent, target host, everything the parent sends, error class, (status, socks_reply,
# http_status), message): the same for every case as when the clients raised these errors
ANSWERS = [
    # SOCKS5: the parent's own failures
    ("socks5h", EX, b"\x05\xff", ParentError, PARENT,
     "the parent proxy accepts none of the offered SOCKS5 methods"),
    ("socks5h", EX, b"\x05\x03", ParentError, PARENT,
     "the parent proxy chose SOCKS5 method 0x03, not offered"),
    ("socks5h", EX, b"\x04\x00", ParentError, PARENT,
     "SOCKS5 method choice from the parent proxy has version 0x04, expected 0x05"),
    ("socks5h auth", EX, b"\x05\x02\x01\x01", ParentError, PARENT,
     "the parent proxy refused our credentials"),
    ("socks5h auth", EX, b"\x05\x02\x05\x00", ParentError, PARENT,
     "SOCKS5 username/password status from the parent proxy has version 0x05, expected 0x01"),
    ("socks5h", EX, b"\x05\x00\x04\x00", ParentError, PARENT,
     "SOCKS5 reply from the parent proxy has version 0x04, expected 0x05"),
    ("socks5h", EX, b"\x05\x00\x05\x00\x01\x01", ParentError, PARENT,
     "SOCKS5 reply from the parent proxy has reserved byte 0x01"),
    ("socks5h", EX, b"\x05\x00\x05\x00\x00\x02", ParentError, PARENT,
     "SOCKS5 reply from the parent proxy: address type 0x02 is not supported"),
    ("socks5h", EX, b"\x05\x00\x05\x00\x00\x03\x00\x00\x50", ParentError, PARENT,
     "SOCKS5 reply from the parent proxy: empty domain name"),
    ("socks5h", EX, b"\x05\x00\x05", ParentError, PARENT,
     "the parent proxy closed the connection during the handshake"),
    ("socks5h", EX, b"", ParentError, PARENT,
     "the parent proxy closed the connection during the handshake"),
    # SOCKS5: what the parent says about the target
    ("socks5h", EX, b"\x05\x00" + socks5_reply(0x01), UpstreamError, GENERAL,
     f"{EX}: the parent proxy failed (SOCKS5 reply 0x01)"),
    ("socks5h", EX, b"\x05\x00" + socks5_reply(0x02), ParentDenied, DENIED,
     f"{EX}: the parent proxy's rules do not allow it"),
    ("socks5h", EX, b"\x05\x00" + socks5_reply(0x03), NetworkUnreachable, UNREACHABLE_NET,
     f"{EX}: the parent proxy says the network is unreachable"),
    ("socks5h", EX, b"\x05\x00" + socks5_reply(0x04), HostUnreachable, UNREACHABLE_HOST,
     f"{EX}: the parent proxy says the host is unreachable"),
    ("socks5h", EX, b"\x05\x00" + socks5_reply(0x05), UpstreamRefused, REFUSED,
     f"{EX}: the parent proxy says the connection was refused"),
    ("socks5h", EX, b"\x05\x00" + socks5_reply(0x06), UpstreamTimeout, TIMEOUT,
     f"{EX}: the parent proxy says the connection timed out"),
    ("socks5h", EX, b"\x05\x00" + socks5_reply(0x07), UpstreamError, GENERAL,
     f"{EX}: the parent proxy failed (SOCKS5 reply 0x07)"),
    ("socks5h", EX, b"\x05\x00" + socks5_reply(0x08), UpstreamError, GENERAL,
     f"{EX}: the parent proxy failed (SOCKS5 reply 0x08)"),
    ("socks5h", EX, b"\x05\x00" + socks5_reply(0x09), UpstreamError, GENERAL,
     f"{EX}: the parent proxy failed (SOCKS5 reply 0x09)"),
    ("socks5h", EX, b"\x05\x00" + socks5_reply(0xFF), UpstreamError, GENERAL,
     f"{EX}: the parent proxy failed (SOCKS5 reply 0xff)"),
    ("socks5h auth", EX, b"\x05\x02\x01\x00\x05\x05", UpstreamRefused, REFUSED,
     f"{EX}: the parent proxy says the connection was refused"),
    ("socks5", "127.0.0.1:9", b"\x05\x00\x05\x05", UpstreamRefused, REFUSED,
     "127.0.0.1:9: the parent proxy says the connection was refused"),
    ("socks5", "[2001:db8::1]:443", b"\x05\x00\x05\x04", HostUnreachable, UNREACHABLE_HOST,
     "[2001:db8::1]:443: the parent proxy says the host is unreachable"),
    # SOCKS4a
    ("socks4a", EX, b"\x00\x5b\x00\x00\x00\x00\x00\x00", UpstreamError, GENERAL,
     f"{EX}: the parent proxy rejected or failed the request"),
    ("socks4a", EX, b"\x00\x5b", UpstreamError, GENERAL,
     f"{EX}: the parent proxy rejected or failed the request"),
    ("socks4a", EX, b"\x00\x5c", ParentError, PARENT,
     "the parent proxy could not confirm our user id by identd (92)"),
    ("socks4a", EX, b"\x00\x5d", ParentError, PARENT,
     "the parent proxy could not confirm our user id by identd (93)"),
    ("socks4a", EX, b"\x00\x5e", ParentError, PARENT,
     "SOCKS4 reply from the parent proxy has unknown code 0x5e"),
    ("socks4a", EX, b"\x05\x5a", ParentError, PARENT,
     "SOCKS4 reply from the parent proxy has version 0x05"),
    ("socks4a", EX, b"\x00\x5a\x01", ParentError, PARENT,
     "the parent proxy closed the connection during the handshake"),
    # HTTP
    ("http auth", EX, b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", ParentError,
     PARENT, "the parent proxy refused our credentials (407)"),
    ("http", EX, b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", ParentError, PARENT,
     "the parent proxy wants credentials and none are configured (407)"),
    ("http", EX, b"HTTP/1.1 403 Forbidden\r\n\r\n", ParentDenied, DENIED,
     f"{EX}: the parent proxy's rules do not allow it (403)"),
    ("http", EX, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\n\r\n", ParentDenied,
     DENIED, f"{EX}: the parent proxy's rules do not allow it (403)"),
    ("http", EX, b"HTTP/1.1 504 Gateway Timeout\r\n\r\n", UpstreamTimeout, TIMEOUT,
     f"{EX}: the parent proxy timed out connecting (504)"),
    ("http", EX, b"HTTP/1.1 502 Bad Gateway\r\n\r\n", UpstreamError, GENERAL,
     f"{EX}: the parent proxy could not connect (502)"),
    ("http", EX, b"HTTP/1.1 503 Service Unavailable\r\n\r\n", UpstreamError, GENERAL,
     f"{EX}: the parent proxy could not connect (503)"),
    ("http", EX, b"HTTP/1.1 500 Internal Server Error\r\n\r\n", UpstreamError, GENERAL,
     f"{EX}: the parent proxy answered CONNECT with 500"),
    ("http", EX, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", UpstreamError,
     GENERAL, f"{EX}: the parent proxy answered CONNECT with 404"),
    ("http", EX, b"HTTP/1.1 400 Bad Request\r\n\r\n", UpstreamError, GENERAL,
     f"{EX}: the parent proxy answered CONNECT with 400"),
    ("http", EX, b"HTTP/1.1 301 Moved Permanently\r\nLocation: /\r\n\r\n", ParentError, PARENT,
     "the parent proxy answered CONNECT with 301"),
    ("http", EX, b"SSH-2.0-OpenSSH_9.6\r\n\r\n", ParentError, PARENT,
     "malformed HTTP response from the parent proxy"),
    ("http", EX, b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 17000, ParentError, PARENT,
     "the parent proxy's response head is longer than 16384 bytes"),
    ("http", EX, b"HTTP/1.1 200", ParentError, PARENT,
     "the parent proxy closed the connection during the handshake"),
]  # fmt: skip


def ask(kind: str, target: str) -> tuple[Parent, str, int]:
    scheme, _, auth = kind.partition(" ")
    parent = Parent(scheme, "127.0.0.1", 1080, ALICE if auth else None)
    host, _, port = target.rpartition(":")
    return parent, host.strip("[]"), int(port)


async def handshake(parent: Parent, host: str, port: int, answer: bytes) -> None:
    """Our handshake with a parent that sends `answer` whatever it is told, then closes."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.sendall(answer)
        theirs.shutdown(socket.SHUT_WR)
        client = client_for(parent, socks5.Command.CONNECT, host, port)
        await Handshake(ours, client).run()


@pytest.mark.parametrize(
    ("kind", "target", "answer", "error", "replies", "message"),
    [pytest.param(*case, id=f"{case[0]}: {case[2][:24]!r}") for case in ANSWERS],
)
def test_what_a_parent_answer_becomes(
    kind: str,
    target: str,
    answer: bytes,
    error: type[SessionError],
    replies: tuple[str, int, int],
    message: str,
) -> None:
    parent, host, port = ask(kind, target)
    with pytest.raises(SessionError) as info:
        asyncio.run(handshake(parent, host, port, answer))
    exc = info.value
    assert type(exc) is error
    assert (exc.status, exc.socks_reply, exc.http_status) == replies
    assert str(exc) == message
    assert "wonderland" not in str(exc)


@pytest.mark.parametrize(
    ("code", "error", "replies"),
    [
        (REP_GENERAL_FAILURE, UpstreamError, GENERAL),
        (REP_NOT_ALLOWED, ParentDenied, DENIED),
        (REP_NETWORK_UNREACHABLE, NetworkUnreachable, UNREACHABLE_NET),
        (REP_HOST_UNREACHABLE, HostUnreachable, UNREACHABLE_HOST),
        (REP_CONNECTION_REFUSED, UpstreamRefused, REFUSED),
        (REP_TTL_EXPIRED, UpstreamTimeout, TIMEOUT),
        (REP_COMMAND_NOT_SUPPORTED, UpstreamError, GENERAL),
        (REP_ADDRESS_TYPE_NOT_SUPPORTED, UpstreamError, GENERAL),
        (0x09, UpstreamError, GENERAL),
        (0xFF, UpstreamError, GENERAL),
    ],
)
def test_a_refusal_is_the_targets_failure(
    code: int, error: type[UpstreamError], replies: tuple[str, int, int]
) -> None:
    """A client's Refused: the error its SOCKS5 code says, never the parent's failure."""
    exc = _target_failure(code, f"{EX}: the parent proxy says so")
    assert type(exc) is error
    assert (exc.status, exc.socks_reply, exc.http_status) == replies
    assert str(exc) == f"{EX}: the parent proxy says so"
    assert not isinstance(exc, ParentError)  # no parent is blamed, none is tried next


@pytest.mark.parametrize(
    ("kind", "host", "port", "why"),
    [
        ("socks4a", "2001:db8::1", 443, "SOCKS4 cannot carry an IPv6 address"),
        ("socks4a", "::ffff:192.0.2.1", 443, "SOCKS4 cannot carry an IPv6 address"),
        # 224 characters, 287 bytes once IDNA-encoded
        ("socks4a", ".".join(["bü" * 12] * 9), 80, "SOCKS4a host name longer than 255 bytes"),
        ("socks5h", ".".join(["bü" * 12] * 9), 80, "domain name of 287 bytes cannot be sent"),
        ("socks5h", "a" * 64 + ".example", 80, "label empty or too long"),
        ("socks5h", "a\x00b", 80, "control characters"),
        ("socks5h", "example.com", 65536, "port 65536 is out of range"),
        ("http", "user@host.example", 80, "cannot be written in a CONNECT request"),
        ("http", "example.com", 0, "port 0 is out of range"),
        ("http auth", "example.com", 443, None),  # the control: a client is made
    ],
)
def test_what_a_parent_cannot_be_asked_for(
    kind: str, host: str, port: int, why: str | None
) -> None:
    """A target the parent's protocol cannot carry: neither the target's failure nor the
    parent's (no other parent is tried); HTTP 502, as a target we could not reach."""
    parent, _, _ = ask(kind, "x:1")
    if why is None:
        client_for(parent, socks5.Command.CONNECT, host, port)
        return
    with pytest.raises(AddressNotSupported) as info:
        client_for(parent, socks5.Command.CONNECT, host, port)
    exc = info.value
    assert (exc.status, exc.socks_reply, exc.http_status) == (
        "unsupported",
        REP_ADDRESS_TYPE_NOT_SUPPORTED,
        502,
    )
    assert str(exc).startswith(f"the parent proxy {parent} cannot be asked for it: ")
    assert why in str(exc)
    assert not isinstance(exc, ParentError)
