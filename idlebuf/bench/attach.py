"""State at attach: how long `record -p --memory` takes to find what an idle server already
holds, at N connections, for each queued model (threads blocked in recv(), io_uring RECVs,
goroutines parked in reads), whether it found all of it (against the server's own count), and
what the allocator walkers spent looking up those N buffers' allocations."""

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

from idlebuf.experiments.processes import read_event, spawn, stop
from probes.format.reader import read_meta

GO_SERVER = Path(__file__).resolve().parents[2] / "workloads" / "go_server" / "go_server"
SERVERS: dict[str, list[str]] = {
    "threads": [sys.executable, "-m", "workloads.threaded_server"],
    "uring": [sys.executable, "-m", "workloads.uring_server", "--op", "recv"],
    "go": [str(GO_SERVER)],
}


@dataclass(frozen=True)
class AttachRun:
    """One idle server recorded late: what the recorder found at attach against the
    server's own count, and what looking it up cost."""

    connections: int
    truth_posted_reads: int  # the server's count
    found: int  # blocked syscalls + io_uring requests + parked goroutines
    exact: bool
    walk_ms: float  # finding them
    record_wall_s: float  # the whole `record --duration 1`
    heap_walk_ms: float | None  # the first flush's heap walk: every buffer (None: no walk)
    heap_walk_buffers: int | None
    heap_walk_end_ms: float | None  # the walk at the end


def one(name: str, connections: int, buffer: int) -> AttachRun:
    server = subprocess.Popen(
        [*SERVERS[name], "--buffer-size", str(buffer)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    load = None
    try:
        listening = read_event(server.stdout, "listening", 60)  # type: ignore[arg-type]
        load = spawn(
            "workloads.loadgen",
            *("--port", str(listening["port"]), "--connections", str(connections)),
            *("--active", "0", "--hold", "600"),
        )
        read_event(load.stdout, "connected", 600)  # type: ignore[arg-type]
        deadline = time.monotonic() + 300
        while True:  # until every connection's read is posted (or parked)
            os.kill(server.pid, signal.SIGUSR1)
            truth = read_event(server.stdout, "ground_truth", 60)  # type: ignore[arg-type]
            if truth["posted_reads"] == connections or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "attach"
            began = time.monotonic()
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "idlebuf",
                    "record",
                    "-o",
                    str(trace),
                    "-p",
                    str(server.pid),
                    "--memory",
                    "--duration",
                    "1",
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            wall = time.monotonic() - began
            if done.returncode:
                raise RuntimeError(done.stderr.strip())
            meta = read_meta(trace)
            (found,) = meta.at_attach
            walks = meta.memory.walks if meta.memory else None
    finally:
        if load is not None:
            stop(load)
        stop(server)
    seen = found.blocked_syscalls + sum(r.requests for r in found.rings)
    seen += found.go.parked_reads if found.go else 0
    return AttachRun(
        connections=connections,
        truth_posted_reads=truth["posted_reads"],
        found=seen,
        exact=seen == truth["posted_reads"] == connections,
        walk_ms=found.walk_ms,
        record_wall_s=wall,
        heap_walk_ms=walks.max_ms if walks else None,
        heap_walk_buffers=walks.buffers if walks else None,
        heap_walk_end_ms=walks.end_ms if walks else None,
    )


def run(connections: int, buffer: int, log: Callable[[str], None]) -> dict[str, AttachRun]:
    """Each queued model's server, by name."""
    out = {}
    for name in SERVERS:
        r = out[name] = one(name, connections, buffer)
        log(f"attach {name}: found {r.found:,} of {r.truth_posted_reads:,} in {r.walk_ms:,.0f} ms")
    return out
