"""The other event tables across windows: allocations, writes, resident memory.

Each pass keeps only what is still open at a window's bound (allocations not freed, writes
not returned, each process's resident counters) and what the end needs (allocations live
then, write buffers seen, sums at the heap fit's instants); everything else it leaves is
additive (counts, sums) or a span on the time series' edges (analysis.series).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.groups import dense_codes, sums
from analysis.memory import allocation_intervals, live_at
from analysis.parking import Attribute
from analysis.reads import columns_of, read_intervals
from analysis.series import EdgeSeries, Peaks, steps_of
from analysis.windows import EVENT_COLUMNS, empty
from probes.format.schema import RssMember

Rounding = Callable[[np.ndarray], np.ndarray]


def _stacked(*frames: pd.DataFrame) -> pd.DataFrame:
    full = [f for f in frames if not f.empty]
    if not full:
        return frames[0]
    return full[0] if len(full) == 1 else pd.concat(full, ignore_index=True)


def bytes_by(times: np.ndarray, sizes: np.ndarray, stamps: np.ndarray) -> np.ndarray:
    """For each stamp, the sum of `sizes` whose time is at or before it."""
    order = np.argsort(times, kind="stable")
    total = np.concatenate([[0], np.cumsum(sizes[order], dtype=np.int64)])
    return total[np.searchsorted(times[order], stamps, side="right")]


@dataclass
class FitStamps:
    """Where the heap fit wants the traced allocations summed: one process's settled
    memory points (analysis.cost.settled), with its allocator's rounding."""

    stamps: np.ndarray  # ns, ascending
    rounding: Rounding
    scale: int = 1  # one allocation address in `scale` was traced
    live: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        self.live = np.zeros(len(self.stamps), np.int64)


class AllocPass:
    """Allocations paired with their frees, a window at a time: live at the end, summed on
    the time series' edges and at the heap fit's instants, and live at any edge of the
    current window (for the buffers of reads posted then)."""

    def __init__(
        self,
        series: EdgeSeries,
        end_ns: int,
        walked: pd.DataFrame,
        fit: dict[int, FitStamps],
    ) -> None:
        self.series = series
        self.end_ns = end_ns
        self.walked = walked  # the walkers' blocks: attributed to whatever read them
        self.fit = fit
        self.carry = empty("allocs")
        self.live_pieces: list[pd.DataFrame] = []
        self.made = allocation_intervals(empty("allocs").assign(fn=0), empty("frees"))
        # the walkers' blocks count from when they were found
        series.spans(
            "heap_live_bytes",
            walked["pid"].to_numpy(np.int64),
            walked["alloc_ns"].to_numpy(np.int64),
            np.full(len(walked), np.nan),
            walked["size"].to_numpy(np.int64),
        )

    def window(self, low: float, ev: dict[str, pd.DataFrame]) -> None:
        allocs = ev.get("allocs", self.carry.iloc[0:0])
        frees = ev.get("frees", empty("frees"))
        made = allocation_intervals(_stacked(self.carry, allocs).assign(fn=0), frees)
        alloc_ns = made["alloc_ns"].to_numpy(np.float64)
        free_ns = made["free_ns"].to_numpy(np.float64)
        freed = ~np.isnan(free_ns)
        late = freed & (alloc_ns <= self.end_ns) & ~(free_ns <= self.end_ns)  # live_at the end
        if late.any():
            self.live_pieces.append(made[late])
        self._spans(made, freed)
        self._fit(made, alloc_ns >= low, freed)
        self.made = made
        # the open ones carried as their own columns, not the frame masked then narrowed
        self.carry = pd.DataFrame(
            {
                c: made["alloc_ns" if c == "ts_ns" else c].to_numpy()[~freed]
                for c in EVENT_COLUMNS["allocs"]
            }
        )

    def finish(self) -> pd.DataFrame:
        """The traced allocations live at the end (live_at of allocation_intervals)."""
        made = allocation_intervals(self.carry.assign(fn=0), empty("frees"))
        self._spans(made)
        self.live_pieces.append(live_at(made, self.end_ns, "alloc_ns", "free_ns"))
        for f in self.fit.values():
            f.live = f.live * f.scale
        return _stacked(*self.live_pieces)

    def _spans(self, made: pd.DataFrame, where: np.ndarray | None = None) -> None:
        if not self.series.wanted:
            return
        column = columns_of(made, where)
        self.series.spans(
            "heap_live_bytes",
            column("pid", np.int64),
            column("alloc_ns", np.int64),
            column("free_ns", np.float64),
            column("size", np.int64),
        )

    def _fit(self, made: pd.DataFrame, new: np.ndarray, freed: np.ndarray) -> None:
        """Sums at the fit's instants: + the allocations made in this window, - those freed
        in it (at their free)."""
        if not self.fit or made.empty:
            return
        pid = made["pid"].to_numpy(np.int64)
        for p, f in self.fit.items():
            mine = pid == p
            if not mine.any():
                continue
            sizes = f.rounding(made["size"].to_numpy()[mine]).astype(np.int64)
            born = mine & new
            f.live += bytes_by(
                made["alloc_ns"].to_numpy(np.float64)[born], sizes[new[mine]], f.stamps
            )
            gone = freed[mine]
            f.live -= bytes_by(
                made["free_ns"].to_numpy(np.float64)[mine][gone], sizes[gone], f.stamps
            )

    def attribution(self, bound: float, paired: Callable[[], object]) -> Attribute:
        """For reads whose first edge is in this window: the bytes of their buffer inside
        the allocation holding it then (NaN: their first edge comes later; 0: they span no
        edge). The walkers' blocks hold their buffers whenever these were read into.
        `paired()` returns once this window's allocations are paired."""
        edges = self.series.edges
        assert edges is not None
        m = len(edges)
        held: list[dict[str, np.ndarray]] = []  # this window's allocations, once sorted

        def attribute(
            pid: np.ndarray,
            addr: np.ndarray,
            length: np.ndarray,
            start: np.ndarray,
            end: np.ndarray,
        ) -> np.ndarray:
            out = np.full(len(pid), np.nan)
            first = self.series.first_edge(start)
            at = edges[np.minimum(first, m - 1)].astype(np.float64)
            spans = (first < m) & ~(at >= np.nan_to_num(end, nan=np.inf))
            out[~spans] = 0.0
            now = spans & (at < bound)
            if not now.any():
                return out
            if not held:
                paired()
                held.append(_by_address(self.made, self.walked))
            allocations = held[0]
            for f in np.unique(first[now]).tolist():
                these = np.flatnonzero(now & (first == f))
                e = float(edges[f])
                live = (allocations["alloc_ns"] <= e) & ~(allocations["free_ns"] <= e)
                out[these] = _inside(allocations, live, pid[these], addr[these], length[these])
            return out

        return attribute


def _by_address(made: pd.DataFrame, walked: pd.DataFrame) -> dict[str, np.ndarray]:
    """Allocation intervals (and the walkers' blocks, live at any time) sorted by (pid,
    address), as arrays."""
    columns = {
        "pid": np.concatenate([made["pid"].to_numpy(np.int64), walked["pid"].to_numpy(np.int64)]),
        "addr": np.concatenate(
            [made["addr"].to_numpy(np.uint64), walked["addr"].to_numpy(np.uint64)]
        ),
        "size": np.concatenate(
            [made["size"].to_numpy(np.uint64), walked["size"].to_numpy(np.uint64)]
        ),
        "alloc_ns": np.concatenate(
            [made["alloc_ns"].to_numpy(np.float64), np.full(len(walked), -np.inf)]
        ),
        "free_ns": np.concatenate(
            [made["free_ns"].to_numpy(np.float64), np.full(len(walked), np.nan)]
        ),
    }
    order = np.lexsort((columns["addr"], columns["pid"]))
    return {k: v[order] for k, v in columns.items()}


def _inside(
    allocations: dict[str, np.ndarray],
    live: np.ndarray,
    pid: np.ndarray,
    addr: np.ndarray,
    length: np.ndarray,
) -> np.ndarray:
    """The bytes of each buffer (pid, addr, length) inside the live allocation holding it
    (0: none). Allocations of a process never overlap at one instant."""
    out = np.zeros(len(pid))
    rows = np.flatnonzero(live)
    owners = allocations["pid"][rows]
    addr = addr.astype(np.uint64)
    length = length.astype(np.uint64)
    for p in np.unique(pid).tolist():
        mine = rows[owners == p]
        if not len(mine):
            continue
        starts = allocations["addr"][mine]
        ends = starts + allocations["size"][mine]
        these = np.flatnonzero(pid == p)
        a = addr[these]
        pos = np.searchsorted(starts, a, side="right") - 1
        found = pos >= 0
        pos = np.maximum(pos, 0)
        inside = found & (a < ends[pos])
        overlap = np.minimum(a + length[these], ends[pos]) - a
        out[these] = np.where(inside, overlap, 0).astype(np.float64)
    return out


@dataclass
class WritesAtEnd:
    summary: pd.DataFrame  # write_summary()'s columns, per pid
    buffers: pd.DataFrame  # pid, addr, len: every buffer a write sent from, once


MERGE_EVERY = 16  # windows' write buffers kept apart before they are merged


def _distinct_buffers(pieces: list[pd.DataFrame]) -> pd.DataFrame:
    """Each buffer (pid, addr) of `pieces` once, as first seen."""
    return _stacked(*pieces).drop_duplicates(["pid", "addr"])


class WritePass:
    """Writes to sockets, paired like reads: pending at the end and at peak, sent."""

    def __init__(self, series: EdgeSeries) -> None:
        self.series = series
        self.carry = empty("writes")
        self.peaks = Peaks()
        self.sums: list[pd.DataFrame] = []
        self.buffers: list[pd.DataFrame] = []

    def window(self, low: float, ev: dict[str, pd.DataFrame]) -> None:
        writes = ev.get("writes", self.carry.iloc[0:0])
        if not writes.empty:
            seen = writes[["pid", "addr", "len"]].drop_duplicates(["pid", "addr"])
            self.buffers.append(seen)
            if len(self.buffers) >= MERGE_EVERY:  # not the whole set again every window
                self.buffers = [_distinct_buffers(self.buffers)]
        iv = read_intervals(
            _stacked(self.carry, writes), ev.get("write_completions", empty("write_completions"))
        )
        if iv.empty:
            return
        column = columns_of(iv, None)
        new = column("post_ns", np.float64) >= low
        end = column("end_ns", np.float64)
        is_open = np.isnan(end)
        pid = column("pid", np.int64)
        self.peaks.add(
            steps_of(pid, column("post_ns", np.int64), end, column("len", np.int64), new)
        )
        ret = column("ret", np.float64)
        done = ret > 0
        codes, pids = dense_codes(pid)
        self.sums.append(
            pd.DataFrame(
                {
                    "writes_completed": sums(codes, done, len(pids)),
                    "bytes_sent": sums(codes, np.where(done, ret, 0).astype(np.int64), len(pids)),
                },
                index=pids,
            )
        )
        self._spans(iv[~is_open])
        self.carry = iv[is_open].rename(columns={"post_ns": "ts_ns"})[EVENT_COLUMNS["writes"]]

    def finish(self) -> WritesAtEnd:
        pending = (
            read_intervals(self.carry, empty("write_completions"))
            if len(self.carry)
            else self.carry.rename(columns={"ts_ns": "post_ns"})
        )
        self._spans(pending)
        peaks = self.peaks.peaks([])
        self.peaks.close()
        sums = (
            pd.concat(self.sums).groupby(level=0).sum()
            if self.sums
            else pd.DataFrame(columns=["writes_completed", "bytes_sent"])
        )
        g = pending.groupby("pid")
        out = pd.DataFrame(
            {
                "pending_writes": g.size(),
                "pending_write_bytes": g["len"].sum(),
                "pending_peak": pd.Series({p: v[0] for p, v in peaks.items()}, dtype=np.int64),
                "pending_bytes_peak": pd.Series(
                    {p: v[1] for p, v in peaks.items()}, dtype=np.int64
                ),
                "writes_completed": sums["writes_completed"],
                "bytes_sent": sums["bytes_sent"],
            }
        )
        out = out.fillna(0).astype("int64")
        buffers = _distinct_buffers([empty("writes")[["pid", "addr", "len"]], *self.buffers])
        return WritesAtEnd(out, buffers)

    def _spans(self, writes: pd.DataFrame) -> None:
        if not self.series.wanted or writes.empty:
            return
        pid = writes["pid"].to_numpy(np.int64)
        post = writes["post_ns"].to_numpy(np.int64)
        end = writes["end_ns"].to_numpy(np.float64)
        self.series.spans("pending_writes", pid, post, end)
        self.series.spans("pending_write_bytes", pid, post, end, writes["len"].to_numpy(np.int64))


RESIDENT = (RssMember.ANON, RssMember.FILE, RssMember.SHMEM)
STATUS_MEMBERS = {"rss_anon": RssMember.ANON, "rss_file": RssMember.FILE,
                  "rss_shmem": RssMember.SHMEM}  # fmt: skip


def last_address_spaces(rss_parts: Iterable[pd.DataFrame], status: pd.DataFrame) -> dict[int, int]:
    """Per pid, the address space (mm_id) of its last resident-memory event: a launched
    command's pre-exec copy of the recorder is not the command. `rss_parts` in order."""
    last: dict[int, tuple[int, int]] = {}  # pid -> (ts, mm)
    for part in itertools.chain(rss_parts, [status_events(status, {})]):
        part = part[part["member"].isin([int(m) for m in RESIDENT])]
        if part.empty:
            continue
        ordered = part.sort_values("ts_ns", kind="stable")
        tail = ordered.groupby("pid").tail(1)
        for pid, ts, mm in zip(
            tail["pid"].tolist(), tail["ts_ns"].tolist(), tail["mm_id"].tolist()
        ):
            if pid not in last or ts >= last[pid][0]:
                last[int(pid)] = (int(ts), int(mm))
    return {p: mm for p, (_, mm) in last.items()}


def status_events(status: pd.DataFrame, last_mm: dict[int, int]) -> pd.DataFrame:
    """/proc/PID/status samples as resident-memory events: a sample sets the anonymous,
    file and shared counters at once; one whose address space is unknown (mm_id 0) takes
    the process's last one."""
    mm = status["mm_id"].to_numpy(np.uint64).copy()
    unknown = mm == 0
    if unknown.any() and last_mm:
        mm[unknown] = [last_mm.get(int(p), 0) for p in status["pid"].to_numpy()[unknown]]
    rows = [
        pd.DataFrame({"ts_ns": status["ts_ns"].to_numpy(np.uint64), "pid": status["pid"]
                      .to_numpy(np.uint32), "mm_id": mm, "member": np.full(len(status), int(m),
                      np.uint16), "bytes": status[column].to_numpy(np.int64)})
        for column, m in STATUS_MEMBERS.items()
    ]  # fmt: skip
    return pd.concat(rows, ignore_index=True)


class RssPass:
    """Each process's resident memory (anonymous + file + shared, of its last address
    space) as its counters change: first, now, peak, and on the time series' edges from its
    first sample on. The /proc/PID/status samples join the kmem:rss_stat events in time."""

    def __init__(self, series: EdgeSeries, last_mm: dict[int, int], status: pd.DataFrame):
        self.series = series
        self.last_mm = last_mm
        events = status_events(status, last_mm)
        self.status = events.sort_values("ts_ns", kind="stable").reset_index(drop=True)
        self.values: dict[int, np.ndarray] = {}  # pid -> each counter's last value
        self.first: dict[int, int] = {}
        self.now: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self.traced: set[int] = set()  # pids kmem:rss_stat saw

    def window(self, low: float, bound: float, ev: dict[str, pd.DataFrame]) -> None:
        ts = self.status["ts_ns"].to_numpy(np.float64)
        samples = self.status[(ts >= low) & (ts < bound)]
        traced = ev.get("rss", empty("rss"))
        self.traced.update(np.unique(traced["pid"].to_numpy()).tolist())
        events = _stacked(traced, samples)
        if events.empty:
            return
        pid = events["pid"].to_numpy(np.int64)
        mine = np.array([self.last_mm.get(int(p), -1) for p in pid], dtype=np.float64)
        keep = events["member"].isin([int(m) for m in RESIDENT]).to_numpy()
        keep = keep & (events["mm_id"].to_numpy(np.float64) == mine)
        events = events[keep].sort_values("ts_ns", kind="stable")
        events = events.drop_duplicates(["pid", "ts_ns", "member"], keep="last")
        slot = {int(m): i for i, m in enumerate(RESIDENT)}
        for p, part in events.groupby("pid", sort=True):
            stamps, at = np.unique(part["ts_ns"].to_numpy(np.int64), return_inverse=True)
            grid = np.full((len(stamps), len(RESIDENT)), np.nan)
            columns = [slot[int(m)] for m in part["member"].tolist()]
            grid[at, columns] = part["bytes"].to_numpy(np.float64)
            before = self.values.get(int(p), np.full(len(RESIDENT), np.nan))
            filled = _forward_filled(np.vstack([before, grid]))[1:]
            self.values[int(p)] = filled[-1]
            totals = np.nan_to_num(filled).sum(axis=1).astype(np.int64)
            self.first.setdefault(int(p), int(totals[0]))
            self.now[int(p)] = int(totals[-1])
            self.peak[int(p)] = max(self.peak.get(int(p), 0), int(totals.max()))
            self.series.level("rss_bytes", int(p), stamps, totals)


def _forward_filled(grid: np.ndarray) -> np.ndarray:
    """Each column's NaNs filled with the last value above them (NaN before the first)."""
    rows = np.arange(len(grid))[:, None]
    index = np.where(np.isnan(grid), 0, rows)
    index = np.maximum.accumulate(index, axis=0)
    out = grid[index, np.arange(grid.shape[1])]
    seen = np.maximum.accumulate(~np.isnan(grid), axis=0)
    return np.where(seen, out, np.nan)
