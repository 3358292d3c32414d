"""What the sans-I/O protocol code may import, checked on its source with `ast`.

proxyd/protocols/ turns bytes into events and bytes, nothing more: no sockets,
no event loop, no TLS, and nothing of proxyd above it (sessions, the chain,
the configuration). From proxyd.errors it takes protocol-level names only: the
REP_* codes, ProtocolError (a peer's malformed message, with the reply to
give), LocalProtocolError and ParentProtocolError. What a failure means for a
session (an UpstreamError, a ParentError, ...) is the drivers' to say.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import proxyd.protocols
from proxyd import errors

PACKAGE = "proxyd.protocols"
ROOT = Path(proxyd.protocols.__file__).parent
MODULES = sorted(ROOT.rglob("*.py"))
IO_MODULES = ("asyncio", "socket", "ssl", "selectors")
PROXYD_ALLOWED = ("proxyd.errors", "proxyd.protocols")


def _under(module: str, roots: tuple[str, ...]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


def _session_level(name: str) -> bool:
    """Whether a name of proxyd.errors says what a failure means for a session."""
    value = getattr(errors, name, None)
    return (
        isinstance(value, type)
        and issubclass(value, (errors.UpstreamError, errors.SessionError))
        and value is not errors.ProtocolError
    )


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a `from ... import` names, relative ones resolved in `package`."""
    if node.level == 0:
        return node.module or ""
    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*parts, node.module] if node.module else parts)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def violations(source: str, package: str = PACKAGE) -> list[str]:
    """What a module of `package` with this source imports that it may not."""
    found: list[str] = []
    # names bound to proxyd.errors itself, whose attributes are checked like imports
    errors_names = {"proxyd.errors"}

    def module(name: str, line: int) -> None:
        # `proxyd` alone is a package path (`from proxyd import x`): x is checked
        above = _under(name, ("proxyd",)) and name != "proxyd" and not _under(name, PROXYD_ALLOWED)
        if _under(name, IO_MODULES) or above:
            found.append(f"line {line}: imports {name}")

    def from_errors(name: str, line: int) -> None:
        if name == "*" or _session_level(name):
            found.append(f"line {line}: imports {name} from proxyd.errors")

    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module(alias.name, node.lineno)
                if alias.name == "proxyd.errors" and alias.asname:
                    errors_names.add(alias.asname)
        elif isinstance(node, ast.ImportFrom):
            source_module = _absolute(node, package)
            module(source_module, node.lineno)
            for alias in node.names:
                if source_module == "proxyd":  # `from proxyd import chain`: a module
                    module(f"proxyd.{alias.name}", node.lineno)
                    if alias.name == "errors":
                        errors_names.add(alias.asname or alias.name)
                elif source_module == "proxyd.errors":
                    from_errors(alias.name, node.lineno)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _dotted(node.value) in errors_names:
            from_errors(node.attr, node.lineno)
    return found


def _package_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join([PACKAGE, *parts])
    return ".".join([PACKAGE, *parts[:-1]])


def test_every_protocol_module_is_checked() -> None:
    names = {path.name for path in MODULES}
    assert {"__init__.py", "clients.py", "common.py", "http.py", "socks5.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(ROOT)))
def test_protocols_import_no_io_and_no_session_errors(path: Path) -> None:
    assert violations(path.read_text(encoding="utf-8"), _package_of(path)) == []


# --- the check itself ------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "import socket",
        "import socket as s",
        "import asyncio.events",
        "from ssl import SSLContext",
        "import selectors",
        "def f():\n    import socket",
        "from proxyd import chain",
        "from proxyd import errors, session",
        "import proxyd.upstream",
        "from proxyd.config import Config",
        "from .. import chain",
        "from ..udp import UdpRelay",
        "from proxyd.errors import ParentError",
        "from proxyd.errors import ProtocolError, UpstreamError",
        "from proxyd.errors import SessionError",
        "from proxyd.errors import AddressNotSupported",
        "from proxyd.errors import Denied as D",
        "from ..errors import ParentDenied",
        "from proxyd.errors import *",
        "from proxyd import errors\nraise errors.UpstreamTimeout('x')",
        "from proxyd import errors as e\nraise e.ParentError('x')",
        "import proxyd.errors\nraise proxyd.errors.ParentError('x')",
        "import proxyd.errors as e\nraise e.HostUnreachable('x')",
    ],
)
def test_the_check_sees(source: str) -> None:
    assert violations(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "import ipaddress\nimport struct\nimport h11",
        "from __future__ import annotations",
        "from proxyd.errors import REP_SUCCEEDED, LocalProtocolError, ParentProtocolError",
        "from proxyd.errors import ProtocolError",
        "from proxyd.protocols import socks4, socks5",
        "from proxyd.protocols.common import NEED_DATA",
        "from . import common",
        "from .common import NEED_DATA",
        "from .. import errors\nraise errors.ProtocolError('x')",
        "import proxyd.errors\nraise proxyd.errors.LocalProtocolError('x')",
    ],
)
def test_the_check_allows(source: str) -> None:
    assert violations(source) == []
