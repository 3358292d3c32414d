"""The status page: one self-contained HTML document (inline CSS and SVG, no script)
made from the report proxyd.status builds, reloading itself every few seconds.

Every string that may come from outside (user names, client addresses, server
names) is escaped here; numbers are formatted, never passed through.
"""

from __future__ import annotations

import html
from typing import Any, Final

REFRESH: Final = 5  # seconds between reloads
CHART_WIDTH: Final = 600
CHART_HEIGHT: Final = 80

_STYLE: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.4em 0 .4em}
h3{font-size:1em;margin:.6em 0 .2em}
table{border-collapse:collapse}td,th{padding:.15em .8em .15em 0;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}.up{color:#17702a}.down{color:#b3261e;font-weight:bold}
svg{background:#fff;border:1px solid #ddd;display:block;margin:.2em 0 .6em}
polyline{fill:none;stroke-width:1.5}.c{stroke:#1f5fbf;color:#1f5fbf}
.u{stroke:#c26a00;color:#c26a00}.d{stroke:#17702a;color:#17702a}
.grid{display:flex;flex-wrap:wrap;gap:0 3em}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _bytes(n: int) -> str:
    """1,234,567 B (1.2 MB): exact, and readable."""
    size, units = float(n), ["B", "kB", "MB", "GB", "TB", "PB"]
    while size >= 1000 and len(units) > 1:
        size /= 1000
        units.pop(0)
    readable = f" ({size:.1f} {units[0]})" if n >= 1000 else ""
    return f"{n:,} B{readable}"


def _duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"


def _chart(title: str, lines: list[tuple[str, str, list[int]]]) -> str:
    """A polyline per series over the window; the newest second on the right."""
    peak = max((max(values, default=0) for _, _, values in lines), default=0) or 1
    step = CHART_WIDTH / max(1, max(len(values) for _, _, values in lines) - 1)
    polylines = []
    for css, _, values in lines:
        points = " ".join(
            f"{i * step:.1f},{CHART_HEIGHT - v * (CHART_HEIGHT - 2) / peak - 1:.1f}"
            for i, v in enumerate(values)
        )
        polylines.append(f'<polyline class="{css}" points="{points}"/>')
    legend = ", ".join(f'<span class="{css}">{_e(name)}</span>' for css, name, _ in lines)
    return (
        f"<div>{_e(title)}: {legend} <span class=muted>(peak {peak:,} per second)</span>"
        f'<svg width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img" aria-label="{_e(title)}">'
        f"{''.join(polylines)}</svg></div>"
    )


def _table(headers: tuple[str, str], rows: list[tuple[str, str]], empty: str) -> str:
    if not rows:
        return f"<p class=muted>{_e(empty)}</p>"
    head = f'<tr><th>{_e(headers[0])}</th><th class="n">{_e(headers[1])}</th></tr>'
    body = "".join(f'<tr><td>{name}</td><td class="n">{value}</td></tr>' for name, value in rows)
    return f"<table>{head}{body}</table>"


def render(report: dict[str, Any]) -> bytes:
    """The page for `report` (proxyd.status.report), UTF-8."""
    window = report["window_s"]
    minutes = f"{window // 60} min"
    series = report["series"]
    listeners = ", ".join(_e(a) for a in report["listeners"]) or "none"
    active = [(_e(protocol), f"{n:,}") for protocol, n in report["active"].items()]
    users = [
        (_e(row["user"]) if row["user"] is not None else "<i>(no user)</i>", _bytes(row["bytes"]))
        for row in report["top_users"]
    ]
    if report["other_users_bytes"]:
        users.append(("<i>(others)</i>", _bytes(report["other_users_bytes"])))
    clients = [(_e(row["client"]), _bytes(row["bytes"])) for row in report["top_clients"]]
    if report["other_clients_bytes"]:
        clients.append(("<i>(others)</i>", _bytes(report["other_clients_bytes"])))
    refusals = [(_e(status), f"{n:,}") for status, n in report["refusals"].items()]
    groups = []
    for group in report["upstreams"]:
        rows = "".join(
            f"<tr><td>{_e(s['server'])}</td>"
            + ('<td class="up">up</td>' if s["up"] else '<td class="down">down</td>')
            + "</tr>"
            for s in group["servers"]
        )
        groups.append(f"<h3>{_e(group['group'])}</h3><table>{rows}</table>")
    quotas = []
    if (q := report.get("quotas")) is not None:
        for row in q["users"]:
            limits = [
                f"{_bytes(n)}{what}"
                for n, what in (
                    (row["bytes"], ""),
                    (row["up_limit"], " up"),
                    (row["down_limit"], " down"),
                )
                if n is not None
            ]
            used = f"{_bytes(row['up'] + row['down'])} ({_bytes(row['up'])} up)"
            share = f"{row['used']:.0%}"
            over = ' class="down"' if row["used"] >= 1 else ""
            quotas.append(
                f"<tr><td>{_e(row['user'])}</td><td>{used}</td><td>{', '.join(limits)}</td>"
                f"<td{over}>{share}</td></tr>"
            )
    rate = report["connections"] / window
    bandwidth = (report["bytes_up"] + report["bytes_down"]) / window
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH}">',
        '<meta name="viewport" content="width=device-width">',
        f"<title>proxyd {_e(report['version'])}: status</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>proxyd {_e(report['version'])}</h1>",
        f"<p>up {_duration(report['uptime_s'])} &middot; workers: "
        f'<span id="workers">{report["workers_reporting"]} of {report["workers"]}</span>'
        f" reporting &middot; listening on {listeners}</p>",
        f'<h2>Active connections: <span id="active">{report["active_total"]:,}</span></h2>',
        _table(("protocol", "open"), active, "none open"),
        f"<h2>Last {minutes}</h2>",
        f'<p><span id="connections">{report["connections"]:,}</span> connections '
        f"({rate:.2f} per second); "
        f'<span id="bytes-up">{_bytes(report["bytes_up"])}</span> up, '
        f'<span id="bytes-down">{_bytes(report["bytes_down"])}</span> down '
        f"({_bytes(round(bandwidth))} per second)</p>",
        _chart("connections per second", [("c", "connections", series["connections"])]),
        _chart(
            "bytes per second",
            [("u", "up", series["bytes_up"]), ("d", "down", series["bytes_down"])],
        ),
        '<div class="grid"><section>',
        f"<h2>Top users by bytes, last {minutes}</h2>",
        _table(("user", "bytes"), users, "no traffic"),
        "</section><section>",
        f"<h2>Top clients by bytes, last {minutes}</h2>",
        _table(("client address", "bytes"), clients, "no traffic"),
        "</section><section>",
        f"<h2>Refusals by status, last {minutes}</h2>",
        _table(("status", "count"), refusals, "none"),
        "</section></div>",
        "<h2>Upstream groups</h2>",
        "".join(groups) or "<p class=muted>none configured</p>",
        *(
            []
            if q is None
            else [
                f"<h2>Quotas, this {_e(q['period'])} (until {_e(q['period_end'])})</h2>",
                "<table><tr><th>user</th><th>used</th><th>quota</th><th>share</th></tr>"
                + "".join(quotas)
                + "</table>"
                if quotas
                else "<p class=muted>no user under a quota has used any yet</p>",
            ]
        ),
        f'<p class="muted">Reloads every {REFRESH} s. The same data as JSON: '
        '<a href="/status.json">/status.json</a>; Prometheus: <a href="/metrics">/metrics</a>.</p>',
        "</body></html>\n",
    ]
    return "\n".join(parts).encode()
