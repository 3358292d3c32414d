"""structlog set-up: JSON lines on stdout (or a console format), and the access event."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _lead_with_time_and_event(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> dict[str, Any]:
    """Order the keys `ts, level, event, ...` so a tailed log reads left to right."""
    return {
        "ts": event.pop("ts"),
        "level": event.pop("level"),
        "event": event.pop("event"),
        **event,
    }


class _StdoutLogger(structlog.WriteLogger):
    """Writes lines to stdout; a closed or broken stdout loses lines, never the daemon."""

    def msg(self, message: str) -> None:
        try:
            super().msg(message)
        except (OSError, ValueError):
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _stdout_logger(*_args: Any) -> _StdoutLogger:
    return _StdoutLogger(sys.stdout)


# Access events are governed by `log.access`, not by the level: a daemon at
# level "warning" still writes them. Rebuilt by configure().
_access_log: Any = structlog.get_logger()


def configure(fmt: str = "json", level: str = "info") -> None:
    """Route every proxyd event to stdout; called once by the CLI before anything logs."""
    renderer: structlog.typing.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stdout.isatty(),
            # plain tracebacks: a rich one would print local variables, secrets included
            exception_formatter=structlog.dev.plain_traceback,
        )
    else:
        renderer = structlog.processors.JSONRenderer()
    processors: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]
    if fmt != "console":
        processors += [structlog.processors.format_exc_info, _lead_with_time_and_event]
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_stdout_logger,
        cache_logger_on_first_use=True,
    )
    global _access_log
    _access_log = structlog.wrap_logger(
        None, wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)
    )


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)


def access(
    *,
    conn_id: int,
    client: str,
    status: str,
    user: str | None = None,
    protocol: str | None = None,
    command: str | None = None,
    target: str | None = None,
    bytes_up: int = 0,
    bytes_down: int = 0,
    duration_ms: float = 0.0,
    **extra: Any,
) -> None:
    """The one access event per finished connection, with every field DESIGN.md names."""
    _access_log.info(
        "access",
        conn_id=conn_id,
        client=client,
        user=user,
        protocol=protocol,
        command=command,
        target=target,
        status=status,
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        duration_ms=duration_ms,
        **extra,
    )
