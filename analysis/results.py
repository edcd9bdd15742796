"""What the analysis concludes, as typed results: the one thing reporters are given.

`summarize()` (analysis.summary) returns a `TraceSummary`; `comparison_row()`
(analysis.comparison) turns one of its processes into a `ComparisonRow`. Each result renders
itself as JSON with `to_json()`, field by field in declaration order: the field names are the
documented JSON keys of `idlebuf report --json` (tests/golden pins them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from probes.format.meta import MemoryOptions, ProcessAtAttach

# A JSON object as json.loads gives it and json.dumps takes it: its values may be of any
# JSON type (numbers, strings, lists, objects, null), so Any is the honest type of a value.
JsonObject = dict[str, Any]

NOT_IN_JSON = {"json": False}  # dataclass field metadata: a field to_json() leaves out


def to_json(value: Any) -> Any:
    """A result (or a list, dict or scalar of results) as plain JSON values."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fields_json(value)
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if hasattr(value, "item"):  # a numpy scalar
        return value.item()
    return value


def _fields_json(result: Any) -> JsonObject:
    return {
        f.name: to_json(getattr(result, f.name))
        for f in dataclasses.fields(result)
        if f.metadata.get("json", True)
    }


class Result:
    """A dataclass rendered as a JSON object of its fields."""

    def to_json(self) -> JsonObject:
        return _fields_json(self)


# why the buffers of idle connections attached late are not seen: nothing read since
QUIET = "idle connections with no data since the attach"


@dataclass
class Unknown(Result):
    """A part of a figure that cannot be known: how many connections (or reads) it concerns,
    and why. Never folded into the figure as 0."""

    connections: int
    why: str
    bytes: int | None = None  # the bytes concerned, where their size is known


@dataclass
class Provenance(Result):
    """Where a count comes from: seen live, found at attach (a /proc scan, a walk of the
    kernel's or the runtime's structures), or unknown."""

    live: int = 0
    at_attach: int = 0
    unknown: list[Unknown] = field(default_factory=list)


@dataclass
class NowAndPeak(Result):
    now: int
    peak: int


@dataclass
class ReadCounts(Result):
    """Reads of one process, source or label: posted now, completed, received."""

    posted_reads: int = 0
    pinned_bytes: int = 0
    buffer_select_posted: int = 0  # posted reads that pin no buffer of their own
    multishot_posted: int = 0
    reads_completed: int = 0
    reads_failed: int = 0
    bytes_received: int = 0


@dataclass
class SourceFigures(ReadCounts):
    """A source's counts (syscall, uring, parked, file) and each syscall or opcode's."""

    by_op: dict[str, ReadCounts] = field(default_factory=dict)


@dataclass
class ReadinessWaits(Result):
    count: int = 0  # begun while recording
    now: int = 0  # still waiting at the end


@dataclass
class WriteFigures(Result):
    pending_writes: int = 0
    pending_write_bytes: int = 0
    pending_peak: int = 0
    pending_bytes_peak: int = 0
    writes_completed: int = 0
    bytes_sent: int = 0


@dataclass
class BufferGroup(Result):
    """A provided-buffer group of an io_uring ring."""

    ring: int
    group: int
    how: str  # "ring" (registered) or "provide" (PROVIDE_BUFFERS)
    buffers: int
    bytes: int
    consumed: int
    available: int


@dataclass
class IoBufferHeap(Result):
    """Heap allocations holding the buffers of reads posted (or parked) at the end. Buffers
    whose allocation was not seen (made before the attach, or too small to be tracked) are
    `unknown`, not counted as 0."""

    bytes: int = 0  # buffer bytes inside tracked allocations
    idle_bytes: int = 0  # ... of idle connections
    allocations: int = 0  # the allocations holding them, each once
    allocation_bytes: int = 0
    mapped_bytes: int = 0  # buffer bytes in memory the program mapped itself
    idle_mapped_bytes: int = 0
    resident_bytes: int = 0
    idle_resident_bytes: int = 0
    unknown: list[Unknown] = field(default_factory=list)


@dataclass
class BufferSite(Result):
    """Where allocations holding IO buffers were made: a user stack, innermost first."""

    bytes: int
    buffers: int
    stack: list[str]


@dataclass
class Allocations(Result):
    allocations: int = 0
    bytes: int = 0


@dataclass
class Buffers(Result):
    buffers: int = 0
    bytes: int = 0


@dataclass
class RetainedBuffers(Buffers):
    """Last-data buffers still held by idle connections with nothing posted; `unknown`: idle
    connections that received nothing since the attach (what they keep cannot be seen)."""

    resident_bytes: int = 0
    unknown: list[Unknown] = field(default_factory=list)


@dataclass
class HeapLive(Result):
    """Allocations the allocator probes tracked, live at the end; None when allocations
    were looked up (allocator walkers), not traced."""

    allocations: int | None = 0  # tracked allocations live at the end (scaled when sampled)
    bytes: int | None = 0
    estimated: bool = False  # scaled from a sample
    brk_heap_bytes: int = 0
    mappings: int = 0  # mappings the program made itself, live at the end
    mapped_bytes: int = 0
    since_attach: bool = False  # only allocations made since the attach are tracked


@dataclass
class ResidentMemory(Result):
    """Resident bytes (anonymous + file + shared): None when nothing measured them."""

    first: int | None = None
    now: int | None = None
    peak: int | None = None
    source: str = "unknown"  # where first and now come from


@dataclass
class ConnectionCounts(Result):
    open: int = 0
    idle: int = 0


@dataclass
class ConnectionFit(Result):
    """Memory fitted against the connections a process held over one recording (see
    analysis.cost): bytes per connection, how well the line fits, over how many points."""

    bytes_per_connection: float
    r2: float | None
    points: int
    distinct_counts: int  # distinct connection counts among the points
    ci95_bytes: float | None  # the slope's 95% interval, +/-
    source: str  # what memory was fitted
    confident: bool = True  # False: shown, not used (the reason says why)


@dataclass
class KernelPart(Result):
    """Slab objects of one cache per idle connection (the kernel model)."""

    cache: str
    objects: float  # per connection
    object_bytes: float  # its share of a slab on the recording's kernel
    bytes: float


@dataclass
class WaiterPart(Result):
    """One part of what carries an idle connection's wait, per idle connection: of a thread
    blocked on it (its kernel stack, its task_struct, its user stack's resident pages), a
    process of its own, a goroutine, an io_uring request (its io_kiocb); where it was seen
    (`provenance`: at_attach, at_end - read from /proc as the recording ended - or live:
    an io_uring request traced, or a recording's latest scan while it ran, when it has none
    at the end - a recorder killed, a process gone before the end)."""

    waiter: str  # thread, process, goroutine, uring_request
    part: str
    bytes: float
    provenance: str


@dataclass
class SavingPart(Result):
    """One part of what a readiness design would free (negative: what it would need)."""

    part: str
    bytes: float


@dataclass
class PerIdleConnection(Result):
    """What one idle connection costs on average. Measured: its user buffer plus its kernel
    socket memory (`bytes`, committed; `resident_bytes`). Whole: buffer (the allocations
    holding it) + waiter (what carries its wait) + owned state (other user memory it keeps
    alive) + kernel (the slab model and queue memory) = `total_bytes`; a figure that could
    not be known is None, with why (`reason`, `kernel_reason`, `waiter_reason`,
    `whole_unknown`)."""

    resident_bytes: float = 0.0
    user_buffer_bytes: int = 0  # over all idle connections
    socket_kernel_bytes: int = 0  # over all idle connections
    bytes: float = 0.0  # per idle connection
    unknown: list[Unknown] = field(default_factory=list)  # idle connections not fully known
    io_buffer_bytes: float = 0.0  # per idle connection: posted, parked or retained buffers
    # ... the allocations holding them, rounding included (the buffer part of the total)
    buffer_bytes: float | None = None
    # per idle connection: what carries its wait, part by part (None: unknown, with why)
    waiter_bytes: float | None = None
    waiter_parts: list[WaiterPart] = field(default_factory=list)
    waiter_reason: str | None = None
    # the other user memory it keeps alive, and how it was found: "reachable" (what its
    # roots alone reach in the heap, walked: the mean over `owned_connections` idle
    # connections), "private" (a process per connection), "fitted" (the heap fit)
    owned_bytes: float | None = None
    owned_how: str | None = None
    owned_connections: int | None = None  # "reachable": the idle connections walked
    owned_shared_bytes: int | None = None  # ... what they reach first together (not owned)
    owned_check: str | None = None  # the walk against the fit, and what else to know of it
    other_user_bytes: float | None = None  # per connection, beyond IO buffers (the heap fit)
    kernel_bytes: float | None = None  # slab objects (kernel_parts) + queue memory
    kernel_parts: list[KernelPart] = field(default_factory=list)
    total_bytes: float | None = None
    # the known parts alone (an unknown part as 0, a buffer not seen at its length): what an
    # idle connection costs at least
    total_at_least_bytes: float = 0.0
    # a readiness design: the idle connections' buffers and waiters, less a pool of buffers
    # for the active ones (saving_parts; the assumption in saving_assumes)
    saving_bytes: float = 0.0
    saving_parts: list[SavingPart] = field(default_factory=list)
    saving_assumes: str | None = None
    fit: ConnectionFit | None = None  # the heap against connections
    rss_fit: ConnectionFit | None = None  # RSS against connections, for comparison
    socket_fit: ConnectionFit | None = None  # the kernel's queue memory against connections
    reason: str | None = None  # why `fit` is missing or not used
    kernel_reason: str | None = None  # what the kernel model could not cover
    whole_unknown: list[Unknown] = field(default_factory=list)  # parts of the total not known


@dataclass
class MemoryFigures(Result):
    """A process's memory side (recordings made with --memory)."""

    io_buffer_heap: IoBufferHeap
    idle_posted_reads: int
    io_buffer_sites: list[BufferSite]  # where the allocations holding them were made
    read_sites: list[BufferSite]  # where the reads were posted from (the code to change)
    write_buffer_heap: Allocations
    held_data_buffers: Buffers  # every connection's last-data buffer still held
    retained: RetainedBuffers  # those of idle connections
    heap_live: HeapLive
    rss: ResidentMemory
    connections: ConnectionCounts
    socket_kernel_bytes: int
    per_idle_connection: PerIdleConnection
    # how buffers' allocations were found: "walk:glibc", "walk:go+glibc", "probes"
    allocations_found_by: str = "probes"
    # analysis.memory.connection_table(), this process's rows
    connection_rows: pd.DataFrame = field(default_factory=pd.DataFrame, metadata=NOT_IN_JSON)

    def to_json(self, connections: bool = False) -> JsonObject:
        out = _fields_json(self)
        if connections:
            out["connection_table"] = connection_table_json(self.connection_rows)
        return out


def connection_table_json(rows: pd.DataFrame) -> list[JsonObject]:
    """The per-connection rows as JSON objects (NaN as null), without the pid and the
    generation (the fd and the times tell connections on one fd apart)."""
    rows = rows.astype(object).where(rows.notna(), None)
    return [
        {str(k): (v.item() if hasattr(v, "item") else v) for k, v in r.items() if k != "pid"}
        for r in rows.drop(columns=["gen"], errors="ignore").to_dict("records")
    ]


@dataclass
class ProcessSummary(Result):
    pid: int
    comm: str
    posted_reads: NowAndPeak
    pinned_bytes: NowAndPeak
    buffer_select_posted: int
    by_source: dict[str, SourceFigures]
    readiness_waits: ReadinessWaits
    writes: WriteFigures
    reads_completed: int
    reads_failed: int
    bytes_received: int
    buffer_groups: list[BufferGroup]
    memory: MemoryFigures | None = None
    # where the posted reads come from (seen live, found at attach, unknown)
    provenance: Provenance = field(default_factory=Provenance)

    def to_json(self, connections: bool = False) -> JsonObject:
        out = _fields_json(self)
        if self.memory is None:
            del out["memory"]
        else:
            out["memory"] = self.memory.to_json(connections)
        return out


# The time series' figures, in order (besides pid and t_s).
TIMELINE_FIGURES = (
    "posted_reads",
    "pinned_bytes",
    "io_buffer_heap_bytes",
    "heap_live_bytes",
    "rss_bytes",
    "socket_kernel_bytes",
    "connections_open",
    "idle_connections",
    "pending_writes",
    "pending_write_bytes",
)


@dataclass
class TimelinePoint(Result):
    """A process's state at the end of one step of the time series. A figure is None where it
    was not measured at that instant (RSS before its first sample): a gap, never a 0. The
    posted reads are known throughout (live, and found at attach), hence never None."""

    pid: int
    t_s: float  # seconds since tracing began
    posted_reads: int = 0
    pinned_bytes: int = 0
    io_buffer_heap_bytes: int | None = 0
    heap_live_bytes: int | None = 0
    rss_bytes: int | None = 0
    socket_kernel_bytes: int | None = 0
    connections_open: int | None = 0
    idle_connections: int | None = 0
    pending_writes: int | None = 0
    pending_write_bytes: int | None = 0

    def figure(self, name: str) -> float | None:
        """The figure `name` (a field), or None where it was not measured."""
        value = getattr(self, name)
        return None if value is None else float(value)


@dataclass
class TraceSummary(Result):
    """Everything `idlebuf report` shows about one trace; "now" is the recording's end."""

    processes: list[ProcessSummary]
    drops: dict[str, int]
    complete: bool
    duration_s: float | None
    stop_reason: str | None
    alternate_s: float | None
    uring: str | None  # "traced", or why io_uring was not
    uring_before_attach: list[int]  # pids with rings whose requests could only be counted
    idle_threshold_s: float
    timeline: list[TimelinePoint] | None = None  # with --timeline
    memory: MemoryOptions | None = None  # the recording's --memory options
    at_attach: list[ProcessAtAttach] = field(default_factory=list)  # what was found at attach
    # the recording's targets as one server: each part per idle connection of them all
    per_idle_connection: PerIdleConnection | None = None
    warnings: list[str] = field(default_factory=list)  # what reading the trace left out

    def to_json(self, connections: bool = False) -> JsonObject:
        out = _fields_json(self)
        out["processes"] = [p.to_json(connections) for p in self.processes]
        if self.timeline is None:
            del out["timeline"]
        return out

    def process(self, pid: int) -> ProcessSummary:
        (found,) = [p for p in self.processes if p.pid == pid]
        return found

    def timeline_of(self, pid: int) -> list[TimelinePoint]:
        return [p for p in self.timeline or [] if p.pid == pid]
