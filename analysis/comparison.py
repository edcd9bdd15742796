"""Recordings side by side: one process's figures at the end of a recording as one row.

Pure arithmetic over a TraceSummary: the rows of `idlebuf demo`, `compare` and `sweep`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from analysis.results import JsonObject, MemoryFigures, ProcessSummary, Result
from probes.format.errors import IdlebufError


@dataclass
class ComparisonRow(Result):
    """One recorded server (or process) at the end of its recording (made with --memory)."""

    model: str
    pid: int
    connections: int
    active: int
    posted_reads: int
    pinned_bytes: int
    io_buffer_memory: int  # user memory held for reads: see io_buffer_memory()
    io_buffer_memory_resident: int
    rss_growth: int | None  # None: resident memory was not measured
    rss_bytes: int | None
    socket_kernel_bytes: int
    per_idle_connection_bytes: int
    pending_writes: int
    pending_write_bytes: int
    write_buffer_heap: int  # live allocations that writes were sent from
    # the whole cost of an idle connection (analysis.cost) and its parts (WHOLE_COST_PARTS);
    # None: could not be known (or a comparison saved before the part was)
    io_buffer_per_idle_connection_bytes: int | None = None  # posted, parked or retained buffers
    waiter_per_idle_connection_bytes: int | None = None  # what carries its wait
    other_user_per_idle_connection_bytes: int | None = None  # the heap fit, beyond the buffers
    kernel_per_connection_bytes: int | None = None  # slab objects + queue memory
    whole_per_idle_connection_bytes: int | None = None  # the sum of the parts
    whole_unknown: list[str] = field(default_factory=list)  # why a part is not known
    ratio_to_readiness: float = 1.0  # of the ratio's figure, to the first row's
    trace: str | None = None
    ground_truth: JsonObject | None = None  # what the server said about itself (demo)

    @classmethod
    def from_json(cls, data: JsonObject) -> ComparisonRow:
        """A saved row; the fields a file predates keep their defaults (parts unknown)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def whole_cost_parts(self) -> list[tuple[CostPart, int | None]]:
        """The whole cost per idle connection, part by part (None: unknown), stacking order."""
        return [(part, getattr(self, part.key)) for part in WHOLE_COST_PARTS]


@dataclass(frozen=True)
class CostPart:
    """One part of the whole cost per idle connection: the ComparisonRow field holding it."""

    key: str
    name: str


# Stacked in this order. A new part (a connection's waiter, its owned state) is one more
# ComparisonRow field and one more entry here; reporters draw whatever this lists.
WHOLE_COST_PARTS = (
    CostPart("io_buffer_per_idle_connection_bytes", "IO buffer"),
    CostPart("waiter_per_idle_connection_bytes", "waiter"),
    CostPart("other_user_per_idle_connection_bytes", "other user memory"),
    CostPart("kernel_per_connection_bytes", "kernel"),
)


def io_buffer_memory(process: ProcessSummary) -> tuple[int, int]:
    """(committed, resident) bytes of user memory held for reads at the end: posted or parked
    buffers (heap or the program's own mappings), buffers still held after their data (a pool's
    counted once), provided-buffer groups. Resident covers the posted and idle retained ones.
    A posted buffer whose allocation was not seen (made before the attach, a lookup that
    failed) counts its own length: memory it holds for certain, never 0."""
    memory = _memory(process)
    heap = memory.io_buffer_heap
    committed = heap.bytes + heap.mapped_bytes + memory.held_data_buffers.bytes
    committed += sum(u.bytes or 0 for u in heap.unknown)
    committed += sum(g.bytes for g in process.buffer_groups)
    resident = heap.resident_bytes + memory.retained.resident_bytes
    return committed, resident


def comparison_row(
    process: ProcessSummary,
    name: str,
    connections: int | None = None,
    active: int | None = None,
    rss_base: int | None = None,
) -> ComparisonRow:
    """`process`'s row. Connections and active default to what the trace saw (open; open and
    not idle); RSS growth is counted from `rss_base`, or from the first sample."""
    memory = _memory(process, name)
    committed, resident = io_buffer_memory(process)
    seen = memory.connections
    base = memory.rss.first if rss_base is None else rss_base
    peak = memory.rss.peak
    cost = memory.per_idle_connection
    return ComparisonRow(
        model=name,
        pid=process.pid,
        connections=seen.open if connections is None else connections,
        active=seen.open - seen.idle if active is None else active,
        posted_reads=process.posted_reads.now,
        pinned_bytes=process.pinned_bytes.now,
        io_buffer_memory=committed,
        io_buffer_memory_resident=resident,
        rss_growth=None if peak is None or base is None else peak - base,
        rss_bytes=memory.rss.now,
        socket_kernel_bytes=memory.socket_kernel_bytes,
        per_idle_connection_bytes=round(cost.bytes),
        pending_writes=process.writes.pending_writes,
        pending_write_bytes=process.writes.pending_write_bytes,
        write_buffer_heap=memory.write_buffer_heap.bytes,
        io_buffer_per_idle_connection_bytes=_rounded(cost.buffer_bytes),
        waiter_per_idle_connection_bytes=_rounded(cost.waiter_bytes),
        other_user_per_idle_connection_bytes=_rounded(cost.other_user_bytes),
        kernel_per_connection_bytes=_rounded(cost.kernel_bytes),
        whole_per_idle_connection_bytes=_rounded(cost.total_bytes),
        whole_unknown=[u.why for u in cost.whole_unknown],
    )


def _rounded(n: float | None) -> int | None:
    return None if n is None else round(n)


def with_ratios(rows: list[ComparisonRow], figure: str = "io_buffer_memory") -> list[ComparisonRow]:
    """Each row with its `figure` over the first row's (the readiness baseline)."""
    baseline = getattr(rows[0], figure) if rows else 0
    return [replace(row, ratio_to_readiness=_ratio(getattr(row, figure), baseline)) for row in rows]


def _ratio(figure: int, baseline: int) -> float:
    return round(figure / max(baseline, 1), 1)


@dataclass
class Held(Result):
    """What the idle connections hold of one kind of memory: in all, and per connection."""

    what: str  # "IO buffers"
    bytes: int | None  # None: unknown
    per_connection: int | None


@dataclass
class Headline(Result):
    """A comparison's first sentence, as figures. `models`: the rows whose `figure` is the
    largest (equal rows named together); how many of their connections are idle, and what
    those hold, part by part (`held`: a new part of the whole cost is one more entry); what
    the baseline - the first row, the readiness design in the demo - keeps in all. No
    baseline when the first row is one of `models` (a single row, or all equal)."""

    models: list[str]
    figure: str  # the ComparisonRow field compared: io_buffer_memory, or write_buffer_heap
    bytes: int  # the models' figure
    connections: int
    idle: int  # connections less the active ones (on the write side: those not reading)
    held: list[Held]
    baseline: str | None = None
    baseline_bytes: int | None = None
    ratio: float | None = None  # bytes over baseline_bytes, as in the rows' ratio


def headline(rows: list[ComparisonRow], figure: str = "io_buffer_memory") -> Headline | None:
    """The headline of `rows` compared by `figure` (the ratios' figure); None with no rows."""
    if not rows:
        return None
    worst = max(rows, key=lambda r: getattr(r, figure))  # the first of equals
    held = _held(worst, figure)

    def same(row: ComparisonRow) -> bool:
        return (getattr(row, figure), row.connections, row.active, _held(row, figure)) == (
            getattr(worst, figure),
            worst.connections,
            worst.active,
            held,
        )

    models = [r for r in rows if same(r)]
    out = Headline(
        models=[r.model for r in models],
        figure=figure,
        bytes=getattr(worst, figure),
        connections=worst.connections,
        idle=max(worst.connections - worst.active, 0),
        held=held,
    )
    if rows[0] not in models:
        out.baseline, out.baseline_bytes = rows[0].model, getattr(rows[0], figure)
        out.ratio = _ratio(out.bytes, out.baseline_bytes)
    return out


def _held(row: ComparisonRow, figure: str) -> list[Held]:
    if figure == "write_buffer_heap":  # the write side: writes blocked on readers that do not read
        per = row.pending_write_bytes // row.pending_writes if row.pending_writes else None
        return [Held("pending writes", row.pending_write_bytes, per)]
    idle = max(row.connections - row.active, 0)
    per = row.io_buffer_per_idle_connection_bytes
    held = [Held("IO buffers", None if per is None else per * idle, per)]
    waiter = row.waiter_per_idle_connection_bytes
    if waiter:  # threads (or requests) that carry their waits
        held.append(Held("waiters", waiter * idle, waiter))
    return held


def _memory(process: ProcessSummary, name: str | None = None) -> MemoryFigures:
    if process.memory is None:
        raise IdlebufError(
            f"{name or f'pid {process.pid}'}: recorded without --memory; "
            "no memory figures to compare"
        )
    return process.memory
