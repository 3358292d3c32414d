"""`[[upstreams]]`: groups of parent proxies that rules route through (`via = "name"`).

A group names its servers as URLs (`socks5://user:pass@host:port`, `socks5h://`
to let the parent resolve names, `socks4a://`, `http://` for CONNECT), how a
server is chosen for a request (`strategy`), and when a failing server is left
out (`max_fails` failures within `fail_window` seconds take it out for
`down_time`, after which a probe must reach it before it is used again).

Validated at load like every other key. A URL's password never appears in a
problem message, a log line or a repr.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from proxyd.protocols.common import Credentials, canonical_host, format_hostport

SCHEMES: Final = ("socks5", "socks5h", "socks4a", "http")
STRATEGIES: Final = ("round_robin", "random", "least_connections", "hash")
KEYS: Final = ("name", "servers", "strategy", "max_fails", "fail_window", "down_time")
NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_CREDENTIAL: Final = 255  # bytes of a SOCKS5 username or password (RFC 1929)


@dataclass(frozen=True, slots=True)
class Parent:
    """One parent proxy; `credentials` hides its password in repr (Credentials does)."""

    scheme: str
    host: str
    port: int
    credentials: Credentials | None = None

    @property
    def address(self) -> str:
        return format_hostport(self.host, self.port)

    @property
    def resolves_names(self) -> bool:
        """Whether the parent is given the target's name (else we resolve it first)."""
        return self.scheme != "socks5"

    @property
    def carries_udp(self) -> bool:
        return self.scheme in ("socks5", "socks5h")

    def __str__(self) -> str:
        """The URL without credentials: what logs and messages show."""
        return f"{self.scheme}://{self.address}"


@dataclass(frozen=True, slots=True)
class UpstreamGroup:
    name: str
    servers: tuple[Parent, ...]
    strategy: str = "round_robin"
    max_fails: int = 3  # 0: never take a server out
    fail_window: float = 30.0
    down_time: float = 30.0


def parse_parent(url: Any) -> Parent:
    """A server URL into a Parent; ValueError says what is wrong without quoting the URL
    (it may hold a password)."""
    if not isinstance(url, str) or not url:
        raise ValueError("must be a URL string like socks5://host:1080")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid URL (host and port, IPv6 in brackets)") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    if not parts.hostname:
        raise ValueError(f"{scheme}:// URL names no host")
    if port is None or port == 0:
        raise ValueError(f"{scheme}:// URL must name a port (1-65535)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{scheme}:// URL must be only [user:password@]host:port")
    try:
        host = canonical_host(parts.hostname)
    except ValueError as exc:
        raise ValueError(f"{scheme}:// URL host: {exc}") from None
    credentials = None
    if parts.username is not None or parts.password is not None:
        username = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        if not username:
            raise ValueError(f"{scheme}:// URL has a password but no user name")
        if scheme == "socks4a" and password:
            raise ValueError("socks4a:// carries a user id but no password")
        if scheme.startswith("socks5") and (
            len(username.encode()) > MAX_CREDENTIAL or len(password.encode()) > MAX_CREDENTIAL
        ):
            raise ValueError(f"{scheme}:// user name and password are at most 255 bytes each")
        if scheme.startswith("socks5") and not password:
            raise ValueError(f"{scheme}:// URL has a user name but no password")
        if scheme == "http" and ":" in username:
            raise ValueError("http:// user name must not contain ':' (Basic auth splits there)")
        if scheme == "socks4a" and ("\0" in username or len(username.encode()) > MAX_CREDENTIAL):
            raise ValueError("socks4a:// user id must be at most 255 bytes, without NUL")
        credentials = Credentials(username, password)
    return Parent(scheme, host, port, credentials)


def parse_upstreams(value: Any, problems: list[str]) -> tuple[UpstreamGroup, ...]:
    """`[[upstreams]]` into groups; each problem is appended with its key path."""
    if not isinstance(value, list):
        problems.append("upstreams: must be an array of tables ([[upstreams]])")
        return ()
    groups: list[UpstreamGroup] = []
    for index, table in enumerate(value):
        group = _parse_group(table, f"upstreams[{index}]", problems)
        if group is None:
            continue
        if any(g.name == group.name for g in groups):
            problems.append(f"upstreams[{index}].name: {group.name!r} is used twice")
            continue
        groups.append(group)
    return tuple(groups)


def _parse_group(table: Any, path: str, problems: list[str]) -> UpstreamGroup | None:
    if not isinstance(table, Mapping):
        problems.append(f"{path}: must be a table")
        return None
    before = len(problems)
    for key in table:
        if key not in KEYS:
            problems.append(f"{path}.{key}: unknown key (known: {', '.join(KEYS)})")
    name = table.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name) or name == "direct":
        problems.append(
            f"{path}.name: must be a name of letters, digits, '_', '-' or '.' "
            f'(and not "direct"), not {name!r}'
        )
    servers: list[Parent] = []
    listed = table.get("servers")
    if not isinstance(listed, list) or not listed:
        problems.append(f"{path}.servers: must be a non-empty list of proxy URLs")
    else:
        for i, url in enumerate(listed):
            try:
                servers.append(parse_parent(url))
            except ValueError as exc:
                problems.append(f"{path}.servers[{i}]: {exc}")
        addresses = [(s.host, s.port) for s in servers]
        if len(set(addresses)) < len(addresses):
            problems.append(f"{path}.servers: the same host:port is listed twice")
    strategy = table.get("strategy", "round_robin")
    if strategy not in STRATEGIES:
        problems.append(
            f"{path}.strategy: must be one of {', '.join(STRATEGIES)}, not {strategy!r}"
        )
    max_fails = table.get("max_fails", 3)
    if type(max_fails) is not int or not 0 <= max_fails <= 1000:
        problems.append(f"{path}.max_fails: must be an integer from 0 to 1000, not {max_fails!r}")
    seconds = {}
    for key, default in (("fail_window", 30.0), ("down_time", 30.0)):
        item = table.get(key, default)
        if type(item) not in (int, float) or not 0 < item <= 86400:
            problems.append(f"{path}.{key}: must be a number of seconds, > 0 and at most 86400")
        else:
            seconds[key] = float(item)
    if len(problems) > before:
        return None
    assert isinstance(name, str)
    return UpstreamGroup(
        name=name,
        servers=tuple(servers),
        strategy=strategy,
        max_fails=max_fails,
        fail_window=seconds["fail_window"],
        down_time=seconds["down_time"],
    )
