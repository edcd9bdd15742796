"""A fleet of traces: each summarised on its own (`digest`, run anywhere - a Dask worker
needs only this package, no root and no bcc), then aggregated per host, per program and per
IO model (`aggregate`).

A digest is small (a few numbers per traced process), so hundreds of traces are summarised
in parallel and only their digests travel back. A trace that cannot be read is a `Failure`
with its one-line reason; the others still count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.comparison import io_buffer_memory
from analysis.engine import analyze
from analysis.results import NOT_IN_JSON, ProcessSummary, Result
from analysis.windows import WINDOW_ROWS, trace_events
from probes.format.errors import IdlebufError
from probes.format.reader import read_meta, unreadable


@dataclass
class ProcessDigest(Result):
    """One traced process of one trace, at the end of its recording. The figures of the
    memory side are None (unknown) for a trace recorded without --memory."""

    trace: str
    host: str
    pid: int
    program: str  # its name (comm)
    model: str  # the IO model its reads show (see io_model)
    posted_reads: int
    pinned_bytes: int
    connections: int | None
    idle_connections: int | None
    io_buffer_memory: int | None  # user memory held for reads (as compare's column)
    idle_buffer_bytes: int | None  # ... by idle connections: what readiness would save
    per_idle_connection_bytes: float | None  # measured: IO buffer + kernel socket memory
    whole_per_idle_connection_bytes: float | None  # + other user memory + kernel objects


# what only a recording made with --memory knows
MEMORY_FIGURES = (
    "connections",
    "idle_connections",
    "io_buffer_memory",
    "idle_buffer_bytes",
    "per_idle_connection_bytes",
    "whole_per_idle_connection_bytes",
)


@dataclass
class Failure(Result):
    trace: str
    reason: str
    readable: bool = field(default=True, metadata=NOT_IN_JSON)  # False: could not be opened


@dataclass
class Digest(Result):
    trace: str
    processes: list[ProcessDigest] = field(default_factory=list)
    failure: Failure | None = None


def io_model(process: ProcessSummary) -> str:
    """What a process's reads say about its IO model: reads posted at the end by io_uring
    (with provided buffers or not), by blocked syscalls (a thread per connection) or parked
    (green threads, goroutines); else readiness when it waited on readiness."""
    posted = {name: s.posted_reads for name, s in process.by_source.items()}
    if process.buffer_groups:
        return "queued: io_uring provided buffers"
    if posted.get("uring", 0):
        return "queued: io_uring"
    if posted.get("parked", 0):
        return "queued: parked (green threads, Go)"
    if posted.get("syscall", 0):
        return "queued: blocking reads (threads)"
    if process.readiness_waits.count:
        return "readiness (epoll, poll, select)"
    return "unknown"


# a trace with more events than this is read in windows (analysis.windows) on its worker,
# in bounded memory, with the same figures; smaller ones in one window (about 4 GiB here)
STREAM_ABOVE_EVENTS = 20_000_000


def digest(
    path: str, idle_threshold_s: float = 1.0, stream_above: int = STREAM_ABOVE_EVENTS
) -> Digest:
    """One trace's digest; never raises for a trace that cannot be read (its failure says
    why). A trace of more than `stream_above` events is read in windows."""
    try:
        rows = WINDOW_ROWS if trace_events(path) > stream_above else None
        summary = analyze(path, idle_threshold_s, window_rows=rows)
        host = read_meta(Path(path)).host.hostname or "unknown"
    except IdlebufError as exc:
        return Digest(path, failure=Failure(path, str(exc).splitlines()[0][:500]))
    except (OSError, ValueError, KeyError, MemoryError) as exc:
        return Digest(path, failure=Failure(path, f"cannot be read: {exc!r}"[:500]))
    out = Digest(path)
    for process in summary.processes:
        memory = process.memory
        if not (
            process.posted_reads.peak
            or process.reads_completed
            or (memory is not None and memory.connections.open)
        ):
            continue  # traced, but never read from a socket (a launcher, a helper)
        figures: dict[str, int | float | None] = dict.fromkeys(MEMORY_FIGURES)
        if memory is not None:
            cost = memory.per_idle_connection
            figures = {
                "connections": memory.connections.open,
                "idle_connections": memory.connections.idle,
                "io_buffer_memory": int(io_buffer_memory(process)[0]),
                "idle_buffer_bytes": cost.user_buffer_bytes,
                "per_idle_connection_bytes": round(cost.bytes, 1),
                "whole_per_idle_connection_bytes": cost.total_bytes,
            }
        out.processes.append(
            ProcessDigest(
                path, host, process.pid, process.comm or "?", io_model(process),
                process.posted_reads.now, process.pinned_bytes.now, **figures,  # type: ignore[arg-type]
            )
        )  # fmt: skip
    return out


@dataclass
class Group(Result):
    """Processes of one host, program or IO model, summed; the cost per idle connection as a
    distribution over them (p50, p90, max; `whole_known` of them had a whole cost)."""

    key: str
    processes: int
    traces: int
    without_memory: int  # processes recorded without --memory: not in the memory figures
    connections: int | None
    idle_connections: int | None
    posted_reads: int
    pinned_bytes: int
    io_buffer_memory: int | None
    idle_buffer_bytes: int | None
    per_idle_p50: float | None
    per_idle_p90: float | None
    per_idle_max: float | None
    whole_p50: float | None
    whole_p90: float | None
    whole_max: float | None
    whole_known: int


@dataclass
class FleetSummary(Result):
    traces: int  # given
    read: int  # summarised
    failures: list[Failure]
    by_host: list[Group]
    by_program: list[Group]
    by_model: list[Group]
    top: list[ProcessDigest]  # the processes holding most IO-buffer memory for idle ones


DIGEST_COLUMNS = list(ProcessDigest.__dataclass_fields__)


def process_table(digests: list[Digest]) -> pd.DataFrame:
    rows = [p.to_json() for d in digests for p in d.processes]
    return pd.DataFrame(rows, columns=DIGEST_COLUMNS)


def _quantile(values: pd.Series, q: float) -> float | None:
    v = values.dropna().to_numpy(dtype=float)
    return None if v.size == 0 else round(float(np.quantile(v, q)), 1)


def _known_sum(values: pd.Series) -> int | None:
    """The sum of the known values; None when none is known."""
    known = values.dropna()
    return None if known.empty else int(known.astype("int64").sum())


def _groups(table: pd.DataFrame, by: str) -> list[Group]:
    out = []
    for key, rows in table.groupby(by, sort=True):
        whole = rows["whole_per_idle_connection_bytes"].astype(float)
        per_idle = rows["per_idle_connection_bytes"].astype(float)
        per_idle = per_idle.where(rows["idle_connections"].astype(float) > 0)
        out.append(
            Group(
                key=str(key),
                processes=len(rows),
                traces=int(rows["trace"].nunique()),
                without_memory=int(rows["connections"].isna().sum()),
                posted_reads=int(rows["posted_reads"].sum()),
                pinned_bytes=int(rows["pinned_bytes"].sum()),
                **{
                    k: _known_sum(rows[k])
                    for k in (
                        "connections",
                        "idle_connections",
                        "io_buffer_memory",
                        "idle_buffer_bytes",
                    )
                },
                per_idle_p50=_quantile(per_idle, 0.5),
                per_idle_p90=_quantile(per_idle, 0.9),
                per_idle_max=_quantile(per_idle, 1.0),
                whole_p50=_quantile(whole, 0.5),
                whole_p90=_quantile(whole, 0.9),
                whole_max=_quantile(whole, 1.0),
                whole_known=int(whole.notna().sum()),
            )
        )
    # the most idle-buffer memory first
    return sorted(out, key=lambda g: (-(g.idle_buffer_bytes or 0), g.key))


def aggregate(
    digests: list[Digest], top: int = 10, not_found: list[Failure] | None = None
) -> FleetSummary:
    """The fleet's figures from its traces' digests (in any order: the result is the same);
    `not_found`: paths given that held no trace, listed first among the failures."""
    digests = sorted(digests, key=lambda d: d.trace)
    not_found = not_found or []
    table = process_table(digests)
    ranked = table.assign(rank=table["idle_buffer_bytes"].astype(float).fillna(-1)).sort_values(
        ["rank", "trace", "pid"], ascending=[False, True, True], kind="stable"
    )
    by_key = {(p.trace, p.pid): p for d in digests for p in d.processes}
    return FleetSummary(
        traces=len(digests) + len(not_found),
        read=sum(d.failure is None for d in digests),
        failures=not_found + [d.failure for d in digests if d.failure is not None],
        by_host=_groups(table, "host"),
        by_program=_groups(table, "program"),
        by_model=_groups(table, "model"),
        top=[
            by_key[(str(t), int(p))]
            for t, p in zip(ranked["trace"].head(top), ranked["pid"].head(top))
        ],
    )


def find_traces(paths: list[Path], max_depth: int = 4) -> tuple[list[str], list[Failure]]:
    """Trace directories (holding a meta.json) among `paths` and below them (at most
    `max_depth` levels), sorted; a path that holds none is a failure, with why."""
    found: set[str] = set()
    failures = []
    for path in paths:
        try:
            if (path / "meta.json").is_file():
                found.add(str(path))
                continue
            if not path.is_dir():
                failures.append(Failure(str(path), "no such trace or directory"))
                continue
            here = {
                str(p.parent)
                for depth in range(1, max_depth + 1)
                for p in path.glob("/".join(["*"] * depth) + "/meta.json")
                if p.is_file() and not p.is_symlink()
            }
        except OSError as exc:  # a directory this user may not enter: one failure of many
            failures.append(Failure(str(path), str(unreadable(path, exc)), readable=False))
            continue
        if not here:
            failures.append(Failure(str(path), "holds no trace (no meta.json below it)"))
        found |= here
    return sorted(found), failures
