"""The memory side on real probes: read buffers joined to the heap allocations behind them.

131 connections, each with a read buffer of 12,347 bytes; 4 of them exchange 2 messages just
before the recording ends, the other 127 have been idle for longer than the idle threshold.
Exactly 127 x 12,347 bytes are IO-buffer heap of idle connections, whether the buffers were
malloc()ed, posix_memalign()ed or carved from one pool; other allocations are not attributed.
Both ways of finding allocations: the allocator walkers (the default: glibc's chunks read from
the process's memory) and the allocator probes (--alloc-probes: uprobes on every call).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from probes.format.reader import open_trace, read_meta
from tests.helpers import (
    Recording,
    go,
    idlebuf,
    python_module,
    read_event,
    start_loadgen,
    stop,
    threads_in_socket_reads,
    wait_until,
)

pytestmark = pytest.mark.bpf

CONNECTIONS, ACTIVE, BUFFER, OTHERS, OTHER_SIZE, POOL_SLOTS = 131, 4, 12347, 13, 50021, 149
# the 4 active connections must stay under it until the recording ends (stopping a
# recording made with --alloc-probes took 1.8 s on a loaded machine); the others idle past it
IDLE_THRESHOLD = 3.0


PAGE = 4096


def glibc_usable(request: int) -> int:
    """What glibc's walk reports for malloc(request) (or posix_memalign's, whose leading gap
    is split off): the chunk (the request plus its 8-byte header, rounded up to 16) less
    the header - 12,360 bytes for 12,347."""
    return (request + 8 + 15) // 16 * 16 - 8


def glibc_mmapped(request: int) -> int:
    """What glibc's walk reports for a malloc above the mmap threshold: a mapping of whole
    pages holding the request and its 16-byte header, less that header."""
    return -(-(request + 16) // PAGE) * PAGE - 16


def expected_walk(alloc: str, truth: dict) -> dict[int, tuple[int, int, set[str]]]:
    """For each buffer the server says it holds: the block the walk at the end must find
    for it (address, size, which allocator), from the server's own allocations and the
    allocator's rounding."""
    pool: dict[str, int] = truth["allocations"][0] if alloc == "pool" else {}
    out = {}
    for b in truth["buffers"]:
        if alloc == "pool":  # every slot in the one block (its only allocation), a mapping
            assert len(truth["allocations"]) == 1
            out[b["addr"]] = (pool["addr"], glibc_mmapped(pool["size"]), {"glibc mmap"})
        elif alloc == "mmap":  # each buffer a mapping the server made: whole pages
            out[b["addr"]] = (b["addr"], -(-b["len"] // PAGE) * PAGE, {"mapping"})
        else:  # each buffer its own block, in the main arena or a thread's
            arenas = {"glibc", "glibc thread arena"}
            out[b["addr"]] = (b["addr"], glibc_usable(b["len"]), arenas)
    return out


@pytest.mark.parametrize("method", ["walkers", "probes"])
@pytest.mark.parametrize("alloc", ["malloc", "posix_memalign", "pool", "mmap"])
def test_io_buffer_heap_of_idle_connections(tmp_path: Path, alloc: str, method: str) -> None:
    trace = tmp_path / "trace"
    with Recording(
        trace,
        python_module(
            "workloads.threaded_server",
            "--alloc",
            alloc,
            "--buffer-size",
            str(BUFFER),
            "--other-allocs",
            str(OTHERS),
            "--other-size",
            str(OTHER_SIZE),
            "--pool-slots",
            str(POOL_SLOTS),
        ),
        record_args=("--memory", *(("--alloc-probes",) if method == "probes" else ())),
    ) as rec:
        pid = rec.pid
        load = start_loadgen(
            rec.port,
            CONNECTIONS,
            ACTIVE,
            2,
            1000,
            "--wait-start",
            "--hold",
            "60",
            stdin=subprocess.PIPE,
        )
        try:
            wait_until(lambda: threads_in_socket_reads(pid) == CONNECTIONS, 30, "blocked")
            time.sleep(IDLE_THRESHOLD * 1.3)  # every connection is idle now...
            go(load)
            read_event(load.stdout, "done", 30)  # type: ignore[arg-type]
            wait_until(lambda: threads_in_socket_reads(pid) == CONNECTIONS, 30, "blocked")
            truth = rec.truth()  # ...but these 4 just had data
            rec.finish()
        finally:
            stop(load)

    done = idlebuf("report", "--json", "--idle-threshold", str(IDLE_THRESHOLD), str(trace))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    (proc,) = [p for p in report["processes"] if p["pid"] == pid]
    assert all(v == 0 for v in report["drops"].values()), report["drops"]
    memory = proc["memory"]
    assert proc["posted_reads"]["now"] == CONNECTIONS == truth["posted_reads"]
    assert memory["idle_posted_reads"] == CONNECTIONS - ACTIVE
    heap = memory["io_buffer_heap"]
    # the walk at the end of the recording (both methods make it): a block for every buffer
    # the server holds, each the server's own allocation as its allocator rounded it - an
    # empty or partial walk fails here
    t = open_trace(trace)
    walked = t["heap_blocks"]
    walked = walked[(walked["pid"] == pid) & (walked["what"] == "end")]
    assert len(truth["buffers"]) == CONNECTIONS
    expected = expected_walk(alloc, truth)
    assert len(walked) == CONNECTIONS and set(walked["buffer"]) == set(expected)
    for row in walked.itertuples():
        addr, size, allocators = expected[row.buffer]
        assert (row.addr, row.size, row.why) == (addr, size, ""), (row, addr, size)
        assert row.allocator in allocators, row
    if alloc == "mmap":  # not heap: mappings the program made itself
        assert (heap["bytes"], heap["mapped_bytes"]) == (0, CONNECTIONS * BUFFER)
        assert heap["idle_mapped_bytes"] == (CONNECTIONS - ACTIVE) * BUFFER
        assert memory["heap_live"]["mappings"] >= CONNECTIONS
        return
    assert heap["bytes"] == CONNECTIONS * BUFFER
    assert heap["idle_bytes"] == (CONNECTIONS - ACTIVE) * BUFFER
    assert heap["unknown"] == []
    if method == "walkers":
        # each buffer's block is the server's own allocation, as glibc rounded it
        assert (read_meta(trace).memory.allocators[0].method) == "walk:glibc"
        assert memory["heap_live"]["bytes"] is None  # not traced: looked up
        if alloc == "pool":
            (pool,) = truth["allocations"]
            assert heap["allocations"] == 1
            assert heap["allocation_bytes"] == glibc_mmapped(pool["size"])
        else:
            assert heap["allocations"] == CONNECTIONS
            assert heap["allocation_bytes"] == CONNECTIONS * glibc_usable(BUFFER)
        # where the reads were posted from: user stacks taken as they were posted (a walk
        # can fail: the kernel counts those)
        posted_from = sum(site["buffers"] for site in memory["read_sites"])
        missed = read_meta(trace).probes.reads.kernel_counts["stack_missed"]
        assert posted_from + missed >= CONNECTIONS
        assert all(site["stack"] for site in memory["read_sites"])
        return
    # which allocations hold the buffers: the server's own, and none of the others
    allocs = t["allocs"][t["allocs"]["pid"] == pid]
    if alloc in ("malloc", "posix_memalign"):
        # buffer allocations have their user stacks (a walk can fail: the kernel counts those),
        # and the stacks were kept
        mine = allocs[allocs["size"] == BUFFER]
        missed = read_meta(trace).probes.reads.kernel_counts
        assert len(mine) == CONNECTIONS
        assert (allocs["stack_id"] == 0).sum() <= missed["stack_missed"]
        assert (mine["stack_id"] > 0).sum() >= CONNECTIONS * 0.9
        mine = mine[mine["stack_id"] > 0]
        stacks = t["stacks"][t["stacks"]["pid"] == pid]
        assert set(mine["stack_id"]) <= set(stacks["stack_id"])
        assert all(len(frames) > 0 for frames in stacks["frames"])
    server_allocs = {(a["addr"], a["size"]) for a in truth["allocations"]}
    traced = set(zip(allocs["addr"], allocs["size"]))
    assert server_allocs <= traced
    assert {(a["addr"], a["size"]) for a in truth["other_allocations"]} <= traced
    if alloc == "pool":
        assert memory["io_buffer_heap"]["allocations"] == 1
        assert memory["io_buffer_heap"]["allocation_bytes"] == POOL_SLOTS * BUFFER
    else:
        assert memory["io_buffer_heap"]["allocations"] == CONNECTIONS
        assert memory["io_buffer_heap"]["allocation_bytes"] == CONNECTIONS * BUFFER
    assert memory["heap_live"]["bytes"] >= (
        OTHERS * OTHER_SIZE + memory["io_buffer_heap"]["allocation_bytes"]
    )
    assert memory["rss"]["now"] > 0
    # committed is not resident: nothing writes an idle connection's buffer
    idle_resident = memory["io_buffer_heap"]["idle_resident_bytes"]
    if alloc == "pool":  # a fresh mapping: only pages shared with active buffers or the header
        assert idle_resident <= 8 * 4096
    assert idle_resident < memory["io_buffer_heap"]["idle_bytes"]
    cost = memory["per_idle_connection"]
    assert cost["resident_bytes"] < cost["bytes"]
