"""The bench's main table as Markdown, written into README.md between two markers.

`bench/run --readme` does this after its run; `.venv/bin/python bench/readme_table.py`
does it again from bench/results/latest.json (with --print, to stdout only). The text
says on what machine, when and with what command the figures were taken, because a
figure on its own says nothing about a noisy two-core machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from report import forwarding_lines, rows, workers_line

BENCH = Path(__file__).resolve().parent
LATEST = BENCH / "results" / "latest.json"
README = BENCH.parent / "README.md"
START = "<!-- bench:start -->"
END = "<!-- bench:end -->"


def _cell(text: str) -> str:
    """A table cell: '|' would end it, and '*' (some operations failed) is not emphasis."""
    return text.replace("|", "\\|").replace("*", "\\*") or " "


def markdown_table(cells: list[list[str]]) -> str:
    header, *body = cells
    lines = ["| " + " | ".join(_cell(c) for c in header) + " |"]
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """Machine, date and command, the table, what each proxy does per forwarded request,
    the workers lines and the run's notes."""
    command = report.get("command", "bench/run")
    parts = [
        f"`{command}` on {report.get('nproc', '?')} cpus ({report.get('cpu_model', '?')}), "
        f"Linux {report.get('kernel', '?')}, {_date(report.get('date'))}; proxy rows are "
        "ratios to `direct` in the same run (see [bench/README.md](bench/README.md)).",
        markdown_table(rows(report)),
    ]
    forwarding = forwarding_lines(report)
    if forwarding:
        parts.append("Forwarding, per request:\n\n" + "\n".join(f"- {x}" for x in forwarding))
    workers = workers_line(report.get("workers"))
    if workers:
        lines = "\n".join(f"- {line}" for line in workers.splitlines())
        parts.append(f"Workers and metrics:\n\n{lines}")
    if report.get("notes"):
        parts.append("Notes:\n\n" + "\n".join(f"- {note}" for note in report["notes"]))
    return "\n\n".join(parts)


def _date(iso: str | None) -> str:
    """bench.py's UTC ISO date as "2026-12-05 23:52 UTC"."""
    try:
        return datetime.datetime.fromisoformat(iso or "").strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso or "?"


def check_markers(readme: Path) -> str:
    """The file's text, if it has each marker once, in order; else SystemExit."""
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{readme}: needs one {START} line and one {END} line after it")
    return text


def update(readme: Path, text: str) -> None:
    """Replace what is between the markers."""
    old = check_markers(readme)
    head, rest = old.split(START)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=LATEST, help="the bench's results")
    parser.add_argument("--readme", type=Path, default=README, help="the file to update")
    parser.add_argument("--print", action="store_true", help="print the Markdown only")
    args = parser.parse_args(argv)
    text = render(json.loads(args.json.read_text()))
    if args.print:
        print(text)
    else:
        update(args.readme, text)
        print(f"{args.readme}: performance table updated from {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
