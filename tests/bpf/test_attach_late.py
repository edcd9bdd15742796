"""Late equals early: a server recorded from its start, and the same server attached to once
its connections are idle (`record -p`, a second recorder on the same process), show the
same posted reads and pinned bytes - exactly, and as the server itself counts them.

What the late recorder cannot see happen it finds at attach: threads blocked in reads (/proc),
io_uring requests and provided-buffer groups (the rings' kernel state), goroutines parked in
reads (the Go runtime's memory).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from probes.format.reader import open_trace, read_meta
from tests.helpers import ROOT, Recording, idlebuf, python_module, report_json, start_loadgen, stop

pytestmark = pytest.mark.bpf

URING_CONNECTIONS, URING_BUFFER = 211, 16411
GO_CONNECTIONS, GO_BUFFER = 173, 16384
THREAD_CONNECTIONS = 59
RING_BUFFERS, RING_BUFFER_SIZE = 67, 4099
GO_SERVER = ROOT / "workloads" / "go_server" / "go_server"


def early_and_late(
    tmp_path: Path, command: list[str], connections: int, ready: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Any]:
    """(early process report, late process report, the server's ground truth, late meta)."""
    early, late = tmp_path / "early", tmp_path / "late"
    with Recording(early, command) as rec:
        load = start_loadgen(rec.port, connections, 0, 1, 100, "--hold", "120")
        try:
            truth = rec.wait_for(ready, timeout=60)
            done = idlebuf("record", "-o", str(late), "-p", str(rec.pid), "--duration", "1.5")
            assert done.returncode == 0, done.stderr
            assert rec.truth()["posted_reads"] == truth["posted_reads"]  # still idle
            rec.finish()
        finally:
            stop(load)

    def process(trace: Path) -> dict[str, Any]:
        (proc,) = [p for p in report_json(trace)["processes"] if p["pid"] == rec.pid]
        return proc

    return process(early), process(late), truth, read_meta(late)


def same_posted(early: dict[str, Any], late: dict[str, Any]) -> None:
    for figure in ("posted_reads", "pinned_bytes"):
        assert late[figure]["now"] == early[figure]["now"], figure
    assert late["buffer_select_posted"] == early["buffer_select_posted"]


@pytest.mark.parametrize(
    "args",
    [
        ["--op", "recv"],
        ["--op", "read"],
        ["--op", "readv"],
        ["--op", "recvmsg"],
        ["--op", "read_fixed", "--fixed-slots", "256"],
        ["--op", "recv", "--sqpoll"],
    ],
    ids=["recv", "read", "readv", "recvmsg", "read_fixed", "sqpoll"],
)
def test_io_uring_requests_posted_before_the_attach(tmp_path: Path, args: list[str]) -> None:
    command = python_module("workloads.uring_server", "--buffer-size", str(URING_BUFFER), *args)
    early, late, truth, meta = early_and_late(
        tmp_path, command, URING_CONNECTIONS, lambda t: t["posted_reads"] == URING_CONNECTIONS
    )
    same_posted(early, late)
    assert late["posted_reads"]["now"] == URING_CONNECTIONS == truth["posted_reads"]
    assert late["pinned_bytes"]["now"] == URING_CONNECTIONS * URING_BUFFER == truth["pinned_bytes"]
    assert late["provenance"]["at_attach"] == URING_CONNECTIONS
    (found,) = meta.at_attach
    (ring,) = found.rings  # one ring, however many fds it is open on
    assert (ring.how, ring.requests) == ("walked", URING_CONNECTIONS)


@pytest.mark.parametrize("how", ["buffer-ring", "multishot-read", "provide"])
def test_provided_buffers_registered_before_the_attach(tmp_path: Path, how: str) -> None:
    """Buffer-select requests pin nothing of their own: the group's buffers are found too."""
    group = {
        "buffer-ring": ["--buffer-ring", str(RING_BUFFERS)],
        "multishot-read": ["--op", "read_multishot", "--buffer-ring", str(RING_BUFFERS)],
        "provide": ["--provide", str(RING_BUFFERS)],
    }[how]
    command = python_module(
        "workloads.uring_server", "--buffer-size", str(RING_BUFFER_SIZE), *group
    )
    early, late, truth, meta = early_and_late(
        tmp_path,
        command,
        URING_CONNECTIONS,
        lambda t: t["connections_open"] == URING_CONNECTIONS,
    )
    same_posted(early, late)
    assert late["posted_reads"]["now"] == URING_CONNECTIONS == late["buffer_select_posted"]
    assert late["pinned_bytes"]["now"] == 0
    (group_found,) = late["buffer_groups"]
    assert group_found["how"] == ("provide" if how == "provide" else "ring")
    assert group_found["buffers"] == RING_BUFFERS == truth["buffer_group"]["buffers"]
    assert group_found["bytes"] == RING_BUFFERS * RING_BUFFER_SIZE
    (found,) = meta.at_attach
    assert [r.groups for r in found.rings] == [1]


def test_threads_blocked_before_the_attach(tmp_path: Path) -> None:
    command = python_module("workloads.threaded_server", "--buffer-size", str(URING_BUFFER))
    early, late, truth, meta = early_and_late(
        tmp_path, command, THREAD_CONNECTIONS, lambda t: t["posted_reads"] == THREAD_CONNECTIONS
    )
    same_posted(early, late)
    assert late["posted_reads"]["now"] == THREAD_CONNECTIONS == truth["posted_reads"]
    assert late["pinned_bytes"]["now"] == THREAD_CONNECTIONS * URING_BUFFER
    assert meta.at_attach[0].blocked_syscalls == THREAD_CONNECTIONS


def test_goroutines_parked_before_the_attach(tmp_path: Path) -> None:
    """A real Go server (Debian's toolchain, built by the bootstrap): every idle connection's
    goroutine is parked in conn.Read(buf); the late recorder finds each one, its fd and its
    buffer, in the Go runtime's memory."""
    assert GO_SERVER.exists(), "workloads/go_server is not built: run scripts/bootstrap"
    command = [str(GO_SERVER), "--buffer-size", str(GO_BUFFER)]
    early, late, truth, meta = early_and_late(
        tmp_path, command, GO_CONNECTIONS, lambda t: t["posted_reads"] == GO_CONNECTIONS
    )
    same_posted(early, late)
    assert late["posted_reads"]["now"] == GO_CONNECTIONS == truth["posted_reads"]
    assert late["pinned_bytes"]["now"] == GO_CONNECTIONS * GO_BUFFER == truth["pinned_bytes"]
    assert late["by_source"]["parked"]["posted_reads"] == GO_CONNECTIONS
    go = meta.at_attach[0].go
    assert go is not None and go.parked_reads == GO_CONNECTIONS and go.why is None


def test_a_stripped_go_binary_says_what_it_cannot_see(tmp_path: Path) -> None:
    """Without DWARF the parked readers cannot be found: the report says how many sockets
    that concerns, and does not show 0 as if it knew."""
    stripped = tmp_path / "go_server"
    subprocess.run(["strip", "-o", str(stripped), str(GO_SERVER)], check=True)
    trace = tmp_path / "late"
    with Recording(tmp_path / "early", [str(stripped)]) as rec:
        load = start_loadgen(rec.port, 7, 0, 1, 100, "--hold", "120")
        try:
            rec.wait_for(lambda t: t["posted_reads"] == 7)
            done = idlebuf("record", "-o", str(trace), "-p", str(rec.pid), "--duration", "1")
            assert done.returncode == 0, done.stderr
            rec.finish()
        finally:
            stop(load)
    (proc,) = [p for p in report_json(trace)["processes"] if p["pid"] == rec.pid]
    (unknown,) = proc["provenance"]["unknown"]
    assert unknown["connections"] >= 7 and "stripped" in unknown["why"]
    text = idlebuf("report", str(trace)).stdout
    assert "UNKNOWN posted reads" in text


@pytest.mark.parametrize("method", ["walkers", "probes"])
def test_memory_figures_attached_late(tmp_path: Path, method: str) -> None:
    """Threads blocked in recv() on malloc'ed buffers, attached late with --memory: the
    allocator walkers find the buffers' blocks in glibc's heap, allocated before the attach
    or not; the allocator probes cannot see those allocations, and the IO-buffer heap says
    so (unknown, with the buffers' bytes) instead of 0. Resident memory comes from /proc."""
    command = python_module(
        "workloads.threaded_server", "--buffer-size", str(URING_BUFFER), "--alloc", "malloc"
    )
    trace = tmp_path / "late"
    probes = ("--alloc-probes",) if method == "probes" else ()
    with Recording(tmp_path / "early", command) as rec:
        load = start_loadgen(rec.port, THREAD_CONNECTIONS, 0, 1, 100, "--hold", "120")
        try:
            truth = rec.wait_for(lambda t: t["posted_reads"] == THREAD_CONNECTIONS)
            done = idlebuf(
                "record",
                "-o",
                str(trace),
                "-p",
                str(rec.pid),
                "--memory",
                *probes,
                "--duration",
                "1.5",
            )
            assert done.returncode == 0, done.stderr
            rec.finish()
        finally:
            stop(load)
    (proc,) = [p for p in report_json(trace)["processes"] if p["pid"] == rec.pid]
    assert proc["posted_reads"]["now"] == THREAD_CONNECTIONS
    heap = proc["memory"]["io_buffer_heap"]
    rss = proc["memory"]["rss"]
    assert "/proc/PID/status" in rss["source"]
    assert abs(rss["first"] - truth["rss_bytes"]) < 1 << 20  # read at attach, the server idle
    if method == "walkers":
        assert heap["bytes"] == THREAD_CONNECTIONS * URING_BUFFER and heap["unknown"] == []
        assert heap["allocations"] == THREAD_CONNECTIONS
        blocks = {a["addr"] for a in truth["allocations"]}
        walked = open_trace(trace)["heap_blocks"]
        assert set(walked.loc[walked["what"] == "end", "addr"]) == blocks
        return
    assert heap["bytes"] == 0 and heap["allocations"] == 0
    (unknown,) = heap["unknown"]
    assert unknown["connections"] == THREAD_CONNECTIONS
    assert unknown["bytes"] == THREAD_CONNECTIONS * URING_BUFFER
    assert "before the attach" in unknown["why"]
    assert proc["memory"]["heap_live"]["since_attach"] is True
    text = idlebuf("report", str(trace)).stdout
    assert "UNKNOWN IO-buffer heap" in text


def test_go_buffers_found_in_the_go_heap(tmp_path: Path) -> None:
    """The Go server attached late with --memory: each parked goroutine's buffer is an
    object of Go's heap, found in the runtime's spans, of its size class (16,384 exactly)."""
    command = [str(GO_SERVER), "--buffer-size", str(GO_BUFFER)]
    trace = tmp_path / "late"
    with Recording(tmp_path / "early", command) as rec:
        load = start_loadgen(rec.port, GO_CONNECTIONS, 0, 1, 100, "--hold", "120")
        try:
            truth = rec.wait_for(lambda t: t["posted_reads"] == GO_CONNECTIONS)
            done = idlebuf(
                "record", "-o", str(trace), "-p", str(rec.pid), "--memory", "--duration", "1.5"
            )
            assert done.returncode == 0, done.stderr
            rec.finish()
        finally:
            stop(load)
    (proc,) = [p for p in report_json(trace)["processes"] if p["pid"] == rec.pid]
    heap = proc["memory"]["io_buffer_heap"]
    assert heap["bytes"] == GO_CONNECTIONS * GO_BUFFER == truth["pinned_bytes"]
    assert (heap["allocations"], heap["allocation_bytes"]) == (
        GO_CONNECTIONS,
        GO_CONNECTIONS * GO_BUFFER,
    )
    walked = open_trace(trace)["heap_blocks"]
    end = walked[walked["what"] == "end"]
    assert set(end["allocator"]) == {"go"}
    assert set(end["addr"]) == {b["addr"] for b in truth["buffers"]}
    (method,) = {a.method for a in read_meta(trace).memory.allocators}
    assert method == "walk:go+glibc"
