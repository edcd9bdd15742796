"""Recordings side by side: one process's figures at the end of a recording as one row.

Pure arithmetic over a TraceSummary: the rows of `idlebuf demo`, `compare` and `sweep`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from analysis.results import MemoryFigures, ProcessSummary, Result
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
    # the whole cost of an idle connection (analysis.cost); None: could not be known
    kernel_per_connection_bytes: int | None = None  # slab objects + queue memory
    whole_per_idle_connection_bytes: int | None = None  # IO buffer + other user + kernel
    ratio_to_readiness: float = 1.0  # of the ratio's figure, to the first row's
    trace: str | None = None
    ground_truth: dict[str, Any] | None = None  # what the server said about itself (demo)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ComparisonRow:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def io_buffer_memory(process: ProcessSummary) -> tuple[int, int]:
    """(committed, resident) bytes of user memory held for reads at the end: posted or parked
    buffers (heap or the program's own mappings), buffers still held after their data (a pool's
    counted once), provided-buffer groups. Resident covers the posted and idle retained ones."""
    memory = _memory(process)
    heap = memory.io_buffer_heap
    committed = heap.bytes + heap.mapped_bytes + memory.held_data_buffers.bytes
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
        per_idle_connection_bytes=round(memory.per_idle_connection.bytes),
        pending_writes=process.writes.pending_writes,
        pending_write_bytes=process.writes.pending_write_bytes,
        write_buffer_heap=memory.write_buffer_heap.bytes,
        kernel_per_connection_bytes=_rounded(memory.per_idle_connection.kernel_bytes),
        whole_per_idle_connection_bytes=_rounded(memory.per_idle_connection.total_bytes),
    )


def _rounded(n: float | None) -> int | None:
    return None if n is None else round(n)


def with_ratios(rows: list[ComparisonRow], figure: str = "io_buffer_memory") -> list[ComparisonRow]:
    """Each row with its `figure` over the first row's (the readiness baseline)."""
    baseline = getattr(rows[0], figure) if rows else 0
    return [
        replace(row, ratio_to_readiness=round(getattr(row, figure) / max(baseline, 1), 1))
        for row in rows
    ]


def _memory(process: ProcessSummary, name: str | None = None) -> MemoryFigures:
    if process.memory is None:
        raise IdlebufError(
            f"{name or f'pid {process.pid}'}: recorded without --memory; "
            "no memory figures to compare"
        )
    return process.memory
