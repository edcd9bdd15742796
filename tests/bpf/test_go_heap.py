"""A real Go server's heap read from outside (probes.allocators.go): every live object listed
from the runtime's spans, and what each idle connection's goroutine keeps alive in it.

The server is workloads/go_server serving through a bufio.Reader and a bufio.Writer of
4 KiB each (--bufio, as net/http does). The truth is the runtime's own: its MemStats
(HeapAlloc, HeapObjects, HeapInuse) read after a runtime.GC() with nothing allocated after
them (SIGUSR2), and their growth over the connections as they were opened. Needs root (to
read another process's memory), not BPF."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from idlebuf.experiments.processes import read_event, stop
from probes.allocators.go import GoHeap, GoObjects
from probes.attach import reach
from probes.attach.goroutines import ParkedRead, parked_reads
from probes.golang import binary_of, load_bias
from probes.process_memory import ProcessMemory
from tests.bpf.test_attach_late import GO_SERVER
from tests.helpers import idlebuf, report_json

pytestmark = pytest.mark.bpf

CONNECTIONS, BUFFER = 23, 4096


@dataclass
class GoServer:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def heap(self) -> dict[str, Any]:
        """The runtime's heap figures after a GC, with nothing allocated since."""
        assert self.proc.stdout is not None
        os.kill(self.pid, signal.SIGUSR2)
        truth = read_event(self.proc.stdout, "ground_truth", 10)
        return {**truth, **read_event(self.proc.stdout, "heap", 10)}

    def go_heap(self, mem: ProcessMemory) -> GoHeap:
        binary = binary_of(self.pid)
        return GoHeap(mem, binary, load_bias(self.pid, binary))


def go_server(*args: str) -> Iterator[GoServer]:
    if os.geteuid() != 0:
        pytest.skip("needs root: it reads another process's memory")
    assert GO_SERVER.exists(), "workloads/go_server is not built: run scripts/bootstrap"
    proc = subprocess.Popen([str(GO_SERVER), *args], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        yield GoServer(proc, read_event(proc.stdout, "listening", 10)["port"])
    finally:
        stop(proc)


@pytest.fixture
def bufio_server() -> Iterator[GoServer]:
    yield from go_server("--bufio", "--buffer-size", str(BUFFER))


def idle(server: GoServer, count: int) -> list[socket.socket]:
    """`count` connections that say nothing, once each is parked in its read."""
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(count)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = parked_reads(server.pid, lambda fd: is_socket(server.pid, fd)).reads
        if len(found) >= count:
            break
        time.sleep(0.05)
    return socks


def is_socket(pid: int, fd: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    except OSError:
        return False


def test_the_listed_objects_are_the_runtime_s_heap(bufio_server: GoServer) -> None:
    socks = idle(bufio_server, CONNECTIONS)
    truth = bufio_server.heap()
    with ProcessMemory(bufio_server.pid) as mem:
        go = bufio_server.go_heap(mem)
        began = time.monotonic()
        found = go.objects()
        took = time.monotonic() - began
        assert found.raced == 0
        # HeapAlloc: the live objects' slots; HeapObjects: Mallocs - Frees, where Go 1.19
        # counts a block of tiny allocations once (it adds them to both)
        assert abs(int(found.bytes.sum()) - truth["heap_alloc"]) <= 0.01 * truth["heap_alloc"]
        assert abs(len(found) - truth["heap_objects"]) <= 0.01 * truth["heap_objects"]
        assert sum(b - a for a, b in found.extents) == truth["heap_inuse"]
        assert np.all(found.lo[1:] >= found.hi[:-1])  # sorted, disjoint
        rng = np.random.default_rng(7)
        for i in rng.choice(len(found), 300, replace=False).tolist():
            lo, size = int(found.lo[i]), int(found.bytes[i])
            at = go.find(lo + int(rng.integers(0, size)))
            assert at is not None and (at.addr, at.size) == (lo, size), (hex(lo), size, at)  # type: ignore[union-attr]
    assert took < 1.0
    del socks


# --- the owned-state walk over the Go heap (a prototype of what probes.attach.owned does) ----
@dataclass
class Owned:
    bytes: list[int]  # per connection, in the order of `reads`
    allocations: list[int]
    sizes: list[dict[int, int]]  # per connection: object size -> how many
    shared: int
    global_: int
    unreached: int
    took_s: float


def owned(pid: int, mem: ProcessMemory, go: GoHeap, reads: list[ParkedRead]) -> Owned:
    """What each parked read's goroutine reaches from its stack [sp, hi) and nothing else
    does: the nodes are the heap's objects (noscan ones hold no edges), the global roots the
    binary's data and bss and every other goroutine's live stack - the GC's own roots. The
    runtime's memory off the heap (spans, mcaches, the poller's descriptors) is no root: it
    points at every span's first object."""
    began = time.monotonic()
    heap: GoObjects = go.objects()
    ends = np.where(heap.noscan, heap.lo, heap.hi)
    nodes = reach.Nodes(heap.lo, heap.hi, heap.bytes, ends)
    reader = _words(mem)
    # the heap as one dense snapshot (zeros where no span is in use): one pass for the edges
    # (reach.edges per span run would scan the nodes' ends once per run - thousands)
    first, last = heap.extents[0][0], heap.extents[-1][1]
    words = np.zeros((last - first) // 8, np.uint64)
    for lo, hi in heap.extents:
        for base, part in reader(lo, hi):
            words[(base - first) // 8 : (base - first) // 8 + len(part)] = part
    src, dst = reach.edges(first, words, nodes)
    del words
    indptr, indices = reach.csr(len(nodes), src, dst)
    seeds = []
    for r in reads:
        words = [w for _, w in reader(r.sp & ~7, r.hi)]
        seeds.append(reach.targets(np.concatenate(words), nodes))
    mine = {r.sp for r in reads}
    ranges = go.data() + [
        s.live for s in go.goroutines() if s.live is not None and s.sp not in mine
    ]
    words = [w for lo, hi in ranges for _, w in reader(lo, hi)]
    global_seeds = reach.targets(np.concatenate(words), nodes)
    walked = reach.assign(indptr, indices, seeds, global_seeds)
    conns = len(reads)
    size, count = reach.totals(walked.labels, nodes, conns)
    sizes = []
    for c in range(conns):
        values, counts = np.unique(heap.bytes[walked.labels == c], return_counts=True)
        sizes.append(dict(zip(values.tolist(), counts.tolist())))
    return Owned(
        size[:conns].tolist(),
        count[:conns].tolist(),
        sizes,
        int(size[conns]),
        int(size[conns + 1]),
        int(size[conns + 2]),
        time.monotonic() - began,
    )


def _words(mem: ProcessMemory) -> Any:
    """A reader of [lo, hi) as (address, words) runs: only the pages that hold memory (as
    probes.attach.owned reads), in reads of up to 32 MiB."""

    def read(lo: int, hi: int) -> list[tuple[int, np.ndarray]]:
        lo, hi = lo & ~7, hi & ~7
        runs: list[list[int]] = []
        for page in mem.touched_pages(lo - lo % 4096, -(-hi // 4096) * 4096):
            if runs and runs[-1][1] == page and page - runs[-1][0] < 32 << 20:
                runs[-1][1] = page + 4096
            else:
                runs.append([page, page + 4096])
        out = []
        for a, b in runs:
            a, b = max(a, lo), min(b, hi)
            if a < b:
                out.append((a, np.frombuffer(mem.read(a, b - a), "<u8").astype(np.uint64)))
        return out

    return read


def test_each_idle_connection_owns_its_bufio_reader_and_writer(bufio_server: GoServer) -> None:
    before = bufio_server.heap()
    socks = idle(bufio_server, CONNECTIONS)
    after = bufio_server.heap()
    grown = (after["heap_alloc"] - before["heap_alloc"]) / CONNECTIONS
    reads = parked_reads(bufio_server.pid, lambda fd: is_socket(bufio_server.pid, fd)).reads
    assert len(reads) == CONNECTIONS and all(r.sp and r.hi for r in reads)
    with ProcessMemory(bufio_server.pid) as mem:
        found = owned(bufio_server.pid, mem, bufio_server.go_heap(mem), reads)
    typical = max(set(found.bytes), key=found.bytes.count)
    print(f"\nHeapAlloc grew {grown:.0f} B per connection; owned: {found.bytes}")
    print(f"shared {found.shared}, global {found.global_}, unreached {found.unreached}")
    print(f"a typical connection's objects by size: {found.sizes[found.bytes.index(typical)]}")
    # the growth also holds each goroutine's runtime.g (the runtime's: allgs holds it) and
    # the server's maps' growth (its own): what a connection owns is the rest
    assert 2 * BUFFER <= typical <= grown and grown - typical <= 1024, (typical, grown)
    # a goroutine's stack is read whole from sp (conservatively: its frames' dead slots
    # too), and stacks are reused: a stale word may give a connection more, or make one of
    # its objects shared with the one whose old stack it reuses - rarely
    exact = [c for c, b in enumerate(found.bytes) if b == typical]
    assert len(exact) >= CONNECTIONS - 3, found.bytes
    for c in exact:
        assert found.sizes[c].get(BUFFER) == 2, found.sizes[c]  # its reader's and writer's
    assert all(sizes.get(BUFFER, 0) >= 1 for sizes in found.sizes), found.sizes
    del socks


def test_attached_late_the_whole_cost_of_a_go_connection_is_known(
    bufio_server: GoServer, tmp_path: Path
) -> None:
    """`record -p` on the Go server whose 23 connections sit idle already: the walk finds
    each connection's objects on the Go heap (no glibc fit on a Go program), so the whole
    cost per idle connection is known - buffer + goroutine + owned state + kernel - and its
    owned state is the heap's growth per connection less the goroutine's g (the waiter's)."""
    before = bufio_server.heap()
    socks = idle(bufio_server, CONNECTIONS)
    after = bufio_server.heap()
    grown = (after["heap_alloc"] - before["heap_alloc"]) / CONNECTIONS
    trace = tmp_path / "trace"
    try:
        done = idlebuf(
            "record", "-o", str(trace), "-p", str(bufio_server.pid), "--memory", "--duration", "3"
        )
        assert done.returncode == 0, done.stderr
    finally:
        for s in socks:
            s.close()
    (proc,) = report_json(trace)["processes"]
    cost = proc["memory"]["per_idle_connection"]
    print(f"\nHeapAlloc grew {grown:.0f} B per connection; per idle connection: {cost}")
    assert (cost["owned_how"], cost["owned_connections"]) == ("reachable", CONNECTIONS)
    parts = {(p["waiter"], p["part"]) for p in cost["waiter_parts"]}
    assert parts == {("goroutine", "stack"), ("goroutine", "g")}
    assert cost["buffer_bytes"] == BUFFER  # the read buffer: a Go size class of its own
    # the growth holds the buffer, the objects owned, each goroutine's g and the server's
    # maps (its own); a stale stack word may add to one connection (the mean shows it)
    owned = cost["owned_bytes"] + cost["buffer_bytes"]
    assert cost["owned_bytes"] >= 4096  # the bufio.Writer's buffer, at least
    assert grown - 1024 <= owned <= grown * 1.15, (owned, grown)
    assert cost["total_bytes"] is not None and cost["total_bytes"] == cost["total_at_least_bytes"]
