"""The access record: one builder for every access line, whatever it records (a
tunnel, a forwarded request, a UDP association, a refusal at accept), with the
fields the contract names in the order people read them."""

from __future__ import annotations

import time
from typing import Any

from proxyd.context import Conn
from proxyd.errors import Status
from proxyd.log import write_access
from proxyd.status import RECORDER

_CONN_USER: Any = object()  # `user` not given: the connection's


def record(
    conn: Conn,
    status: Status,
    *,
    command: str | None = None,
    target: str | None = None,
    user: str | None = _CONN_USER,
    bytes_up: int = 0,
    bytes_down: int = 0,
    started: float | None = None,
    error: str | None = None,
    write: bool = True,
    **extra: Any,
) -> None:
    """Write one access line for `conn` (unless `write` is False: `log.access` is off),
    and tell the status page. `started` (time.monotonic) defaults to the
    connection's accept; `extra` adds fields (`rule`, `via`, datagram counts, ...)
    after the contract's own, and the connection's TLS version and balancer last."""
    if not write:
        user = conn.user if user is _CONN_USER else user
        RECORDER.logged(conn, status, user, bytes_up, bytes_down)
        return
    event: dict[str, Any] = {
        "ts": None,
        "level": "info",
        "event": "access",
        "conn_id": conn.conn_id,
        "client": conn.client,
        "user": conn.user if user is _CONN_USER else user,
        "protocol": conn.protocol,
        "command": command,
        "target": target,
        "status": status,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "duration_ms": round(
            (time.monotonic() - (conn.started if started is None else started)) * 1000, 1
        ),
    }
    if extra:
        event.update(extra)
    if error:
        event["error"] = error
    if conn.tls is not None:
        event["tls"] = conn.tls
    if conn.proxied_by is not None:
        event["proxied_by"] = conn.proxied_by
    write_access(event)
    RECORDER.logged(conn, status, event["user"], bytes_up, bytes_down)  # the status page
