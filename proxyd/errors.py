"""The small error tree of proxyd.

A protocol or upstream error carries what to answer: the SOCKS reply code and
the HTTP status, plus the short `status` word the access log records.
"""

from __future__ import annotations

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


class ProxydError(Exception):
    """Base of every error proxyd raises on purpose."""


class ConfigError(ProxydError):
    """The configuration is invalid; `problems` holds one `key.path: what` per fault."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class SessionError(ProxydError):
    """Ends one client session; says what to answer and what to log."""

    status = "error"
    socks_reply = REP_GENERAL_FAILURE
    http_status = 502

    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class ProtocolError(SessionError):
    """The client sent something we cannot accept."""

    status = "bad_request"
    http_status = 400

    def __init__(
        self,
        message: str,
        *,
        socks_reply: int = REP_GENERAL_FAILURE,
        http_status: int = 400,
        status: str | None = None,
    ) -> None:
        super().__init__(message, status=status)
        self.socks_reply = socks_reply
        self.http_status = http_status


class AuthFailed(SessionError):
    """Missing or wrong credentials."""

    status = "auth_failed"
    socks_reply = REP_NOT_ALLOWED
    http_status = 407


class LockedOut(AuthFailed):
    """Too many failed logins from this client address lately (`auth.max_failures`)."""

    status = "locked_out"
    http_status = 429


class Denied(SessionError):
    """An access rule, or `server.default_action`, refuses the request."""

    status = "denied"
    socks_reply = REP_NOT_ALLOWED
    http_status = 403

    def __init__(self, rule: int | None, reason: str | None = None) -> None:
        if reason is None:
            reason = f"denied by rules[{rule}]" if rule is not None else "denied by default_action"
        super().__init__(reason)
        self.rule = rule  # the access line's `rule`: None for the default action


class OverLimit(SessionError):
    """The daemon is at `server.max_connections`."""

    status = "limit"
    socks_reply = REP_GENERAL_FAILURE
    http_status = 503


class UpstreamError(SessionError):
    """Reaching the target failed; subclasses fix the reply and status."""


class UpstreamRefused(UpstreamError):
    status = "refused"
    socks_reply = REP_CONNECTION_REFUSED


class NetworkUnreachable(UpstreamError):
    status = "unreachable"
    socks_reply = REP_NETWORK_UNREACHABLE


class HostUnreachable(UpstreamError):
    """Host unreachable, including a name that does not resolve."""

    status = "unreachable"
    socks_reply = REP_HOST_UNREACHABLE


class UpstreamTimeout(UpstreamError):
    status = "timeout"
    socks_reply = REP_HOST_UNREACHABLE
    http_status = 504


class LocalProtocolError(ProxydError):
    """Our own code drove a protocol state machine through an illegal transition (a bug)."""


class ParentError(UpstreamError):
    """A parent proxy itself failed (unreachable, broke its protocol, refused our
    credentials): it counts against the parent's health, and the next parent of
    its group is tried. A failure the parent reports about the target is an
    ordinary UpstreamError instead, answered as if we had connected ourselves."""

    status = "parent_failed"


class ParentDenied(UpstreamError):
    """The parent proxy's own rules refused the target."""

    status = "denied"
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

    status = "unsupported"
    socks_reply = REP_ADDRESS_TYPE_NOT_SUPPORTED
