"""What tracing costs the traced program: throughput and p99 latency of a server under
back-to-back load from loopback clients, untraced and traced, in alternating pairs.

Each pair measures the same running server twice - once untraced, once with a recorder
attached (-p PID) - in an order that flips every round, so drift on a shared machine hits both
sides alike. The figure is the traced/untraced ratio per pair, as min/median/max.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from idlebuf.bench.common import RecorderRun, spread
from idlebuf.scenario import read_event, spawn, stop

SERVERS = {
    "readiness": ("workloads.epoll_server", ("--buffers", "pool")),
    "threads": ("workloads.threaded_server", ()),
}
# what is attached: only reads that wait (>= 1 ms; the rest counted in the kernel; no writes),
# seen through the scheduler (the default where the kernel allows) or through syscall
# tracepoints; every read and write, and readiness waits (the default); + the memory side
# (allocator uprobes on blocks >= 1 KiB, RSS, socket memory); + every allocation however small
CONFIGS = {
    "posted reads": ("--min-wait", "1", "--no-writes"),
    "posted (syscalls)": ("--min-wait", "1", "--no-writes", "--wait-hooks", "syscalls"),
    "every read": (),
    "+ memory": ("--memory",),
    "everything": ("--memory", "--min-alloc", "1"),
}


def placement() -> tuple[set[int] | None, set[int] | None]:
    """CPUs for the server and for the load generator: one each, apart, where there are two
    (they otherwise migrate and share CPUs differently from run to run); the recorder runs
    anywhere."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[-1]}


def burst(
    port: int, connections: int, seconds: float, cpus: set[int] | None = None
) -> dict[str, Any]:
    """Back-to-back 1,000-byte echo exchanges on every connection for `seconds`."""
    load = spawn(
        "workloads.loadgen",
        *("--port", str(port), "--connections", str(connections), "--active", str(connections)),
        *("--messages", str(10**9), "--rate", "0", "--duration", str(seconds)),
        cpus=cpus,
    )
    try:
        return read_event(load.stdout, "done", seconds + 60)  # type: ignore[arg-type]
    finally:
        stop(load)


def run(
    rounds: int,
    seconds: float,
    connections: int,
    log: Callable[[str], None],
    configs: list[str] | None = None,
) -> dict[str, Any]:
    configs = list(CONFIGS) if configs is None else configs
    server_cpus, load_cpus = placement()
    results: dict[str, Any] = {
        "rounds": rounds,
        "seconds": seconds,
        "connections": connections,
        "server_cpus": sorted(server_cpus or ()),
        "load_cpus": sorted(load_cpus or ()),
    }
    for server_name, (module, args) in SERVERS.items():
        server = spawn(module, *args, cpus=server_cpus)
        try:
            port = read_event(server.stdout, "listening", 30)["port"]  # type: ignore[arg-type]
            burst(port, connections, 1.0, load_cpus)  # warm up
            per_config: dict[str, Any] = {}
            for config in configs:
                record_args = CONFIGS[config]
                throughput, p99, footprints, base = [], [], [], []
                for r in range(rounds):
                    sides: dict[str, dict[str, Any]] = {}
                    for traced in (False, True) if r % 2 == 0 else (True, False):
                        if not traced:
                            sides["untraced"] = burst(port, connections, seconds, load_cpus)
                            continue
                        with tempfile.TemporaryDirectory() as tmp:
                            rec = RecorderRun(Path(tmp) / "t", "-p", str(server.pid), *record_args)
                            try:
                                rec.wait_attached()
                                sides["traced"] = burst(port, connections, seconds, load_cpus)
                                footprints.append(rec.footprint())
                            finally:
                                rec.finish()
                    u, t = sides["untraced"], sides["traced"]
                    throughput.append(t["requests_per_s"] / u["requests_per_s"])
                    p99.append(t["latency_us"]["p99"] / u["latency_us"]["p99"])
                    base.append(u)
                    log(
                        f"overhead {server_name} {config} round {r + 1}/{rounds}: "
                        f"{u['requests_per_s']:,.0f} -> {t['requests_per_s']:,.0f} req/s, "
                        f"p99 {u['latency_us']['p99']:,.0f} -> {t['latency_us']['p99']:,.0f} us"
                    )
                per_config[config] = {
                    "throughput_ratio": spread(throughput),
                    "p99_ratio": spread(p99),
                    "untraced_requests_per_s": spread([b["requests_per_s"] for b in base]),
                    "untraced_p99_us": spread([b["latency_us"]["p99"] for b in base]),
                    "recorder_cpu_share": spread([f["cpu_share"] for f in footprints]),
                    "recorder_peak_rss_bytes": max(f["peak_rss_bytes"] for f in footprints),
                }
            results[server_name] = per_config
        finally:
            stop(server)
    return results
