"""How the rooms of proxyd/ depend on each other, checked on their source with `ast`.

Imports point one way, down the data path (protocols -> dns, direct, chain, relay
-> gate -> handlers, tunnel, forward, udp -> session -> server -> cli): no cycle
anywhere, counting imports made only for type checking or inside functions, so
that each module can be read and changed without the ones above it. Who may go
where is decided in gate.py alone: no other module evaluates the access rules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import proxyd

ROOT = Path(proxyd.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imported(name: str, tree: ast.AST) -> Iterator[str]:
    """Every proxyd module `name`'s source imports, wherever the import stands."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # `from proxyd import gate` imports the module proxyd.gate
            targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            targets = targets or [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != "proxyd" and target != name:
                yield target


def graph(sources: dict[str, str]) -> dict[str, set[str]]:
    return {name: set(imported(name, ast.parse(text))) for name, text in sources.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and
    modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def sources() -> dict[str, str]:
    return {name: path.read_text() for name, path in MODULES.items()}


def test_no_import_cycle_inside_proxyd() -> None:
    assert cycles(graph(sources())) == []


def test_the_check_finds_a_cycle_made_only_for_type_checking() -> None:
    """It can fail: a cycle made of an import that runs only under TYPE_CHECKING, and
    one made inside a function, are cycles too."""
    found = sources()
    found["proxyd.relay"] += (
        "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from proxyd.session import X\n"
    )
    assert any({"proxyd.relay", "proxyd.session"} <= set(c) for c in cycles(graph(found)))
    found = sources()
    found["proxyd.dns"] += "\ndef late():\n    from proxyd import gate\n"
    assert any({"proxyd.dns", "proxyd.gate"} <= set(c) for c in cycles(graph(found)))


def test_only_the_server_imports_the_session() -> None:
    importers = {name for name, deps in graph(sources()).items() if "proxyd.session" in deps}
    assert importers == {"proxyd.server"}


# what evaluates the access rules; the names a rule table is built and read with
# (Rules, Rule, parse_rules, in_networks, ...) are free for anyone
RULE_EVALUATION = {"check_before_lookup", "check_without_destination", "allowed_addresses"}
RULE_REQUEST = "Request"  # what a rule is asked about


def rule_evaluations(name: str, tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in RULE_EVALUATION:
            found.append(f"{name}:{node.lineno}: {node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr in ("decide", "check"):
            # rules.decide(...), self.ctx.rules.check(...): the rule table asked directly
            if ast.unparse(node.value).split(".")[-1] == "rules":
                found.append(f"{name}:{node.lineno}: rules.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("rules"):
            for alias in node.names:
                if alias.name in RULE_EVALUATION or alias.name == RULE_REQUEST:
                    found.append(f"{name}:{node.lineno}: imports {alias.name}")
    return found


def test_the_rules_are_evaluated_in_the_gate_alone() -> None:
    outside = {"proxyd.gate", "proxyd.rules"}
    found = [
        hit
        for name, text in sources().items()
        if name not in outside
        for hit in rule_evaluations(name, ast.parse(text))
    ]
    assert found == []
    assert rule_evaluations("proxyd.gate", ast.parse(MODULES["proxyd.gate"].read_text()))


@pytest.mark.parametrize(
    "line",
    [
        "decision = self.ctx.rules.check_before_lookup(request)",
        "rules.check(request)",
        "ctx.rules.decide(request, None)",
        "from proxyd.rules import allowed_addresses",
    ],
)
def test_the_rule_check_sees_an_evaluation_elsewhere(line: str) -> None:
    assert rule_evaluations("proxyd.udp", ast.parse(line))
