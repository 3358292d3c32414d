"""The human table: one row per proxy, direct loopback as the yardstick row."""

from __future__ import annotations

from typing import Any

LEGEND = """\
stream S5/CONN: one download from nginx via curl; MB/s for direct, ratio to direct for proxies.
CPU s/GiB: the proxy's user+system CPU seconds per GiB streamed (via SOCKS5 / via CONNECT).
hs/s: connect + handshake + 100-byte echo + close per second, (ratio) to the direct echo at the
  same concurrency; p50/p99 latency of one such operation; * = some failed (see notes).
fwd req/s: wrk -c64 with keep-alive through the proxy, absolute-form GET of 1 KiB from nginx
  (ratio) to wrk at nginx directly.
KiB/tunnel: (RSS with N idle tunnels - RSS before) / N; SOCKS5 tunnels, HTTP CONNECT for
  tinyproxy and squid; [k held] when only k of N opened.
after close: RSS and open fds once the tunnels closed, minus their values before."""


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _ratio(x: float | None, base: float | None) -> str:
    return f"{x / base:.2f}" if x is not None and base else "-"


def _handshakes(run: dict[str, Any] | None, base: float | None) -> tuple[str, str]:
    """(rate cell, latency cell) of one loadgen run."""
    if not run:
        return "-", "-"
    if "error" in run:
        return "ERR", "-"
    rate = _num(run["ops_per_s"])
    if base is not None:
        rate += f" ({_ratio(run['ops_per_s'], base)})"
    return rate + ("*" if run["errors"] else ""), f"{run['p50_ms']:.2f}/{run['p99_ms']:.2f}"


def _stream(run: dict[str, Any] | None, direct_mb_s: float | None) -> str:
    if run is None:
        return "-"
    if "error" in run:
        return "ERR"
    return _ratio(run["mb_per_s"], direct_mb_s)


def _forward(run: dict[str, Any] | None, direct: float | None) -> str:
    if run is None:
        return "-"
    if "error" in run:
        return "ERR"
    if not run["supported"]:
        return f"unsupported ({run['probe_status']})"
    return f"{_num(run['req_per_s'])} ({_ratio(run['req_per_s'], direct)})"


def _idle(run: dict[str, Any] | None) -> tuple[str, str]:
    """(KiB per tunnel, after-close cell)."""
    if run is None:
        return "-", "-"
    if "error" in run:
        return "ERR", "ERR"
    held = "" if run["held"] == run["requested"] else f" [{run['held']} held]"
    rss_mib = run["rss_after_minus_before_kib"] / 1024
    after = f"{rss_mib:+.1f} MiB/{run['fds_after_minus_before']:+d}"
    return f"{_num(run['kib_per_tunnel'])}{held}", after


# What each proxy does per forwarded request, checked by hand with two origins on loopback
# and three requests (A, A, B) on one curl connection; squid's and proxyd's access lines
# per wrk request are counted in every run ("access_lines" in the JSON).
FORWARDING = {
    "proxyd": "parses every request and answer; keep-alive to the client and to each origin",
    "squid": "parses every request and answer; keep-alive to the client and to each origin",
    "pproxy": "parses the first request only, then relays the connection as bytes: later "
    "requests go to the first origin whatever their URL",
    "tinyproxy": "parses every request; closes both connections after every answer",
}


def forwarding_lines(report: dict[str, Any]) -> list[str]:
    """One line per proxy in the run that forwards: what it does per request, which
    decides what its fwd req/s means."""
    lines = []
    for name, result in report.get("proxies", {}).items():
        if name in FORWARDING and "forward" in result:
            logged = _get(result, "forward", "access_lines")
            requests = _get(result, "forward", "requests")
            count = ""
            if logged is not None and requests is not None:
                count = f" [{logged:,} access lines, {requests:,} wrk requests]"
            lines.append(f"{name}: {FORWARDING[name]}{count}")
    return lines


HEADER = [
    "proxy", "stream S5", "stream CONN", "CPU s/GiB S5/CONN", "S5 hs/s c=1", "p50/p99 ms",
    "S5 hs/s c=64", "p50/p99 ms", "CONN hs/s c=64", "p50/p99 ms", "fwd req/s", "KiB/tunnel",
    "after close RSS/fds",
]  # fmt: skip


def rows(report: dict[str, Any]) -> list[list[str]]:
    """The table's cells, header first."""
    direct = report.get("direct", {})
    d_mb_s = _get(direct, "stream", "mb_per_s")
    d_c1 = _get(direct, "handshake_c1", "ops_per_s")
    d_c64 = _get(direct, "handshake_c64", "ops_per_s")
    d_fwd = _get(direct, "forward", "req_per_s")
    rate_c1, lat_c1 = _handshakes(direct.get("handshake_c1"), None)
    rate_c64, lat_c64 = _handshakes(direct.get("handshake_c64"), None)
    stream = "ERR" if d_mb_s is None else f"{_num(d_mb_s)} MB/s"
    cells = [
        HEADER,
        ["direct", stream, stream, "-", rate_c1, lat_c1, rate_c64, lat_c64, rate_c64, lat_c64,
         _num(d_fwd), "-", "-"],
    ]  # fmt: skip
    for name, r in report.get("proxies", {}).items():
        if "error" in r:
            cells.append([name, r["error"][:60]] + [""] * (len(HEADER) - 2))
            continue
        cpu = "/".join(
            _num(_get(r, key, "proxy_cpu_s_per_gib")) for key in ("stream_socks5", "stream_connect")
        )
        kib, after = _idle(r.get("idle_tunnels"))
        cells.append(
            [
                name,
                _stream(r.get("stream_socks5"), d_mb_s),
                _stream(r.get("stream_connect"), d_mb_s),
                cpu,
                *_handshakes(r.get("socks5_c1"), d_c1),
                *_handshakes(r.get("socks5_c64"), d_c64),
                *_handshakes(r.get("http_c64"), d_c64),
                _forward(r.get("forward"), d_fwd),
                kib,
                after,
            ]
        )
    return cells


def table(report: dict[str, Any]) -> str:
    cells = rows(report)
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def workers_line(workers: dict[str, Any] | None) -> str:
    """The workers = 1 vs 2 comparison (proxyd and loadgen unpinned, as each line says)
    and the metrics off vs on comparison (pinned like the main table)."""
    if not workers:
        return ""
    cells = []
    for n in (1, 2):
        run = workers.get(f"workers_{n}", {})
        rate = f"{_num(run['ops_per_s'])} hs/s" if "ops_per_s" in run else "not available"
        cells.append(f"workers = {n}: {rate}")
    ratio = f"; ratio {workers['ratio']}" if "ratio" in workers else ""
    where = _where(workers.get("workers_1", {}))
    lines = [f"proxyd SOCKS5 c=64 {', '.join(cells)}{ratio} ({where})"]
    off, on = workers.get("metrics_off", {}), workers.get("metrics_on", {})
    if "ops_per_s" in off and "ops_per_s" in on:
        ratio = f"; ratio {workers['metrics_ratio']}" if "metrics_ratio" in workers else ""
        lines.append(
            f"proxyd SOCKS5 c=64 [metrics] off: {_num(off['ops_per_s'])} hs/s, on: "
            f"{_num(on['ops_per_s'])} hs/s{ratio} ({_where(off)})"
        )
    return "\n".join(lines)


def _where(run: dict[str, Any]) -> str:
    """Where the proxy and the load generator ran, for one of the workers lines."""
    proxy, load = run.get("proxy_cpus"), run.get("load_cpus")
    if proxy is None or load is None:  # one cpu: the bench pins nothing
        return "nothing pinned"
    if proxy == "any" and load == "any":
        return "proxy and load generator unpinned, echo server on the load cpu"
    return f"proxy on cpu {proxy}, load generator on cpu {load}"
