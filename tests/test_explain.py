"""proxyd.explain without a network: the target and command as the parsers give
them, and each `[[rules]]` table's lines in a config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxyd.explain import command_of, parse_target, rule_source, rule_spans

CONFIG = """\
[server]
listen = ["127.0.0.1:1080"]

[[ rules ]]  # the first
action = "deny"
destinations = [
  "10.0.0.0/8",
]

# the second: everyone else
[[rules]]
action = "allow"

[[upstreams]]
name = "p"
servers = ["socks5://127.0.0.1:1081"]
[[rules]]
action = "allow"
via = "p"
"""


def test_each_rules_table_spans_its_header_to_the_next_table() -> None:
    assert rule_spans(CONFIG) == [(4, 8), (11, 12), (17, 19)]


def test_a_rule_source_needs_one_header_a_rule(tmp_path: Path) -> None:
    path = tmp_path / "proxyd.toml"
    path.write_text(CONFIG)
    source = rule_source(path, 1, 3)
    assert source == {
        "path": str(path),
        "first_line": 11,
        "last_line": 12,
        "lines": ["[[rules]]", 'action = "allow"'],
    }
    assert rule_source(path, 1, 4) is None  # rules written some other way too
    assert rule_source(tmp_path / "gone.toml", 0, 3) is None


@pytest.mark.parametrize(
    "text, target",
    [
        ("Example.COM.:443", ("example.com", 443)),
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::FFFF:127.0.0.1]:80", ("::ffff:127.0.0.1", 80)),
        ("bücher.example:80", ("xn--bcher-kva.example", 80)),
    ],
)
def test_targets_are_canonical(text: str, target: tuple[str, int]) -> None:
    assert parse_target(text) == target


@pytest.mark.parametrize("text", ["example.com", ":80", "a:-1", "a:65536", "[nope]:1", "a b:1"])
def test_bad_targets(text: str) -> None:
    with pytest.raises(ValueError):
        parse_target(text)


def test_commands_per_protocol() -> None:
    assert command_of("socks5", "UDP_ASSOCIATE") == "udp_associate"
    assert command_of("http", "get") == "GET"
    assert command_of("http", "CONNECT") == "connect"
    for protocol, command in (("socks4", "udp_associate"), ("socks5", "GET")):
        with pytest.raises(ValueError):
            command_of(protocol, command)
