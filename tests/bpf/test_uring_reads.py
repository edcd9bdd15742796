"""io_uring posted reads on real probes, against servers using a real io_uring.

211 connections with one read request of 16,411 bytes posted per connection; 11 of them receive
one message of 1,000 bytes, which completes their request, and are not re-posted: exactly 200
posted reads and 200 x 16,411 pinned bytes, each request's buffer as the server lists it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from analysis.reads import read_intervals
from probes.format.reader import open_trace
from probes.format.schema import URING_OP_NAMES, URING_WAIT_OPS, PostFlag, Source
from tests.helpers import (
    Recording,
    go,
    python_module,
    read_event,
    report_json,
    start_loadgen,
    stop,
)

pytestmark = pytest.mark.bpf

CONNECTIONS, ACTIVE, SIZE, BUFFER = 211, 11, 1000, 16411
RING_BUFFERS, RING_BUFFER_SIZE = 67, 4099


def run_uring(
    tmp_path: Path,
    server_args: list[str],
    expect_posted: int,
    stop_server_first: bool = False,
    waiting: str = "posted_reads",
    size: int = SIZE,
) -> tuple[Path, int, dict[str, Any], dict[str, Any]]:
    """Record a uring server under load; returns (trace, pid, ground truth, load summary).

    `waiting`: the ground-truth count that reaches every connection before data is sent
    (posted reads, or polls with --poll-first)."""
    trace = tmp_path / "trace"
    with Recording(trace, python_module("workloads.uring_server", *server_args)) as rec:
        load = start_loadgen(
            rec.port,
            CONNECTIONS,
            ACTIVE,
            1,
            size,
            "--hold",
            "60",
            "--wait-start",
            stdin=subprocess.PIPE,
        )
        try:
            # every connection's read (or poll) is posted before any data is sent...
            rec.wait_for(lambda t: t[waiting] == CONNECTIONS)
            go(load)
            done = read_event(load.stdout, "done", 60)  # type: ignore[arg-type]
            sent = ACTIVE * size
            truth = rec.wait_for(
                lambda t: t["posted_reads"] == expect_posted and t["bytes_received"] == sent
            )
            if stop_server_first:  # the recorder stops by itself when its target exits
                os.kill(rec.pid, signal.SIGTERM)
                _, err = rec.proc.communicate(timeout=60)
                assert rec.proc.returncode == 0, err.decode()
            else:
                rec.finish()
        finally:
            stop(load)
    return trace, rec.pid, truth, done


def posted_now(trace: Path, pid: int) -> Any:
    t = open_trace(trace)
    iv = read_intervals(t["posts"], t["completions"])
    return iv[(iv["pid"] == pid) & iv["end_ns"].isna() & (iv["source"] == Source.URING)]


@pytest.mark.parametrize(
    ("op", "sqpoll"),
    [
        ("recv", False),
        ("read", False),
        ("readv", False),
        ("recvmsg", False),
        ("read_fixed", False),
        ("recv", True),
    ],
)
def test_one_request_per_connection(tmp_path: Path, op: str, sqpoll: bool) -> None:
    args = ["--op", op, "--buffer-size", str(BUFFER), "--no-repost"]
    trace, pid, truth, done = run_uring(
        tmp_path, args + (["--sqpoll"] if sqpoll else []), CONNECTIONS - ACTIVE
    )
    assert done["requests"] == ACTIVE
    report = report_json(trace)
    (proc,) = [p for p in report["processes"] if p["pid"] == pid]
    assert all(v == 0 for v in report["drops"].values()), report["drops"]
    assert proc["posted_reads"]["now"] == CONNECTIONS - ACTIVE == truth["posted_reads"]
    assert proc["pinned_bytes"]["now"] == (CONNECTIONS - ACTIVE) * BUFFER
    assert proc["posted_reads"]["peak"] == CONNECTIONS
    assert proc["reads_completed"] == ACTIVE
    assert proc["bytes_received"] == ACTIVE * SIZE == truth["bytes_received"]
    opname = op.upper()
    assert list(proc["by_source"]) == ["uring"]
    assert list(proc["by_source"]["uring"]["by_op"]) == [opname]

    posted = posted_now(trace, pid)
    assert sorted(zip(posted["fd"], posted["addr"], posted["len"])) == sorted(
        (b["fd"], b["addr"], b["len"]) for b in truth["buffers"]
    )
    assert set(posted["flags"] & PostFlag.SOCKET) == {PostFlag.SOCKET}
    assert set(URING_OP_NAMES[o] for o in posted["op"]) == {opname}
    if op in ("readv", "recvmsg"):
        assert set(posted["nvec"]) == {2}
    if op == "read_fixed":
        assert set(posted["flags"] & PostFlag.FIXED_BUFFER) == {PostFlag.FIXED_BUFFER}


# a message spanning 4 of the ring's buffers: a bundle's completion fills all 4
BUNDLED = 3 * RING_BUFFER_SIZE + 7


@pytest.mark.parametrize(
    ("how", "op", "multishot", "bundle", "size"),
    [
        ("ring", "recv", True, False, SIZE),
        ("ring", "recv", True, True, SIZE),
        ("ring", "recv", True, True, BUNDLED),
        ("ring", "read_multishot", True, False, SIZE),
        ("provide", "recv", False, False, SIZE),
    ],
)
def test_requests_taking_provided_buffers(
    tmp_path: Path, how: str, op: str, multishot: bool, bundle: bool, size: int
) -> None:
    """A group of 67 buffers of 4,099 bytes behind 211 connections' requests; with bundles
    and 12,304-byte messages each completion takes 4 buffers, and all 4 come back."""
    args = [
        f"--{'buffer-ring' if how == 'ring' else 'provide'}",
        str(RING_BUFFERS),
        "--buffer-size",
        str(RING_BUFFER_SIZE),
        "--op",
        op,
        *(["--bundle"] if bundle else []),
    ]
    trace, pid, truth, done = run_uring(tmp_path, args, CONNECTIONS, size=size)
    per_message = -(-size // RING_BUFFER_SIZE) if bundle else 1
    report = report_json(trace)
    (proc,) = [p for p in report["processes"] if p["pid"] == pid]
    assert all(v == 0 for v in report["drops"].values()), report["drops"]
    # every connection holds a posted request, but none pins a buffer of its own
    assert proc["posted_reads"]["now"] == CONNECTIONS
    assert proc["pinned_bytes"]["now"] == 0
    assert proc["buffer_select_posted"] == CONNECTIONS
    assert proc["bytes_received"] == ACTIVE * size == truth["bytes_received"]
    assert done["bytes_received"] == ACTIVE * size  # every bundle's data came back whole
    # a message may arrive in more than one piece, each a completion of its own
    assert proc["reads_completed"] == truth["reads_completed"] >= ACTIVE
    (group,) = proc["buffer_groups"]
    truth_group = truth["buffer_group"]
    assert group["how"] == how and group["group"] == truth_group["group"]
    assert group["buffers"] == RING_BUFFERS == truth_group["buffers"]
    assert group["bytes"] == RING_BUFFERS * RING_BUFFER_SIZE == truth_group["bytes"]
    assert group["consumed"] == truth_group["consumed"] >= ACTIVE * per_message
    if per_message > 1:  # bundles: completions took several buffers each
        assert group["consumed"] > proc["reads_completed"]
    assert group["available"] == RING_BUFFERS  # the server gave each buffer back
    posted = posted_now(trace, pid)
    flags = PostFlag.BUFFER_SELECT | (PostFlag.MULTISHOT if multishot else 0)
    assert set(posted["flags"] & (PostFlag.BUFFER_SELECT | PostFlag.MULTISHOT)) == {flags}
    assert set(posted["len"]) == {0}
    assert set(URING_OP_NAMES[o] for o in posted["op"]) == {op.upper()}
    assert set(posted["flags"] & PostFlag.BUNDLE) == {PostFlag.BUNDLE if bundle else 0}


def test_nothing_stays_posted_after_the_process_exits(tmp_path: Path) -> None:
    args = ["--op", "recv", "--buffer-size", str(BUFFER), "--no-repost"]
    trace, pid, truth, _ = run_uring(tmp_path, args, CONNECTIONS - ACTIVE, stop_server_first=True)
    report = report_json(trace)
    (proc,) = [p for p in report["processes"] if p["pid"] == pid]
    assert report["stop_reason"] == "all targets exited"
    assert proc["posted_reads"]["now"] == 0 and proc["pinned_bytes"]["now"] == 0
    assert proc["posted_reads"]["peak"] == CONNECTIONS
    t = open_trace(trace)
    cancelled = t["completions"][
        (t["completions"]["source"] == Source.URING) & (t["completions"]["ret"] < 0)
    ]
    assert len(cancelled) == CONNECTIONS - ACTIVE


def test_poll_first_reads_only_into_pooled_buffers(tmp_path: Path) -> None:
    """POLL_ADD per connection, then a RECV into one of 5 pooled buffers: 211 connections wait
    without a posted read; the 11 reads that happen use the pool's buffers and complete."""
    pool = 5
    args = ["--poll-first", str(pool), "--buffer-size", str(BUFFER)]
    trace, pid, truth, _ = run_uring(tmp_path, args, 0, waiting="polling")
    assert truth["polling"] == CONNECTIONS
    assert truth["posted_reads"] == 0
    report = report_json(trace)
    (proc,) = [p for p in report["processes"] if p["pid"] == pid]
    assert proc["posted_reads"]["now"] == 0 and proc["pinned_bytes"]["now"] == 0
    assert 1 <= proc["posted_reads"]["peak"] <= pool
    assert proc["reads_completed"] == ACTIVE and proc["bytes_received"] == ACTIVE * SIZE
    t = open_trace(trace)
    iv = read_intervals(t["posts"], t["completions"])
    uring = iv[(iv["pid"] == pid) & (iv["source"] == Source.URING)]
    polls = uring[uring["op"] == URING_WAIT_OPS["POLL_ADD"]]
    reads = uring[uring["op"] != URING_WAIT_OPS["POLL_ADD"]]
    assert len(reads) == ACTIVE
    assert set(reads["addr"]) <= set(truth["pool"]["addresses"])
    assert set(reads["len"]) == {BUFFER}
    # the POLL_ADDs: one armed on every connection at the end (its waiter), none pinning a
    # byte; counted apart from the reads
    assert int(polls["end_ns"].isna().sum()) == truth["polling"] == CONNECTIONS
    assert set(polls["len"]) == {0}
    assert proc["by_source"]["uring poll"]["posted_reads"] == CONNECTIONS
