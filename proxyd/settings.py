"""Everything the daemon runs with: the TOML file, the command-line overrides and the
files the config names (users, TLS certificate), read and checked together.

The same reading serves the start, `check-config` and every SIGHUP reload, so a
config that would not start is also one a reload refuses.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxyd import auth, config, egress, tls
from proxyd.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Settings:
    config: config.Config
    users: dict[str, auth.PasswordHash] = field(default_factory=dict)
    tls: ssl.SSLContext | None = None

    def warnings(self) -> list[tuple[str, dict[str, Any]]]:
        """Things that work but should not be so: (event, fields) for the log."""
        found: list[tuple[str, dict[str, Any]]] = []
        users_file, key = self.config.auth.users_file, self.config.tls.key
        if users_file is not None and auth.is_world_readable(users_file):
            hint = "chmod 600 it: it holds password hashes"
            found.append(("users_file_world_readable", {"path": str(users_file), "hint": hint}))
        costs = {(h.log_n, h.r, h.p) for h in self.users.values()}
        if len(costs) > 1:
            hint = (
                "the users' hashes have different scrypt costs, so how long a login takes "
                "shows whether its user exists; set each password again with proxyd passwd"
            )
            found.append(("users_file_mixed_costs", {"path": str(users_file), "hint": hint}))
        if self.config.exposed and self.config.server.private_destinations == "allow":
            hint = (
                "clients from beyond this host may reach its loopback services, its private "
                "networks and cloud metadata; name what they need in [[rules]] destinations"
            )
            found.append(("private_destinations_allowed", {"hint": hint}))
        if key is not None and auth.is_world_readable(key):
            hint = "chmod 600 it: it is the TLS private key"
            found.append(("tls_key_world_readable", {"path": str(key), "hint": hint}))
        server = self.config.server
        ways_out = [("server", server.egress, server.egress_interface)]
        ways_out += [
            (f"rules[{i}]", rule.egress or (), rule.egress_interface)
            for i, rule in enumerate(self.config.rules)
        ]
        for where, networks, interface in ways_out:
            for name, what in egress.absent(networks, interface):
                hint = "connections that should leave from it fail until the host has it"
                fields = {"key": f"{where}.{name}", "missing": what, "hint": hint}
                found.append(("egress_missing", fields))
        return found


@dataclass(frozen=True, slots=True)
class Source:
    """Where the settings come from: a file (or the built-in defaults) and overrides."""

    path: Path | None = None
    listen: Sequence[str] = ()
    log_format: str | None = None
    log_level: str | None = None
    # the listening sockets systemd passed (socket activation): judged instead of
    # server.listen by the open-proxy guard, at the start and at every reload
    sockets: tuple[config.ListenAddress, ...] = ()

    @property
    def name(self) -> str:
        """How problems are prefixed: the file that has them."""
        path = self.resolved_path()
        return "(built-in defaults)" if path is None else str(path)

    def resolved_path(self) -> Path | None:
        if self.path is not None:
            return self.path
        return config.DEFAULT_PATH if config.DEFAULT_PATH.exists() else None

    def read(self) -> Settings:
        """Read and check it all; ConfigError lists every problem found."""
        path = self.resolved_path()
        cfg = config.Config() if path is None else config.load(path)
        cfg = config.with_overrides(
            cfg, listen=self.listen, log_format=self.log_format, log_level=self.log_level
        )
        return with_files(cfg, self.sockets)


def with_files(cfg: config.Config, sockets: Sequence[config.ListenAddress] = ()) -> Settings:
    """The config with the files it names read: ConfigError for every problem that
    would stop the daemon from starting, beyond the file's own keys."""
    problems = []
    users: dict[str, auth.PasswordHash] = {}
    context = None
    if cfg.auth.users_file is not None:
        try:
            users = auth.load_users(cfg.auth.users_file)
        except ConfigError as exc:
            problems += exc.problems
        else:
            if not users:  # authentication would be off, silently: an open proxy
                problems.append(
                    f"auth.users_file: {cfg.auth.users_file} holds no user; add one with "
                    "`proxyd passwd`, or remove auth.users_file"
                )
    if cfg.tls.cert is not None and cfg.tls.key is not None:
        try:
            context = tls.server_context(cfg.tls.cert, cfg.tls.key)
        except ConfigError as exc:
            problems += exc.problems
    if (why := cfg.open_proxy_problem(sockets)) is not None:
        problems.append(why)
    if problems:
        raise ConfigError(problems)
    return Settings(cfg, users, context)


def keep_fixed(old: config.Config, new: config.Config) -> tuple[config.Config, list[str]]:
    """`new`, with the values a reload cannot change (workers, log format and level)
    taken from `old`; and the keys whose change was dropped (they need a restart)."""
    values = {
        "server.workers": (old.server.workers, new.server.workers),
        "log.format": (old.log.format, new.log.format),
        "log.level": (old.log.level, new.log.level),
        "accounting": (old.accounting, new.accounting),
        "metrics.per_user": (old.metrics.per_user, new.metrics.per_user),
    }
    changed = [key for key, (was, wanted) in values.items() if was != wanted]
    if changed:
        new = dataclasses.replace(
            new,
            server=dataclasses.replace(new.server, workers=old.server.workers),
            log=dataclasses.replace(new.log, format=old.log.format, level=old.log.level),
            accounting=old.accounting,
            metrics=dataclasses.replace(new.metrics, per_user=old.metrics.per_user),
        )
    return new, changed
