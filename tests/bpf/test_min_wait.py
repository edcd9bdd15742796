"""`record --min-wait`: only reads and writes that wait are recorded; the rest are counted.

A thread-per-connection server with 23 connections, 3 of which exchange 101 messages back to
back after waiting 1.5 s: the 20 idle connections' reads wait for the whole recording and are
recorded (by the recorder's sweep, since they never return) with their exact buffers; the 3
first reads were swept while waiting and recorded again at their return, and count once.
Each call the probes see is either counted (it returned within 50 ms) or recorded, never
both: with the syscall hooks they see every call (together exactly the server's count); with
the scheduler hooks they see the calls that blocked (together exactly the kernel's count of
blocked calls), and no syscall tracepoint is used.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from analysis.reads import read_intervals
from probes.format.reader import meta_so_far, open_trace, read_meta
from probes.format.schema import PostFlag
from tests.helpers import (
    Recording,
    go,
    python_module,
    read_event,
    report_json,
    start_loadgen,
    stop,
    threads_in_socket_reads,
    wait_until,
)

pytestmark = pytest.mark.bpf


def _posts_written(trace: Path) -> int:
    meta = meta_so_far(trace)
    return meta.rows.get("posts", 0) if meta is not None and meta.rows else 0


CONNECTIONS, ACTIVE, MESSAGES, BUFFER = 23, 3, 101, 4099


@pytest.mark.parametrize("hooks", ["scheduler", "syscalls"])
def test_only_waiting_calls_are_recorded(tmp_path: Path, hooks: str) -> None:
    trace = tmp_path / "trace"
    server = python_module("workloads.threaded_server", "--buffer-size", str(BUFFER))
    with Recording(trace, server, ("--min-wait", "50", "--wait-hooks", hooks)) as rec:
        load = start_loadgen(
            rec.port,
            *(CONNECTIONS, ACTIVE, MESSAGES, 1000),
            *("--hold", "60", "--wait-start"),
            stdin=subprocess.PIPE,
        )
        try:
            rec.wait_for(lambda t: t["posted_reads"] == CONNECTIONS)
            # the recorder's sweep (once a second) records every read waiting (nothing else
            # is recorded yet: no call has returned)
            wait_until(lambda: _posts_written(trace) >= CONNECTIONS, 30, "the sweep")
            go(load)
            read_event(load.stdout, "done", 60)  # type: ignore[arg-type]
            truth = rec.wait_for(lambda t: t["reads_completed"] == ACTIVE * MESSAGES)
            wait_until(
                lambda: threads_in_socket_reads(rec.pid) == CONNECTIONS, 30, "threads in recv"
            )
            time.sleep(0.3)  # a duration: every read now waiting has waited past 50 ms
            rec.finish()
        finally:
            stop(load)
    (proc,) = [p for p in report_json(trace)["processes"] if p["pid"] == rec.pid]
    assert proc["posted_reads"]["now"] == CONNECTIONS == truth["posted_reads"]
    assert proc["pinned_bytes"]["now"] == CONNECTIONS * BUFFER == truth["pinned_bytes"]
    meta = read_meta(trace)
    assert meta.min_wait_ns == 50_000_000
    assert meta.probes.reads.wait_hooks == hooks
    counts = meta.probes.reads.kernel_counts
    quick = counts["quick"]
    t = open_trace(trace)
    mine = t["completions"]["pid"] == rec.pid
    waited_reads = int((t["completions"][mine]["ret"] > 0).sum())
    # the 3 first reads of the active connections: swept while waiting, then recorded at
    # their return; the analysis keeps one record of each
    posts = t["posts"][t["posts"]["pid"] == rec.pid]
    is_swept = (posts["flags"] & PostFlag.SWEPT) != 0
    assert is_swept.sum() >= CONNECTIONS
    # swept while waiting and recorded again by the kernel at their return: exactly the
    # active connections' first reads (more than the final sweep's calls, which never return)
    keys = ["pid", "source", "key", "ts_ns"]
    returned = posts[is_swept][keys].merge(posts[~is_swept][keys].drop_duplicates(), on=keys)
    assert len(returned) == ACTIVE
    intervals = read_intervals(t["posts"], t["completions"])
    intervals = intervals[intervals["pid"] == rec.pid]
    assert not intervals["superseded"].any()
    assert int((intervals["ret"] > 0).sum()) == waited_reads >= ACTIVE
    waited_writes = int((t["write_completions"]["pid"] == rec.pid).sum())
    assert int((t["write_completions"]["pid"] == rec.pid).sum()) == int(
        (t["writes"]["pid"] == rec.pid).sum()
    )  # nothing still waiting to send
    # against the workload's own count of its calls: each active connection made MESSAGES
    # recvs that returned and one still waiting, each idle connection one; MESSAGES sends
    assert int((intervals["ret"] > 0).sum()) <= ACTIVE * MESSAGES == truth["reads_completed"]
    assert waited_writes <= ACTIVE * MESSAGES
    calls = 2 * ACTIVE * MESSAGES + CONNECTIONS
    if hooks == "syscalls":
        # every echo is one recv and one send: each was either counted or recorded
        assert quick + waited_reads + waited_writes == 2 * ACTIVE * MESSAGES
        assert counts["blocked"] == 0
    else:
        # each call that blocked was counted, or recorded (returned, or still waiting)
        assert counts["blocked"] == quick + len(intervals) + waited_writes
        # a call blocks once at most before it returns; the pending reads all did
        assert CONNECTIONS <= counts["blocked"] <= calls
        assert len(intervals) == waited_reads + CONNECTIONS  # the 23 still waiting
        assert "BLOCK_HOOKS=1" in meta.probes.reads.cflags or any(
            f == "-DBLOCK_HOOKS=1" for f in meta.probes.reads.cflags
        )
    assert quick > 0
    # no readiness waits are traced in this mode
    assert t["waits"].empty
