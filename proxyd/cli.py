"""Command line: run the daemon, check a config, manage the users file.

This is the only module that exits the process or prints to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from proxyd import (
    __version__,
    accounting,
    auth,
    books,
    config,
    explain,
    log,
    metrics,
    settings,
    status,
    systemd,
    tls,
)
from proxyd.errors import ConfigError, ListenFailed

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3  # proxyd explain: the daemon would refuse the request


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
    gen_cert = sub.add_parser(
        "gen-cert", help="write a self-signed TLS certificate and key for trials"
    )
    gen_cert.add_argument("--out", type=Path, required=True, help="directory for cert.pem, key.pem")
    gen_cert.add_argument(
        "--name", required=True, help="the host name or IP address clients will use"
    )
    why = sub.add_parser(
        "explain", help="say whether a request would be allowed, and why (exit 0, 3 if refused)"
    )
    why.set_defaults(explain_parser=why)
    why.add_argument("--config", type=Path, dest="explain_path", metavar="PATH", default=None)
    why.add_argument(
        "--client", type=_ip, default="127.0.0.1", metavar="IP", help="(default: 127.0.0.1)"
    )
    why.add_argument("--user", metavar="NAME", help="the user the credentials name")
    why.add_argument("--protocol", choices=tuple(explain.COMMANDS), default="socks5")
    why.add_argument(
        "--command",
        dest="request_command",  # (`command` is the subcommand's name)
        metavar="COMMAND",
        default="connect",
        help="connect, bind, udp_associate, or an HTTP method for forwarding (default: connect)",
    )
    why.add_argument("--json", action="store_true", help="one JSON object")
    why.add_argument("target", type=_target, metavar="HOST:PORT")
    quota = sub.add_parser("quota", help="users' traffic this period, and their quotas")
    quota.set_defaults(quota_parser=quota)
    quota.add_argument("--config", type=Path, dest="quota_path", metavar="PATH", default=None)
    what = quota.add_subparsers(dest="quota_command", required=True)
    show = what.add_parser("show", help="each user's use and quota, from the state file")
    show.add_argument("--user", metavar="NAME", help="this user only")
    show.add_argument("--json", action="store_true", help="one JSON object")
    reset = what.add_parser(
        "reset", help="start a user's count of this period anew (through the running daemon)"
    )
    reset.add_argument(
        "--wait", type=float, default=5.0, metavar="SECONDS", help="for the daemon (default: 5)"
    )
    reset.add_argument("user")
    return parser


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _target(text: str) -> tuple[str, int]:
    try:
        return explain.parse_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _report(name: str, problems: list[str]) -> None:
    for problem in problems:
        print(f"{name}: {problem}", file=sys.stderr)


def check_config(path: Path | None) -> int:
    source = settings.Source(path)
    try:
        current = source.read()
    except ConfigError as exc:
        _report(source.name, exc.problems)
        return EXIT_PROBLEM
    for event, fields in current.warnings():  # what works but should not be so
        details = ", ".join(f"{key}: {value}" for key, value in fields.items())
        print(f"{source.name}: warning: {event} ({details})", file=sys.stderr)
    print(f"{source.name}: OK")
    return EXIT_OK


def explain_request(args: argparse.Namespace) -> int:
    try:
        command = explain.command_of(args.protocol, args.request_command)
    except ValueError as exc:
        args.explain_parser.error(f"--command: {exc}")  # exits 2, as argparse does
    source = settings.Source(args.explain_path or args.config, args.listen)
    try:
        current = source.read()
    except ConfigError as exc:
        _report(source.name, exc.problems)
        return EXIT_PROBLEM
    host, port = args.target
    query = explain.Query(args.client, args.user, args.protocol, command, host, port)
    result = explain.explain(current, source.resolved_path(), query, log.stderr_logger())
    print(json.dumps(result) if args.json else explain.human(result))
    return EXIT_OK if result["allowed"] else EXIT_REFUSED


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
    source = settings.Source(args.config, args.listen, args.log_format, args.log_level)
    try:
        current = source.read()
    except ConfigError as exc:
        _report(source.name, exc.problems)
        return EXIT_PROBLEM
    cfg = current.config
    log.configure(cfg.log.format, cfg.log.level)
    logger = log.get_logger()
    for event, fields in current.warnings():
        logger.warning(event, **fields)
    from proxyd.server import Server  # after logging is configured

    try:
        activated = systemd.listen_sockets()
    except ConfigError as exc:
        for problem in exc.problems:
            logger.error("socket_activation", error=problem)
        return EXIT_PROBLEM
    if activated:
        # the open-proxy guard judges the sockets systemd passed, now and at reloads
        sockets = tuple(config.ListenAddress(*sock.getsockname()[:2]) for sock in activated)
        source = dataclasses.replace(source, sockets=sockets)
        if (why := cfg.open_proxy_problem(sockets)) is not None:
            _report(source.name, [why])
            for sock in activated:
                sock.close()
            return EXIT_PROBLEM
        ignored = [str(a) for a in cfg.server.listen]
        logger.info("socket_activation", listeners=[str(a) for a in sockets], ignored=ignored)

    def serve(server: Server) -> int:
        try:
            _run_loop(server.serve())
        except ListenFailed as exc:
            logger.error("listen_failed", address=exc.address, error=str(exc))
            return EXIT_PROBLEM
        except OSError as exc:  # not a listener's: the system refused something else
            logger.error("start_failed", error=str(exc))
            return EXIT_PROBLEM
        if server.lookups_left:
            # a resolver thread still waits for a DNS server that never answers: the
            # interpreter's exit would join it, for as long as resolv.conf lets it wait
            _detach_broken_stdout()
            os._exit(EXIT_OK)
        return EXIT_OK

    owned_books = None
    if cfg.accounting.enabled:  # the owner of the counts: this process, or the supervisor
        acc = cfg.accounting
        try:
            owned_books = books.open_books(acc.state_file, acc.every, cfg.quotas, logger)
        except (books.StateInUse, OSError, ConfigError) as exc:
            path = books.state_path(acc.state_file)
            logger.error("accounting_failed", path=str(path), error=str(exc))
            return EXIT_PROBLEM
    try:
        if cfg.server.workers == 1:
            # metrics of one process live in it; no multiprocess files of someone else's
            os.environ.pop(metrics.MULTIPROC_ENV, None)
            os.environ.pop(status.DIR_ENV, None)
            watcher = systemd.Notifier()
            server = Server(
                current,
                logger,
                activated=activated,
                watcher=watcher,
                reread=source.read,
                books=owned_books,
            )
            return serve(server)
        from proxyd.workers import Supervisor, SupervisorLink

        def run_worker(index: int, start: settings.Settings, link: SupervisorLink) -> int:
            return serve(
                Server(
                    start,
                    logger,
                    worker=index,
                    activated=activated,
                    watcher=link,
                    reread=link.reread,
                    accounts=link.accounts,
                )
            )

        try:
            supervisor = Supervisor(
                current, source, run_worker, logger, activated=bool(activated), books=owned_books
            )
            return supervisor.run()
        except ListenFailed as exc:
            logger.error("listen_failed", address=exc.address, error=str(exc))
            return EXIT_PROBLEM
        except OSError as exc:  # not a listener's: the system refused something else
            logger.error("start_failed", error=str(exc))
            return EXIT_PROBLEM
    finally:
        if owned_books is not None:
            owned_books.close()
        _detach_broken_stdout()


def gen_cert(out: Path, name: str) -> int:
    if not name or any(c.isspace() for c in name):
        print(f"proxyd gen-cert: --name {name!r} is not a host name or address", file=sys.stderr)
        return EXIT_USAGE
    try:
        cert, key = tls.generate(out.resolve(), name)
    except OSError as exc:
        print(f"proxyd gen-cert: cannot write into {out}: {exc.strerror}", file=sys.stderr)
        return EXIT_PROBLEM
    print(f"wrote {cert} and {key} (mode 0600), valid {tls.CERT_DAYS} days for {name}")
    print(f'[tls]\ncert = "{cert}"\nkey = "{key}"')
    return EXIT_OK


def _detach_broken_stdout() -> None:
    """Whoever read our stdout may be gone: then let the exit flush go to /dev/null."""
    try:
        sys.stdout.flush()
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def quota(args: argparse.Namespace) -> int:
    source = settings.Source(args.quota_path or args.config)
    try:
        cfg = source.read().config
    except ConfigError as exc:
        _report(source.name, exc.problems)
        return EXIT_PROBLEM
    if not cfg.accounting.enabled:
        print(f"proxyd quota: {source.name}: accounting is off (no [accounting])", file=sys.stderr)
        return EXIT_PROBLEM
    path = books.state_path(cfg.accounting.state_file)
    if args.quota_command == "reset":
        try:
            auth.check_username(args.user)
        except ValueError as exc:
            print(f"proxyd quota reset: {exc}", file=sys.stderr)
            return EXIT_USAGE
        log.configure("console", "warning")
        try:
            owner = books.reset_user(
                path, cfg.accounting.every, cfg.quotas, args.user, log.get_logger(), args.wait
            )
        except (books.StateInUse, TimeoutError, OSError, ConfigError) as exc:
            print(f"proxyd quota reset: {exc}", file=sys.stderr)
            return EXIT_PROBLEM
        how = f"by the daemon (pid {owner})" if owner else f"in {path}"
        print(f"{_shown(args.user)}: count of this period reset {how}")
        return EXIT_OK
    try:
        state = books.read_state(path)
    except FileNotFoundError:
        print(f"proxyd quota: {path}: no state file yet (nothing counted)", file=sys.stderr)
        return EXIT_PROBLEM
    except ConfigError as exc:
        print(f"proxyd quota: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    rows = books.usage(state, cfg.quotas, args.user)
    owner = books.lock_owner(path)
    ended = state["end"] <= time.time()
    if args.json:
        print(
            json.dumps(
                {
                    "state_file": str(path),
                    "period": state["period"],
                    "start": state["start_iso"],
                    "end": state["end_iso"],
                    "ended": ended,
                    "saved": state["saved"],
                    "daemon_pid": owner,
                    "users": rows,
                },
                indent=1,
            )
        )
        return EXIT_OK
    saved = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(state["saved"]))
    daemon = f"the daemon of pid {owner} counts on" if owner else "no daemon is running"
    print(f"{path}: {state['period']}, {state['start_iso']} to {state['end_iso']}")
    print(f"saved {saved}; {daemon}" + ("; that period has ended" if ended else ""))
    print(f"{'user':<20} {'up':>12} {'down':>12} {'total':>12}  quota")
    for row in rows:
        size = accounting.format_size
        limit = "-"
        if "limit" in row:
            mark = " EXCEEDED" if row["exceeded"] else ""
            limit = f"{row['limit']} ({row['used']:.0%}){mark}"
        print(
            f"{_shown(row['user']):<20} {size(row['up']):>12} {size(row['down']):>12} "
            f"{size(row['bytes']):>12}  {limit}"
        )
    return EXIT_OK


def _shown(name: str) -> str:
    """A user name for a terminal: as it is when printable, else quoted with escapes."""
    return name if name.isprintable() else repr(name)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "quota":
        return quota(args)
    if args.command == "explain":
        return explain_request(args)
    if args.command == "check-config":
        return check_config(args.check_path or args.config)
    if args.command == "passwd":
        return passwd(args.file, args.user)
    if args.command == "gen-cert":
        return gen_cert(args.out, args.name)
    return run(args)
