"""A trace as windows of time: the event tables read part by part, each window every event
earlier than a bound, in time order; the small tables whole.

Each part's first and last timestamp come from meta.json (or, for older traces, the part's
Parquet footer). Parts are loaded in order of their first timestamp; after each load, every
event earlier than the first timestamp of the parts not loaded yet is complete - no part
still to come can hold one - and goes out: as one window, or as several cut at times that
leave about a window's rows each when there are many more (parts bigger than a window, a
long flush's), so that a window's cost stays the same whatever the parts. Parts that
overlap in time simply wait together. With no limit on a window's rows the whole trace is
one window: "in memory" is the same analysis over a single window.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from probes.format import schema
from probes.format.errors import TraceError
from probes.format.meta import Meta
from probes.format.reader import PartRef, read_meta, read_table, table_parts

# The event tables, and the columns the analysis reads of each: read a window at a time.
EVENT_COLUMNS: dict[str, list[str]] = {
    "posts": ["ts_ns", "pid", "tid", "fd", "source", "op", "key", "addr", "len", "flags",
              "stack_id"],
    "completions": ["ts_ns", "pid", "source", "key", "ret"],
    "waits": ["ts_ns", "pid", "tid"],
    "wait_ends": ["ts_ns", "pid", "tid"],
    "allocs": ["ts_ns", "pid", "addr", "size", "stack_id"],
    "frees": ["ts_ns", "pid", "addr"],
    "writes": ["ts_ns", "pid", "tid", "fd", "source", "op", "key", "addr", "len", "flags"],
    "write_completions": ["ts_ns", "pid", "source", "key", "ret"],
    "rss": ["ts_ns", "pid", "mm_id", "member", "bytes"],
    "buffer_uses": ["ts_ns", "pid", "ring", "group", "bytes", "request"],
}  # fmt: skip
# Read whole: state and samples (one row per process, buffer or connection per flush).
STATE_TABLES = (
    "processes",
    "stacks",
    "heap_blocks",
    "maps",
    "unmaps",
    "residency",
    "buffer_groups",
    "buffer_rings",
    "proc_status",
    "memory_points",
    "waiters",
    "owned",
)
SOCKET_COLUMNS = [
    "ts_ns", "pid", "fd", "inode", "family", "ipv6", "state", "local", "remote", "rmem_alloc",
    "wmem_queued", "fwd_alloc", "epoll", "sock_type",
]  # fmt: skip
WINDOW_ROWS = 500_000  # events loaded before a window is related (measured fastest at 10M)
# windows put together ahead of the one being related: a part bigger than a window (a long
# flush's) is read and decoded while the windows before it are related
READ_AHEAD = 3


@dataclass
class Part:
    table: str
    ref: PartRef
    rows: int
    first_ns: int
    last_ns: int


@dataclass
class TraceInput:
    """An opened trace directory: its metadata, its small tables, its event tables' parts
    planned in time order, and what reading it left out (`warnings`)."""

    path: Path
    meta: Meta
    state: dict[str, pd.DataFrame]
    sockets: pd.DataFrame
    parts: list[Part]
    warnings: list[str] = field(default_factory=list)

    @property
    def events(self) -> int:
        return sum(p.rows for p in self.parts)

    def pids_of(self, table: str) -> set[int]:
        """The pids an event table names (read a part at a time, one column)."""
        pids: set[int] = set()
        for p in self.parts:
            if p.table == table:
                pids.update(np.unique(p.ref.read(["pid"])["pid"].to_numpy()).tolist())
        return pids

    def column_parts(self, table: str, columns: list[str]) -> Iterator[pd.DataFrame]:
        """An event table's parts in order, a few columns of each: for passes that need
        one table before the windows (the last address space of each process)."""
        for p in sorted((p for p in self.parts if p.table == table), key=lambda p: p.ref.name):
            yield p.ref.read(columns).to_pandas()


def open_input(path: str | Path) -> TraceInput:
    """The trace at `path`, its metadata and small tables read and checked, its parts
    planned (not read)."""
    path = Path(path)
    meta = read_meta(path)
    warnings: list[str] = []
    state = {name: read_table(path, schema.TABLES[name], meta, warnings) for name in STATE_TABLES}
    sockets = _sockets(path, meta, warnings)
    parts = []
    for name in EVENT_COLUMNS:
        refs = table_parts(path, schema.TABLES[name], meta, warnings)
        listed = 0
        for ref in refs:
            rows, first, last = ref.time_range()
            listed += rows
            if rows:
                parts.append(Part(name, ref, rows, first, last))
        declared = (meta.rows or {}).get(name) if meta.parts is None else None
        if declared is not None and listed < declared:  # older traces: the counts agree
            raise TraceError(
                f"{path / name}: meta.json says {declared:,} rows, the parts hold {listed:,}"
            )
    parts.sort(key=lambda p: p.first_ns)  # stable: a table's parts keep their order
    return TraceInput(path, meta, state, sockets, parts, warnings)


def trace_events(path: str | Path) -> int:
    """Rows of the event tables, from meta.json's list of parts (or the parts' footers):
    what analysing the trace costs, before reading it."""
    path = Path(path)
    meta = read_meta(path)
    events = 0
    for name in EVENT_COLUMNS:
        for ref in table_parts(path, schema.TABLES[name], meta):
            events += ref.expect.rows if ref.expect is not None else ref.time_range()[0]
    return events


def recording_span(trace: TraceInput) -> tuple[int, int]:
    """(start, end) of the recording, CLOCK_MONOTONIC ns: from meta.json, or the first and
    last events (a killed recording ends at its last event). The end is when events
    stopped being taken, where meta.json says: the walks made after it take time that no
    connection spent idle as far as anyone could see."""
    meta = trace.meta
    start = meta.tracing_since_ns or meta.clock.monotonic_ns
    end = meta.traced_until_ns or meta.end_monotonic_ns
    if end is None or not start:
        firsts = [p.first_ns for p in trace.parts]
        lasts = [p.last_ns for p in trace.parts]
        for df in (*trace.state.values(), trace.sockets):
            if "ts_ns" in df and not df.empty:
                firsts.append(int(df["ts_ns"].min()))
                lasts.append(int(df["ts_ns"].max()))
        if end is None:
            end = max(lasts, default=0)
        if not start:
            start = min(firsts, default=end)
    return start, max(start, end)


class Windows:
    """The trace's windows: iterated, (low, bound, each table's events from `low` to before
    `bound`), in time order; the first low is -inf, the last bound +inf. Every event comes
    out exactly once, each part is read once. `window_rows` None: one window.

    The windows are put together on a thread of their own, started when this is made (the
    first windows are read while the caller sets up), up to READ_AHEAD ahead: reading,
    decoding and cutting parts (Arrow lets go of the GIL) while the caller relates the
    windows before. Used as a context manager: the thread is stopped on leaving."""

    def __init__(self, parts: list[Part], window_rows: int | None) -> None:
        self.ready: queue.Queue[Any] = queue.Queue(maxsize=READ_AHEAD)
        self.stop = threading.Event()
        self.producer = threading.Thread(
            target=self._produce, args=(parts, window_rows), name="idlebuf-windows", daemon=True
        )
        self.producer.start()

    def __enter__(self) -> Windows:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[float, float, dict[str, pd.DataFrame]]]:
        while (window := self.ready.get()) is not None:
            if isinstance(window, BaseException):
                raise window
            yield window

    def close(self) -> None:
        self.stop.set()
        self.producer.join()

    def _offer(self, item: Any) -> bool:
        """Hand `item` over unless the caller has stopped listening."""
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, parts: list[Part], window_rows: int | None) -> None:
        try:
            for window in _assembled(parts, window_rows or math.inf):
                if not self._offer(window):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
            self._offer(exc)
            return
        self._offer(None)


@dataclass
class _Piece:
    """Rows of one part waiting to go out, the last time they may hold, and whether they
    are in time order (parts written a flush at a time are: cut by a binary search, not a
    filter)."""

    rows: pa.Table
    last: float
    ordered: bool

    @staticmethod
    def of(rows: pa.Table, last: float) -> _Piece:
        ts = _times(rows)
        return _Piece(rows, last, bool(len(ts) < 2 or (ts[1:] >= ts[:-1]).all()))

    def split(self, bound: float) -> tuple[pa.Table, _Piece]:
        """(its rows before `bound`, the piece of the rest)."""
        if self.ordered:
            at = int(np.searchsorted(_times(self.rows), np.uint64(int(bound)), side="left"))
            return self.rows.slice(0, at), _Piece(self.rows.slice(at), self.last, True)
        ts_type = self.rows.schema.field("ts_ns").type
        cut = pc.less(self.rows["ts_ns"], pa.scalar(int(bound), ts_type))
        later = self.rows.filter(pc.invert(cut))
        return self.rows.filter(cut), _Piece(later, self.last, False)

    def times_before(self, bound: float) -> np.ndarray:
        if self.last < bound:
            return _times(self.rows)
        return _times(self.split(bound)[0])


def _times(rows: pa.Table) -> np.ndarray:
    return rows["ts_ns"].to_numpy()


def _assembled(
    parts: list[Part], window_rows: float
) -> Iterator[tuple[float, float, dict[str, pd.DataFrame]]]:
    """Windows' windows, put together where it is called."""
    # each table's pieces waiting to go out
    waiting: dict[str, list[_Piece]] = {}
    low = -math.inf
    i = 0
    while i < len(parts):
        loaded = 0
        while i < len(parts) and (loaded == 0 or loaded < window_rows):
            p = parts[i]
            piece = _within(p, p.ref.read(EVENT_COLUMNS[p.table]))
            waiting.setdefault(p.table, []).append(_Piece.of(piece, float(p.last_ns)))
            loaded += p.rows
            i += 1
        bound = float(parts[i].first_ns) if i < len(parts) else math.inf
        times = [piece.times_before(bound) for pieces in waiting.values() for piece in pieces]
        if i < len(parts) and sum(len(t) for t in times) < window_rows / 4:
            continue  # a window's worth loaded, little of it complete: load on
        # parts bigger than a window (a long flush's) go out as several windows
        for cut in [*_cuts(times, low, bound, window_rows), bound]:
            yield low, cut, _taken(waiting, cut)
            low = cut
    if not parts:
        yield low, math.inf, {}


def _cuts(times: list[np.ndarray], low: float, bound: float, window_rows: float) -> list[float]:
    """Bounds between `low` and `bound` that leave about `window_rows` of the events at
    `times` between two (none when there are not many more): the times at those ranks."""
    if not math.isfinite(window_rows):
        return []
    total = sum(len(t) for t in times)
    windows = round(total / window_rows)
    if windows < 2:
        return []
    ranks = [total * j // windows for j in range(1, windows)]
    at = np.partition(np.concatenate(times), ranks)[ranks].tolist()
    cuts: list[float] = []
    for t in at:  # events at one instant are never split
        if low < t < bound and (not cuts or t > cuts[-1]):
            cuts.append(float(t))
    return cuts


def _taken(waiting: dict[str, list[_Piece]], bound: float) -> dict[str, pd.DataFrame]:
    """Each table's waiting rows earlier than `bound`, taken out of `waiting`."""
    out = {}
    for name, pieces in waiting.items():
        if not pieces:
            continue
        # a piece whose last event is before the bound goes out whole, uncut (parts
        # written a flush at a time mostly are); the others are cut at the bound
        early = [piece.rows for piece in pieces if piece.last < bound]
        later = []
        for piece in pieces:
            if piece.last >= bound:
                before, rest = piece.split(bound)
                early.append(before)
                later.append(rest)
        waiting[name] = later
        table = pa.concat_tables(early) if len(early) > 1 else early[0]
        # the pieces' columns joined by Arrow, which lets go of the GIL, then handed to
        # pandas as they are (to_pandas joins chunked columns holding it: 0.2 s at 10M)
        out[name] = table.combine_chunks().to_pandas(split_blocks=True, use_threads=False)
    return out


def _within(part: Part, rows: pa.Table) -> pa.Table:
    """The part's rows, once their times are within those it was planned by (meta.json's
    word for them, or its footer's)."""
    if rows.num_rows:
        bounds = pc.min_max(rows["ts_ns"])
        first, last = bounds["min"].as_py(), bounds["max"].as_py()
        if first < part.first_ns or last > part.last_ns:
            raise TraceError(
                f"{part.ref.path}/{part.ref.name} holds events from {first} to {last} ns, "
                f"outside the {part.first_ns} to {part.last_ns} it is listed with"
            )
    return rows


def _sockets(path: Path, meta: Meta, warnings: list[str]) -> pd.DataFrame:
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


def empty(table: str) -> pd.DataFrame:
    """An event table's columns, no rows."""
    return _empty(table).copy()


@functools.cache
def _empty(table: str) -> pd.DataFrame:
    columns = EVENT_COLUMNS[table]
    return schema.TABLES[table].subset(columns).arrow_schema().empty_table().to_pandas()
