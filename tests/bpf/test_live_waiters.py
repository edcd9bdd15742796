"""Waiters followed while recording, not only at attach and at the end.

A small C server (workloads/c/stack_threads.c) serves each connection with a thread of its
own blocked in recv(). Threads come (new connections) and go (connections closed) while
idlebuf records it with --memory; the recorder scans them at its flushes (what "live") and
writes their changes. A recording that ends well knows them at the end; one whose recorder
is killed (SIGKILL: nothing runs at the end) still knows them as of its latest live scan."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from analysis.waiters import latest_waiters
from probes.format import schema
from probes.format.reader import read_meta, read_table
from tests.helpers import (
    RecorderProcess,
    compiled_c,
    finish_recording,
    read_event,
    report_json,
    stop,
    threads_in_socket_reads,
    wait_until,
)

pytestmark = pytest.mark.bpf

BEFORE, DURING, CLOSED = 11, 12, 6  # 11 + 12 = 23 waiting; 29 - 6 = 23
TOUCHED = 100_003
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compiled_c(tmp_path_factory.mktemp("c"), "stack_threads", "-pthread")


def waiting_threads(trace: Path, pid: int, what: str) -> dict[int, int]:
    """tid -> fd of the threads of `pid` waiting as of its latest scan of kind `what` in
    the trace so far (the recorder may still be writing it)."""
    with contextlib.suppress(FileNotFoundError):
        rows = read_table(trace, schema.WAITERS)
        rows = latest_waiters(rows[(rows["what"] == what) & (rows["pid"] == pid)])
        threads = rows[rows["kind"] == "thread"]
        return dict(zip(threads["tid"].tolist(), threads["fd"].tolist()))
    return {}


def connect(port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


def thread_parts(trace: Path, pid: int, connections: int) -> dict[str, dict]:
    """The waiter parts per idle connection `idlebuf report` gives `pid`, whose
    `connections` are all open and idle."""
    process = next(p for p in report_json(trace)["processes"] if p["pid"] == pid)
    memory = process["memory"]
    assert memory["connections"] == {"open": connections, "idle": connections}
    parts = {p["part"]: p for p in memory["per_idle_connection"]["waiter_parts"]}
    assert {p["waiter"] for p in parts.values()} == {"thread"}
    return parts


def test_threads_started_while_recording_are_followed(tmp_path: Path, server: Path) -> None:
    """11 threads wait when idlebuf attaches (-p); 12 more connections come while it
    records: the live scans write each new thread once (only changes), and the end's scan
    has all 23."""
    trace = tmp_path / "trace"
    total = BEFORE + DURING
    target = subprocess.Popen([str(server), "0", str(total), str(TOUCHED)], stdout=subprocess.PIPE)
    clients: list[socket.socket] = []
    recorder = None
    try:
        assert target.stdout is not None
        port = read_event(target.stdout, "listening", 30)["port"]
        clients = connect(port, BEFORE)
        wait_until(lambda: threads_in_socket_reads(target.pid) == BEFORE, 30, "11 waiting")
        recorder = RecorderProcess(trace, "--memory", "-p", str(target.pid))
        recorder.wait_attached()
        assert len(waiting_threads(trace, target.pid, "attach")) == BEFORE
        clients += connect(port, DURING)
        truth = read_event(target.stdout, "ground_truth", 30)
        wait_until(
            lambda: len(waiting_threads(trace, target.pid, "live")) == total,
            30,
            "a live scan to find the 23 threads",
        )
        time.sleep(2.5)  # every connection idle past the threshold, several flushes on
        finish_recording(recorder.proc)
    finally:
        for c in clients:
            c.close()
        if recorder is not None:
            stop(recorder.proc)
        stop(target)
    assert truth["connections"] == total
    rows = read_table(trace, schema.WAITERS, read_meta(trace))
    mine = rows[(rows["pid"] == target.pid) & (rows["kind"] == "thread")]
    counts = mine["what"].value_counts().to_dict()
    # the attach's 11; the live scans: each of the 23 threads written once, however many
    # flushes found it unchanged (the first live rows are a whole scan, then only changes)
    assert counts == {"attach": BEFORE, "live": total, "end": total}, counts
    assert (mine["fd"] >= 0).all()  # none went away
    live = waiting_threads(trace, target.pid, "live")
    assert live == waiting_threads(trace, target.pid, "end")
    assert len(set(live.values())) == total
    parts = thread_parts(trace, target.pid, total)
    assert all(p["provenance"] == "at_end" for p in parts.values())
    # 23 threads for 23 idle connections: one kernel stack each
    assert parts["kernel stack"]["bytes"] == read_meta(trace).kernel_stack_bytes


def test_a_killed_recording_knows_the_waiters_of_its_latest_live_scan(
    tmp_path: Path, server: Path
) -> None:
    """29 connections, 6 closed while recording (their threads end): 23 threads wait. The
    recorder is killed with SIGKILL once a live scan found them; `idlebuf report` of what it
    left still has the 23 waiters, seen live."""
    trace = tmp_path / "trace"
    opened = BEFORE + DURING + CLOSED
    waiting = opened - CLOSED
    recorder = RecorderProcess(
        trace, "--memory", "--", str(server), "0", str(opened), str(TOUCHED),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    clients: list[socket.socket] = []
    pid = 0
    try:
        stdout = recorder.proc.stdout
        assert stdout is not None
        listening = read_event(stdout, "listening", 60)
        pid = listening["pid"]
        clients = connect(listening["port"], opened)
        truth = read_event(stdout, "ground_truth", 30)
        wait_until(
            lambda: len(waiting_threads(trace, pid, "live")) == opened,
            30,
            "a live scan to find the 29 threads",
        )
        for c in clients[:CLOSED]:
            c.close()
        wait_until(lambda: threads_in_socket_reads(pid) == waiting, 30, "6 threads to end")
        wait_until(
            lambda: len(waiting_threads(trace, pid, "live")) == waiting,
            30,
            "a live scan to find 6 threads gone",
        )
        time.sleep(2.5)  # every connection idle past the threshold, several flushes on
        recorder.proc.send_signal(signal.SIGKILL)
        recorder.proc.wait(30)
    finally:
        for c in clients:
            c.close()
        stop(recorder.proc)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert truth["connections"] == opened
    meta = json.loads((trace / "meta.json").read_text())
    assert meta["complete"] is False  # killed: nothing ran at the end
    rows = read_table(trace, schema.WAITERS)
    assert "end" not in set(rows["what"])
    mine = rows[(rows["pid"] == pid) & (rows["what"] == "live")]
    # the 6 threads that ended: a row each saying so (fd -1)
    assert (mine["fd"] < 0).sum() == CLOSED
    assert len(waiting_threads(trace, pid, "live")) == waiting
    parts = thread_parts(trace, pid, waiting)
    assert set(parts) == {"kernel stack", "task_struct", "pid", "user stack"}
    assert all(p["provenance"] == "live" for p in parts.values())
    assert parts["kernel stack"]["bytes"] == meta["kernel_stack_bytes"]  # 23 for 23
    # each thread's stack as it counted its resident pages itself (mincore), at least the
    # bytes it wrote
    resident = truth["stack_resident"] / opened
    stack = parts["user stack"]["bytes"]
    assert -(-TOUCHED // PAGE) * PAGE <= resident <= stack <= resident + PAGE, (stack, resident)
