"""What tracing costs the traced program: throughput and p99 latency of a server under
back-to-back load from loopback clients, with tracing switched off and on every few seconds.

Untraced throughput drifts by +-15% between runs seconds apart on a shared VM, more than the
cost being measured. So each figure compares windows a few seconds apart within one run: a
recorder attached to the running server (`idlebuf record -p PID --alternate SECONDS`)
detaches its programs and attaches them again every SECONDS, noting when each switch began
and ended; the load generator, running throughout, logs every exchange's end time and
latency. Each traced window is compared with the untraced windows on either side of it; the
figures are the ratios, min/median/max over windows. Left out: the switches themselves
(detaching a perf-event tracepoint waits for an RCU grace period: ~2.5 s for the default
set, ~4.5 s with the allocator uprobes) and the first quarter of each window, while the
recorder catches up with the events of a window just begun (windows much shorter than the
recorder's ~0.1 s drain cycle measure the kernel side only: 0.5 s windows showed every
read costing 5% on the threaded server, 2 s windows 35%). Configs far from the 5% target
get a third of the windows. The recorder's own CPU is counted over the whole run.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from idlebuf.bench.common import Spread, spread
from idlebuf.experiments.processes import RecorderProcess, read_event, spawn, stop
from probes.format.meta import Switch
from probes.format.reader import switches

SERVERS = {
    "readiness": ("workloads.epoll_server", ("--buffers", "pool")),
    "threads": ("workloads.threaded_server", ()),
}
# what is attached: only reads that wait (>= 1 ms; the rest counted in the kernel; no writes),
# seen through the scheduler (the default where the kernel allows) or through syscall
# tracepoints, alone or with the memory side (RSS, socket memory, buffers' allocations looked
# up by the allocator walkers); every read and write, and readiness waits (the default);
# + the memory side with walkers, or with allocator probes (uprobes on blocks >= 1 KiB,
# mmap/brk); + every allocation however small
CONFIGS = {
    "posted reads": ("--min-wait", "1", "--no-writes"),
    "posted + memory": ("--min-wait", "1", "--no-writes", "--memory"),
    "posted (syscalls)": ("--min-wait", "1", "--no-writes", "--wait-hooks", "syscalls"),
    "every read": (),
    "+ memory": ("--memory",),
    "+ memory (probes)": ("--memory", "--alloc-probes"),
    "everything": ("--memory", "--alloc-probes", "--min-alloc", "1"),
}
MIN_WINDOW = 0.5  # a window shorter than this fraction of SECONDS (at the load's ends) is left out
SETTLE = 0.25  # this fraction of SECONDS at the start of each window is left out
PRECISE = ("posted reads", "posted + memory", "posted (syscalls)")  # measured with every round


@dataclass(frozen=True)
class ConfigOverhead:
    """One config on one server: each traced window against the untraced ones around it."""

    throughput_ratio: Spread
    p99_ratio: Spread
    untraced_requests_per_s: Spread
    windows: int
    switch_s: Spread  # how long switching tracing off or on took
    recorder_cpu_share: Spread
    recorder_peak_rss_bytes: int


@dataclass
class Overhead:
    rounds: int
    seconds: float  # between switches
    connections: int
    server_cpus: list[int]
    load_cpus: list[int]
    # server ("readiness", "threads") -> config (of CONFIGS) -> its figures
    servers: dict[str, dict[str, ConfigOverhead]] = field(default_factory=dict)
    method: str = "alternate"


def placement() -> tuple[set[int] | None, set[int] | None]:
    """CPUs for the server and for the load generator: one each, apart, where there are two
    (they otherwise migrate and share CPUs differently from run to run); the recorder runs
    anywhere."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[-1]}


def start_load(
    port: int, connections: int, samples: Path, cpus: set[int] | None
) -> subprocess.Popen[bytes]:
    """Back-to-back 1,000-byte echo exchanges on every connection until a line on stdin."""
    return spawn(
        "workloads.loadgen",
        *("--port", str(port), "--connections", str(connections), "--active", str(connections)),
        *("--messages", str(10**9), "--rate", "0", "--duration", "3600"),
        *("--until-stdin", "--samples", str(samples)),
        stdin=subprocess.PIPE,
        cpus=cpus,
    )


def windows(
    alternations: list[Switch], start: float, end: float, seconds: float
) -> list[tuple[float, float, bool]]:
    """(from, to, tracing) in CLOCK_MONOTONIC seconds: the stretches between one switch's end
    (plus SETTLE x seconds) and the next one's beginning, within [start, end]; stretches cut
    short by the load's start or end are left out."""
    out = []
    for i, switch in enumerate(alternations):
        lo = max(switch.to_ns / 1e9 + SETTLE * seconds, start)
        nxt = alternations[i + 1].from_ns / 1e9 if i + 1 < len(alternations) else end
        hi = min(nxt, end)
        if hi - lo >= (MIN_WINDOW - SETTLE) * seconds:
            out.append((lo, hi, switch.tracing))
    return out


def compare(
    stretches: list[tuple[float, float, bool]], ends: np.ndarray, latencies: np.ndarray
) -> tuple[list[float], list[float], list[float]]:
    """Per traced window between two untraced ones: (throughput ratios, p99 ratios) against
    their mean, and the untraced throughputs."""

    def figures(lo: float, hi: float) -> tuple[float, float]:
        inside = (ends >= lo) & (ends < hi)
        lat = latencies[inside]
        return inside.sum() / (hi - lo), float(np.percentile(lat, 99)) if lat.size else 0.0

    measured = [(figures(lo, hi), tracing) for lo, hi, tracing in stretches]
    throughput, p99, base = [], [], []
    for i in range(1, len(measured) - 1):
        (traced, on), before, after = measured[i], measured[i - 1], measured[i + 1]
        if not on or before[1] or after[1]:
            continue
        untraced = [(before[0][0] + after[0][0]) / 2, (before[0][1] + after[0][1]) / 2]
        if untraced[0] > 0 and untraced[1] > 0:
            throughput.append(traced[0] / untraced[0])
            p99.append(traced[1] / untraced[1])
            base.append(untraced[0])
    return throughput, p99, base


def measure(
    pid: int,
    port: int,
    record_args: tuple[str, ...],
    rounds: int,
    seconds: float,
    connections: int,
    load_cpus: set[int] | None,
    workdir: Path,
) -> ConfigOverhead:
    """One config on one running server: `rounds` traced windows, each between two untraced."""
    trace = workdir / "trace"
    rec = RecorderProcess(trace, "-p", str(pid), *record_args, "--alternate", str(seconds))
    samples = workdir / "samples"
    try:
        rec.wait_attached()
        began = time.monotonic()
        load = start_load(port, connections, samples, load_cpus)
        try:
            # switches: the attach, then off/on pairs; enough for `rounds` traced windows
            # between untraced ones, plus the one cut by the load's start
            wanted = 2 * rounds + 3
            deadline = began + (wanted + 2) * (seconds + 10)
            while len(switches(trace)) < wanted and time.monotonic() < deadline:
                time.sleep(0.2)
            load.stdin.write(b"stop\n")  # type: ignore[union-attr]
            load.stdin.flush()  # type: ignore[union-attr]
            read_event(load.stdout, "done", 60)  # type: ignore[arg-type]
        finally:
            stop(load)
        footprint = rec.footprint()
    finally:
        rec.finish()
    pairs = np.fromfile(samples, dtype=np.float64).reshape(-1, 2)
    ends, latencies = pairs[:, 0], pairs[:, 1]
    if not ends.size:
        raise RuntimeError("the load generator completed no exchange")
    alternations = switches(trace)
    stretches = windows(alternations, float(ends.min()), float(ends.max()), seconds)
    throughput, p99, base = compare(stretches, ends, latencies)
    if not throughput:
        raise RuntimeError(f"no traced window between untraced ones ({len(stretches)} windows)")
    return ConfigOverhead(
        throughput_ratio=spread(throughput),
        p99_ratio=spread(p99),
        untraced_requests_per_s=spread(base),
        windows=len(stretches),
        switch_s=spread([(a.to_ns - a.from_ns) / 1e9 for a in alternations[1:]] or [0.0]),
        recorder_cpu_share=spread([footprint.cpu_share]),
        recorder_peak_rss_bytes=footprint.peak_rss_bytes,
    )


def run(
    rounds: int,
    seconds: float,
    connections: int,
    log: Callable[[str], None],
    configs: list[str] | None = None,
) -> Overhead:
    configs = list(CONFIGS) if configs is None else configs
    server_cpus, load_cpus = placement()
    results = Overhead(
        rounds, seconds, connections, sorted(server_cpus or ()), sorted(load_cpus or ())
    )
    for server_name, (module, args) in SERVERS.items():
        server = spawn(module, *args, cpus=server_cpus)
        try:
            port = read_event(server.stdout, "listening", 30)["port"]  # type: ignore[arg-type]
            per_config: dict[str, ConfigOverhead] = {}
            results.servers[server_name] = per_config
            for config in configs:
                with tempfile.TemporaryDirectory() as tmp:
                    r = measure(
                        server.pid,
                        port,
                        CONFIGS[config],
                        rounds if config in PRECISE else max(5, rounds // 3),
                        seconds,
                        connections,
                        load_cpus,
                        Path(tmp),
                    )
                per_config[config] = r
                log(
                    f"overhead {server_name} {config}: throughput "
                    f"{r.throughput_ratio.median:.3f} (median of {r.throughput_ratio.n}), "
                    f"p99 {r.p99_ratio.median:.3f}, untraced "
                    f"{r.untraced_requests_per_s.median:,.0f} req/s"
                )
        finally:
            stop(server)
    return results
