"""The state each connection of a Go program keeps alive: the Go heap's objects that the
stack of the goroutine parked in its read reaches and no other root does (the rule is
probes.attach.reach's, as for glibc's heap in probes.attach.owned).

Nodes: every allocated object of the Go heap (probes.allocators.go GoHeap.objects: spans,
freeindex, allocBits); objects of a span that holds no pointers have no edges. A
connection's roots: its goroutine's stack from its saved stack pointer to the stack's top.
Global roots: what the garbage collector itself scans - the binary's data and bss, and every
other goroutine's live stack. The runtime's memory off the heap (spans, mcaches, the
poller's descriptors) is no root: it points at every span's first object. A goroutine's own
runtime.g is its waiter's part (reached from allgs: the runtime's), not its owned state.

The stacks are read conservatively (every word of [sp, hi), dead frame slots too; Go's stack
maps are not read): a stale word may give a connection more than it owns, flagged by the
analysis when one connection owns far over the median. Only sizes reach the trace.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from probes.allocators.go import GoHeap
from probes.attach import reach
from probes.attach.goroutines import ParkedRead
from probes.attach.owned import _Reader
from probes.attach.walked import Found, Walked, credit
from probes.golang import GoLayoutError
from probes.process_memory import MemoryReadError

MAX_OBJECTS = 50_000_000  # past it, unknown (the graph would not fit a small agent)


def walk(pid: int, go: GoHeap, reads: Sequence[ParkedRead], budget_s: float) -> Walked:
    """Each parked read's connection's owned state in Go process `pid`."""
    began, cpu = time.monotonic(), time.thread_time()
    deadline = began + budget_s
    out = Walked(pid, allocator="go")
    reader = _Reader(go.mem)  # type: ignore[arg-type]

    def done(why: str = "") -> Walked:
        out.why = out.why or why
        out.raced = reader.raced
        out.took_s, out.cpu_s = time.monotonic() - began, time.thread_time() - cpu
        return out

    reads = [r for r in reads if r.sp and r.hi > r.sp]
    out.connections = [Found(r.fd, r.goid & 0xFFFFFFFF, "goroutine stack") for r in reads]
    try:
        heap = go.objects()
    except (GoLayoutError, MemoryReadError) as exc:
        return done(f"the Go heap could not be read: {exc}")
    if len(heap) > MAX_OBJECTS:
        return done(f"not walked: a Go heap of {len(heap):,} objects")
    if not len(heap) or not heap.extents:
        return done("the Go heap holds no object")
    reader.raced += heap.raced
    nodes = reach.Nodes(heap.lo, heap.hi, heap.bytes, np.where(heap.noscan, heap.lo, heap.hi))
    out.chunks, out.heap_bytes = len(nodes), int(nodes.bytes.sum())
    # the heap as one dense snapshot (zeros where no span is in use): one pass for the edges
    # (reach.edges per span run would scan the nodes' ends once per run: thousands of runs)
    first, last = heap.extents[0][0], heap.extents[-1][1]
    words = np.zeros((last - first) // 8, np.uint64)
    for lo, hi in heap.extents:
        for base, part in reader.sparse(lo, hi):
            words[(base - first) // 8 : (base - first) // 8 + len(part)] = part
        if time.monotonic() > deadline:
            return done(f"time budget: {budget_s:g} s ran out reading the Go heap")
    src, dst = reach.edges(first, words, nodes)
    del words
    indptr, indices = reach.csr(len(nodes), src, dst)
    del src, dst
    seeds = []
    for r in reads:
        pieces = [w for _, w in reader.sparse(r.sp & ~7, r.hi & ~7)]
        seeds.append(
            reach.targets(np.concatenate(pieces), nodes) if pieces else np.zeros(0, np.int64)
        )
    try:
        mine = {r.sp for r in reads}
        ranges = go.data() + [
            s.live for s in go.goroutines() if s.live is not None and s.sp not in mine
        ]
    except (GoLayoutError, MemoryReadError) as exc:
        return done(f"the Go runtime's roots could not be read: {exc}")
    global_words = [w for lo, hi in ranges for _, w in reader.sparse(lo & ~7, hi & ~7)]
    buffers = [[r.addr] for r in reads]
    cut = credit(out, nodes, (indptr, indices), seeds, global_words, buffers, deadline, budget_s)
    if cut is None:
        return done(f"time budget: {budget_s:g} s ran out reading the roots")
    for found in out.connections:
        found.why = cut
    return done()
