"""structlog set-up: JSON lines on stdout (or a console format), access events included."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import structlog
from structlog.typing import Processor

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


class _LineWriter:
    """Log lines for stdout, written together once per loop iteration.

    A burst of access lines costs one write system call (and one wake-up of
    whoever reads the log), not one each. Without a running loop a line is
    written at once. A closed or broken stdout loses lines, never the daemon.
    """

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._scheduled = False

    def write(self, line: str) -> None:
        self._lines.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        loop.call_soon(self.flush)
        self._scheduled = True

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except (OSError, ValueError):
            pass


_writer = _LineWriter()
flush = _writer.flush


class _StdoutLogger:
    """The structlog logger: every method hands the rendered line to the writer."""

    def msg(self, message: str) -> None:
        _writer.write(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _stdout_logger(*_args: Any) -> _StdoutLogger:
    return _StdoutLogger()


# The access line skips structlog's bound-logger machinery (half its cost per
# connection) but goes through the same time stamper and renderer. Access
# events are governed by `log.access`, not by the level. Set by configure().
_stamp = structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts")
_render: Processor = structlog.processors.JSONRenderer()


def configure(fmt: str = "json", level: str = "info") -> None:
    """Route every proxyd event to stdout; called once by the CLI before anything logs."""
    renderer: Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stdout.isatty(),
            # plain tracebacks: a rich one would print local variables, secrets included
            exception_formatter=structlog.dev.plain_traceback,
        )
    else:
        renderer = structlog.processors.JSONRenderer()
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts")
    processors: list[Processor] = [structlog.processors.add_log_level, stamp]
    if fmt != "console":
        processors += [structlog.processors.format_exc_info, _lead_with_time_and_event]
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_stdout_logger,
        cache_logger_on_first_use=True,
    )
    global _stamp, _render, _json_lines
    _stamp, _render, _json_lines = stamp, renderer, fmt != "console"


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)


def write_access(event: dict[str, Any]) -> None:
    """An access event (built by proxyd.access, keys in their printed order, "ts"
    among them to be filled in) rendered and written like every other line: in JSON
    without structlog's processors (a third of the line's cost, one per connection),
    the same text as they would write."""
    if _json_lines:
        event["ts"] = _utc_now()
        _writer.write(json.dumps(event, default=str))
        return
    line = _render(None, "info", _stamp(None, "info", event))
    assert isinstance(line, str)
    _writer.write(line)


_json_lines = True  # set by configure()
_second = -1  # the second _utc_text is for
_utc_text = ""  # its date and time of day, as ISO 8601


def _utc_now() -> str:
    """Now as structlog's TimeStamper(fmt="iso", utc=True) writes it, the date and
    time of day formatted once a second rather than once a line."""
    global _second, _utc_text
    now = time.time()
    second = int(now)
    if second != _second:
        _second = second
        _utc_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    micro = int((now - second) * 1_000_000)
    return f"{_utc_text}.{micro:06d}Z" if micro else f"{_utc_text}Z"


def stderr_logger() -> Any:
    """A logger for a command that answers on stdout (`proxyd explain`): the daemon's
    code it runs may warn, and that goes to stderr as JSON, warnings and errors only."""
    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
