"""The recorder's ceiling: how many events per second it takes to disk with no drops.

Live: `idlebuf record -- read_storm` in ping-pong mode (each turn sends a byte and reads it
back: four events) with one and with two storm processes; the events are counted in the trace
and divided by the storm's own duration. On a 2-core machine the storm, the probes (which run
in the storm's syscalls) and the recorder share the CPUs, so this is the machine's ceiling.
Pipeline: the recorder's user-space path alone (split by kind, columns, Parquet), fed
synthetic records in process, in events per CPU-second.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idlebuf.bench.common import Spread, spread, table_rows, trace_drops
from idlebuf.experiments.processes import Footprint, RecorderProcess, read_event, spawn
from probes.batches import split_by_kind, write_records
from probes.format import schema
from probes.format.writer import TraceWriter

EVENT_TABLES = ("posts", "completions", "writes", "write_completions")
RING_MIB = 64  # ~760k events of slack: the storm and the recorder share two CPUs


@dataclass(frozen=True)
class LiveRun:
    """One recorded storm."""

    procs: int
    events: int  # in the trace
    expected_events: int  # what the storm made
    storm_seconds: float
    events_per_s: float
    drops: int
    recorder: Footprint


@dataclass(frozen=True)
class Live:
    """The recorded storms of one size (storm processes), over the trials."""

    events_per_s: Spread
    drops: Spread
    recorder_cpu_share: Spread
    recorder_peak_rss_bytes: int
    untraced_events_per_s_equivalent: float  # the storm untraced, its syscalls as events
    runs: list[LiveRun]


@dataclass(frozen=True)
class Pipeline:
    """The recorder's user-space path alone, in process."""

    events: int
    events_per_s: float  # wall
    events_per_cpu_s: float


@dataclass(frozen=True)
class Ceiling:
    count_per_proc: int
    trials: int
    ring_buffer_mib: int
    live: dict[int, Live]  # by storm processes: 1, 2
    pipeline: Pipeline


def untraced_rate(count: int, procs: int) -> float:
    storm = spawn(
        "workloads.read_storm", "--mode", "pingpong", "--count", str(count), "--procs", str(procs)
    )
    done = read_event(storm.stdout, "done", 600)  # type: ignore[arg-type]
    storm.wait()
    return float(done["syscalls_per_s"]) * 2  # a syscall would be two events


def live(count: int, procs: int) -> LiveRun:
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "storm"
        rec = RecorderProcess(
            trace,
            *("--ring-buffer", str(RING_MIB)),
            "--",
            *(sys.executable, "-m", "workloads.read_storm"),
            *("--mode", "pingpong", "--count", str(count), "--procs", str(procs)),
            stdout=subprocess.PIPE,
        )
        try:
            rec.wait_attached()
            done = read_event(rec.proc.stdout, "done", 600)  # type: ignore[arg-type]
            footprint = rec.footprint()
        finally:
            rec.finish()
        events = table_rows(trace, *EVENT_TABLES)
        drops = sum(trace_drops(trace).values())
    return LiveRun(
        procs=procs,
        events=events,
        expected_events=count * procs * 4,
        storm_seconds=done["seconds"],
        events_per_s=events / done["seconds"],
        drops=drops,
        recorder=footprint,
    )


def pipeline(n: int = 4_000_000, batch: int = 200_000) -> Pipeline:
    records = np.zeros(n, dtype=schema.WIRE_EVENT.dtype)
    records["ts_ns"] = np.arange(n, dtype=np.uint64) * 250
    kinds = np.array(
        [
            schema.Kind.POST,
            schema.Kind.COMPLETE,
            schema.Kind.WRITE_POST,
            schema.Kind.WRITE_COMPLETE,
        ],
        dtype=np.uint8,
    )
    records["kind"] = kinds[np.arange(n) % 4]
    records["pid"] = records["tid"] = 4242
    records["fd"], records["key"], records["value"], records["addr"] = 7, 4242, 1, 0x7F0000
    tmp = Path(tempfile.mkdtemp())
    try:
        writer = TraceWriter(tmp / "t")
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(0, n, batch):
            write_records(writer, split_by_kind(records[i : i + batch]))
        writer.close()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Pipeline(n, n / wall, n / cpu)


def run(count: int, trials: int, log: Callable[[str], None]) -> Ceiling:
    by_procs = {}
    for procs in (1, 2):
        runs = []
        for t in range(trials):
            r = live(count, procs)
            runs.append(r)
            log(
                f"ceiling {procs} storm process(es), trial {t + 1}/{trials}: "
                f"{r.events_per_s / 1e6:.2f}M events/s, {r.drops:,} dropped, recorder "
                f"{r.recorder.cpu_share:.0%} CPU, {r.recorder.peak_rss_bytes / 2**20:.0f} MiB"
            )
        by_procs[procs] = Live(
            events_per_s=spread([r.events_per_s for r in runs]),
            drops=spread([r.drops for r in runs]),
            recorder_cpu_share=spread([r.recorder.cpu_share for r in runs]),
            recorder_peak_rss_bytes=max(r.recorder.peak_rss_bytes for r in runs),
            untraced_events_per_s_equivalent=untraced_rate(count, procs),
            runs=runs,
        )
    alone = pipeline()
    log(f"ceiling pipeline: {alone.events_per_cpu_s / 1e6:.2f}M events per CPU-s")
    return Ceiling(count, trials, RING_MIB, by_procs, alone)
