"""What each connection's roots reach in a heap, and no other connection's: the heap as a
graph of allocations, and the rule that gives each allocation its owner.

The graph is conservative: any 8-aligned word of an allocation (or of a root range) whose
value lies inside a live allocation's user area is an edge to it (interior pointers
included). The rule, tried on a real thread-per-connection server (issue 23), is a
breadth-first walk from every root at once, level by level:

- each allocation goes to the root that reaches it in the fewest hops;
- a connection's root wins a tie with the program's global data (servers keep global
  lists that point straight at every connection's objects: they cannot veto);
- an allocation reached at the same depth by two or more connections is *shared*, and so is
  what it alone leads to; shared bytes are reported as such (per process), never divided
  among the connections nor counted as any one's owned state.

Labels: 0..C-1 the connections, C shared, C+1 global, -1 not reached. Pure numpy: no /proc
here (probes.attach.owned reads the process).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

UNREACHED = -1
SMALL_FRONTIER = 48  # below this many nodes a level is stepped in Python (numpy's fixed cost)
EDGE_SLICE = 1 << 23  # words scanned for edges at once (bounds the temporaries: ~64 MiB each)


@dataclass(frozen=True)
class Nodes:
    """Live allocations: user areas [lo, hi), sorted by lo and disjoint, where a pointer
    makes an edge to them; [lo, ends) where their words are (a glibc chunk in use also has
    the next chunk's prev_size field, but a pointer there is glibc's own, to the next
    chunk's header: its top, its bins); the bytes each takes from its allocator (a glibc
    chunk: its size, header included)."""

    lo: np.ndarray  # uint64
    hi: np.ndarray  # uint64
    bytes: np.ndarray  # int64
    ends: np.ndarray | None = None  # uint64; None: hi

    def __len__(self) -> int:
        return len(self.lo)

    @functools.cached_property
    def top(self) -> np.uint64:
        """The end of the highest user area (computed once: a walk asks per word run)."""
        return self.hi.max() if len(self.hi) else np.uint64(0)

    def holding(self, values: np.ndarray, words: bool = False) -> np.ndarray:
        """The node each value points into (int64), -1 where none; with `words`, the node
        whose words hold each address."""
        values = np.asarray(values, dtype=np.uint64)
        if not len(self.lo) or not len(values):
            return np.full(len(values), -1, np.int64)
        i = np.searchsorted(self.lo, values, side="right").astype(np.int64) - 1
        safe = np.maximum(i, 0)
        end = self.ends if words and self.ends is not None else self.hi
        ok = (i >= 0) & (values < end[safe])
        return np.where(ok, safe, -1)


def candidates(words: np.ndarray, nodes: Nodes) -> np.ndarray:
    """Indices of `words` whose value falls in the span of `nodes` (a cheap first filter)."""
    if not len(nodes):
        return np.zeros(0, np.int64)
    return np.flatnonzero((words >= nodes.lo[0]) & (words < nodes.top))


def targets(words: np.ndarray, nodes: Nodes) -> np.ndarray:
    """The distinct nodes that `words` (root words) point into."""
    at = candidates(words, nodes)
    found = nodes.holding(words[at])
    return np.unique(found[found >= 0])


def edges(base: int, words: np.ndarray, nodes: Nodes) -> tuple[np.ndarray, np.ndarray]:
    """(sources, destinations) of the edges held by the words of a snapshot that starts at
    address `base`: from the live allocation each word lies in to the one its value points
    into. Words outside every live allocation (free chunks, allocator metadata) hold none;
    an allocation pointing into itself is no edge. Sources come out in address order."""
    srcs, dsts = [], []
    for first in range(0, len(words), EDGE_SLICE):
        part = words[first : first + EDGE_SLICE]
        at = candidates(part, nodes)
        if not len(at):
            continue
        dst = nodes.holding(part[at])
        keep = dst >= 0
        at, dst = at[keep], dst[keep]
        where = np.uint64(base) + np.uint64(8) * (at + first).astype(np.uint64)
        src = nodes.holding(where, words=True)
        keep = (src >= 0) & (src != dst)
        srcs.append(src[keep])
        dsts.append(dst[keep])
    if not srcs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(srcs), np.concatenate(dsts)


def csr(n: int, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices): the edges grouped by source."""
    if len(src) and np.any(src[1:] < src[:-1]):
        order = np.argsort(src, kind="stable")
        src, dst = src[order], dst[order]
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=indptr[1:])
    return indptr, dst.astype(np.int64, copy=False)


@dataclass
class Assignment:
    """Each node's label (0..C-1 a connection, C shared, C+1 global, -1 not reached), how
    many levels the walk went down, and whether it finished (False: the time budget ran
    out; what was not reached then is not known)."""

    labels: np.ndarray
    levels: int
    done: bool


def resolve(dst: np.ndarray, lab: np.ndarray, conns: int) -> tuple[np.ndarray, np.ndarray]:
    """One level's claims (node, label), several per node possibly, as (nodes, labels):
    one connection alone -> it (a tie with global data or shared state goes to it); two
    connections or more -> shared; shared and global -> shared; global alone -> global."""
    key = dst.astype(np.int64) * (conns + 2) + lab
    key.sort()  # distinct keys by sorting (numpy's unique hashes first, then sorts: 2x)
    key = key[np.r_[True, key[1:] != key[:-1]]]
    node, label = key // (conns + 2), key % (conns + 2)
    first = np.flatnonzero(np.r_[True, node[1:] != node[:-1]])
    lowest = label[first]  # sorted: each node's smallest label first
    conn_only = np.where(label < conns, label, -1)
    highest_conn = np.maximum.reduceat(conn_only, first)
    out = np.where(
        lowest < conns,
        np.where(highest_conn == lowest, lowest, conns),
        np.where(lowest == conns, conns, conns + 1),
    )
    return node[first], out


def _resolve_small(claims: dict[int, set[int]], conns: int) -> tuple[list[int], list[int]]:
    """resolve(), for a few claims, in Python."""
    nodes, labels = [], []
    for node, labs in claims.items():
        mine = [lab for lab in labs if lab < conns]
        if mine:
            label = mine[0] if len(mine) == 1 else conns
        else:
            label = conns if conns in labs else conns + 1
        nodes.append(node)
        labels.append(label)
    return nodes, labels


def assign(
    indptr: np.ndarray,
    indices: np.ndarray,
    seeds: Sequence[np.ndarray],
    global_seeds: np.ndarray,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Assignment:
    """The multi-source walk: `seeds[c]` the nodes connection c's roots point to directly,
    `global_seeds` those the program's global data does (each at depth 1).

    Levels with many claims are stepped in numpy; small ones (a linked list of a million
    nodes is a million levels) in Python, where numpy's fixed cost per call would
    dominate."""
    conns = len(seeds)
    labels = np.full(len(indptr) - 1, UNREACHED, np.int32)
    dst = np.concatenate([*(np.asarray(s, np.int64) for s in seeds), global_seeds])
    lab = np.concatenate(
        [
            *(np.full(len(s), c, np.int64) for c, s in enumerate(seeds)),
            np.full(len(global_seeds), conns + 1, np.int64),
        ]
    ).astype(np.int64)
    return _walk(indptr, indices, labels, dst.astype(np.int64), lab, conns, deadline, clock, 0)


def _walk(
    indptr: np.ndarray,
    indices: np.ndarray,
    labels: np.ndarray,
    dst: np.ndarray,
    lab: np.ndarray,
    conns: int,
    deadline: float | None,
    clock: Callable[[], float],
    level: int,
) -> Assignment:
    """Label what `dst` (claimed by `lab`) and what follows from it reach, level by level."""
    claims: dict[int, set[int]] = {}
    if len(dst) < SMALL_FRONTIER:
        claims, dst = _claims(dst, lab), dst[:0]
    while len(dst) or claims:
        level += 1
        if len(dst):  # a big level, in numpy
            nodes, labs = resolve(dst, lab, conns)
            labels[nodes] = labs
            if len(nodes) >= SMALL_FRONTIER:
                dst, lab = _expand(indptr, indices, nodes, labs)
                fresh = labels[dst] == UNREACHED
                dst, lab = dst[fresh], lab[fresh]
                if len(dst) < SMALL_FRONTIER:
                    claims, dst = _claims(dst, lab), dst[:0]
            else:
                claims = _claims_from(indptr, indices, labels, nodes.tolist(), labs.tolist())
                dst = dst[:0]
        else:  # a small one, in Python
            small_nodes, small_labels = _resolve_small(claims, conns)
            labels[small_nodes] = small_labels
            claims = _claims_from(indptr, indices, labels, small_nodes, small_labels)
        if claims and sum(len(c) for c in claims.values()) >= SMALL_FRONTIER:  # numpy again
            dst = np.fromiter((d for d, cs in claims.items() for _ in cs), np.int64)
            lab = np.fromiter((c for cs in claims.values() for c in cs), np.int64)
            claims = {}
        if deadline is not None and (len(dst) or level % 256 == 0) and clock() > deadline:
            return Assignment(labels, level, not (len(dst) or claims))
    return Assignment(labels, level, True)


def _claims(dst: np.ndarray, lab: np.ndarray) -> dict[int, set[int]]:
    claims: dict[int, set[int]] = {}
    for d, c in zip(dst.tolist(), lab.tolist()):
        claims.setdefault(d, set()).add(c)
    return claims


def _claims_from(
    indptr: np.ndarray, indices: np.ndarray, labels: np.ndarray, nodes: list[int], labs: list[int]
) -> dict[int, set[int]]:
    """The next level's claims from a few labelled nodes, in Python."""
    claims: dict[int, set[int]] = {}
    for node, label in zip(nodes, labs):
        for nxt in indices[indptr[node] : indptr[node + 1]].tolist():
            if labels[nxt] == UNREACHED:
                claims.setdefault(nxt, set()).add(label)
    return claims


def _expand(
    indptr: np.ndarray, indices: np.ndarray, nodes: np.ndarray, labs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every edge out of `nodes`: (destinations, the label of the node it leaves)."""
    begin = indptr[nodes]
    counts = indptr[nodes + 1] - begin
    total = int(counts.sum())
    if not total:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    offsets = np.repeat(begin - (np.cumsum(counts) - counts), counts) + np.arange(total)
    return indices[offsets], np.repeat(labs.astype(np.int64), counts)


def totals(labels: np.ndarray, nodes: Nodes, conns: int) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, allocations) per label 0..C+1 (connections, shared, global), and of the
    nodes not reached at index C+2."""
    index = np.where(labels >= 0, labels, conns + 2)
    size = np.bincount(index, weights=nodes.bytes.astype(np.float64), minlength=conns + 3)
    count = np.bincount(index, minlength=conns + 3)
    return size.astype(np.int64), count.astype(np.int64)
