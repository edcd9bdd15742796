"""Parked reads on real probes: a server written like Go's runtime (green threads).

127 connections, each served by a green thread with its own 8,191-byte buffer on a
non-blocking socket; 5 of them exchange 2 messages. Every thread ends parked on readiness after
an EAGAIN, holding its buffer: 127 parked reads, 127 x 8,191 pinned bytes, none in the kernel.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.reads import parked_reads, read_intervals
from probes.format.reader import open_trace
from tests.helpers import (
    Recording,
    python_module,
    read_event,
    report_json,
    start_loadgen,
    stop,
    wait_until,
)

pytestmark = pytest.mark.bpf

CONNECTIONS, ACTIVE, MESSAGES, SIZE, BUFFER = 127, 5, 2, 1000, 8191


def test_green_threads_park_their_buffers(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    with Recording(
        trace,
        python_module("workloads.green_server", "--buffer-size", str(BUFFER)),
        record_args=("--memory",),
    ) as rec:
        pid = rec.pid
        load = start_loadgen(rec.port, CONNECTIONS, ACTIVE, MESSAGES, SIZE, "--hold", "60")
        try:
            done = read_event(load.stdout, "done", 60)  # type: ignore[arg-type]
            state: dict = {}
            wait_until(
                lambda: state.update(rec.truth()) or state["parked"] == CONNECTIONS,
                30,
                "every green thread parked",
            )
            rec.finish()
        finally:
            stop(load)

    report = report_json(trace)
    (proc,) = [p for p in report["processes"] if p["pid"] == pid]
    assert proc["posted_reads"]["now"] == CONNECTIONS == state["parked"]
    assert proc["pinned_bytes"]["now"] == CONNECTIONS * BUFFER == state["pinned_bytes"]
    parked = proc["by_source"]["parked"]
    assert parked["posted_reads"] == CONNECTIONS
    assert proc["by_source"]["syscall"]["posted_reads"] == 0  # the kernel holds none
    # the scheduler waits for readiness (epoll), and is waiting now
    assert proc["readiness_waits"]["count"] > 0 and proc["readiness_waits"]["now"] == 1
    assert proc["reads_completed"] == ACTIVE * MESSAGES == done["requests"]
    assert proc["bytes_received"] == ACTIVE * MESSAGES * SIZE
    # Python zero-fills a bytearray: every parked buffer is resident, in full
    memory = proc["memory"]
    assert memory["io_buffer_heap"]["bytes"] == CONNECTIONS * BUFFER
    assert memory["io_buffer_heap"]["resident_bytes"] == CONNECTIONS * BUFFER

    t = open_trace(trace)
    completed = read_intervals(t["posts"], t["completions"])
    held = parked_reads(completed, t["waits"])
    held = held[(held["pid"] == pid) & held["end_ns"].isna()]
    assert sorted(zip(held["fd"], held["addr"], held["len"])) == sorted(
        (b["fd"], b["addr"], b["len"]) for b in state["buffers"]
    )
