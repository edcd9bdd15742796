"""`record -p PID --tree`: a server with a process per connection, attached late by its
parent's pid, is traced whole - the children that hold its connections at attach, and those
it forks while recorded.

The server is workloads/c/fork_per_connection.c: a child forked for each connection waits in
recv() into an 8 KiB buffer of its own (the model of PostgreSQL's backends; the real one is
tests/bpf/test_real_postgres.py's). The truth is the server's own list of its children and
/proc (each child blocked in its read), outside idlebuf.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    RecorderProcess,
    compiled_c,
    finish_recording,
    idlebuf,
    read_event,
    report_json,
    stop,
    threads_in_socket_reads,
    wait_for_trace_started,
    wait_until,
)

pytestmark = pytest.mark.bpf

BEFORE, AFTER = 23, 6  # connections idle before the attach, and opened while recording
BUFFER, PRIVATE = 8192, 100_003


@pytest.fixture(scope="module")
def forking(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compiled_c(tmp_path_factory.mktemp("c"), "fork_per_connection")


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


class ForkingServer:
    """fork_per_connection serving BEFORE + AFTER connections, BEFORE of them open (each
    child blocked in its read); `connect(n)` opens n more."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen(
            [str(binary), str(BEFORE + AFTER), str(PRIVATE)], stdout=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        listening = read_event(self.proc.stdout, "listening", 30)
        self.pid: int = listening["pid"]
        self.port: int = listening["port"]
        self.clients: list[socket.socket] = []

    def connect(self, n: int) -> None:
        self.clients += [socket.create_connection(("127.0.0.1", self.port)) for _ in range(n)]
        wait_until(
            lambda: (
                sum(threads_in_socket_reads(c) for c in children(self.pid)) == len(self.clients)
            ),
            30,
            "every child blocked in its read",
        )

    def ground_truth(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        return read_event(self.proc.stdout, "ground_truth", 30)

    def close(self) -> None:
        for c in self.clients:
            c.close()
        stop(self.proc)


@contextlib.contextmanager
def forking_server(binary: Path) -> Iterator[ForkingServer]:
    server = ForkingServer(binary)
    try:
        server.connect(BEFORE)
        yield server
    finally:
        server.close()


def record(trace: Path, *args: str) -> dict[str, Any]:
    done = idlebuf("record", "-o", str(trace), "--force", *args, timeout=300)
    assert done.returncode == 0, done.stderr
    return report_json(trace)


def posted(report: dict[str, Any], pids: list[int]) -> dict[int, tuple[int, int]]:
    """(posted reads, pinned bytes) now of each of `pids` the report has."""
    return {
        p["pid"]: (p["posted_reads"]["now"], p["pinned_bytes"]["now"])
        for p in report["processes"]
        if p["pid"] in pids
    }


def test_tree_finds_every_child_s_read_attached_late(tmp_path: Path, forking: Path) -> None:
    with forking_server(forking) as server:
        kids = children(server.pid)
        assert len(kids) == BEFORE
        # the contrast: -p follows the parent's threads only, none of which reads
        alone = record(tmp_path / "alone", "-p", str(server.pid), "--memory", "--duration", "3")
        assert posted(alone, kids) == {}
        assert sum(p["posted_reads"]["now"] for p in alone["processes"]) == 0
        # the parent given twice, and one child besides: each process is recorded once
        trace = tmp_path / "tree"
        report = record(
            trace, "-p", str(server.pid), "-p", str(kids[0]), "-p", str(server.pid),
            "--tree", "--memory", "--duration", "3",
        )  # fmt: skip
    assert posted(report, kids) == {pid: (1, BUFFER) for pid in kids}
    pids = [p["pid"] for p in report["processes"]]
    assert sorted(pids) == sorted({server.pid, *kids})
    assert sum(p["posted_reads"]["now"] for p in report["processes"]) == BEFORE
    assert sum(p["pinned_bytes"]["now"] for p in report["processes"]) == BEFORE * BUFFER
    meta = json.loads((trace / "meta.json").read_text())
    assert meta["targets"]["tree"] == meta["targets"]["pids"]
    # found by the walk, less the child given with -p itself
    assert sorted(meta["targets"]["descendants"]) == sorted(kids[1:])
    at_attach = {a["pid"]: a["blocked_syscalls"] for a in meta["at_attach"]}
    assert at_attach == {server.pid: 0, **{pid: 1 for pid in kids}}
    # each connection's waiter is its process, found at attach as at the end
    for p in report["processes"]:
        if p["pid"] in kids:
            cost = p["memory"]["per_idle_connection"]
            assert p["memory"]["connections"] == {"open": 1, "idle": 1}, p["pid"]
            assert {w["waiter"] for w in cost["waiter_parts"]} == {"process"}, p["pid"]
            assert cost["owned_how"] == "private" and cost["owned_bytes"] >= PRIVATE, p["pid"]
    whole = report["per_idle_connection"]
    assert whole["buffer_bytes"] >= BUFFER and whole["io_buffer_bytes"] == BUFFER
    assert whole["waiter_reason"] is None and whole["whole_unknown"] == []
    assert {w["waiter"] for w in whole["waiter_parts"]} == {"process"}
    assert whole["total_bytes"] is not None and whole["total_bytes"] > PRIVATE + BUFFER
    # the text report: the whole cost of each child, and of the tree as one server; the
    # parent, which holds no idle connection, has none
    text = idlebuf("report", str(trace)).stdout
    assert text.count("per idle connection (whole)") == BEFORE + 1
    assert f"all {BEFORE + 1} processes as one server ({BEFORE} idle connections)" in text


def test_tree_follows_children_forked_while_recording(tmp_path: Path, forking: Path) -> None:
    trace = tmp_path / "trace"
    with forking_server(forking) as server:
        before = children(server.pid)
        recorder = RecorderProcess(trace, "-p", str(server.pid), "--tree", "--duration", "60")
        try:
            wait_for_trace_started(trace, 120)
            server.connect(AFTER)
            truth = server.ground_truth()  # printed once all BEFORE + AFTER children wait
            finish_recording(recorder.proc)
        finally:
            stop(recorder.proc)
    later = sorted(set(truth["children"]) - set(before))
    assert len(later) == AFTER and len(truth["children"]) == BEFORE + AFTER
    report = report_json(trace)
    assert posted(report, truth["children"]) == {pid: (1, BUFFER) for pid in truth["children"]}
    # the later ones were seen posting their reads, not found at attach
    provenance = {p["pid"]: p["provenance"] for p in report["processes"]}
    for pid in truth["children"]:
        seen = "live" if pid in later else "at_attach"
        assert provenance[pid][seen] == 1, (pid, provenance[pid])
        assert provenance[pid]["live"] + provenance[pid]["at_attach"] == 1, pid
    meta = json.loads((trace / "meta.json").read_text())
    assert sorted(meta["targets"]["descendants"]) == sorted(before)
    assert set(later).isdisjoint(a["pid"] for a in meta["at_attach"])
