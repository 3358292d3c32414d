"""The small error tree of proxyd, and the access log's status words.

A protocol or upstream error carries what to answer: the SOCKS reply code and
the HTTP status, plus the short `status` word the access log records. Every
error class proxyd raises on purpose is here.
"""

from __future__ import annotations

import enum
import errno
import math
import socket
from typing import Final

# SOCKS5 reply codes (RFC 1928 section 6), shared by every module that answers.
REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Status(enum.StrEnum):
    """The access line's `status`: `ok`, or a short reason (README lists them all)."""

    OK = "ok"
    AUTH_FAILED = "auth_failed"
    LOCKED_OUT = "locked_out"
    DENIED = "denied"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    RESET = "reset"
    BAD_REQUEST = "bad_request"
    UNSUPPORTED = "unsupported"
    LIMIT = "limit"
    QUOTA_EXCEEDED = "quota_exceeded"
    CLIENT_CLOSED = "client_closed"
    UPSTREAM_CLOSED = "upstream_closed"
    PARENT_FAILED = "parent_failed"
    SHUTDOWN = "shutdown"
    ERROR = "error"


# How a relay that ends so is closed: cut off, with a reset on both sides, so that
# neither takes the stream for a whole one.
CUT_OFF: Final = frozenset({Status.RESET, Status.QUOTA_EXCEEDED})


class ProxydError(Exception):
    """Base of every error proxyd raises on purpose."""


class ConfigError(ProxydError):
    """The configuration is invalid; `problems` holds one `key.path: what` per fault."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class SessionError(ProxydError):
    """Ends one client session; says what to answer and what to log."""

    status = Status.ERROR
    socks_reply = REP_GENERAL_FAILURE
    http_status = 502
    retry_after: int | None = None  # an HTTP answer's Retry-After, in seconds

    def __init__(self, message: str, *, status: Status | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class ProtocolError(SessionError):
    """The client sent something we cannot accept."""

    status = Status.BAD_REQUEST
    http_status = 400

    def __init__(
        self,
        message: str,
        *,
        socks_reply: int = REP_GENERAL_FAILURE,
        http_status: int = 400,
        status: Status | None = None,
    ) -> None:
        super().__init__(message, status=status)
        self.socks_reply = socks_reply
        self.http_status = http_status


class AuthFailed(SessionError):
    """Missing or wrong credentials."""

    status = Status.AUTH_FAILED
    socks_reply = REP_NOT_ALLOWED
    http_status = 407


class LockedOut(AuthFailed):
    """Too many failed logins from this client address lately (`auth.max_failures`),
    or for this user name (`auth.max_user_failures`); `retry_after`: whole seconds
    until the lockout ends (an HTTP 429's Retry-After)."""

    status = Status.LOCKED_OUT
    http_status = 429

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


class Denied(SessionError):
    """An access rule, or `server.default_action`, refuses the request."""

    status = Status.DENIED
    socks_reply = REP_NOT_ALLOWED
    http_status = 403

    def __init__(
        self, rule: int | None, reason: str | None = None, *, code: str | None = None
    ) -> None:
        if reason is None:
            reason = f"denied by rules[{rule}]" if rule is not None else "denied by default_action"
        super().__init__(reason)
        self.rule = rule  # the access line's `rule`: None for the default action, or none at all
        # the access line's `reason` when no rule decided: "private_destination", "own_listener"
        self.code = code

    def fields(self) -> dict[str, object]:
        """What the access line adds: the deciding rule, or why it was refused without one."""
        return {"rule": self.rule} if self.code is None else {"rule": None, "reason": self.code}


class OverLimit(SessionError):
    """The daemon is at `server.max_connections`."""

    status = Status.LIMIT
    socks_reply = REP_GENERAL_FAILURE
    http_status = 503


class QuotaExceeded(SessionError):
    """The user has used up its traffic quota for this period (`[[quotas]]`)."""

    status = Status.QUOTA_EXCEEDED
    socks_reply = REP_NOT_ALLOWED
    http_status = 403


class ClientClosed(SessionError):
    """The client went away before its request was whole."""

    status = Status.CLIENT_CLOSED


class HandshakeTimeout(SessionError):
    """No complete request within `timeouts.handshake`."""

    status = Status.HANDSHAKE_TIMEOUT
    http_status = 408


class UpstreamError(SessionError):
    """Reaching the target failed; subclasses fix the reply and status."""


class UpstreamRefused(UpstreamError):
    status = Status.REFUSED
    socks_reply = REP_CONNECTION_REFUSED


class NetworkUnreachable(UpstreamError):
    status = Status.UNREACHABLE
    socks_reply = REP_NETWORK_UNREACHABLE


class HostUnreachable(UpstreamError):
    """Host unreachable, including a name that does not resolve."""

    status = Status.UNREACHABLE
    socks_reply = REP_HOST_UNREACHABLE


class UpstreamTimeout(UpstreamError):
    status = Status.TIMEOUT
    socks_reply = REP_HOST_UNREACHABLE
    http_status = 504


class UpstreamBroken(SessionError):
    """A forwarded answer's origin closed or broke the connection mid-response: the
    client is cut off."""

    status = Status.UPSTREAM_CLOSED


def classify(exc: OSError, target: str) -> UpstreamError:
    """Map a connect or lookup failure to the error that says what to answer."""
    if isinstance(exc, socket.gaierror):
        return HostUnreachable(f"cannot resolve {target}: {exc.strerror}")
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamRefused(f"{target} refused the connection")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"connecting to {target} timed out")
    if exc.errno in (errno.ENETUNREACH, errno.ENETDOWN):
        return NetworkUnreachable(f"network of {target} is unreachable")
    if exc.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
        return HostUnreachable(f"{target} is unreachable")
    return UpstreamError(f"connecting to {target} failed: {exc.strerror or exc}")


class LocalProtocolError(ProxydError):
    """Our own code drove a protocol state machine through an illegal transition (a bug)."""


class ParentError(UpstreamError):
    """A parent proxy itself failed (unreachable, broke its protocol, refused our
    credentials): it counts against the parent's health, and the next parent of
    its group is tried. A failure the parent reports about the target is an
    ordinary UpstreamError instead, answered as if we had connected ourselves."""

    status = Status.PARENT_FAILED


class ParentDenied(UpstreamError):
    """The parent proxy's own rules refused the target."""

    status = Status.DENIED
    socks_reply = REP_NOT_ALLOWED
    http_status = 403


class ParentProtocolError(ProxydError):
    """A parent proxy broke its protocol or refused us (our credentials, its identd
    check). Raised by the sans-I/O clients of proxyd.protocols.clients, which know
    no sessions: the chain driver makes it a ParentError."""


class AddressNotSupported(UpstreamError):
    """The target's address cannot be carried to the parent (an IPv6 address under
    SOCKS4, a name too long once IDNA-encoded): the target is fine, but this parent
    cannot be asked for it."""

    status = Status.UNSUPPORTED
    socks_reply = REP_ADDRESS_TYPE_NOT_SUPPORTED


class ListenFailed(OSError):
    """A listener could not be bound: which one (its config key and address), and why."""

    def __init__(self, role: str, address: object, cause: OSError) -> None:
        super().__init__(cause.errno, f"{role}: {address}: {cause.strerror}")
        self.address = str(address)
