"""proxyd.config: TOML into frozen dataclasses; every problem named by its key path, all at once."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, get_type_hints

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd import config
from proxyd.config import (
    AuthConfig,
    BuffersConfig,
    Config,
    DnsConfig,
    ListenAddress,
    LogConfig,
    MetricsConfig,
    ServerConfig,
    TimeoutsConfig,
    TlsConfig,
    from_mapping,
    load,
    parse_listen,
    with_overrides,
)
from proxyd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_mapping(data)
    assert info.value.problems
    assert str(info.value) == "; ".join(info.value.problems)
    return info.value.problems


# --- defaults ---------------------------------------------------------------------


def test_defaults_are_those_of_design_md() -> None:
    cfg = Config()
    assert cfg.server.listen == (ListenAddress("127.0.0.1", 1080),)
    assert cfg.server.workers == 1
    assert cfg.server.max_connections == 10000
    assert cfg.server.allow_open_proxy is False
    assert cfg.auth.users_file is None
    assert cfg.timeouts.handshake == 10
    assert cfg.timeouts.connect == 10
    assert cfg.timeouts.idle == 300
    assert cfg.timeouts.udp_idle == 60
    assert cfg.buffers.read_size == 65536
    assert cfg.buffers.so_rcvbuf == 0
    assert cfg.buffers.so_sndbuf == 0
    assert cfg.buffers.tcp_nodelay is True
    assert cfg.log.format == "json"
    assert cfg.log.level == "info"
    assert cfg.log.access is True


def test_empty_mapping_gives_the_defaults() -> None:
    assert config.from_mapping({}) == Config()
    assert (
        from_mapping({"server": {}, "auth": {}, "timeouts": {}, "buffers": {}, "log": {}})
        == Config()
    )


def test_design_md_values_written_out_give_the_defaults() -> None:
    # DESIGN.md's [server], [timeouts], [buffers] and [log] blocks, as written there.
    data = {
        "server": {
            "listen": ["127.0.0.1:1080"],
            "workers": 1,
            "max_connections": 10000,
            "allow_open_proxy": False,
        },
        "timeouts": {"handshake": 10, "connect": 10, "idle": 300, "udp_idle": 60},
        "buffers": {"read_size": 65536, "so_rcvbuf": 0, "so_sndbuf": 0, "tcp_nodelay": True},
        "log": {"format": "json", "level": "info", "access": True},
    }
    assert config.from_mapping(data) == Config()


def test_example_config_file_is_the_defaults() -> None:
    # config/proxyd.toml promises "every key, with its built-in default".
    assert load(ROOT / "config" / "proxyd.toml") == Config()


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.workers = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.log = LogConfig()  # type: ignore[misc]


# --- good values --------------------------------------------------------------------


def test_every_key_set() -> None:
    cfg = from_mapping(
        {
            "server": {
                "listen": ["0.0.0.0:1080", "[::1]:1081"],
                "workers": 1,
                "max_connections": 5,
                "allow_open_proxy": True,
            },
            "auth": {
                "users_file": "/etc/proxyd/users",
                "allow_socks4": True,
                "max_failures": 0,
                "failure_window": 30,
                "lockout": 0.5,
                "ipv6_prefix": 56,
                "max_user_failures": 7,
            },
            "tls": {"cert": "/etc/proxyd/cert.pem", "key": "/etc/proxyd/key.pem"},
            "dns": {"cache_size": 0, "cache_ttl": 0, "negative_ttl": 1.5},
            "timeouts": {"handshake": 2.5, "connect": 3, "idle": 600, "udp_idle": 0.5},
            "buffers": {
                "read_size": 1024,
                "so_rcvbuf": 4096,
                "so_sndbuf": 8192,
                "tcp_nodelay": False,
            },
            "log": {"format": "console", "level": "debug", "access": False},
            "metrics": {"listen": "[::1]:9180", "status_page": False},
        }
    )
    assert cfg == Config(
        server=ServerConfig(
            listen=(ListenAddress("0.0.0.0", 1080), ListenAddress("::1", 1081)),
            workers=1,
            max_connections=5,
            allow_open_proxy=True,
        ),
        auth=AuthConfig(
            users_file=Path("/etc/proxyd/users"),
            allow_socks4=True,
            max_failures=0,
            failure_window=30.0,
            lockout=0.5,
            ipv6_prefix=56,
            max_user_failures=7,
        ),
        tls=TlsConfig(cert=Path("/etc/proxyd/cert.pem"), key=Path("/etc/proxyd/key.pem")),
        dns=DnsConfig(cache_size=0, cache_ttl=0.0, negative_ttl=1.5),
        timeouts=TimeoutsConfig(handshake=2.5, connect=3.0, idle=600.0, udp_idle=0.5),
        buffers=BuffersConfig(read_size=1024, so_rcvbuf=4096, so_sndbuf=8192, tcp_nodelay=False),
        log=LogConfig(format="console", level="debug", access=False),
        metrics=MetricsConfig(listen=ListenAddress("::1", 9180), status_page=False),
    )
    assert isinstance(cfg.auth.users_file, Path)
    assert type(cfg.timeouts.connect) is float


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("timeouts", "connect", 1, 1.0),
        ("timeouts", "idle", 7 * 86400, float(7 * 86400)),
        ("timeouts", "handshake", 0.001, 0.001),
        ("buffers", "read_size", 16 * 1024 * 1024, 16 * 1024 * 1024),
        ("buffers", "so_rcvbuf", 1 << 30, 1 << 30),
        ("server", "max_connections", 1, 1),
        ("server", "max_connections", 10_000_000, 10_000_000),
        ("log", "format", "JSON", "json"),
        ("log", "level", "Warning", "warning"),
        ("log", "level", "error", "error"),
    ],
)
def test_edge_values_accepted(section: str, key: str, value: Any, expected: Any) -> None:
    cfg = from_mapping({section: {key: value}})
    assert getattr(getattr(cfg, section), key) == expected


# --- bad values, each reported with its key path ----------------------------------------

BAD = [
    # (mapping, key path the one problem must start with)
    ({"server": {"listen": "127.0.0.1:1080"}}, "server.listen"),
    ({"server": {"listen": []}}, "server.listen"),
    ({"server": {"listen": ["127.0.0.1:1080", "localhost:1080"]}}, "server.listen[1]"),
    ({"server": {"listen": ["127.0.0.1:1080", 1080]}}, "server.listen[1]"),
    ({"server": {"listen": ["nonsense"]}}, "server.listen[0]"),
    ({"server": {"listen": ["127.0.0.1:70000"]}}, "server.listen[0]"),
    ({"server": {"workers": "1"}}, "server.workers"),
    ({"server": {"workers": 0}}, "server.workers"),
    ({"server": {"workers": 257}}, "server.workers"),
    ({"server": {"workers": True}}, "server.workers"),
    ({"server": {"workers": 1.0}}, "server.workers"),
    ({"server": {"max_connections": 0}}, "server.max_connections"),
    ({"server": {"max_connections": -5}}, "server.max_connections"),
    ({"server": {"max_connections": 10_000_001}}, "server.max_connections"),
    ({"server": {"max_connections": "100"}}, "server.max_connections"),
    ({"server": {"max_connections": 1.5}}, "server.max_connections"),
    ({"server": {"allow_open_proxy": "yes"}}, "server.allow_open_proxy"),
    ({"server": {"allow_open_proxy": 1}}, "server.allow_open_proxy"),
    ({"auth": {"users_file": 5}}, "auth.users_file"),
    ({"auth": {"ipv6_prefix": 0}}, "auth.ipv6_prefix"),
    ({"auth": {"ipv6_prefix": 129}}, "auth.ipv6_prefix"),
    ({"auth": {"ipv6_prefix": "64"}}, "auth.ipv6_prefix"),
    ({"auth": {"max_user_failures": -1}}, "auth.max_user_failures"),
    ({"auth": {"max_user_failures": 2.5}}, "auth.max_user_failures"),
    ({"auth": {"users_file": ""}}, "auth.users_file"),
    ({"auth": {"users_file": ["/etc/proxyd/users"]}}, "auth.users_file"),
    ({"timeouts": {"connect": 0}}, "timeouts.connect"),
    ({"timeouts": {"connect": -1}}, "timeouts.connect"),
    ({"timeouts": {"connect": "10"}}, "timeouts.connect"),
    ({"timeouts": {"connect": True}}, "timeouts.connect"),
    ({"timeouts": {"connect": math.nan}}, "timeouts.connect"),
    ({"timeouts": {"connect": math.inf}}, "timeouts.connect"),
    ({"timeouts": {"handshake": 7 * 86400 + 1}}, "timeouts.handshake"),
    ({"timeouts": {"idle": 0.0}}, "timeouts.idle"),
    ({"timeouts": {"udp_idle": [60]}}, "timeouts.udp_idle"),
    ({"auth": {"allow_socks4": "yes"}}, "auth.allow_socks4"),
    ({"limits": {"per_client": -1}}, "limits.per_client"),
    ({"limits": {"per_user": "10"}}, "limits.per_user"),
    ({"dns": {"cache_size": -1}}, "dns.cache_size"),
    ({"dns": {"cache_size": 1.5}}, "dns.cache_size"),
    ({"dns": {"cache_ttl": -1}}, "dns.cache_ttl"),
    ({"dns": {"negative_ttl": math.nan}}, "dns.negative_ttl"),
    ({"dns": {"negative_ttl": "5"}}, "dns.negative_ttl"),
    ({"dns": {"ttl": 5}}, "dns.ttl"),
    ({"buffers": {"read_size": 1023}}, "buffers.read_size"),
    ({"buffers": {"read_size": 16 * 1024 * 1024 + 1}}, "buffers.read_size"),
    ({"buffers": {"read_size": "64k"}}, "buffers.read_size"),
    ({"buffers": {"so_rcvbuf": -1}}, "buffers.so_rcvbuf"),
    ({"buffers": {"so_sndbuf": (1 << 30) + 1}}, "buffers.so_sndbuf"),
    ({"buffers": {"tcp_nodelay": "true"}}, "buffers.tcp_nodelay"),
    ({"buffers": {"tcp_nodelay": 0}}, "buffers.tcp_nodelay"),
    ({"log": {"format": "xml"}}, "log.format"),
    ({"log": {"format": 1}}, "log.format"),
    ({"log": {"level": "trace"}}, "log.level"),
    ({"log": {"level": ""}}, "log.level"),
    ({"log": {"access": "yes"}}, "log.access"),
    ({"metrics": {"listen": ["127.0.0.1:9180"]}}, "metrics.listen"),
    ({"metrics": {"listen": "localhost:9180"}}, "metrics.listen"),
    ({"metrics": {"listen": "127.0.0.1:99999"}}, "metrics.listen"),
    ({"metrics": {"port": 9180}}, "metrics.port"),
    ({"metrics": {"status_page": "yes"}}, "metrics.status_page"),
    # Unknown keys and sections are errors, so a typo is never silently ignored.
    ({"server": {"listn": ["127.0.0.1:1080"]}}, "server.listn"),
    ({"timeouts": {"conect": 10}}, "timeouts.conect"),
    ({"log": {"file": "/var/log/proxyd"}}, "log.file"),
    ({"servr": {}}, "servr"),
    ({"rules": {"action": "deny"}}, "rules"),
    ({"rules": ["deny"]}, "rules[0]"),
    ({"rules": [{"action": "block"}]}, "rules[0].action"),
    ({"rules": [{"action": "deny", "allow": True}]}, "rules[0].allow"),
    ({"rules": [{"action": "deny", "clients": ["10.0.0.0/33"]}]}, "rules[0].clients[0]"),
    ({"rules": [{"action": "deny", "clients": "10.0.0.0/8"}]}, "rules[0].clients"),
    ({"rules": [{"action": "deny", "destinations": ["exa mple.com"]}]}, "rules[0].destinations[0]"),
    ({"rules": [{"action": "deny", "destinations": ["ex*.com"]}]}, "rules[0].destinations[0]"),
    ({"rules": [{"action": "deny", "ports": ["9000-8000"]}]}, "rules[0].ports[0]"),
    ({"rules": [{"action": "deny", "ports": [0]}]}, "rules[0].ports[0]"),
    ({"rules": [{"action": "deny", "ports": ["80-"]}]}, "rules[0].ports[0]"),
    ({"rules": [{"action": "deny", "protocols": ["socks6"]}]}, "rules[0].protocols[0]"),
    ({"rules": [{"action": "deny", "users": []}]}, "rules[0].users"),
    ({"server": {"default_action": "maybe"}}, "server.default_action"),
    # A section that is not a table.
    ({"server": 1}, "server"),
    ({"timeouts": [10]}, "timeouts"),
]


@pytest.mark.parametrize(("data", "path"), BAD, ids=[p for _, p in BAD])
def test_bad_value_names_its_key(data: dict[str, Any], path: str) -> None:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: "), problems[0]
    assert len(problems[0]) > len(path) + 2  # says what is wrong, not only where


def test_unknown_key_lists_the_known_ones() -> None:
    (problem,) = problems_of({"server": {"listn": []}})
    assert "listen" in problem


# --- each key declared once: a field of its section, carrying its check -------------------------

# Config's fields but rules, upstreams and quotas (parsed by proxyd/rules.py,
# proxyd/parents.py and proxyd/accounting.py).
SECTIONS = {
    f.name: get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name not in ("rules", "upstreams", "quotas")
}


def test_unknown_section_lists_configs_fields_in_order() -> None:
    assert problems_of({"servr": {}}) == [
        "servr: unknown section (known: server, auth, limits, dns, timeouts, buffers, tls, "
        "metrics, log, accounting, rules, upstreams, quotas)"
    ]
    assert all(dataclasses.is_dataclass(cls) for cls in SECTIONS.values()), SECTIONS


@pytest.mark.parametrize("name", SECTIONS)
def test_every_key_carries_its_check(name: str) -> None:
    fields = dataclasses.fields(SECTIONS[name])
    for f in fields:
        assert callable(f.metadata.get("check")), f"{name}.{f.name} has no check in its metadata"
    for f in fields:
        # A table fits no key's type, so the key's own check (not "unknown key") rejects it.
        (problem,) = problems_of({name: {f.name: {}}})
        assert problem.startswith(f"{name}.{f.name}: must "), problem


@pytest.mark.parametrize("name", SECTIONS)
def test_unknown_key_lists_exactly_the_sections_fields(name: str) -> None:
    known = ", ".join(f.name for f in dataclasses.fields(SECTIONS[name]))
    assert problems_of({name: {"bogus": 1}}) == [f"{name}.bogus: unknown key (known: {known})"]


def test_listen_problem_names_the_bad_entry_only() -> None:
    problems = problems_of({"server": {"listen": ["127.0.0.1:1", "bad", "[::1]:2", "also bad"]}})
    assert [p.split(":", 1)[0] for p in problems] == ["server.listen[1]", "server.listen[3]"]


def test_all_problems_at_once() -> None:
    data = {
        "server": {"listen": ["127.0.0.1:1080", "x"], "workers": 0, "bogus": 1},
        "timeouts": {"connect": -1, "idle": "long"},
        "buffers": {"read_size": 1},
        "log": {"level": "loud"},
        "nonsense": {},
    }
    problems = problems_of(data)
    paths = sorted(p.split(": ", 1)[0] for p in problems)
    assert paths == sorted(
        [
            "server.listen[1]",
            "server.workers",
            "server.bogus",
            "timeouts.connect",
            "timeouts.idle",
            "buffers.read_size",
            "log.level",
            "nonsense",
        ]
    )


# --- listen addresses ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:1080", "127.0.0.1", 1080),
        ("0.0.0.0:0", "0.0.0.0", 0),
        ("192.0.2.10:65535", "192.0.2.10", 65535),
        ("[::1]:1080", "::1", 1080),
        ("[::]:8080", "::", 8080),
        ("[2001:db8::1]:443", "2001:db8::1", 443),
    ],
)
def test_parse_listen(text: str, host: str, port: int) -> None:
    address = parse_listen(text)
    assert address == ListenAddress(host, port)
    assert str(address) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1080",
        "127.0.0.1",
        "127.0.0.1:",
        ":1080",
        "localhost:1080",
        "example.com:80",
        "256.0.0.1:80",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:http",
        "127.0.0.1: 80",
        "::1:1080",  # IPv6 needs brackets
        "::1",
        "[::1]",
        "[::1:1080",
        "[127.0.0.1]:1080",
        "[localhost]:1080",
        "[]:1080",
    ],
)
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


@pytest.mark.parametrize(
    ("text", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("127.1.2.3:1", True),
        ("[::1]:1", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("192.0.2.1:1", False),
        ("[2001:db8::1]:1", False),
    ],
)
def test_is_loopback(text: str, loopback: bool) -> None:
    assert parse_listen(text).is_loopback is loopback


# --- open proxy refusal -----------------------------------------------------------------


def config_with(listen: list[str], **extra: Any) -> Config:
    server: dict[str, Any] = {"listen": listen}
    data: dict[str, Any] = {"server": server}
    if "allow_open_proxy" in extra:
        server["allow_open_proxy"] = extra["allow_open_proxy"]
    if "users_file" in extra:
        data["auth"] = {"users_file": extra["users_file"]}
    return from_mapping(data)


@pytest.mark.parametrize("listen", ["0.0.0.0:1080", "[::]:1080", "192.0.2.1:1080"])
def test_open_proxy_problem(listen: str) -> None:
    problem = config_with([listen]).open_proxy_problem()
    assert problem is not None
    assert problem.startswith("server.listen: ")
    assert listen in problem
    assert "users_file" in problem
    assert "allow_open_proxy" in problem


def test_open_proxy_problem_names_only_exposed_addresses() -> None:
    problem = config_with(["127.0.0.1:1080", "0.0.0.0:1081"]).open_proxy_problem()
    assert problem is not None
    assert "0.0.0.0:1081" in problem
    assert "127.0.0.1:1080" not in problem


@pytest.mark.parametrize(
    "cfg",
    [
        Config(),
        config_with(["127.0.0.1:1080"]),
        config_with(["[::1]:1080", "127.0.0.1:1081"]),
        config_with(["0.0.0.0:1080"], allow_open_proxy=True),
        config_with(["[::]:1080"], allow_open_proxy=True),
        config_with(["0.0.0.0:1080"], users_file="/etc/proxyd/users"),
        config_with(["[::]:1080", "127.0.0.1:1"], users_file="/etc/proxyd/users"),
    ],
    ids=[
        "defaults",
        "v4 loopback",
        "both loopbacks",
        "allowed v4",
        "allowed v6",
        "users v4",
        "users v6",
    ],
)
def test_no_open_proxy_problem(cfg: Config) -> None:
    assert cfg.open_proxy_problem() is None


ONLY_NAMED = {"server": {"listen": ["0.0.0.0:1080"], "default_action": "deny"}}


@pytest.mark.parametrize(
    "rules",
    [
        [],
        [{"action": "allow", "clients": ["192.0.2.0/24"]}],
        [
            {"action": "allow", "clients": ["192.0.2.0/24"], "destinations": ["example.com"]},
            {"action": "deny", "destinations": ["example.org"]},
            {"action": "allow", "clients": ["2001:db8::/32"]},
        ],
    ],
    ids=["nothing allowed", "one client rule", "client rules and a deny"],
)
def test_client_rules_close_an_exposed_daemon(rules: list[dict[str, Any]]) -> None:
    assert from_mapping({**ONLY_NAMED, "rules": rules}).open_proxy_problem() is None


@pytest.mark.parametrize(
    ("server", "rules"),
    [
        ({}, [{"action": "allow", "clients": ["192.0.2.0/24"]}]),  # allow by default
        ({"default_action": "deny"}, [{"action": "allow", "destinations": ["example.com"]}]),
        (
            {"default_action": "deny"},
            [
                {"action": "allow", "clients": ["192.0.2.0/24"]},
                {"action": "allow", "ports": [443]},
            ],
        ),
        ({"default_action": "deny"}, [{"action": "allow", "clients": ["0.0.0.0/0"]}]),
        ({"default_action": "deny"}, [{"action": "allow", "clients": ["::/0"]}]),
        (
            {"default_action": "deny"},
            [{"action": "allow", "clients": ["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"]}],
        ),
        ({"default_action": "deny"}, [{"action": "allow", "clients": ["10.0.0.0/7"]}]),
    ],
    ids=[
        "default allow",
        "no clients",
        "one of two without",
        "all v4",
        "all v6",
        "all by halves",
        "wider than a /8",
    ],
)
def test_open_rules_leave_an_exposed_daemon_open(
    server: dict[str, Any], rules: list[dict[str, Any]]
) -> None:
    data = {"server": {"listen": ["0.0.0.0:1080"], **server}, "rules": rules}
    problem = from_mapping(data).open_proxy_problem()
    assert problem is not None and "clients in every allow rule" in problem


def test_socks4_with_users_on_an_exposed_daemon_needs_an_opt_in() -> None:
    auth = {"users_file": "/etc/proxyd/users", "allow_socks4": True}
    problem = from_mapping(
        {"server": {"listen": ["0.0.0.0:1080"]}, "auth": auth}
    ).open_proxy_problem()
    assert problem is not None
    assert problem.startswith("server.listen: 0.0.0.0:1080") and "auth.allow_socks4" in problem
    balanced = {"listen": ["127.0.0.1:1080"], "proxy_protocol_from": ["127.0.0.1/32"]}
    problem = from_mapping({"server": balanced, "auth": auth}).open_proxy_problem()
    assert problem is not None and "auth.allow_socks4" in problem
    # on loopback, opted in, or only for named clients: fine
    assert from_mapping({"auth": auth}).open_proxy_problem() is None
    opted = {"listen": ["0.0.0.0:1080"], "allow_open_proxy": True}
    assert from_mapping({"server": opted, "auth": auth}).open_proxy_problem() is None
    rules = [{"action": "allow", "clients": ["192.0.2.0/24"]}]
    assert from_mapping({**ONLY_NAMED, "auth": auth, "rules": rules}).open_proxy_problem() is None


def test_sockets_from_systemd_are_judged_instead_of_listen() -> None:
    cfg = config_with(["127.0.0.1:1080"])
    problem = cfg.open_proxy_problem((ListenAddress("0.0.0.0", 1080),))
    assert problem is not None and problem.startswith("socket activation: 0.0.0.0:1080")
    public = config_with(["0.0.0.0:1080"])
    assert public.open_proxy_problem((ListenAddress("::1", 1080),)) is None


# --- files ------------------------------------------------------------------------------------


def test_load(tmp_path: Path) -> None:
    path = tmp_path / "proxyd.toml"
    path.write_text(
        '[server]\nlisten = ["[::1]:1081"]\n\n[timeouts]\nconnect = 2\n\n[log]\nformat = "console"\n'
    )
    cfg = load(path)
    assert cfg.server.listen == (ListenAddress("::1", 1081),)
    assert cfg.timeouts.connect == 2.0
    assert cfg.log.format == "console"
    assert cfg.timeouts.idle == 300.0


def test_load_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "proxyd.toml"
    path.write_text("")
    assert load(path) == Config()


@pytest.mark.parametrize(
    "text",
    [
        "[server\nworkers = 1\n",
        "[server]\nworkers = \n",
        "[server]\nworkers = 1\nworkers = 1\n",
        'listen = "127.0.0.1:1080',
        "\x00",
    ],
)
def test_load_bad_toml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "proxyd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert len(info.value.problems) == 1
    assert "TOML" in info.value.problems[0]


def test_load_invalid_values_reports_key_paths(tmp_path: Path) -> None:
    path = tmp_path / "proxyd.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:1080", "nope"]\n\n[timeouts]\nconnect = -1\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert [p.split(": ", 1)[0] for p in info.value.problems] == [
        "server.listen[1]",
        "timeouts.connect",
    ]


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "absent.toml")
    assert len(info.value.problems) == 1
    assert "cannot read" in info.value.problems[0]


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load(tmp_path)


# --- command-line overrides ---------------------------------------------------------------------


def test_with_overrides() -> None:
    base = from_mapping({"timeouts": {"connect": 3}, "log": {"access": False}})
    cfg = with_overrides(
        base, listen=["127.0.0.1:0", "[::1]:0"], log_format="console", log_level="DEBUG"
    )
    assert cfg.server.listen == (ListenAddress("127.0.0.1", 0), ListenAddress("::1", 0))
    assert cfg.log == LogConfig(format="console", level="debug", access=False)
    # Everything else is kept; the original is unchanged.
    assert cfg.timeouts == base.timeouts
    assert cfg.server.max_connections == base.server.max_connections
    assert base.server.listen == (ListenAddress("127.0.0.1", 1080),)
    assert base.log.format == "json"


def test_with_no_overrides_is_the_same_config() -> None:
    base = from_mapping({"server": {"listen": ["[::1]:1"]}, "log": {"level": "error"}})
    assert with_overrides(base) == base


def test_with_overrides_reports_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        with_overrides(
            Config(), listen=["127.0.0.1:1", "localhost:2"], log_format="xml", log_level="loud"
        )
    paths = [p.split(": ", 1)[0] for p in info.value.problems]
    assert paths == ["--listen[1]", "--log-format", "--log-level"]


def test_with_overrides_bad_listen_keeps_nothing() -> None:
    with pytest.raises(ConfigError) as info:
        with_overrides(Config(), listen=["0.0.0.0:99999"])
    assert info.value.problems[0].startswith("--listen[0]: ")


# --- whatever the TOML holds: a Config or a ConfigError ------------------------------------------

KNOWN = {
    name: list(dataclasses.fields(cls))
    for name, cls in [
        ("server", ServerConfig),
        ("auth", AuthConfig),
        ("timeouts", TimeoutsConfig),
        ("buffers", BuffersConfig),
        ("log", LogConfig),
    ]
}
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["127.0.0.1:1080", "[::1]:0", "json", "debug", "/tmp/users"]),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
keys = st.sampled_from([f.name for fields in KNOWN.values() for f in fields] + ["bogus"])
sections = st.dictionaries(
    st.sampled_from([*KNOWN, "bogus"]),
    st.one_of(st.dictionaries(keys, toml_values, max_size=4), toml_scalars),
    max_size=5,
)
PATH = re.compile(r"^(server|auth|timeouts|buffers|log|bogus)(\.\w+(\[\d+\])?)?: \S")


@settings(max_examples=200, deadline=None)
@given(data=sections)
def test_any_mapping_gives_config_or_config_error(data: dict[str, Any]) -> None:
    try:
        cfg = from_mapping(data)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert PATH.match(problem), problem
    else:
        assert isinstance(cfg, Config)
        assert all(isinstance(a, ListenAddress) for a in cfg.server.listen)
        assert 0 < cfg.timeouts.connect <= config.MAX_SECONDS


@pytest.mark.parametrize("tls", [{"cert": "/c.pem"}, {"key": "/k.pem"}])
def test_tls_cert_and_key_go_together(tls: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"tls": tls})
    assert info.value.problems == ["tls: cert and key must be set together"]


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"auth": {"max_failures": -1}}, "auth.max_failures"),
        ({"auth": {"failure_window": 0}}, "auth.failure_window"),
        ({"auth": {"lockout": "1h"}}, "auth.lockout"),
        ({"tls": {"cert": 1, "key": "/k.pem"}}, "tls.cert"),
    ],
)
def test_bad_throttle_and_tls_values(data: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(data)
    assert any(p.startswith(f"{path}: ") for p in info.value.problems), info.value.problems


def test_a_trusted_balancer_without_users_is_an_open_proxy() -> None:
    """HAProxy on a public address in front of a proxyd on loopback relays anyone."""
    server = {"listen": ["127.0.0.1:1081"], "proxy_protocol_from": ["127.0.0.1/32"]}
    problem = config.from_mapping({"server": server}).open_proxy_problem()
    assert problem is not None and problem.startswith("server.proxy_protocol_from:")
    assert (
        from_mapping({"server": {**server, "allow_open_proxy": True}}).open_proxy_problem() is None
    )
    with_users = {"server": server, "auth": {"users_file": "/etc/proxyd/users"}}
    assert config.from_mapping(with_users).open_proxy_problem() is None


def test_accounting_and_quotas() -> None:
    cfg = from_mapping(
        {
            "accounting": {
                "period": "7 Days",
                "anchor": "2026-01-01T04:00 Europe/Berlin",
                "state_file": "/srv/proxyd/accounting.json",
                "save_interval": 2,
            },
            "quotas": [{"users": ["alice"], "bytes": "1GiB"}, {"users": "*", "up": 10}],
        }
    )
    assert cfg.accounting.enabled and cfg.accounting.period == "7 days"
    assert str(cfg.accounting.every) == "7 days from 2026-01-01 04:00 Europe/Berlin"
    assert [q.total for q in cfg.quotas] == [1 << 30, None]
    assert not Config().accounting.enabled  # (off without the table)
    assert from_mapping({"accounting": {}}).accounting.enabled


def test_accounting_problems() -> None:
    problems = problems_of(
        {"accounting": {"period": "fortnight", "anchor": "25:00", "save_interval": 0}}
    )
    assert [p.split(":", 1)[0] for p in problems] == [
        "accounting.period",
        "accounting.anchor",
        "accounting.save_interval",
    ]
    assert "'day', 'week', 'month' or 'N days'" in problems[0]
    assert problems_of({"quotas": [{"users": "*", "bytes": 1}]}) == [
        "quotas: need accounting on (an [accounting] table)"
    ]
    assert problems_of(
        {"accounting": {"enabled": False}, "quotas": [{"users": "*", "bytes": 1}]}
    ) == ["quotas: need accounting on (an [accounting] table)"]
