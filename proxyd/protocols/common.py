"""Types shared by the protocol parsers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


class NeedData:
    """Sentinel: more bytes are needed before the next event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # keep the password out of any traceback or log
        return f"Credentials(username={self.username!r}, password=<hidden>)"


def format_hostport(host: str, port: int) -> str:
    """`host:port`, with IPv6 addresses in brackets as URLs and logs write them."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
