"""One process's owned-state walk as the trace keeps it (probes.attach.owned for glibc's heap
and CPython's, probes.attach.owned_go for Go's): each connection's figures, the process's,
and the step both walks end with - the rule applied, and its result written down."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from probes.attach import reach


@dataclass
class Found:
    """What one connection owns: bytes and allocations beyond its buffers' allocations
    (`buffer_bytes`: those among what it reaches alone, counted in the buffer part)."""

    fd: int
    tid: int
    root: str
    owned_bytes: int = 0
    allocations: int = 0
    buffer_bytes: int = 0
    why: str = ""  # not known (or a lower bound), and why


@dataclass
class Walked:
    """One process's walk: each connection's owned state, and the rest of its heap."""

    pid: int
    allocator: str = "glibc"
    connections: list[Found] = field(default_factory=list)
    heap_bytes: int = 0  # in use, walked
    chunks: int = 0
    shared_bytes: int = 0  # reached at the same depth by several connections first
    global_bytes: int = 0  # the program's
    unreached_bytes: int = 0  # reached by no root (leaked, or held where this cannot see)
    raced: int = 0  # reads that raced with the process (short, or the heap changed)
    took_s: float = 0.0
    cpu_s: float = 0.0
    levels: int = 0
    why: str = ""  # the walk could not be made, and why

    def rows(self, ts_ns: int, what: str) -> list[dict[str, Any]]:
        """Rows of the trace's `owned` table: the process's own (fd -1), then one per
        connection."""
        base = {"ts_ns": ts_ns, "pid": self.pid, "what": what, "allocator": self.allocator}
        rows = [
            base
            | {
                "fd": -1, "tid": 0, "root": "", "owned_bytes": 0, "allocations": 0,
                "buffer_bytes": 0, "how": "", "why": self.why, "heap_bytes": self.heap_bytes,
                "chunks": self.chunks, "shared_bytes": self.shared_bytes,
                "global_bytes": self.global_bytes, "unreached_bytes": self.unreached_bytes,
                "raced": self.raced, "took_ms": round(self.took_s * 1000),
                "cpu_ms": round(self.cpu_s * 1000),
            }
        ]  # fmt: skip
        for c in self.connections:
            rows.append(
                base
                | {
                    "fd": c.fd, "tid": c.tid, "root": c.root, "owned_bytes": c.owned_bytes,
                    "allocations": c.allocations, "buffer_bytes": c.buffer_bytes,
                    "how": "reachable", "why": c.why or self.why,
                }
            )  # fmt: skip
        return rows


def credit(
    out: Walked,
    nodes: reach.Nodes,
    graph: tuple[np.ndarray, np.ndarray],
    seeds: list[np.ndarray],
    global_words: list[np.ndarray],
    buffers: Sequence[Iterable[int]],
    deadline: float,
    budget_s: float,
) -> str | None:
    """The walk's rule applied (reach.assign) from each connection's `seeds` and the
    program's roots (`global_words`), and what it gives written into `out`: each
    connection's owned bytes and allocations less its `buffers`' allocations (the buffer
    part), and the process's shared, global and unreached bytes. Returns why the figures
    are a lower bound ("" if they are not), None when the budget ran out before the walk."""
    global_seeds = (
        reach.targets(np.concatenate(global_words), nodes)
        if global_words
        else np.zeros(0, np.int64)
    )
    if time.monotonic() > deadline:
        return None
    assigned = reach.assign(*graph, seeds, global_seeds, deadline)
    out.levels = assigned.levels
    conns = len(seeds)
    size, count = reach.totals(assigned.labels, nodes, conns)
    out.shared_bytes, out.global_bytes = int(size[conns]), int(size[conns + 1])
    out.unreached_bytes = int(size[conns + 2])
    for c, (addrs, found) in enumerate(zip(buffers, out.connections)):
        mine = nodes.holding(np.asarray(sorted(addrs), np.uint64))
        mine = np.unique(mine[mine >= 0])
        mine = mine[assigned.labels[mine] == c]
        found.buffer_bytes = int(nodes.bytes[mine].sum())
        found.owned_bytes = int(size[c]) - found.buffer_bytes
        found.allocations = int(count[c]) - len(mine)
    if assigned.done:
        return ""
    return (
        f"time budget: {budget_s:g} s ran out {assigned.levels} levels down the walk "
        "(what it found is a lower bound)"
    )
