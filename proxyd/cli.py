"""Command line: run the daemon, check a config, manage the users file.

This is the only module that exits the process or prints to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from proxyd import __version__, auth, config, log
from proxyd.errors import ConfigError

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxyd", description="SOCKS5 / HTTP forwarding proxy daemon (runs in the foreground)."
    )
    parser.add_argument("--version", action="version", version=f"proxyd {__version__}")
    parser.add_argument(
        "--config", type=Path, help=f"TOML config (default: {config.DEFAULT_PATH} if it exists)"
    )
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="listen here instead of server.listen (repeatable)",
    )
    parser.add_argument("--log-format", choices=config.LOG_FORMATS)
    parser.add_argument("--log-level", choices=config.LOG_LEVELS)
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", type=Path, dest="check_path", default=None, required=False)
    passwd = sub.add_parser("passwd", help="add or replace a user in a users file")
    passwd.add_argument("--file", type=Path, required=True, help="users file to write")
    passwd.add_argument("user")
    return parser


def _load(path: Path | None) -> config.Config:
    if path is None:
        path = config.DEFAULT_PATH if config.DEFAULT_PATH.exists() else None
    return config.Config() if path is None else config.load(path)


def _problems(
    path: Path | None, cfg: config.Config
) -> tuple[list[str], dict[str, auth.PasswordHash]]:
    """Everything that would stop the daemon from starting, beyond the file's own keys,
    and the users it would start with."""
    problems = []
    users: dict[str, auth.PasswordHash] = {}
    if cfg.auth.users_file is not None:
        try:
            users = auth.load_users(cfg.auth.users_file)
        except ConfigError as exc:
            problems += exc.problems
    if (why := cfg.open_proxy_problem()) is not None:
        problems.append(why)
    return problems, users


def _report(path: Path | None, problems: list[str]) -> None:
    where = str(path) if path is not None else "(built-in defaults)"
    for problem in problems:
        print(f"{where}: {problem}", file=sys.stderr)


def check_config(path: Path | None) -> int:
    try:
        cfg = _load(path)
    except ConfigError as exc:
        _report(path, exc.problems)
        return EXIT_PROBLEM
    problems, _users = _problems(path, cfg)
    _report(path, problems)
    if problems:
        return EXIT_PROBLEM
    print(f"{path or '(built-in defaults)'}: OK")
    return EXIT_OK


def passwd(path: Path, user: str) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {user}: ")
        if getpass.getpass("Again: ") != password:
            print("proxyd passwd: the passwords differ", file=sys.stderr)
            return EXIT_PROBLEM
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        auth.set_user(path, user, password)
    except (ValueError, OSError) as exc:
        print(f"proxyd passwd: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    print(f"{path}: set password for {user}", file=sys.stderr)
    return EXIT_OK


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when it is installed; the stock loop otherwise."""
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main)
    finally:
        log.flush()  # lines the last loop iteration left for its end


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config.with_overrides(
            _load(args.config),
            listen=args.listen,
            log_format=args.log_format,
            log_level=args.log_level,
        )
    except ConfigError as exc:
        _report(args.config, exc.problems)
        return EXIT_PROBLEM
    problems, users = _problems(args.config, cfg)
    if problems:
        _report(args.config, problems)
        return EXIT_PROBLEM
    log.configure(cfg.log.format, cfg.log.level)
    logger = log.get_logger()
    if cfg.auth.users_file is not None:
        if auth.is_world_readable(cfg.auth.users_file):
            logger.warning(
                "users_file_world_readable",
                path=str(cfg.auth.users_file),
                hint="chmod 600 it: it holds password hashes",
            )
        if not users:
            logger.warning("users_file_empty", path=str(cfg.auth.users_file))
    from proxyd.server import Server  # after logging is configured

    def run_worker(index: int, worker_cfg: config.Config) -> int:
        server = Server(worker_cfg, auth.Authenticator(users), logger, worker=index)
        try:
            _run_loop(server.serve())
        except OSError as exc:
            logger.error("listen_failed", error=str(exc))
            return EXIT_PROBLEM
        return EXIT_OK

    try:
        if cfg.server.workers == 1:
            return run_worker(0, cfg)
        from proxyd.workers import Supervisor

        try:
            return Supervisor(cfg, run_worker, logger).run()
        except OSError as exc:
            logger.error("listen_failed", error=str(exc))
            return EXIT_PROBLEM
    finally:
        _detach_broken_stdout()


def _detach_broken_stdout() -> None:
    """Whoever read our stdout may be gone: then let the exit flush go to /dev/null."""
    try:
        sys.stdout.flush()
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.check_path or args.config)
    if args.command == "passwd":
        return passwd(args.file, args.user)
    return run(args)
