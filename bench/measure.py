"""The servers on loopback and the four measurements (a)-(d), each for one proxy or direct.

Load generators and servers run on the load core, the proxy on its own core.
A figure that cannot be taken raises MeasurementFailed with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procs import (
    LOOPBACK,
    MeasurementFailed,
    Processes,
    as_json_line,
    cpu_seconds,
    free_port,
    readline,
    usage,
    wait_for_lines,
    wait_for_port,
)
from proxies import Proxy, Running

BENCH = Path(__file__).resolve().parent
LOADGEN = str(BENCH / "results" / "loadgen")
GIB = 1 << 30


@dataclass(frozen=True)
class Plan:
    """How long and how big each measurement is."""

    quick: bool
    stream_bytes: int
    seconds_c1: float  # handshake runs at concurrency 1
    seconds_c64: float  # handshake runs at concurrency 64
    warmup: float  # seconds of load before handshake figures are taken
    forward_seconds: int
    hold_tunnels: int

    @classmethod
    def make(cls, quick: bool, tunnels: int | None) -> Plan:
        if quick:
            return cls(True, 256 << 20, 2.0, 2.0, 0.5, 2, tunnels or 500)
        return cls(False, GIB, 5.0, 8.0, 1.0, 8, tunnels or 5000)


class Bench:
    def __init__(self, plan: Plan, workdir: Path, procs: Processes) -> None:
        self.plan = plan
        self.workdir = workdir
        self.procs = procs
        self.notes: list[str] = []
        self._runs = 0
        two_cores = len(os.sched_getaffinity(0)) >= 2
        # The proxy under test gets core 0 to itself; load generators and servers core 1.
        self.proxy_cpu: str | None = "0" if two_cores else None
        self.load_cpu: str | None = "1" if two_cores else None
        self.echo_port = 0
        self.nginx_port = 0

    def note(self, text: str) -> None:
        """Something the reader of the results should know (failures, errors under load)."""
        self.notes.append(text)
        print(f"  ! {text}", flush=True)

    def _run(self, base: str, argv: list[str], timeout: float, pinned: bool = True) -> str:
        """A bounded client run on the load core (any core unless `pinned`); its stdout."""
        self._runs += 1
        cpu = self.load_cpu if pinned else None
        return self.procs.run(f"{base}-{self._runs}", argv, cpu=cpu, timeout=timeout)

    @contextlib.contextmanager
    def running(self, proxy: Proxy, pinned: bool = True) -> Iterator[Running]:
        """The proxy, started on the proxy core (any core unless `pinned`), then stopped."""
        run = proxy.start(self.procs, self.workdir, self.proxy_cpu if pinned else None)
        try:
            yield run
        finally:
            self.procs.stop(run.proc)

    # ---- servers: an echo server for handshakes, nginx for streams and requests ------------------

    def start_servers(self) -> None:
        argv = [LOADGEN, "echo", "-p", "0", "-d", "3600"]
        echo = self.procs.start("echo", argv, cpu=self.load_cpu)
        port = wait_for_lines(self.procs.log("echo"), r'"event": "listening", "port": (\d+)', echo)
        self.echo_port = int(port[0].group(1))

        www = self.workdir / "www"
        www.mkdir()
        block = os.urandom(1 << 20)  # real bytes: a sparse file could be sent for free
        with (www / "big.bin").open("wb") as f:
            for _ in range(self.plan.stream_bytes >> 20):
                f.write(block)
        (www / "small").write_bytes(os.urandom(1024))
        self.nginx_port = free_port()
        conf = self.workdir / "nginx.conf"
        conf.write_text(self._nginx_conf(www))
        errors = self.workdir / "nginx-error.log"
        argv = ["nginx", "-p", str(self.workdir), "-e", str(errors), "-c", str(conf)]
        nginx = self.procs.start("nginx", argv, cpu=self.load_cpu)
        wait_for_port(self.nginx_port, nginx, errors)

    def _nginx_conf(self, www: Path) -> str:
        tmp = self.workdir / "nginx-temp"
        tmp.mkdir()
        temp_paths = "".join(
            f"  {kind}_temp_path {tmp}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        # As root the workers would switch to nobody, who cannot read the workdir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return (
            f"daemon off;\nmaster_process on;\nworker_processes 1;\n{user}"
            f"pid {self.workdir}/nginx.pid;\nerror_log {self.workdir}/nginx-error.log warn;\n"
            "events { worker_connections 4096; }\n"
            "http {\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n"
            "  keepalive_requests 10000000;\n  default_type application/octet-stream;\n"
            f"{temp_paths}"
            f"  server {{ listen {LOOPBACK}:{self.nginx_port}; root {www}; }}\n}}\n"
        )

    # ---- (a) one large stream --------------------------------------------------------------------

    def stream(self, via: list[str], proxy_pid: int | None) -> dict[str, Any]:
        """curl downloads the big file (through the proxy when `via` says so)."""
        url = f"http://{LOOPBACK}:{self.nginx_port}/big.bin"
        write_out = "%{http_code} %{size_download} %{time_total}"
        argv = ["curl", "-sS", "--max-time", "300", "-o", "/dev/null", "-w", write_out, *via, url]
        cpu_before = cpu_seconds(proxy_pid) if proxy_pid else 0.0
        busy_before = cpu_times()
        code, size, seconds = self._run("curl", argv, timeout=320).split()
        busy = busy_percent(busy_before, cpu_times())
        if code != "200" or int(size) != self.plan.stream_bytes:
            raise MeasurementFailed(f"curl got HTTP {code} and {size} bytes")
        result: dict[str, Any] = {
            "bytes": int(size),
            "seconds": float(seconds),
            "mb_per_s": round(int(size) / float(seconds) / 1e6, 1),
            "cpu_busy_pct": busy,
        }
        if proxy_pid:
            cpu = cpu_seconds(proxy_pid) - cpu_before
            result["proxy_cpu_s_per_gib"] = round(cpu / (int(size) / GIB), 3)
        return result

    # ---- (b) connect + handshake + echo + close --------------------------------------------------

    def handshakes(
        self, mode: str, proxy_port: int | None, concurrency: int, pinned: bool = True
    ) -> dict[str, Any]:
        """loadgen MODE (direct, socks5, http) at a concurrency, on the load core (any core
        unless `pinned`); its JSON line."""
        seconds = self.plan.seconds_c1 if concurrency == 1 else self.plan.seconds_c64
        options = f"-t {self.echo_port} -c {concurrency} -d {seconds} -w {self.plan.warmup}"
        if proxy_port is not None:
            options += f" -x {proxy_port}"
        busy_before = cpu_times()
        out = self._run(
            f"loadgen-{mode}",
            [LOADGEN, mode, *options.split()],
            seconds + self.plan.warmup + 30,
            pinned=pinned,
        )
        result = as_json_line(out)
        # How busy each core was: the load core near 100% would mean loadgen is the limit.
        result["cpu_busy_pct"] = busy_percent(busy_before, cpu_times())
        if result["errors"]:
            kinds = {k: v for k, v in result["error_kinds"].items() if v}
            self.note(
                f"loadgen {mode} c={concurrency}: {result['errors']} failed operations {kinds}, "
                f"first: {result['first_error']}"
            )
        return result

    # ---- (c) HTTP forward proxy with keep-alive --------------------------------------------------

    def forward(self, proxy_port: int | None, name: str = "direct") -> dict[str, Any]:
        """wrk with absolute-form requests through the proxy, or at nginx directly."""
        target = f"http://{LOOPBACK}:{self.nginx_port}/small"
        if proxy_port is not None:
            proxy = f"http://{LOOPBACK}:{proxy_port}"
            argv = ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}"]
            status = self._run("curl-probe", [*argv, "-x", proxy, target], timeout=20).strip()
            if status != "200":
                return {"supported": False, "probe_status": status}
        env = [
            f"BENCH_TARGET={target if proxy_port is not None else ''}",
            f"BENCH_HOST={LOOPBACK}:{self.nginx_port}",
        ]
        seconds = self.plan.forward_seconds
        url = f"http://{LOOPBACK}:{proxy_port or self.nginx_port}/small"
        script = str(BENCH / "forward.lua")
        wrk = ["wrk", "-t1", "-c64", f"-d{seconds}s", "--timeout", "5s", "-s", script, url]
        result = as_json_line(self._run("wrk", ["env", *env, *wrk], seconds + 30))
        result["supported"] = True
        elapsed = result["duration_us"] / 1e6
        good = result["requests"] - result["status_errors"]
        result["req_per_s"] = round(good / elapsed, 1) if elapsed else 0.0
        kinds = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        errors = {k: result[k] for k in kinds if result[k]}
        if set(errors) == {"read_errors"} and errors["read_errors"] >= 0.9 * result["requests"]:
            result["keep_alive"] = False
            self.note(
                f"{name} closes the client connection after every response (no keep-alive): "
                "wrk reconnects and counts each close as a read error; req/s counts the "
                "complete responses"
            )
        elif errors:
            self.note(f"wrk via {name}: {errors}")
        return result

    # ---- (d) memory per idle tunnel --------------------------------------------------------------

    def idle_tunnels(self, run: Running, protocol: str) -> dict[str, Any]:
        """RSS and fds before, with N idle tunnels (loadgen hold), and after they close."""
        pid, count = run.proc.pid, self.plan.hold_tunnels
        # A little traffic first, so that the baseline has what any first tunnel allocates.
        warm = f"-x {run.port} -t {self.echo_port} -c 8 -d 5 -n 200"
        self._run("loadgen-warm", [LOADGEN, protocol, *warm.split()], timeout=30)
        time.sleep(0.5)
        before = usage(pid)
        options = f"-P {protocol} -x {run.port} -t {self.echo_port} -N {count} -c 64 -d 300"
        holder = self.procs.start(
            f"loadgen-hold-{protocol}",
            [LOADGEN, "hold", *options.split()],
            cpu=self.load_cpu,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert holder.stdin is not None and holder.stdout is not None
        try:
            setup = json.loads(readline(holder.stdout, timeout=180))
            time.sleep(1.0)  # let the proxy finish what the last tunnels started
            held = usage(pid)
            holder.stdin.close()  # the holder closes every tunnel and exits
            closing = json.loads(readline(holder.stdout, timeout=60))
            holder.wait(30)
        finally:
            self.procs.stop(holder)
        after = _settled_usage(pid, before["fds"])
        n = setup["held"]
        if n < count:
            self.note(
                f"{run.log.stem}: only {n} of {count} idle tunnels opened ({setup['errors']} "
                f"failed of {setup['attempted']} tried, first: {setup['first_error']})"
            )
        return {
            "requested": count,
            "attempted": setup["attempted"],
            "held": n,
            "setup_seconds": setup["setup_seconds"],
            "setup_errors": setup["errors"],
            "first_error": setup["first_error"],
            "dropped_while_held": closing["dropped_while_held"],
            "before": before,
            "with_tunnels": held,
            "after_close": after,
            "kib_per_tunnel": round((held["rss_kib"] - before["rss_kib"]) / n, 2) if n else None,
            "fds_per_tunnel": round((held["fds"] - before["fds"]) / n, 2) if n else None,
            "rss_after_minus_before_kib": after["rss_kib"] - before["rss_kib"],
            "fds_after_minus_before": after["fds"] - before["fds"],
        }


def cpu_times() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies per core from /proc/stat."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(x) for x in fields[:8]]
            idle = values[3] + values[4]  # idle + iowait
            times[name[3:]] = (sum(values) - idle, sum(values))
    return times


def busy_percent(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, float]:
    return {
        core: round(100 * (after[core][0] - busy) / max(1, after[core][1] - total), 1)
        for core, (busy, total) in before.items()
        if core in after
    }


def _settled_usage(pid: int, fds_before: int, timeout: float = 5.0) -> dict[str, int]:
    """Usage once the proxy has closed its side of the tunnels (its fd count stops falling)."""
    deadline = time.monotonic() + timeout
    last = usage(pid)
    while time.monotonic() < deadline and last["fds"] > fds_before:
        time.sleep(0.25)
        now = usage(pid)
        if now["fds"] == last["fds"]:
            break
        last = now
    return usage(pid)
