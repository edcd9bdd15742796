"""The IO models side by side: the same load against each workload, recorded, one table.

Each model's server is launched under `idlebuf record --memory` (so io_uring requests are seen
from the first one), the load generator opens N connections of which a fraction exchange
messages at a steady rate, and the recording's figures become one row.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.memory import rss_at
from analysis.summary import summarize
from analysis.trace import open_trace
from idlebuf.errors import IdlebufError
from idlebuf.render import human_bytes, table
from idlebuf.scenario import read_event, spawn, stop


@dataclass(frozen=True)
class Model:
    name: str
    module: str
    args: tuple[str, ...]
    about: str


def models(active: int) -> list[Model]:
    ring = str(max(8, 2 * active))
    return [
        Model(
            "readiness-pool",
            "workloads.epoll_server",
            ("--buffers", "pool", "--pool-size", "4"),
            "epoll; a buffer from a shared pool only while a socket is readable",
        ),
        Model(
            "readiness-retain",
            "workloads.epoll_server",
            ("--buffers", "retain"),
            "epoll; each connection keeps its buffer after its first data",
        ),
        Model(
            "queued-threads",
            "workloads.threaded_server",
            (),
            "a thread per connection blocked in recv() into its own buffer",
        ),
        Model(
            "queued-green",
            "workloads.green_server",
            (),
            "green threads parked on readiness holding their buffers (Go-style)",
        ),
        Model(
            "queued-uring",
            "workloads.uring_server",
            ("--op", "recv"),
            "io_uring: one RECV with its own buffer posted per connection",
        ),
        Model(
            "uring-buffer-ring",
            "workloads.uring_server",
            ("--buffer-ring", ring),
            "io_uring: multishot RECV taking buffers from a provided-buffer ring",
        ),
    ]


def io_buffer_memory(memory: dict[str, Any], groups: list[dict[str, Any]]) -> tuple[int, int]:
    """(committed, resident) bytes of user memory held for reads at the end: posted or parked
    buffers (heap or the program's own mappings), buffers still held after their data (a pool's
    counted once), provided-buffer groups. Resident covers the posted and idle retained ones."""
    heap = memory["io_buffer_heap"]
    committed = heap["bytes"] + heap["mapped_bytes"] + memory["held_data_buffers"]["bytes"]
    committed += sum(g["bytes"] for g in groups)
    resident = heap["resident_bytes"] + memory["retained"]["resident_bytes"]
    return committed, resident


def record_model(
    model: Model, out: Path, connections: int, active: int, buffer_size: int, duration: float
) -> dict[str, Any]:
    recorder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "idlebuf",
            "record",
            "-o",
            str(out),
            "--memory",
            "--duration",
            str(duration),
            "--",
            sys.executable,
            "-m",
            model.module,
            "--buffer-size",
            str(buffer_size),
            *model.args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    load = None
    try:
        listening = read_event(recorder.stdout, "listening", 60)  # type: ignore[arg-type]
        ready_ns = time.monotonic_ns()  # the trace's clock: RSS growth is counted from here
        load = spawn(
            "workloads.loadgen",
            "--port",
            str(listening["port"]),
            "--connections",
            str(connections),
            "--active",
            str(active),
            "--messages",
            str(int(duration * 20) + 100),
            "--rate",
            "20",
            # the exchanges end a second before the recording does, so that its "now" sees
            # every read re-posted rather than a few caught between completion and re-post
            "--duration",
            str(max(0.5, duration - 1)),
            "--hold-stdin",
            "--hold",
            "120",
            stdin=subprocess.PIPE,
        )
        _, err = recorder.communicate(timeout=duration + 120)
        if recorder.returncode != 0:
            raise IdlebufError(f"recording {model.name} failed: {err.decode().strip()}")
        pid = listening["pid"]
    finally:
        stop(recorder)
        if load is not None:
            stop(load)
    trace = open_trace(out)
    summary = summarize(trace)
    (proc,) = [p for p in summary["processes"] if p["pid"] == pid]
    memory = proc["memory"]
    committed, resident = io_buffer_memory(memory, proc["buffer_groups"])
    return {
        "model": model.name,
        "connections": connections,
        "active": active,
        "posted_reads": proc["posted_reads"]["now"],
        "pinned_bytes": proc["pinned_bytes"]["now"],
        "io_buffer_heap": committed,
        "io_buffer_heap_resident": resident,
        "rss_growth": memory["rss"]["peak"] - rss_at(trace["rss"], pid, ready_ns),
        "socket_kernel_bytes": memory["socket_kernel_bytes"],
        "per_idle_connection_bytes": round(memory["per_idle_connection"]["bytes"]),
        "trace": str(out),
    }


def compare(
    connections: int,
    fraction: float,
    buffer_size: int,
    duration: float,
    keep: Path | None,
    as_json: bool,
) -> int:
    active = round(connections * fraction)
    chosen = models(active)
    base = keep or Path(tempfile.mkdtemp(prefix="idlebuf-compare-"))
    base.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, model in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {model.name}: {model.about}", file=sys.stderr, flush=True)
        rows.append(
            record_model(model, base / model.name, connections, active, buffer_size, duration)
        )
    readiness = rows[0]["io_buffer_heap"] or 1
    for row in rows:
        row["ratio_to_readiness"] = round(row["io_buffer_heap"] / readiness, 1)
    if as_json:
        print(json.dumps({"rows": rows}, indent=2))
        return 0
    print(
        table(
            [
                "model",
                "posted",
                "pinned",
                "IO-buffer memory",
                "resident",
                "RSS growth",
                "socket mem",
                "per idle conn",
                "x readiness",
            ],
            [
                [
                    r["model"],
                    f"{r['posted_reads']:,}",
                    human_bytes(r["pinned_bytes"]),
                    human_bytes(r["io_buffer_heap"]),
                    human_bytes(r["io_buffer_heap_resident"]),
                    human_bytes(r["rss_growth"]),
                    human_bytes(r["socket_kernel_bytes"]),
                    human_bytes(r["per_idle_connection_bytes"]),
                    f"{r['ratio_to_readiness']:g}",
                ]
                for r in rows
            ],
        )
    )
    print(
        f"\n{connections:,} connections, {active:,} active, {human_bytes(buffer_size)} "
        f"buffers; traces in {base}"
    )
    return 0
