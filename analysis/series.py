"""Figures over time, built a window at a time: peaks climbed through +1/-1 steps, and the
values at the time series' edges.

- `Peaks`: the highest posted count (and pinned bytes) at any instant. Peaks need the steps
  in time order, and some steps come late (a read parked after EAGAIN is known to have been
  parked only once the reads after it are seen). So the steps are climbed as they come
  until `hold()` (the first read that may come late), and kept from then on - in memory up
  to STEPS_IN_MEMORY, beyond in a temporary directory - to be climbed at the end with the
  late ones merged in.
- `EdgeSeries`: per process and figure, the value at each edge (the end of each step of
  the time series). Span figures (reads posted, bytes held, idle connections...) add each
  interval to the edges it covers - in any order, so a late interval costs nothing
  special; level figures (RSS, socket memory) take the last sample at or before each edge
  and are unknown (NaN) before the first.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

STEPS_IN_MEMORY = 2_000_000  # steps kept in memory before they go to disk

Chunk = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # pid, ts, d_count, d_bytes


def _loaded(chunk: Chunk | Path) -> Chunk:
    if isinstance(chunk, Path):
        with np.load(chunk) as saved:
            return tuple(saved[f"arr_{i}"] for i in range(4))  # type: ignore[return-value]
    return chunk


class Peaks:
    """Per pid, the highest count and bytes at any instant, from +1/-1 (and +len/-len)
    steps given window by window in time order, and late steps merged in at the end."""

    def __init__(self) -> None:
        self.held: list[Chunk | Path] = []  # kept chunks: arrays, or the path of a saved one
        self.firsts: list[int] = []  # each kept chunk's first step (they come in time order)
        self.in_memory = 0
        self.holding = False
        self.spill: tempfile.TemporaryDirectory[str] | None = None
        self.running: dict[int, np.ndarray] = {}  # pid -> [count, bytes] after the last step
        self.best: dict[int, np.ndarray] = {}

    def hold(self) -> None:
        """From now on steps may come late among those of the next windows: keep them."""
        self.holding = True

    def add(self, chunk: Chunk) -> None:
        ts = chunk[1]
        if not len(ts):
            return
        if not self.holding:
            self._climb(chunk)
            return
        self.firsts.append(int(ts.min()))
        if self.in_memory + len(ts) > STEPS_IN_MEMORY:
            if self.spill is None:
                self.spill = tempfile.TemporaryDirectory(prefix="idlebuf-steps-")
            saved = Path(self.spill.name) / f"{len(self.held):06d}.npz"
            np.savez(saved, *chunk)
            self.held.append(saved)
        else:
            self.held.append(chunk)
            self.in_memory += len(ts)

    def _climb(self, chunk: Chunk) -> None:
        """Walk `chunk`'s steps in time order (per pid; at one instant ends before starts,
        so peaks are not overstated) from the running values, raising the peaks."""
        pid, ts, d_count, d_bytes = chunk
        low, high = int(ts.min()), int(ts.max())
        key = ts - low
        key *= 2
        key += d_count > 0
        # the windows' steps come as runs already in time order (posts, then ends): a
        # stable sort (a merge of runs) is fastest on them
        if pid.min() == pid.max():
            order = np.argsort(key, kind="stable")
            groups = [(int(pid[0]), slice(None))]
        else:
            ids, inverse = np.unique(pid, return_inverse=True)
            width = 2 * (high - low + 1)
            if len(ids) * width < 2**62:
                key += inverse * width
                order = np.argsort(key, kind="stable")
            else:
                order = np.lexsort((d_count > 0, ts, pid))
            bounds = np.searchsorted(inverse[order], np.arange(len(ids) + 1))
            groups = [(int(p), slice(bounds[i], bounds[i + 1])) for i, p in enumerate(ids)]
        del key
        for p, rows in groups:
            at = order[rows]
            base = self.running.get(p, np.zeros(2, np.int64))
            count = np.cumsum(d_count[at], dtype=np.int64) + base[0]
            held = np.cumsum(d_bytes[at], dtype=np.int64) + base[1]
            self.running[p] = np.array([count[-1], held[-1]])
            high_here = np.array([count.max(), held.max()])
            self.best[p] = np.maximum(self.best.get(p, high_here), high_here)

    def peaks(self, late: list[Chunk]) -> dict[int, tuple[int, int]]:
        """Per pid, the highest count and bytes at any instant, the `late` steps (none
        before the hold) merged into the kept ones."""
        kept: Iterator[Chunk] = (_loaded(c) for c in self.held)
        merged = tuple(np.concatenate(a) for a in zip(*late)) if late else None
        if merged is not None and len(merged[1]):
            order = np.argsort(merged[1], kind="stable")
            steps: Chunk = tuple(a[order] for a in merged)  # type: ignore[assignment]
            if not self.held:
                kept = iter([steps])
            else:  # kept chunk i takes the late steps from its first step to chunk i + 1's
                cuts = np.searchsorted(steps[1], self.firsts[1:])
                pieces = zip(*(np.split(a, cuts) for a in steps))
                kept = (
                    tuple(np.concatenate([a, b]) for a, b in zip(c, x))  # type: ignore[misc]
                    for c, x in zip(kept, pieces)
                )
        for chunk in kept:
            self._climb(chunk)
        return {p: (int(v[0]), int(v[1])) for p, v in self.best.items()}

    def close(self) -> None:
        if self.spill is not None:
            self.spill.cleanup()


def steps_of(
    pid: np.ndarray, post: np.ndarray, end: np.ndarray, length: np.ndarray, new: np.ndarray
) -> Chunk:
    """The steps of some reads (or writes): +1 (+len) at the post of those `new` (posted in
    this window), -1 (-len) at the end of those that ended (`end` not NaN)."""
    ended = ~np.isnan(end)
    return (
        np.concatenate([pid[new], pid[ended]]),
        np.concatenate([post[new], end[ended].astype(np.int64)]),
        np.concatenate([np.ones(int(new.sum()), np.int8), -np.ones(int(ended.sum()), np.int8)]),
        np.concatenate([length[new], -length[ended]]),
    )


class EdgeSeries:
    """Per pid and figure, the value at each edge (`edges`: CLOCK_MONOTONIC ns, ascending).
    Without edges (no time series asked for) every call does nothing."""

    def __init__(self, edges: np.ndarray | None) -> None:
        self.edges = edges
        # evenly spaced edges (a time series' steps): an instant's edge by arithmetic
        self.step: int | None = None
        if edges is not None and len(edges) > 1:
            steps = np.diff(edges)
            if (steps == steps[0]).all() and steps[0] > 0:
                self.step = int(steps[0])
        self.spanned: dict[tuple[int, str], np.ndarray] = {}  # differences, m + 1
        self.levels: dict[tuple[int, str], np.ndarray] = {}  # values, NaN: not measured
        self.pids: set[int] = set()

    @property
    def wanted(self) -> bool:
        return self.edges is not None and len(self.edges) > 0

    def first_edge(self, ts: np.ndarray) -> np.ndarray:
        """The index of the first edge at or after each instant (len(edges): none; NaN
        too)."""
        assert self.edges is not None
        if self.step is None:
            return np.searchsorted(self.edges, ts, side="left")
        ts = np.asarray(ts)
        m = len(self.edges)
        first = int(self.edges[0])
        if ts.dtype.kind == "f":
            finite = np.isfinite(ts)
            if finite.all():  # most are: worked out in integers at once
                return self.first_edge(ts.astype(np.int64))
            out = np.where(ts == -np.inf, 0, m)
            out[finite] = self.first_edge(ts[finite].astype(np.int64))
            return out
        return np.clip(-((first - ts.astype(np.int64, copy=False)) // self.step), 0, m)

    def spans(
        self,
        figure: str,
        pid: np.ndarray,
        start: np.ndarray,
        end: np.ndarray,
        weight: np.ndarray | None = None,
    ) -> None:
        """Add `weight` (None: 1) to `figure` at every edge e with start <= e < end (end
        NaN or inf: to the last edge), per pid."""
        self.spans_of(pid, start, end, {figure: weight})

    def spans_of(
        self,
        pid: np.ndarray,
        start: np.ndarray,
        end: np.ndarray,
        weights: dict[str, np.ndarray | None],
    ) -> None:
        """spans() of several figures over the same intervals (None: a weight of 1), the
        edges each covers found once."""
        if not self.wanted or not len(pid):
            return
        assert self.edges is not None
        m = len(self.edges)
        lo = self.first_edge(np.asarray(start))
        end = np.asarray(end, np.float64)
        finite = ~np.isnan(end)
        if finite.all():
            hi = self.first_edge(end)
        else:
            hi = np.full(len(end), m)
            hi[finite] = self.first_edge(end[finite])
        one = pid.min() == pid.max()  # most traces: one server
        self.pids.update([int(pid[0])] if one else np.unique(pid).tolist())
        keep = lo < hi
        if not keep.all():
            pid, lo, hi = pid[keep], lo[keep], hi[keep]
            weights = {f: None if w is None else w[keep] for f, w in weights.items()}
        if not len(pid):
            return
        for p in [int(pid[0])] if one else np.unique(pid).tolist():
            mine = slice(None) if one else pid == p
            for figure, w in weights.items():
                diff = self.spanned.setdefault((p, figure), np.zeros(m + 1, np.int64))
                wp = None if w is None else w[mine].astype(np.float64)
                diff += np.bincount(lo[mine], wp, minlength=m + 1).astype(np.int64)
                diff -= np.bincount(hi[mine], wp, minlength=m + 1).astype(np.int64)

    def level(self, figure: str, pid: int, ts: np.ndarray, values: np.ndarray) -> None:
        """Samples of a level figure for one pid, in time order, later than every sample
        given before: each edge at or after the first takes the last one at or before it."""
        if not self.wanted or not len(ts):
            return
        assert self.edges is not None
        out = self.levels.setdefault((pid, figure), np.full(len(self.edges), np.nan))
        last = np.searchsorted(ts, self.edges, side="right") - 1
        reached = last >= 0
        out[reached] = values[last[reached]]
        self.pids.add(pid)

    def values(self, pid: int, figure: str) -> np.ndarray | None:
        """The figure at each edge (floats; NaN: not measured then); None: never given."""
        if (pid, figure) in self.spanned:
            return np.cumsum(self.spanned[(pid, figure)][:-1]).astype(np.float64)
        return self.levels.get((pid, figure))
