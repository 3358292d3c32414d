"""Side-by-side benchmark of proxyd, its peers and a direct loopback connection.

Started by `bench/run`, which installs the tools and builds `loadgen` first.
Measures, for each proxy and for a direct connection in the same run:
  (a) one large download from nginx through SOCKS5 and HTTP CONNECT (curl), and
      the proxy's CPU seconds per GiB;
  (b) connect + handshake + 100-byte echo + close rate and latency (loadgen);
  (c) HTTP forward proxy requests/s with keep-alive (wrk, absolute-form requests);
  (d) RSS per idle tunnel with thousands open, and RSS and fds after they close;
  (e) proxyd with `workers = 1` against `workers = 2`, and with metrics on.
Prints a table of ratios and writes bench/results/latest.json. Everything
listens on 127.0.0.1 only, and everything started here is stopped at the end,
also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from measure import Bench, Plan
from procs import LOOPBACK, MeasurementFailed, Processes, StartFailed, busy_processes, usage
from proxies import PEERS, PROXYD, Proxy, dpkg_version, proxyd_variant
from readme_table import README, check_markers, render, update
from report import LEGEND, forwarding_lines, table, workers_line

RESULTS = Path(__file__).resolve().parent / "results"


def attempt(bench: Bench, what: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One measurement; when it fails the reason is recorded and the run goes on."""
    print(f"  {what}", flush=True)
    try:
        return measure()
    except (MeasurementFailed, StartFailed, OSError, ValueError, KeyError) as exc:
        bench.note(f"{what} failed: {exc}")
        return {"error": str(exc)}


def measure_direct(bench: Bench) -> dict[str, Any]:
    print("direct (the yardstick)", flush=True)
    return {
        "stream": attempt(bench, "stream", lambda: bench.stream([], None)),
        "handshake_c1": attempt(bench, "echo c=1", lambda: bench.handshakes("direct", None, 1)),
        "handshake_c64": attempt(bench, "echo c=64", lambda: bench.handshakes("direct", None, 64)),
        "forward": attempt(bench, "wrk at nginx", lambda: bench.forward(None)),
    }


def measure_proxy(bench: Bench, proxy: Proxy) -> dict[str, Any]:
    """(a)-(c) on one instance of the proxy, then (d) on a fresh one."""
    print(proxy.name, flush=True)
    result: dict[str, Any] = {"version": proxy.version()}
    try:
        with bench.running(proxy) as run:
            pid, port = run.proc.pid, run.port
            result.update(run.info)
            result["usage_at_start"] = usage(pid)
            if proxy.socks5:
                via = ["--socks5", f"{LOOPBACK}:{port}"]
                result["stream_socks5"] = attempt(
                    bench, "stream via SOCKS5", lambda: bench.stream(via, pid)
                )
            if proxy.connect:
                via = ["-p", "-x", f"http://{LOOPBACK}:{port}"]
                result["stream_connect"] = attempt(
                    bench, "stream via CONNECT", lambda: bench.stream(via, pid)
                )
            for mode, speaks in (("socks5", proxy.socks5), ("http", proxy.connect)):
                for c in (1, 64) if speaks else ():
                    result[f"{mode}_c{c}"] = attempt(
                        bench,
                        f"{mode} handshakes c={c}",
                        lambda mode=mode, c=c: bench.handshakes(mode, port, c),
                    )
            if proxy.http:
                lines_before = run.access_lines() if run.access_lines else None
                result["forward"] = attempt(
                    bench, "forward (wrk)", lambda: bench.forward(port, proxy.name)
                )
                if run.access_lines and lines_before is not None:
                    time.sleep(0.5)  # time for the proxy to write its last lines
                    # wrk's requests + 1 (bench's probe) when the proxy logs every request
                    result["forward"]["access_lines"] = run.access_lines() - lines_before
            time.sleep(1.0)
            result["usage_after_load"] = usage(pid)
        if proxy is PROXYD:
            result["access_log"] = access_summary(run.log)
        protocol = "socks5" if proxy.socks5 else "http"
        with bench.running(proxy) as run:
            result["idle_tunnels"] = attempt(
                bench,
                f"{bench.plan.hold_tunnels} idle {protocol} tunnels",
                lambda: bench.idle_tunnels(run, protocol),
            )
        if proxy is PROXYD:
            result["idle_tunnels_access_log"] = access_summary(run.log)
    except StartFailed as exc:
        bench.note(f"{proxy.name} did not start: {exc}")
        result["error"] = f"did not start: {exc}"
    return result


# Loopback's ephemeral ports (28,232 by default) held in TIME_WAIT by earlier runs:
# above this many, a run waits (at most PORTS_WAIT seconds) for them to clear, or
# connects and binds fail with EADDRNOTAVAIL / EADDRINUSE.
PORTS_BUSY = 15000
PORTS_WAIT = 65.0


def time_wait_sockets() -> int:
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("tw") + 1])
    return 0


def settle_ports() -> None:
    deadline = time.monotonic() + PORTS_WAIT
    if time_wait_sockets() > PORTS_BUSY:
        print(f"  (waiting for TIME_WAIT sockets to clear: {time_wait_sockets()})", flush=True)
    while time_wait_sockets() > PORTS_BUSY and time.monotonic() < deadline:
        time.sleep(1)


def measure_workers(bench: Bench) -> dict[str, Any]:
    """proxyd SOCKS5 handshakes at c=64, two comparisons.

    workers = 1 against 2: proxyd and the load generator both on any core (the echo
    server stays on the load core), for both worker counts, so that the ratio compares
    like with like; two workers pinned to one core would have nothing to gain.
    metrics off against on: one worker pinned as in the main table, and loadgen too."""
    print("proxyd workers = 1 vs 2 (unpinned), metrics off vs on (pinned)", flush=True)
    result: dict[str, Any] = {}
    for key, workers, metrics, pinned in (
        ("workers_1", 1, False, False),
        ("workers_2", 2, False, False),
        ("metrics_off", 1, False, True),
        ("metrics_on", 1, True, True),
    ):
        try:
            with bench.running(proxyd_variant(workers, metrics), pinned=pinned) as run:
                result[key] = attempt(
                    bench,
                    f"{key}, socks5 c=64" + ("" if pinned else ", unpinned"),
                    lambda port=run.port, pinned=pinned: bench.handshakes(
                        "socks5", port, 64, pinned=pinned
                    ),
                )
                # None: one cpu, nothing pinned either way
                unpinned = "any" if bench.proxy_cpu is not None else None
                result[key]["proxy_cpus"] = bench.proxy_cpu if pinned else unpinned
                result[key]["load_cpus"] = bench.load_cpu if pinned else unpinned
                result[key]["processes"] = usage(run.proc.pid)["processes"]
        except StartFailed as exc:
            bench.note(f"proxyd {key} not available: {exc}")
            result[key] = {"available": False, "error": str(exc)}
    for key, base, ratio in (
        ("workers_2", "workers_1", "ratio"),
        ("metrics_on", "metrics_off", "metrics_ratio"),
    ):
        one, other = result[base].get("ops_per_s"), result[key].get("ops_per_s")
        if one and other:
            result[ratio] = round(other / one, 2)
    return result


def access_summary(log: Path) -> dict[str, Any]:
    """proxyd's access statuses, the commonest failure texts, and its other warnings."""
    statuses: collections.Counter[str] = collections.Counter()
    failures: collections.Counter[str] = collections.Counter()
    warnings: collections.Counter[str] = collections.Counter()
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            warnings["(not JSON)"] += 1
            continue
        if event.get("event") == "access":
            statuses[event.get("status", "?")] += 1
            if event.get("status") != "ok":
                failures[f"{event.get('status')}: {event.get('error')}"] += 1
        elif event.get("level") in ("warning", "error", "critical"):
            warnings[event.get("event", "?")] += 1
    return {
        "statuses": dict(statuses),
        "failures": dict(failures.most_common(5)),
        "warnings": dict(warnings),
    }


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per measurement")
    parser.add_argument("--tunnels", type=int, help="idle tunnels to hold (5000; quick: 500)")
    parser.add_argument("--only", help="comma-separated proxies to run (default: all installed)")
    parser.add_argument("--pidfile", type=Path, help="record started PIDs here (for bench/run)")
    parser.add_argument(
        "--readme", action="store_true", help="write the table into README.md's Performance"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.readme:
        check_markers(README)  # before the run, not after minutes of it
    plan = Plan.make(args.quick, args.tunnels)
    wanted = set(args.only.split(",")) if args.only else None
    started = time.monotonic()
    # SIGTERM unwinds like Ctrl-C, through the finally that stops everything.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    report: dict[str, Any] = machine()
    report["command"] = command_line(argv)
    nginx = dpkg_version("nginx")
    report["versions"] = {
        "nginx": nginx if nginx != "unknown" else dpkg_version("nginx-light"),
        "curl": dpkg_version("curl"),
        "wrk": dpkg_version("wrk"),
    }
    with tempfile.TemporaryDirectory(prefix="proxyd-bench-") as workdir:
        procs = Processes(Path(workdir), args.pidfile)
        bench = Bench(plan, Path(workdir), procs)
        report["plan"] = plan.__dict__
        report["pinning"] = {"proxy": bench.proxy_cpu, "load_and_servers": bench.load_cpu}
        report["proxies"] = {}
        print(f"proxyd bench, {'quick' if plan.quick else 'default'} run, workdir {workdir}")
        print(f"proxy on cpu {bench.proxy_cpu}, load generators and servers on {bench.load_cpu}")
        try:
            report["busy_before"] = busy_processes()
            for other in report["busy_before"]:
                bench.note(
                    f"another process was busy when the bench started: {other['command']} "
                    f"(pid {other['pid']}, {other['cpu_pct']}% of a cpu); figures are noisier"
                )
            bench.start_servers()
            report["direct"] = measure_direct(bench)
            # (the workers first: after every peer's run, loopback's ports may be
            # short for a while, TIME_WAIT holding them)
            if wanted is None or "proxyd" in wanted:
                report["workers"] = measure_workers(bench)
            for proxy in [PROXYD, *PEERS]:
                if wanted is not None and proxy.name not in wanted:
                    continue
                if not proxy.installed():
                    bench.note(f"{proxy.name} is not installed: skipped")
                    continue
                settle_ports()
                report["proxies"][proxy.name] = measure_proxy(bench, proxy)
                report["versions"][proxy.name] = report["proxies"][proxy.name]["version"]
        finally:
            procs.stop_all()
        report["busy_after"] = busy_processes()
        report["notes"] = bench.notes
        report["seconds"] = round(time.monotonic() - started, 1)

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "latest.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(report))
    forwarding = forwarding_lines(report)
    if forwarding:
        print("fwd, per request:")
        for line in forwarding:
            print(f"  {line}")
    print(workers_line(report.get("workers")))
    print()
    print(LEGEND)
    if report["notes"]:
        print("\nnotes:")
        for note in report["notes"]:
            print(f"  - {note}")
    print(f"\n{report['nproc']} cpus, {report['seconds']} s in all; JSON: {path}")
    if args.readme:
        update(README, render(report))
        print(f"{README}: performance table updated")
    return 0


def command_line(argv: list[str]) -> str:
    """The command as its user typed it: bench/run's own --pidfile left out."""
    shown, skip = [], False
    for arg in argv:
        if skip or arg == "--pidfile" or arg.startswith("--pidfile="):
            skip = arg == "--pidfile"
            continue
        shown.append(arg)
    return shlex.join(["bench/run", *shown])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # main's finally has stopped everything already
        print("\nbench: interrupted; everything it started is stopped", file=sys.stderr)
        sys.exit(130)
