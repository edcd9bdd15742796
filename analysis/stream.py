"""The relate step in passes over a trace's parts: any size, bounded memory.

`summarize` loads every table whole; at a million events a second a ten-minute recording no
longer fits in memory. `relate` reads the parts of the big tables (posts, completions,
allocs, frees) a window of time at a time and keeps only what is still open between windows:

- Windows. Each part's first and last timestamp come from meta.json (or, for older traces,
  the part's Parquet footer). Parts are loaded in order of their first timestamp; after
  each load, every event earlier than the first timestamp of the parts not loaded yet is
  complete - no part still to come can hold one - and is related as one window. Parts that
  overlap in time simply wait together.
- Read lifetimes. A window's posts and completions are paired by `read_intervals`, with the
  reads still open (carried from the windows before) put in front of its posts: a carried
  post is older than any event of the window, so the pairing is the one over the whole
  trace. The allocations the same way (`allocation_intervals`), carrying the live ones.
- What a finished read leaves: additive or extreme figures per process and per connection
  (`read_summary`, `read_activity`), each connection's last data buffer (`LastData`: the
  retained buffers), and its +1 / -1 steps of the posted count.
- Reads parked after EAGAIN (Go's netpoller, `parked_reads`) and parked reads found at
  attach (`parked_at_attach`) need the next read on the same descriptor and buffer, which
  may come windows later, and a readiness wait in between (the waits are streamed with the
  reads): `Parking` decides each EAGAIN return as soon as it can, and the reads parked at
  attach wait in `NextPost` to the end. Their steps come late, so from the first such
  read the steps are kept (on disk beyond STEPS_IN_MEMORY) and the peaks climbed in time
  order at the end.

What stays whole in memory: the reads open at a window boundary, the live allocations,
one row per connection, EAGAIN returns not decided yet and readiness waits not seen to end,
and the small tables (processes, sockets, walked heap blocks, mappings). The figures are
exactly those of `summarize` for the same trace (tests/unit/test_stream.py compares them,
`relation_of`); those it does not compute - the whole cost, allocation sites, writes,
residency, heap and RSS figures - need the in-memory report.
"""

from __future__ import annotations

import math
import queue
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from analysis.memory import (
    LastData,
    allocation_intervals,
    buffer_attribution,
    connections_from_activity,
    idle_connection_cost,
    idle_reads,
    live_at,
    merge_activity,
    read_activity,
    timeline_edges,
)
from analysis.reads import (
    EAGAIN,
    _next_post,
    columns_of,
    is_network,
    network_reads,
    parked_of,
    read_intervals,
    read_summary,
    wait_spans,
    waiting_between,
)
from analysis.results import (
    NOT_IN_JSON,
    Buffers,
    ConnectionCounts,
    NowAndPeak,
    Provenance,
    Result,
    TraceSummary,
    Unknown,
    connection_table_json,
)
from analysis.summary import (
    NETWORK_SOURCES,
    _intermediate,
    _stacked,
    _totals,
    buffer_unknowns,
    mappings_live,
    posted_provenance,
    quiet_unknowns,
    step_for_span,
    walked_for,
    with_mapped_bytes,
)
from probes.format import schema
from probes.format.errors import TraceError
from probes.format.reader import PartRef, read_meta, read_table, table_parts
from probes.format.schema import Source

WINDOW_ROWS = 500_000  # events loaded before a window is related (measured fastest at 10M)
# what summarize() holds per event of the big tables at its peak (measured: 2.0 GiB at 10M)
IN_MEMORY_BYTES_PER_EVENT = 215
BIG_TABLES = ("posts", "completions", "allocs", "frees", "waits", "wait_ends")
STEPS_IN_MEMORY = 2_000_000  # posted-count steps kept in memory before they go to disk

POST_COLUMNS = ["ts_ns", "pid", "tid", "fd", "source", "op", "key", "addr", "len", "flags"]
COMPLETION_COLUMNS = ["ts_ns", "pid", "source", "key", "ret"]
WAIT_COLUMNS = ["ts_ns", "pid", "tid"]  # readiness waits and their ends
READ_TABLES = {
    "posts": POST_COLUMNS,
    "completions": COMPLETION_COLUMNS,
    "waits": WAIT_COLUMNS,
    "wait_ends": WAIT_COLUMNS,
}
ALLOC_COLUMNS = ["ts_ns", "pid", "addr", "size"]
FREE_COLUMNS = ["ts_ns", "pid", "addr"]
SOCKET_COLUMNS = [
    "ts_ns",
    "pid",
    "fd",
    "inode",
    "family",
    "state",
    "local",
    "remote",
    "rmem_alloc",
    "wmem_queued",
    "fwd_alloc",
]


@dataclass
class RelatedProcess(Result):
    """One process's related figures at the end of the recording. The memory side (None
    when the trace was recorded without --memory) as `report` shows it."""

    pid: int
    comm: str
    posted_reads: NowAndPeak
    pinned_bytes: NowAndPeak
    buffer_select_posted: int
    reads_completed: int  # network reads (with multishot's intermediate completions)
    reads_failed: int
    bytes_received: int
    by_source: dict[str, int] = field(default_factory=dict)  # posted now, per source
    # the reads posted now: seen live or found at attach, and what could not be found
    provenance: Provenance = field(default_factory=Provenance)
    connections: ConnectionCounts | None = None
    io_buffer_bytes: int | None = None  # posted buffers' bytes in heap allocations
    mapped_bytes: int | None = None  # ... in mappings the program made itself
    idle_io_buffer_bytes: int | None = None
    idle_posted_reads: int | None = None
    io_buffer_unknown: list[Unknown] = field(default_factory=list)  # buffers not seen in full
    # each connection's last data buffer still held (a pool's once); those of idle ones
    held_data_buffers: Buffers | None = None
    retained: Buffers | None = None
    retained_unknown: list[Unknown] = field(default_factory=list)  # idle since the attach
    # idle connections' user buffers (posted, parked, retained), and per idle connection
    # those plus the kernel's socket memory (PerIdleConnection's measured figures)
    idle_user_buffer_bytes: int | None = None
    per_idle_connection_bytes: float | None = None
    # analysis.memory.connection_table(), this process's rows
    connection_rows: pd.DataFrame = field(default_factory=pd.DataFrame, metadata=NOT_IN_JSON)

    def to_json(self, connections: bool = False) -> dict[str, Any]:
        out = super().to_json()
        if connections and self.connections is not None:
            out["connection_table"] = connection_table_json(self.connection_rows)
        return out


@dataclass
class RelatedPoint(Result):
    pid: int
    t_s: float
    posted_reads: int
    pinned_bytes: int


@dataclass
class Relation(Result):
    """What `relate` found, and how: the events it read, in how many windows."""

    processes: list[RelatedProcess]
    idle_threshold_s: float
    events: int = 0
    windows: int = 0
    timeline: list[RelatedPoint] | None = None

    def to_json(self, connections: bool = False) -> dict[str, Any]:
        out = super().to_json()
        out["processes"] = [p.to_json(connections) for p in self.processes]
        return out

    def process(self, pid: int) -> RelatedProcess:
        (found,) = [p for p in self.processes if p.pid == pid]
        return found


def relation_of(summary: TraceSummary) -> Relation:
    """The figures `relate` computes, taken from the in-memory `summarize` of the same
    trace (and the same --timeline): what the two paths must agree on."""
    processes = []
    for p in summary.processes:
        m = p.memory
        processes.append(
            RelatedProcess(
                pid=p.pid,
                comm=p.comm,
                posted_reads=p.posted_reads,
                pinned_bytes=p.pinned_bytes,
                buffer_select_posted=p.buffer_select_posted,
                reads_completed=p.reads_completed,
                reads_failed=p.reads_failed,
                bytes_received=p.bytes_received,
                by_source={k: v.posted_reads for k, v in p.by_source.items() if v.posted_reads},
                provenance=p.provenance,
                connections=m.connections if m else None,
                io_buffer_bytes=m.io_buffer_heap.bytes if m else None,
                mapped_bytes=m.io_buffer_heap.mapped_bytes if m else None,
                idle_io_buffer_bytes=m.io_buffer_heap.idle_bytes if m else None,
                idle_posted_reads=m.idle_posted_reads if m else None,
                io_buffer_unknown=m.io_buffer_heap.unknown if m else [],
                held_data_buffers=m.held_data_buffers if m else None,
                retained=Buffers(m.retained.buffers, m.retained.bytes) if m else None,
                retained_unknown=m.retained.unknown if m else [],
                idle_user_buffer_bytes=m.per_idle_connection.user_buffer_bytes if m else None,
                per_idle_connection_bytes=m.per_idle_connection.bytes if m else None,
                connection_rows=m.connection_rows if m else pd.DataFrame(),
            )
        )
    reading = {p.pid for p in processes if p.posted_reads.peak}  # in the posted timeline
    timeline = None
    if summary.timeline is not None:
        timeline = [
            RelatedPoint(t.pid, t.t_s, t.posted_reads, t.pinned_bytes)
            for t in summary.timeline
            if t.pid in reading
        ]
    return Relation(
        [p for p in processes if worth_showing(p)], summary.idle_threshold_s, timeline=timeline
    )


def trace_events(path: str | Path) -> int:
    """Rows of the big tables (posts, completions, allocs, frees, readiness waits), from
    meta.json's list of parts (or the parts' footers): what relating the trace costs, before
    reading it."""
    path = Path(path)
    meta = read_meta(path)
    events = 0
    for name in BIG_TABLES:
        for ref in table_parts(path, schema.TABLES[name], meta):
            events += ref.expect.rows if ref.expect is not None else ref.time_range()[0]
    return events


# --- windows over parts ----------------------------------------------------------------------


@dataclass
class _Part:
    table: str
    ref: PartRef
    rows: int
    first_ns: int
    last_ns: int


def _planned(
    path: Path, tables: dict[str, list[str]], meta: Any, warnings: list[str]
) -> list[_Part]:
    parts = []
    for name in tables:
        for ref in table_parts(path, schema.TABLES[name], meta, warnings):
            rows, first, last = ref.time_range()
            if rows:
                parts.append(_Part(name, ref, rows, first, last))
    return sorted(parts, key=lambda p: p.first_ns)  # stable: a table's parts keep their order


def windows(
    parts: list[_Part], columns: dict[str, list[str]], window_rows: int
) -> Iterator[tuple[float, dict[str, pd.DataFrame]]]:
    """(bound, each table's events earlier than `bound` not yielded before), in time order;
    the last bound is +inf. Every event comes out exactly once, each part is read once.

    The windows are put together on a thread of their own, one ahead: reading, decoding and
    cutting parts (Arrow lets go of the GIL) while the caller relates the window before."""
    ready: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        """Hand `item` over unless the caller has stopped listening."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for window in _assembled(parts, columns, window_rows):
                if not offer(window):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
            offer(exc)
            return
        offer(None)

    producer = threading.Thread(target=produce, name="idlebuf-windows", daemon=True)
    producer.start()
    try:
        while (window := ready.get()) is not None:
            if isinstance(window, BaseException):
                raise window
            yield window
    finally:
        stop.set()
        producer.join()


def _assembled(
    parts: list[_Part], columns: dict[str, list[str]], window_rows: int
) -> Iterator[tuple[float, dict[str, pd.DataFrame]]]:
    """windows(), put together where it is called."""
    waiting: dict[str, list[pa.Table]] = {}
    i = 0
    while i < len(parts):
        loaded = 0
        while i < len(parts) and (loaded == 0 or loaded < window_rows):
            p = parts[i]
            waiting.setdefault(p.table, []).append(_within(p, p.ref.read(columns[p.table])))
            loaded += p.rows
            i += 1
        bound = float(parts[i].first_ns) if i < len(parts) else math.inf
        out = {}
        for name, pieces in waiting.items():
            rows = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
            if bound == math.inf:
                early, waiting[name] = rows, []
            else:
                ts_type = rows.schema.field("ts_ns").type
                cut = pc.less(rows["ts_ns"], pa.scalar(int(bound), ts_type))
                early, waiting[name] = rows.filter(cut), [rows.filter(pc.invert(cut))]
            out[name] = early.to_pandas(split_blocks=True, use_threads=False)
        yield bound, out


def _within(part: _Part, rows: pa.Table) -> pa.Table:
    """The part's rows, once their times are within those it was planned by (meta.json's
    word for them, or its footer's)."""
    if rows.num_rows:
        bounds = pc.min_max(rows["ts_ns"])
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if low < part.first_ns or high > part.last_ns:
            raise TraceError(
                f"{part.ref.path}/{part.ref.name} holds events from {low} to {high} ns, "
                f"outside the {part.first_ns} to {part.last_ns} it is listed with"
            )
    return rows


# --- the posted count's steps ---------------------------------------------------------------


Chunk = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # pid, ts, d_reads, d_bytes


def _loaded(chunk: Chunk | Path) -> Chunk:
    if isinstance(chunk, Path):
        with np.load(chunk) as saved:
            return tuple(saved[f"arr_{i}"] for i in range(4))  # type: ignore[return-value]
    return chunk


class Steps:
    """The +1 / -1 steps of the posted count (and +len / -len of pinned bytes) per pid, in
    time order window by window: the values at the time series' edges, and the peaks.

    Peaks need the steps in time order, and the steps of parked reads come late (at the
    end). So the steps are climbed as they come until `hold()` (the first read that may
    park), and kept from then on - in memory up to STEPS_IN_MEMORY, beyond in a temporary
    directory - to be climbed with the late ones merged in by `peaks`."""

    def __init__(self, edges: np.ndarray | None) -> None:
        self.edges = edges
        self.held: list[Any] = []  # kept chunks: arrays, or the path of a saved one
        self.firsts: list[int] = []  # each kept chunk's first step (they come in time order)
        self.in_memory = 0
        self.holding = False
        self.spill: tempfile.TemporaryDirectory[str] | None = None
        self.on_edges: dict[int, np.ndarray] = {}  # pid -> [posted, pinned] at each edge
        self.running: dict[int, np.ndarray] = {}  # pid -> [posted, pinned] after the last step
        self.best: dict[int, np.ndarray] = {}

    def hold(self) -> None:
        """From now on steps may come late among those of the next windows: keep them."""
        self.holding = True

    def add(
        self, pid: np.ndarray, ts: np.ndarray, d_reads: np.ndarray, d_bytes: np.ndarray
    ) -> None:
        if not len(ts):
            return
        chunk = (pid, ts, d_reads, d_bytes)
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
        as posted_timeline orders them) from the running values, raising the peaks."""
        pid, ts, d_reads, d_bytes = chunk
        low, high = int(ts.min()), int(ts.max())
        key = ts - low
        key *= 2
        key += d_reads > 0
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
                order = np.lexsort((d_reads > 0, ts, pid))
            bounds = np.searchsorted(inverse[order], np.arange(len(ids) + 1))
            groups = [(int(p), slice(bounds[i], bounds[i + 1])) for i, p in enumerate(ids)]
        del key
        for p, rows in groups:
            at = order[rows]
            base = self.running.get(p, np.zeros(2, np.int64))
            posted = np.cumsum(d_reads[at], dtype=np.int64) + base[0]
            pinned = np.cumsum(d_bytes[at], dtype=np.int64) + base[1]
            self.running[p] = np.array([posted[-1], pinned[-1]])
            high_here = np.array([posted.max(), pinned.max()])
            self.best[p] = np.maximum(self.best.get(p, high_here), high_here)
            if self.edges is not None and len(self.edges):
                # the value at an edge: after the last step at or before it; edges before
                # this chunk's first step keep what the chunks before left there
                values = self.on_edges.setdefault(p, np.zeros((2, len(self.edges)), np.int64))
                last = np.searchsorted(ts[at], self.edges, side="right") - 1
                reached = last >= 0
                values[0, reached] = posted[last[reached]]
                values[1, reached] = pinned[last[reached]]

    def peaks(self, late: Chunk | None) -> dict[int, tuple[int, int]]:
        """Per pid, the highest posted count and pinned bytes at any instant, the `late`
        steps (none before the hold) merged into the kept ones."""
        kept: Iterator[Chunk] = (_loaded(c) for c in self.held)
        if late is not None and len(late[1]):
            order = np.argsort(late[1], kind="stable")
            late = tuple(a[order] for a in late)  # type: ignore[assignment]
            assert late is not None
            if not self.held:
                kept = iter([late])
            else:  # kept chunk i takes the late steps from its first step to chunk i + 1's
                cuts = np.searchsorted(late[1], self.firsts[1:])
                pieces = zip(*(np.split(a, cuts) for a in late))
                kept = (
                    tuple(np.concatenate([a, b]) for a, b in zip(c, x))  # type: ignore[misc]
                    for c, x in zip(kept, pieces)
                )
        for chunk in kept:
            self._climb(chunk)
        return {p: (int(v[0]), int(v[1])) for p, v in self.best.items()}

    def at_edges(self) -> dict[int, np.ndarray]:
        """Per pid, [posted reads, pinned bytes] at each edge (once `peaks` has climbed the
        steps held back)."""
        return self.on_edges

    def close(self) -> None:
        if self.spill is not None:
            self.spill.cleanup()


def _steps_of(reads: pd.DataFrame, new: np.ndarray, where: np.ndarray | None = None) -> Chunk:
    """The steps of `reads` (the rows `where` says): +1 at the post of those `new` (posted
    in this window), -1 at the end of those that ended."""
    column = columns_of(reads, where)
    if where is not None:
        new = new[where]
    end = column("end_ns", np.float64)
    ended = ~np.isnan(end)
    pid = column("pid", np.int64)
    length = column("len", np.int64)
    return (
        np.concatenate([pid[new], pid[ended]]),
        np.concatenate([column("post_ns", np.int64)[new], end[ended].astype(np.int64)]),
        np.concatenate([np.ones(int(new.sum()), np.int8), -np.ones(int(ended.sum()), np.int8)]),
        np.concatenate([length[new], -length[ended]]),
    )


# --- lookups ahead in time ------------------------------------------------------------------


class NextPost:
    """For rows seen so far: when the process next posted a syscall read on the same fd,
    strictly after a time - found as later windows pass, as analysis.reads._next_post finds
    it over the whole trace (the end of a read parked at attach)."""

    def __init__(self) -> None:
        self.pending = pd.DataFrame(columns=["seq", "pid", "fd", "_t"])
        self.found: dict[int, float] = {}

    def ask(self, rows: pd.DataFrame, time_col: str) -> None:
        if rows.empty:
            return
        asked = pd.DataFrame(
            {
                "seq": rows["seq"].to_numpy(np.int64),
                "pid": rows["pid"].to_numpy(),
                "fd": rows["fd"].to_numpy(),
                "_t": rows[time_col].to_numpy(np.float64),
            }
        )
        self.pending = asked if self.pending.empty else pd.concat([self.pending, asked])

    def waiting(self) -> bool:
        return not self.pending.empty

    def answer(self, posts: pd.DataFrame) -> None:
        """`posts`: syscall reads posted in one window, after every earlier window's."""
        if self.pending.empty or posts.empty:
            return
        pending = self.pending.reset_index(drop=True)
        got = _next_post(pending, "_t", posts, ["pid", "fd"], "at").to_numpy()
        done = ~np.isnan(got)
        self.found.update(zip(pending["seq"].to_numpy()[done].tolist(), got[done].tolist()))
        self.pending = pending[~done]

    def values(self, seqs: pd.Series, missing: float) -> np.ndarray:
        return np.array([self.found.get(int(s), missing) for s in seqs], dtype=np.float64)


class Parking:
    """EAGAIN returns that may be parked reads (analysis.reads.parked_reads), decided as the
    windows pass rather than at the end, so that a Go server's millions of them are never
    all held: one is parked when the next read on its fd (`at`, its end) and the next read
    into its buffer (`next_fd`: the same fd, or none) are known, and a readiness wait was in
    progress at some moment in between (`covered`). The waits are streamed alongside: those
    of a window, and those begun earlier not seen to end, are checked against the EAGAIN
    returns not covered yet; a wait that ended is not needed by any later EAGAIN."""

    def __init__(self) -> None:
        self.pending = pd.DataFrame()
        self.open_waits = pd.DataFrame(columns=["pid", "tid", "ts_ns"])

    def add(self, eagain: pd.DataFrame) -> None:
        rows = eagain.assign(at=np.nan, next_fd=np.nan, covered=False)
        self.pending = rows if self.pending.empty else pd.concat([self.pending, rows])

    def window(
        self, posts: pd.DataFrame, waits: pd.DataFrame, wait_ends: pd.DataFrame
    ) -> pd.DataFrame:
        """One window: `posts` its syscall reads (posted in it), `waits` and `wait_ends`
        its readiness waits. The parked reads decided now, as parked_reads() makes them."""
        begun = _stacked(self.open_waits, waits[["pid", "tid", "ts_ns"]])
        spans = wait_spans(begun, wait_ends) if not begun.empty else None
        if spans is not None:
            self.open_waits = (
                spans.loc[np.isinf(spans["end"]), ["pid", "tid", "begin"]]
                .rename(columns={"begin": "ts_ns"})
                .reset_index(drop=True)
            )
        if self.pending.empty:
            return iv_empty()
        p = self.pending.reset_index(drop=True)
        if not posts.empty:
            for by, value, column in (("fd", "at", "at"), ("addr", "next_fd", "next_fd")):
                todo = np.flatnonzero(p[column].isna().to_numpy())
                if len(todo):
                    found = _next_post(p.iloc[todo], "end_ns", posts, ["pid", by], value)
                    p.loc[todo, column] = found.to_numpy()
        if spans is not None:
            todo = np.flatnonzero(~p["covered"].to_numpy(bool))
            if len(todo):
                rows = p.iloc[todo].assign(retry=p["at"].iloc[todo])
                p.loc[todo, "covered"] = waiting_between(rows, spans).to_numpy(bool)
        decided = p["at"].notna().to_numpy() & p["next_fd"].notna().to_numpy()
        self.pending = p[~decided]
        return self._parked(p[decided])

    def finish(self) -> pd.DataFrame:
        """Those still undecided at the end: no next read (still parked), or their buffer
        never read into again."""
        rows, self.pending = self.pending, pd.DataFrame()
        if rows.empty:
            return iv_empty()
        return self._parked(rows.assign(next_fd=rows["next_fd"].fillna(-1.0)))

    @staticmethod
    def _parked(rows: pd.DataFrame) -> pd.DataFrame:
        """The decided `rows` that are parked reads, as parked_reads() makes them."""
        next_fd = rows["next_fd"].to_numpy()
        kept = rows[rows["covered"].to_numpy(bool) & ((next_fd == -1) | (next_fd == rows["fd"]))]
        candidates = kept.drop(columns=["at", "next_fd", "covered"])
        return parked_of(candidates, kept["at"], kept["next_fd"], None, None)


class _Digests:
    """What each window's finished reads leave - read_summary of all, read_activity of the
    network ones, their steps - worked out on a thread of its own in window order, and
    merged every few windows so that a long trace keeps a few frames, not one per window."""

    MERGE_EVERY = 16

    def __init__(self, steps: Steps) -> None:
        self.steps = steps
        self.pool = ThreadPoolExecutor(1)
        self.pending: deque[Future[tuple[pd.DataFrame, pd.DataFrame]]] = deque()
        self.counts: list[pd.DataFrame] = []
        self.activity: list[pd.DataFrame] = []
        self.data = LastData()
        self.late_steps: list[Chunk] = []

    def hold(self) -> None:
        self.pool.submit(self.steps.hold)  # in order: after the windows before it

    def add(
        self, iv: pd.DataFrame, new: np.ndarray, is_open: np.ndarray, seeded: np.ndarray
    ) -> None:
        self.pending.append(self.pool.submit(self._digest, iv, new, is_open, seeded))
        while len(self.pending) > 1:  # at most one window in flight
            self._collect(self.pending.popleft().result())

    def _digest(
        self, iv: pd.DataFrame, new: np.ndarray, is_open: np.ndarray, seeded: np.ndarray
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        network = ~seeded & is_network(iv)
        self.steps.add(*_steps_of(iv, new, network))
        ended = network & ~is_open
        self.data.add(iv, ended)
        return read_summary(iv, ~is_open & ~seeded), read_activity(iv, ended)

    def _collect(self, done: tuple[pd.DataFrame, pd.DataFrame]) -> None:
        self.counts.append(done[0])
        self.activity.append(done[1])
        if len(self.counts) >= self.MERGE_EVERY:
            self.counts = [merge_counts(self.counts)]
            self.activity = [merge_activity(self.activity)]

    def late(self, reads: pd.DataFrame) -> None:
        """Reads decided after their window: parked ones (their steps are merged in by
        Steps.peaks at the end)."""
        if reads.empty:
            return
        self.pending.append(self.pool.submit(self._digest_late, reads))

    def _digest_late(self, reads: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        network = network_reads(reads)
        self.late_steps.append(_steps_of(network, np.ones(len(network), bool)))
        self.data.add(network)
        return read_summary(reads), read_activity(network)

    def finish(self) -> tuple[list[pd.DataFrame], list[pd.DataFrame], Chunk | None]:
        """(the counts, the activity, the late steps)."""
        try:
            while self.pending:
                self._collect(self.pending.popleft().result())
        finally:
            self.pool.shutdown(cancel_futures=True)
        late = None
        if self.late_steps:
            late = tuple(np.concatenate(a) for a in zip(*self.late_steps))
        return self.counts, self.activity, late  # type: ignore[return-value]


def merge_counts(pieces: list[pd.DataFrame]) -> pd.DataFrame:
    """read_summary() of several pieces of a trace's reads, as of all of them."""
    full = [p for p in pieces if not p.empty]
    if len(full) <= 1:
        return full[0] if full else pieces[0]
    out = pd.concat(full).groupby(["pid", "source", "label"], sort=True).sum().reset_index()
    return out.astype({c: "int64" for c in out.columns if c not in ("source", "label")})


# --- relate ---------------------------------------------------------------------------------


def relate(
    path: str | Path,
    idle_threshold_s: float = 1.0,
    timeline_s: float | None = None,
    window_rows: int = WINDOW_ROWS,
    progress: Callable[[str], None] = lambda _: None,
) -> Relation:
    """The relate step of `summarize` over a trace of any size: read lifetimes, the address
    join of posted buffers to live allocations, the per-connection table, the posted count's
    time series. `progress` is told how far it got after each window."""
    path = Path(path)
    meta = read_meta(path)
    warnings: list[str] = []
    small = {
        name: read_table(path, schema.TABLES[name], meta, warnings)
        for name in ("processes", "heap_blocks", "buffer_uses", "maps", "unmaps")
    }
    small["sockets"] = _sockets(path, meta, warnings)
    reads_plan = _planned(path, READ_TABLES, meta, warnings)
    alloc_plan = _planned(path, {"allocs": ALLOC_COLUMNS, "frees": FREE_COLUMNS}, meta, warnings)
    start, end_ns = _span(path, meta, warnings)
    edges = None
    if timeline_s is not None:
        step = step_for_span(start, end_ns, timeline_s)
        edges = timeline_edges(start, end_ns, max(1, int(step * 1e9)))
    steps = Steps(edges)
    job = _Job(path, meta, small, warnings, end_ns, int(idle_threshold_s * 1e9), window_rows)
    job.total = sum(p.rows for p in reads_plan + alloc_plan)
    job.progress = progress
    try:
        out = job.run(reads_plan, alloc_plan, steps)
        out.idle_threshold_s = idle_threshold_s
        if edges is not None:
            out.timeline = [
                RelatedPoint(pid, float((edge - start) / 1e9), int(v[0, i]), int(v[1, i]))
                for pid, v in sorted(steps.at_edges().items())
                for i, edge in enumerate(edges)
            ]
    finally:
        steps.close()
    return out


def _span(path: Path, meta: Any, warnings: list[str]) -> tuple[int, int]:
    """recording_span() of the trace, from the parts' footers: (start, end)."""
    stamps = []
    if meta.end_monotonic_ns is None or not (meta.tracing_since_ns or meta.clock.monotonic_ns):
        for table in schema.TABLES.values():
            if "ts_ns" not in table.column_names():
                continue
            for ref in table_parts(path, table, meta, warnings):
                rows, first, last = ref.time_range()
                if rows:
                    stamps.append((first, last))
    end = meta.end_monotonic_ns
    if end is None:
        end = max((last for _, last in stamps), default=0)
    start = meta.tracing_since_ns or meta.clock.monotonic_ns
    if not start:
        start = min((first for first, _ in stamps), default=end)
    return start, max(start, end)


def _sockets(path: Path, meta: Any, warnings: list[str]) -> pd.DataFrame:
    """The socket samples, their strings as categories (a sample per connection per flush
    repeats a handful of families and states millions of times)."""
    refs = table_parts(path, schema.SOCKETS, meta, warnings)
    if not refs:
        return read_table(path, schema.SOCKETS, meta, warnings)
    pieces = [r.read(SOCKET_COLUMNS).to_pandas() for r in refs]
    out = pd.concat(pieces, ignore_index=True) if len(pieces) > 1 else pieces[0]
    for col in ("family", "state", "local", "remote"):
        out[col] = out[col].astype("category")
    return out


@dataclass
class _Job:
    path: Path
    meta: Any
    small: dict[str, pd.DataFrame]
    warnings: list[str]
    end_ns: int
    threshold_ns: int
    window_rows: int
    total: int = 0
    events: int = 0
    windows: int = 0
    progress: Callable[[str], None] = lambda _: None
    stopping: threading.Event = field(default_factory=threading.Event)
    counting: threading.Lock = field(default_factory=threading.Lock)

    def run(self, reads_plan: list[_Part], alloc_plan: list[_Part], steps: Steps) -> Relation:
        retry = NextPost()  # for the reads parked at attach
        # the allocations are related on a second thread meanwhile (numpy, pandas' sorts
        # and Arrow's reads let go of the GIL): the machine's second core
        with ThreadPoolExecutor(1) as pool:
            live = pool.submit(self._live, alloc_plan) if self.meta.memory is not None else None
            try:
                return self._reads(reads_plan, steps, retry, live)
            except BaseException:  # Ctrl-C, a damaged part: the other thread stops too
                self.stopping.set()
                raise

    def _reads(
        self,
        reads_plan: list[_Part],
        steps: Steps,
        retry: NextPost,
        live: Future[pd.DataFrame] | None,
    ) -> Relation:
        held: list[pd.DataFrame] = []  # reads parked at attach, waiting for the next read
        parking = Parking()  # EAGAIN returns: parked reads?
        carry = _empty(schema.POSTS, POST_COLUMNS).assign(seq=np.zeros(0, np.int64))
        no_completions = _empty(schema.COMPLETIONS, COMPLETION_COLUMNS)
        no_waits = _empty(schema.WAITS, WAIT_COLUMNS)
        seq = 0
        low = -math.inf
        # what a window's finished reads leave is worked out on a thread, in window order,
        # while the next window's reads are paired
        digests = _Digests(steps)
        for bound, ev in windows(reads_plan, READ_TABLES, self.window_rows):
            posts = ev.get("posts", carry.iloc[0:0].drop(columns="seq"))
            completions = ev.get("completions", no_completions)
            waits, wait_ends = ev.get("waits", no_waits), ev.get("wait_ends", no_waits)
            self._advance(len(posts) + len(completions) + len(waits) + len(wait_ends), "reads")
            posts = posts.assign(seq=np.arange(seq, seq + len(posts), dtype=np.int64))
            seq += len(posts)
            iv = read_intervals(_stacked(carry, posts), completions)
            if iv.empty:
                digests.late(parking.window(iv, waits, wait_ends))
                low = bound
                continue
            new = iv["post_ns"].to_numpy(np.float64) >= low
            source = iv["source"].to_numpy()
            seeded = source == Source.PARKED
            is_open = iv["end_ns"].isna().to_numpy()
            if seeded.any():  # parked at attach: ended by the next read on the fd
                digests.hold()
                retry.ask(iv[new & seeded], "post_ns")
                held.append(iv[~is_open & seeded])
            eagain = ~is_open & (source == Source.SYSCALL) & (iv["ret"].to_numpy() == -EAGAIN)
            if eagain.any():  # parked after EAGAIN? known when the next reads come
                digests.hold()
                parking.add(iv[eagain])
            if retry.waiting():
                retry.answer(iv[new & (source == Source.SYSCALL)])
            digests.add(iv, new, is_open, seeded)
            syscall_new = new & (source == Source.SYSCALL)
            digests.late(parking.window(iv[syscall_new], waits, wait_ends))
            carry = iv[is_open].rename(columns={"post_ns": "ts_ns"})[[*POST_COLUMNS, "seq"]]
            low = bound
        # the reads still posted at the end, and those that waited for lookups
        still = read_intervals(carry, no_completions) if not carry.empty else iv_empty()
        seeded_open = (still["source"].to_numpy() == Source.PARKED) if len(still) else None
        if seeded_open is not None and seeded_open.any():
            held.append(still[seeded_open])
            still = still[~seeded_open]
        late = _stacked(self._at_attach(held, retry), parking.finish())
        digests.late(late)
        counts, activity, late_steps = digests.finish()
        counts.append(read_summary(still))
        still, late = network_reads(still), network_reads(late)
        activity.append(read_activity(still))
        peaks = steps.peaks(late_steps)
        posted_now = _stacked(still, late[late["end_ns"].isna()])
        merged = merge_activity(activity)
        memory = None
        if live is not None and self.meta.memory is not None:
            memory = self._memory(posted_now, live.result(), merged, digests.data)
        provenance = posted_provenance(posted_now, self.meta)
        return self._result(merge_counts(counts), peaks, memory, provenance)

    def _advance(self, events: int, what: str) -> None:
        """Count a window (from either thread) and say how far the job got."""
        with self.counting:
            self.events += events
            self.windows += 1
            said = f"{what}: {self.events:,} of {self.total:,} events (window {self.windows})"
        self.progress(said)

    def _at_attach(self, held: list[pd.DataFrame], retry: NextPost) -> pd.DataFrame:
        """The reads parked at attach (parked_at_attach), ended by the next read the process
        made on the same fd, now that every read is known."""
        if not held:
            return iv_empty()
        rows = pd.concat(held, ignore_index=True)
        rows["end_ns"] = retry.values(rows["seq"], np.nan)
        return rows

    def _live(self, plan: list[_Part]) -> pd.DataFrame:
        """The allocations live at the end (live_at of allocation_intervals), a window at a
        time, carrying those not freed yet."""
        carry = _empty(schema.ALLOCS, ALLOC_COLUMNS)
        no_frees = _empty(schema.FREES, FREE_COLUMNS)
        live = []
        # put together where they are related: this is a side thread already
        for _, ev in _assembled(
            plan, {"allocs": ALLOC_COLUMNS, "frees": FREE_COLUMNS}, self.window_rows
        ):
            if self.stopping.is_set():
                return carry.iloc[0:0]
            allocs = ev.get("allocs", carry.iloc[0:0])
            frees = ev.get("frees", no_frees)
            self._advance(len(allocs) + len(frees), "allocations")
            both = _stacked(carry, allocs).assign(fn=0)
            made = allocation_intervals(both, frees)
            freed = made["free_ns"].notna().to_numpy()
            live.append(live_at(made[freed], self.end_ns, "alloc_ns", "free_ns"))
            carry = made[~freed].rename(columns={"alloc_ns": "ts_ns"})[ALLOC_COLUMNS]
        made = allocation_intervals(carry.assign(fn=0), no_frees)
        live.append(live_at(made, self.end_ns, "alloc_ns", "free_ns"))
        return _stacked(*live)

    def _memory(
        self, posted: pd.DataFrame, traced: pd.DataFrame, activity: pd.DataFrame, data: LastData
    ) -> dict[int, dict[str, Any]]:
        """Per pid, the memory side's figures, as memory_by_process computes them: `posted`
        the reads posted at the end, `traced` the allocations the probes saw live then."""
        assert self.meta.memory is not None
        probed, walked_heap, walked_maps, failed = walked_for(
            self.meta.memory, self.small["heap_blocks"]
        )
        live = _stacked(traced, walked_heap)
        mapped = mappings_live(self.small["maps"], self.small["unmaps"], walked_maps, self.end_ns)
        attributed = with_mapped_bytes(buffer_attribution(posted, live), mapped)
        # every connection's last data buffer still held, idle or not; those of idle
        # connections are the retained buffers
        held = data.buffers(posted, live, self.end_ns, 0)
        retained = held[self.end_ns - held["end_ns"] >= self.threshold_ns]
        idle = idle_reads(
            attributed,
            activity.reset_index()[["pid", "fd", "first_ns", "last_data_ns"]],
            self.end_ns,
            self.threshold_ns,
        )
        table = connections_from_activity(
            activity.copy(), self.small["sockets"], retained, self.end_ns, self.threshold_ns
        )
        cost = idle_connection_cost(table).set_index("pid")
        # what could not be seen: buffers whose allocation was not traced or not found, idle
        # connections quiet since the attach (as memory_by_process says)
        late = bool(self.meta.targets.pids)
        if self.meta.memory.alloc_probes:  # every allocator probed
            probed |= set(attributed["pid"].tolist())
        heap_unknown = buffer_unknowns(attributed, self.meta.memory, probed, failed, late)
        quiet = quiet_unknowns(table, late)
        out: dict[int, dict[str, Any]] = {}
        for pid in set(live["pid"]) | set(attributed["pid"]) | self._measured_pids():
            mine = attributed[attributed["pid"] == pid]
            conns = table[(table["pid"] == pid) & table["closed_ns"].isna()]
            kept, mine_held = retained[retained["pid"] == pid], held[held["pid"] == pid]
            out[int(pid)] = {
                "connection_rows": table[table["pid"] == pid],
                "connections": ConnectionCounts(len(conns), int(conns["idle"].sum())),
                "held_data_buffers": Buffers(
                    len(mine_held), int(mine_held["attributed_bytes"].sum())
                ),
                "retained": Buffers(len(kept), int(kept["attributed_bytes"].sum())),
                "io_buffer_bytes": int(mine["attributed_bytes"].sum()),
                "mapped_bytes": int(mine["mapped_bytes"].sum()),
                "idle_user_buffer_bytes": int(cost["user_buffer_bytes"].get(pid, 0)),
                "per_idle_connection_bytes": float(cost["per_idle_connection_bytes"].get(pid, 0.0)),
                "idle_io_buffer_bytes": int(mine.loc[idle[mine.index], "attributed_bytes"].sum()),
                "idle_posted_reads": int(idle[mine.index].sum()),
                "io_buffer_unknown": heap_unknown.get(int(pid), []),
                "retained_unknown": quiet.get(int(pid), []),
            }
        return out

    def _measured_pids(self) -> set[int]:
        """The pids whose resident memory was measured (memory_by_process reports them)."""
        pids: set[int] = set()
        for name in ("rss", "proc_status"):
            for ref in table_parts(self.path, schema.TABLES[name], self.meta, self.warnings):
                pids.update(np.unique(ref.read(["pid"])["pid"].to_numpy()).tolist())
        return pids

    def _result(
        self,
        by_label: pd.DataFrame,
        peaks: dict[int, tuple[int, int]],
        memory: dict[int, dict[str, Any]] | None,
        provenance: dict[int, Provenance],
    ) -> Relation:
        processes = self.small["processes"].drop_duplicates("pid", keep="last").set_index("pid")
        uses = self.small["buffer_uses"]
        pids = sorted(
            set(processes.index) | set(by_label["pid"]) | set(memory or ()) | set(provenance)
        )
        out = []
        for pid in pids:
            rows = by_label[by_label["pid"] == pid]
            totals = _totals(rows[rows["source"].isin(NETWORK_SOURCES)])
            extra = _intermediate(uses[uses["pid"] == pid])
            peak_reads, peak_bytes = peaks.get(int(pid), (0, 0))
            per_source = rows.groupby("source")["posted_reads"].sum()
            mem = (memory or {}).get(int(pid))
            related = RelatedProcess(
                pid=int(pid),
                comm=str(processes["comm"].get(pid, "")) if pid in processes.index else "",
                posted_reads=NowAndPeak(totals.posted_reads, peak_reads),
                pinned_bytes=NowAndPeak(totals.pinned_bytes, peak_bytes),
                buffer_select_posted=totals.buffer_select_posted,
                reads_completed=totals.reads_completed + extra.reads_completed,
                reads_failed=totals.reads_failed,
                bytes_received=totals.bytes_received + extra.bytes_received,
                by_source={str(k): int(v) for k, v in per_source.items() if v},
                provenance=provenance.get(int(pid), Provenance()),
                **(mem or {}),
            )
            out.append(related)
        return Relation(
            [p for p in out if worth_showing(p)], 0.0, events=self.events, windows=self.windows
        )


def worth_showing(p: RelatedProcess) -> bool:
    """A process that read from a socket, or held connections (not a launcher, a helper)."""
    return bool(
        p.posted_reads.peak
        or p.reads_completed
        or p.reads_failed
        or p.by_source
        or (p.connections is not None and p.connections.open)
    )


def _empty(table: schema.Table, columns: list[str]) -> pd.DataFrame:
    return table.subset(columns).arrow_schema().empty_table().to_pandas()


def iv_empty() -> pd.DataFrame:
    return read_intervals(
        _empty(schema.POSTS, POST_COLUMNS), _empty(schema.COMPLETIONS, COMPLETION_COLUMNS)
    )
