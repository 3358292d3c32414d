"""TOML configuration into frozen dataclasses, validated at load.

Every problem is reported with its key path (`timeouts.connect: must be > 0`),
all of them at once; library code raises ConfigError and only the CLI exits.

Each key is declared once, as a field of its section's dataclass that carries its
default and its check (`_key`); the sections, their keys and the checks are all
read back from `dataclasses.fields()` of Config and the section classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar, get_type_hints

from proxyd.accounting import Quota, parse_quotas
from proxyd.egress import PICKS as EGRESS_PICKS
from proxyd.egress import parse as parse_egress
from proxyd.egress import parse_interface
from proxyd.errors import ConfigError
from proxyd.parents import UpstreamGroup, parse_upstreams
from proxyd.periods import Period, parse_period
from proxyd.protocols.common import format_hostport
from proxyd.rules import IPNetwork, Rule, parse_network, parse_rules

DEFAULT_PATH: Final = Path("/etc/proxyd/proxyd.toml")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("json", "console")
MAX_SECONDS: Final = 7 * 86400


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback


def parse_listen(text: str) -> ListenAddress:
    """`127.0.0.1:1080` or `[::1]:1080`; the host must be an IP address."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{text!r} is not HOST:PORT (for example 127.0.0.1:1080 or [::1]:1080)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"{text!r}: the host must be an IPv4 address or a bracketed IPv6 address"
            ) from None
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{text!r}: port {port} is out of range")
    return ListenAddress(host, port)


# --- validation -------------------------------------------------------------

Check = Callable[[Any, str, list[str]], Any]
_INVALID: Final = object()


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _integer(low: int, high: int) -> Check:
    def check(value: Any, path: str, problems: list[str]) -> Any:
        if type(value) is not int:
            problems.append(f"{path}: must be an integer, not {_type_name(value)}")
            return _INVALID
        if not low <= value <= high:
            problems.append(f"{path}: must be between {low} and {high}, not {value}")
            return _INVALID
        return value

    return check


def _seconds(value: Any, path: str, problems: list[str]) -> Any:
    if type(value) not in (int, float):
        problems.append(f"{path}: must be a number of seconds, not {_type_name(value)}")
        return _INVALID
    if not 0 < value <= MAX_SECONDS:
        problems.append(f"{path}: must be > 0 and at most {MAX_SECONDS} seconds, not {value}")
        return _INVALID
    return float(value)


def _non_negative_seconds(value: Any, path: str, problems: list[str]) -> Any:
    if type(value) not in (int, float):
        problems.append(f"{path}: must be a number of seconds, not {_type_name(value)}")
        return _INVALID
    if not 0 <= value <= MAX_SECONDS:
        problems.append(f"{path}: must be >= 0 and at most {MAX_SECONDS} seconds, not {value}")
        return _INVALID
    return float(value)


def _ip_address(value: Any, path: str, problems: list[str]) -> Any:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(value))
    problems.append(f"{path}: must be an IP address string, not {value!r}")
    return _INVALID


def _boolean(value: Any, path: str, problems: list[str]) -> Any:
    if type(value) is not bool:
        problems.append(f"{path}: must be true or false, not {_type_name(value)}")
        return _INVALID
    return value


def _choice(options: Sequence[str]) -> Check:
    def check(value: Any, path: str, problems: list[str]) -> Any:
        if not isinstance(value, str) or value.lower() not in options:
            problems.append(f"{path}: must be one of {', '.join(options)}, not {value!r}")
            return _INVALID
        return value.lower()

    return check


def _path(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, str) or not value:
        problems.append(f"{path}: must be a file path string")
        return _INVALID
    return Path(value)


def _listen(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, list) or not value:
        problems.append(f'{path}: must be a non-empty list of "HOST:PORT" strings')
        return _INVALID
    addresses = [_one_listen(item, f"{path}[{i}]", problems) for i, item in enumerate(value)]
    if _INVALID in addresses:
        return _INVALID
    return tuple(addresses)


def _parsed(parse: Callable[[Any], Any]) -> Check:
    """A check by a parser that raises ValueError saying what is wrong."""

    def check(value: Any, path: str, problems: list[str]) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
            return _INVALID

    return check


def _networks(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, list):
        problems.append(f'{path}: must be a list of CIDRs like "10.0.0.0/8"')
        return _INVALID
    networks = []
    for i, item in enumerate(value):
        try:
            networks.append(parse_network(item))
        except ValueError as exc:
            problems.append(f"{path}[{i}]: {exc}")
    return tuple(networks) if len(networks) == len(value) else _INVALID


def _one_listen(value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, str):
        problems.append(f'{path}: must be a "HOST:PORT" string')
        return _INVALID
    try:
        return parse_listen(value)
    except ValueError as exc:
        problems.append(f"{path}: {exc}")
        return _INVALID


_T = TypeVar("_T")


def _key(default: _T, check: Check) -> _T:
    """A section key's field: its default, and in its metadata the check its TOML value
    must pass; the one place a key, its default and its check are declared."""
    return field(default=default, metadata={"check": check})


def _checks(section: type[Any]) -> dict[str, Check]:
    """A section's keys, in declaration order, each with the check its field carries."""
    return {f.name: f.metadata["check"] for f in dataclasses.fields(section)}


# --- sections ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[ListenAddress, ...] = _key((ListenAddress("127.0.0.1", 1080),), _listen)
    workers: int = _key(1, _integer(1, 256))
    max_connections: int = _key(10000, _integer(1, 10_000_000))
    allow_open_proxy: bool = _key(False, _boolean)
    # the address UDP ASSOCIATE replies give clients (behind NAT); unset = the relay's own
    udp_advertise: str | None = _key(None, _ip_address)
    # what happens to a request no [[rules]] table matches
    default_action: str = _key("allow", _choice(("allow", "deny")))
    # seconds open connections may take to finish after SIGTERM (0 = close them at once)
    shutdown_grace: float = _key(10.0, _non_negative_seconds)
    # load balancers whose connections start with a PROXY protocol header (v1 or v2),
    # which then names the client; from them it is required, from anyone else refused
    proxy_protocol_from: tuple[IPNetwork, ...] = _key((), _networks)
    # the host's own and private networks as destinations: "auto" denies them whenever the
    # daemon is reachable beyond this host (see Config.exposed), "deny" always, "allow" never
    private_destinations: str = _key("auto", _choice(("auto", "deny", "allow")))
    # where connections to targets leave from (proxyd.egress): addresses and CIDRs, a
    # device, and how an address is picked; an allow rule may set its own
    egress: tuple[IPNetwork, ...] = _key((), _parsed(parse_egress))
    egress_interface: str | None = _key(None, _parsed(parse_interface))
    egress_pick: str = _key("random", _choice(EGRESS_PICKS))


@dataclass(frozen=True, slots=True)
class AuthConfig:
    users_file: Path | None = _key(None, _path)
    # SOCKS4 cannot carry a password: with users configured it is refused unless allowed
    allow_socks4: bool = _key(False, _boolean)
    # brute-force throttling: this many failed logins from one client address within
    # failure_window seconds lock it out for lockout seconds; 0 turns it off
    max_failures: int = _key(5, _integer(0, 1_000_000))
    failure_window: float = _key(60.0, _seconds)
    lockout: float = _key(300.0, _seconds)
    # IPv6 clients count as one by this prefix (a host commonly has a whole /64)
    ipv6_prefix: int = _key(64, _integer(1, 128))
    # failed logins for one user name, from anywhere, within failure_window that lock
    # the name out for lockout seconds (but for addresses that logged in as it); 0: off
    max_user_failures: int = _key(20, _integer(0, 1_000_000))


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    # open connections per client IP address; 0 = no limit
    per_client: int = _key(0, _integer(0, 10_000_000))
    # open connections per authenticated user; 0 = no limit
    per_user: int = _key(0, _integer(0, 10_000_000))
    # bytes per second each way, for all of one authenticated user's traffic together
    per_user_rate: int = _key(0, _integer(0, 1 << 40))


@dataclass(frozen=True, slots=True)
class DnsConfig:
    cache_size: int = _key(1024, _integer(0, 1_000_000))  # names; 0 turns the cache off
    cache_ttl: float = _key(60.0, _non_negative_seconds)  # seconds an answer is reused
    negative_ttl: float = _key(5.0, _non_negative_seconds)  # seconds "no such name" is reused
    # names one client address may have looked up at once (until each lookup's thread returns)
    per_client: int = _key(16, _integer(1, 100_000))


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    handshake: float = _key(10.0, _seconds)
    connect: float = _key(10.0, _seconds)
    idle: float = _key(300.0, _seconds)
    udp_idle: float = _key(60.0, _seconds)


@dataclass(frozen=True, slots=True)
class BuffersConfig:
    read_size: int = _key(65536, _integer(1024, 16 * 1024 * 1024))
    so_rcvbuf: int = _key(0, _integer(0, 1 << 30))
    so_sndbuf: int = _key(0, _integer(0, 1 << 30))
    tcp_nodelay: bool = _key(True, _boolean)
    splice: bool = _key(True, _boolean)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    # PEM files; with both set, a client starting with a TLS handshake gets TLS
    cert: Path | None = _key(None, _path)
    key: Path | None = _key(None, _path)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # the admin listener for /metrics (Prometheus) and /healthz; unset = none
    listen: ListenAddress | None = _key(None, _one_listen)
    # the live status page on it (GET / and /status.json): user names, client addresses
    status_page: bool = _key(True, _boolean)
    # bytes by user in /metrics (proxyd_user_bytes_total), for at most per_user_max users
    # in each process (the rest count as user "other")
    per_user: bool = _key(False, _boolean)
    per_user_max: int = _key(100, _integer(1, 100_000))


def _text(what: str, parse: Callable[[str], Any]) -> Check:
    """A check of a string by a parser that raises ValueError saying what is wrong."""

    def check(value: Any, path: str, problems: list[str]) -> Any:
        if not isinstance(value, str):
            problems.append(f"{path}: must be {what}, not {_type_name(value)}")
            return _INVALID
        return _parsed(parse)(value, path, problems)

    return check


_period = _text('"day", "week", "month" or "N days"', lambda text: parse_period(text).spec)
_anchor = _text(
    'a time and zone ("04:00 Europe/Berlin")', lambda text: parse_period("day", text).anchor
)


@dataclass(frozen=True, slots=True)
class AccountingConfig:
    # traffic per user per period, kept in the state file; on when the table is there
    enabled: bool = _key(True, _boolean)
    period: str = _key("month", _period)  # "day", "week", "month" or "N days"
    # when periods begin: a time and zone, with a date for weeks, months and N days
    anchor: str = _key("00:00 UTC", _anchor)
    # unset: $STATE_DIRECTORY/accounting.json under systemd, else /var/lib/proxyd/
    state_file: Path | None = _key(None, _path)
    save_interval: float = _key(5.0, _seconds)  # seconds between saves (and at the end)

    @property
    def every(self) -> Period:
        return parse_period(self.period, self.anchor)


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = _key("json", _choice(LOG_FORMATS))
    level: str = _key("info", _choice(LOG_LEVELS))
    access: bool = _key(True, _boolean)
    # a forwarded request's `url` keeps its query (which may carry tokens) only when asked
    http_query: bool = _key(False, _boolean)


@dataclass(frozen=True, slots=True)
class Config:
    # The file's top-level names, in the order "unknown section" lists them. A field typed
    # as a section class is a table of checked keys; rules and upstreams have parsers of their own.
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    buffers: BuffersConfig = field(default_factory=BuffersConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # off unless the file has an [accounting] table
    accounting: AccountingConfig = field(default_factory=lambda: AccountingConfig(enabled=False))
    rules: tuple[Rule, ...] = ()
    upstreams: tuple[UpstreamGroup, ...] = ()
    quotas: tuple[Quota, ...] = ()

    def upstream(self, name: str) -> UpstreamGroup:
        return next(g for g in self.upstreams if g.name == name)

    @property
    def exposed(self) -> bool:
        """Whether clients from beyond this host can reach the daemon, as far as the file
        says: a listener off loopback, or a load balancer relaying them (sockets systemd
        passes are judged when they arrive)."""
        return bool(self.server.proxy_protocol_from) or not all(
            a.is_loopback for a in self.server.listen
        )

    def open_proxy_problem(self, sockets: Sequence[ListenAddress] = ()) -> str | None:
        """Why starting would make an open proxy, or None when it would not. `sockets`:
        the listening sockets systemd passed, judged instead of server.listen."""
        server = self.server
        if server.allow_open_proxy or self.clients_ruled:
            return None
        if self.auth.users_file is not None and not self.auth.allow_socks4:
            return None
        public = [str(a) for a in sockets or server.listen if not a.is_loopback]
        if public:
            key = "socket activation" if sockets else "server.listen"
            where = f"{key}: {', '.join(public)} is reachable beyond this host"
        elif server.proxy_protocol_from:  # a balancer relays clients from elsewhere
            where = (
                "server.proxy_protocol_from: a load balancer relays clients from beyond this host"
            )
        else:
            return None
        if self.auth.users_file is None:
            what = "no auth.users_file is set"
            fix = "Set auth.users_file, listen on loopback, "
        else:
            what = "auth.allow_socks4 = true lets SOCKS4 clients in without a password"
            fix = "Set auth.allow_socks4 = false, "
        return (
            f"{where} and {what}; anyone could use this proxy. {fix}allow named clients "
            'only (server.default_action = "deny" and clients in every allow rule), '
            "or set server.allow_open_proxy = true"
        )

    @property
    def clients_ruled(self) -> bool:
        """Whether only named clients may use the daemon: nothing allowed by default,
        and every allow rule names its clients, none of them by a network wider than
        an IPv4 /8 or an IPv6 /32 (0.0.0.0/0, or its halves, name everyone)."""
        return self.server.default_action == "deny" and all(
            rule.clients is not None
            and all(net.prefixlen >= (8 if net.version == 4 else 32) for net in rule.clients)
            for rule in self.rules
            if rule.allow
        )


# Read from Config's annotations, so that a new section is nothing more than a new field there.
_SECTIONS: Final[dict[str, type[Any]]] = {
    name: hint
    for name, hint in get_type_hints(Config).items()
    if isinstance(hint, type) and dataclasses.is_dataclass(hint)
}


def from_mapping(data: Mapping[str, Any]) -> Config:
    """Build a Config from parsed TOML, collecting every problem before raising."""
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name == "rules":
            sections["rules"] = parse_rules(value, problems)
            continue
        if name == "upstreams":
            sections["upstreams"] = parse_upstreams(value, problems)
            continue
        if name == "quotas":
            sections["quotas"] = parse_quotas(value, problems)
            continue
        if name not in _SECTIONS:
            known = ", ".join(f.name for f in dataclasses.fields(Config))
            problems.append(f"{name}: unknown section (known: {known})")
            continue
        cls = _SECTIONS[name]
        checks = _checks(cls)
        if not isinstance(value, Mapping):
            problems.append(f"{name}: must be a table ([{name}])")
            continue
        kwargs = {}
        for key, item in value.items():
            if key not in checks:
                problems.append(f"{name}.{key}: unknown key (known: {', '.join(checks)})")
                continue
            checked = checks[key](item, f"{name}.{key}", problems)
            if checked is not _INVALID:
                kwargs[key] = checked
        sections[name] = cls(**kwargs)
    tls = sections.get("tls")
    if tls is not None and (tls.cert is None) != (tls.key is None):
        problems.append("tls: cert and key must be set together")
    problems += _unknown_groups(data)
    accounting = sections.get("accounting")
    if sections.get("quotas") and not (accounting is not None and accounting.enabled):
        problems.append("quotas: need accounting on (an [accounting] table)")
    if problems:
        raise ConfigError(problems)
    return Config(**sections)


def _unknown_groups(data: Mapping[str, Any]) -> list[str]:
    """Rules that route through a group no [[upstreams]] table names (a group named
    but invalid has its own problems, so it counts as named here)."""
    tables = data.get("upstreams")
    tables = tables if isinstance(tables, list) else []
    names = {t["name"] for t in tables if isinstance(t, Mapping) and isinstance(t.get("name"), str)}
    raw = data.get("rules")
    if not isinstance(raw, list):
        return []
    problems = []
    for index, table in enumerate(raw):
        via = table.get("via") if isinstance(table, Mapping) else None
        if isinstance(via, str) and via and via != "direct" and via not in names:
            known = ", ".join(sorted(names)) or "none defined"
            problems.append(f"rules[{index}].via: no [[upstreams]] group named {via!r} ({known})")
    return problems


def load(path: Path) -> Config:
    """Read and validate one TOML file."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not valid TOML: not UTF-8 at byte {exc.start}"]) from exc
    return from_mapping(data)


def with_overrides(
    config: Config,
    *,
    listen: Sequence[str] = (),
    log_format: str | None = None,
    log_level: str | None = None,
) -> Config:
    """Apply command-line overrides, validated by the checks of the keys they override."""
    problems: list[str] = []
    server, log = config.server, config.log
    if listen:
        addresses = _checks(ServerConfig)["listen"](list(listen), "--listen", problems)
        if addresses is not _INVALID:
            server = dataclasses.replace(server, listen=addresses)
    if log_format is not None:
        checked = _checks(LogConfig)["format"](log_format, "--log-format", problems)
        if checked is not _INVALID:
            log = dataclasses.replace(log, format=checked)
    if log_level is not None:
        checked = _checks(LogConfig)["level"](log_level, "--log-level", problems)
        if checked is not _INVALID:
            log = dataclasses.replace(log, level=checked)
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(config, server=server, log=log)
