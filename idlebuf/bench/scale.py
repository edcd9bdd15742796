"""Scale: a server holding 10,000 connections, every one with a read posted, recorded from its
start; the recorder's footprint, and whether posted reads and pinned bytes are still exact
(against the server's own count)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from analysis.summary import summarize
from idlebuf.bench.common import trace_drops
from idlebuf.experiments.processes import Footprint, RecorderProcess, read_event, spawn, stop
from probes.format.reader import open_trace

SERVERS = {
    "uring": ("workloads.uring_server", "--op", "recv"),
    "threads": ("workloads.threaded_server",),
}


@dataclass(frozen=True)
class ScaleRun:
    """One server recorded from its start until a read is posted on every connection."""

    connections: int
    seconds_to_settle: float
    posted_reads: int  # the report's
    pinned_bytes: int
    truth_posted_reads: int  # the server's own count
    truth_pinned_bytes: int
    exact: bool
    drops: int
    trace_bytes: int
    recorder: Footprint


def one(server: tuple[str, ...], connections: int, buffer: int) -> ScaleRun:
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "scale"
        rec = RecorderProcess(
            trace,
            *("--", sys.executable, "-m", *server, "--buffer-size", str(buffer)),
            stdout=subprocess.PIPE,
        )
        load = None
        try:
            listening = read_event(rec.proc.stdout, "listening", 120)  # type: ignore[arg-type]
            rec.wait_attached()
            started = time.monotonic()
            load = spawn(
                "workloads.loadgen",
                *("--port", str(listening["port"]), "--connections", str(connections)),
                *("--active", "0", "--hold", "600"),
            )
            read_event(load.stdout, "connected", 600)  # type: ignore[arg-type]
            deadline = time.monotonic() + 300
            while True:  # until the server has a read posted on every connection
                os.kill(listening["pid"], signal.SIGUSR1)
                truth = read_event(rec.proc.stdout, "ground_truth", 60)  # type: ignore[arg-type]
                if truth["posted_reads"] == connections or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            settled = time.monotonic() - started
            footprint = rec.footprint()
        finally:
            rec.finish(timeout=300)
            if load is not None:
                stop(load)
        summary = summarize(open_trace(trace))
        proc = summary.process(listening["pid"])
        return ScaleRun(
            connections=connections,
            seconds_to_settle=settled,
            posted_reads=proc.posted_reads.now,
            pinned_bytes=proc.pinned_bytes.now,
            truth_posted_reads=truth["posted_reads"],
            truth_pinned_bytes=truth["pinned_bytes"],
            exact=proc.posted_reads.now == truth["posted_reads"] == connections
            and proc.pinned_bytes.now == truth["pinned_bytes"],
            drops=sum(trace_drops(trace).values()),
            trace_bytes=sum(f.stat().st_size for f in trace.rglob("*") if f.is_file()),
            recorder=footprint,
        )


def run(connections: int, buffer: int, log: Callable[[str], None]) -> dict[str, ScaleRun]:
    """Each server, by name."""
    out = {}
    for name, server in SERVERS.items():
        r = out[name] = one(server, connections, buffer)
        log(
            f"scale {name}: {r.posted_reads:,} posted (server: {r.truth_posted_reads:,}), "
            f"exact={r.exact}, recorder {r.recorder.cpu_s:.1f} CPU-s, "
            f"{r.recorder.peak_rss_bytes / 2**20:.0f} MiB peak"
        )
    return out
