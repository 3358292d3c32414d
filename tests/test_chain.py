"""proxyd.parents and proxyd.chain without sockets: server URLs, groups, and the order
in which each strategy tries the parents."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest

from proxyd import config
from proxyd.chain import Pool
from proxyd.errors import ConfigError, ParentError
from proxyd.parents import Parent, UpstreamGroup, parse_parent


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
