"""The analysis: a trace directory -> a TraceSummary, every figure of `idlebuf report`, in
one pass over the trace's windows of time (analysis.windows), in bounded memory.

What stays in memory whatever the trace's length: the reads and writes open at a window's
bound, the allocations live then, one row per connection, EAGAIN returns not decided yet
and readiness waits not seen to end, the figures' values at the time series' edges, and
the small tables (processes, stacks, heap blocks, mappings, socket samples, memory points).
A window is `window_rows` events (None: the whole trace, one window); the figures are the
same whatever the windows (tests/unit/test_engine.py cuts traces every way to check it).
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.buffers import buffer_group_summary, intermediate_tally, merge_tallies, uses_tally
from analysis.cost import traced_heap_plan
from analysis.figures import (
    MemoryInputs,
    Resident,
    memory_by_process,
    posted_provenance,
    rss_sources,
    server_cost,
)
from analysis.idle import IdleSeries
from analysis.memory import SOCKET_KERNEL_FIELDS, walked_blocks
from analysis.passes import AllocPass, FitStamps, RssPass, WritePass, last_address_spaces
from analysis.reading import ReadPass, ReadsAtEnd
from analysis.reads import SUMMARY_COUNTS
from analysis.results import (
    TIMELINE_FIGURES,
    BufferGroup,
    MemoryFigures,
    NowAndPeak,
    ProcessSummary,
    Provenance,
    ReadCounts,
    ReadinessWaits,
    SourceFigures,
    TimelinePoint,
    TraceSummary,
    WriteFigures,
)
from analysis.series import EdgeSeries
from analysis.windows import TraceInput, Windows, open_input, recording_span
from probes.format.errors import UsageError

# Sources whose reads count in a process's totals (io_uring reads of files do not).
NETWORK_SOURCES = ("syscall", "uring", "parked")
MAX_TIMELINE_POINTS = 10_000  # per process
# figures of the time series measured only with --memory; sampled (None before a sample)
MEMORY_SERIES = ("io_buffer_heap_bytes", "heap_live_bytes")
SAMPLED_SERIES = ("rss_bytes", "socket_kernel_bytes")

Progress = Callable[[str], None]

# glibc's mallopt(3) parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's cap
TRIM_THRESHOLD = 128 << 20


@functools.cache
def reuse_freed_memory() -> None:
    """Have glibc's malloc keep the arrays a window frees for the next window's, rather than
    unmap each one and fault its pages back in, zeroed, for the next (by default an array
    over 128 KiB to a few MiB is a mapping of its own): at 10M events, 400,000 page faults
    become 90,000 and the system time halves; the peak grows by a few tens of MiB. Once per
    process; elsewhere than glibc, nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def step_for_span(start: int, end: int, wanted_s: float, at_most: bool = False) -> float:
    """`wanted_s` if a time series over start..end at that step has at most
    MAX_TIMELINE_POINTS points; else, with `at_most`, the step that gives that many, and
    without, a UsageError saying why (a hostile trace's timestamps cannot make it allocate
    without bound)."""
    if not math.isfinite(wanted_s) or wanted_s <= 0:
        raise UsageError(f"a time step must be a positive number of seconds, not {wanted_s}")
    points = (end - start) / (wanted_s * 1e9)
    if points <= MAX_TIMELINE_POINTS:
        return wanted_s
    if at_most:
        return (end - start) / 1e9 / MAX_TIMELINE_POINTS
    raise UsageError(
        f"a time series every {wanted_s:g} s over this recording's {(end - start) / 1e9:,.1f} s "
        f"is {points:,.0f} points; at most {MAX_TIMELINE_POINTS:,}"
    )


def timeline_edges(start_ns: int, end_ns: int, resolution_ns: int) -> np.ndarray:
    """The instants a time series reports: the end of each step, the last one at or after
    the end."""
    return np.arange(start_ns + resolution_ns, end_ns + resolution_ns, resolution_ns)


def analyze(
    path: str | Path,
    idle_threshold_s: float = 1.0,
    timeline_s: float | None = None,
    window_rows: int | None = None,
    progress: Progress = lambda _: None,
) -> TraceSummary:
    """Every process's figures; "now" is the end of the recording. `window_rows`: events
    per window (None: one window); `progress` is told how far it got after each window."""
    reuse_freed_memory()
    trace = open_input(path)
    start, end_ns = recording_span(trace)
    edges = None
    if timeline_s is not None:
        step = step_for_span(start, end_ns, timeline_s)
        edges = timeline_edges(start, end_ns, max(1, int(step * 1e9)))
    return _Analysis(trace, start, end_ns, idle_threshold_s, edges, progress).run(window_rows)


class _Analysis:
    def __init__(
        self,
        trace: TraceInput,
        start: int,
        end_ns: int,
        idle_threshold_s: float,
        edges: np.ndarray | None,
        progress: Progress,
    ) -> None:
        self.trace = trace
        self.start, self.end_ns = start, end_ns
        self.idle_threshold_s = idle_threshold_s
        self.threshold_ns = int(idle_threshold_s * 1e9)
        self.series = EdgeSeries(edges)
        self.progress = progress

    def run(self, window_rows: int | None) -> TraceSummary:
        # the first windows are read while the passes are set up
        with Windows(self.trace.parts, window_rows) as stream:
            return self._run(stream)

    def _run(self, stream: Windows) -> TraceSummary:
        trace, series = self.trace, self.series
        state, meta = trace.state, trace.meta
        memory = meta.memory is not None
        idle = IdleSeries(series, trace.sockets, self.threshold_ns)
        reads = ReadPass(series, idle, memory)
        plan = traced_heap_plan(meta, state["memory_points"])
        scale = meta.memory.sample_every if meta.memory else 1
        fit = {p: FitStamps(stamps, rounding, scale) for p, (stamps, rounding) in plan.items()}
        allocs = AllocPass(series, self.end_ns, walked_blocks(state["heap_blocks"])[0], fit)
        writes = WritePass(series)
        columns = ["ts_ns", "pid", "mm_id", "member"]
        last_mm = last_address_spaces(trace.column_parts("rss", columns), state["proc_status"])
        rss = RssPass(series, last_mm, state["proc_status"])
        tallies: list[pd.DataFrame] = []
        intermediate: list[pd.DataFrame] = []

        def others(low: float, bound: float, ev: dict[str, pd.DataFrame]) -> None:
            writes.window(low, ev)
            rss.window(low, bound, ev)
            uses = ev.get("buffer_uses")
            if uses is not None and not uses.empty:
                tallies.append(uses_tally(uses, state["buffer_rings"]))
                intermediate.append(intermediate_tally(uses))

        total, done, count = trace.events, 0, 0
        # the allocations, writes and resident memory are related on a second thread while
        # the reads are paired (numpy's sorts and Arrow's reads let go of the GIL): the
        # machine's other core. A read's buffer is attributed once the window's
        # allocations are paired.
        side = ThreadPoolExecutor(1, thread_name_prefix="idlebuf-side")
        try:
            for low, bound, ev in stream:
                paired = side.submit(allocs.window, low, ev)
                rest = side.submit(others, low, bound, ev)
                attribute = None
                if memory and series.wanted:
                    attribute = allocs.attribution(bound, paired.result)
                reads.window(low, ev, attribute)
                paired.result()
                rest.result()
                done += sum(len(df) for df in ev.values())
                count += 1
                self.progress(f"{done:,} of {total:,} events (window {count})")
            at_end = reads.finish()
        finally:
            side.shutdown(cancel_futures=True)
            reads.close()
        live = allocs.finish()
        written = writes.finish()
        idle.finish(at_end.ends_of_stream)
        self._sampled_sockets()
        resident = Resident(
            rss.first, rss.now, rss.peak, rss_sources(rss.traced, state["proc_status"])
        )
        figures = memory_by_process(
            MemoryInputs(
                meta, state, trace.sockets, at_end, live, written.buffers, resident,
                {p: f.live for p, f in fit.items()}, self.end_ns, self.threshold_ns,
            )
        )  # fmt: skip
        groups = buffer_group_summary(
            state["buffer_groups"], state["buffer_rings"], merge_tallies(tallies)
        )
        extra = _summed(intermediate)
        processes = self._processes(at_end, figures, written.summary, groups, extra)
        return TraceSummary(
            processes=processes,
            drops={k: int(v) for k, v in meta.drops.items()},
            complete=meta.complete,
            duration_s=meta.elapsed_s,
            stop_reason=meta.stop_reason,
            alternate_s=meta.alternate_s,
            uring=meta.probes.reads.uring,
            uring_before_attach=list(meta.uring_before_attach),
            idle_threshold_s=self.idle_threshold_s,
            timeline=self._timeline() if series.edges is not None else None,
            memory=meta.memory,
            at_attach=list(meta.at_attach),
            warnings=list(trace.warnings),
            per_idle_connection=server_cost(list(figures.values())),
        )

    def _processes(
        self,
        at_end: ReadsAtEnd,
        memory: dict[int, MemoryFigures],
        writes: pd.DataFrame,
        groups: pd.DataFrame,
        extra: pd.DataFrame,
    ) -> list[ProcessSummary]:
        by_label = at_end.counts
        provenance = posted_provenance(at_end.posted, self.trace.meta)
        # the last name each process had (a process that execs is noted again)
        last_seen = self.trace.state["processes"].drop_duplicates("pid", keep="last")
        names = last_seen.set_index("pid")["comm"]
        pids = sorted(
            set(names.index)
            | set(provenance)
            | set(by_label["pid"])
            | set(groups["pid"])
            | set(memory)
            | set(writes.index)
        )
        out = []
        for pid in pids:
            rows = by_label[by_label["pid"] == pid]
            by_source = {
                str(source): SourceFigures(
                    **_totals(src_rows).to_json(),
                    by_op={str(r.label): _totals(pd.DataFrame([r])) for r in src_rows.itertuples()},
                )
                for source, src_rows in rows.groupby("source")
            }
            totals = _totals(rows[rows["source"].isin(NETWORK_SOURCES)])
            more_reads = int(extra["reads"].get(pid, 0))
            more_bytes = int(extra["bytes"].get(pid, 0))
            if "uring" in by_source:
                by_source["uring"].reads_completed += more_reads
                by_source["uring"].bytes_received += more_bytes
            peak_reads, peak_bytes = at_end.peaks.get(int(pid), (0, 0))
            begun = int(at_end.waits_begun.get(pid, 0))
            out.append(
                ProcessSummary(
                    pid=int(pid),
                    comm=str(names.get(pid, "")),
                    posted_reads=NowAndPeak(totals.posted_reads, peak_reads),
                    pinned_bytes=NowAndPeak(totals.pinned_bytes, peak_bytes),
                    buffer_select_posted=totals.buffer_select_posted,
                    by_source=by_source,
                    readiness_waits=ReadinessWaits(
                        begun, begun - int(at_end.waits_ended.get(pid, 0))
                    ),
                    writes=WriteFigures(
                        **{k: int(writes[k].get(pid, 0)) for k in WriteFigures.__dataclass_fields__}
                    ),
                    reads_completed=totals.reads_completed + more_reads,
                    reads_failed=totals.reads_failed,
                    bytes_received=totals.bytes_received + more_bytes,
                    buffer_groups=[
                        BufferGroup(
                            ring=int(g["ring"]),
                            group=int(g["group"]),
                            how=str(g["how"]),
                            buffers=int(g["buffers"]),
                            bytes=int(g["bytes"]),
                            consumed=int(g["consumed"]),
                            available=int(g["available"]),
                        )
                        for g in groups[groups["pid"] == pid].to_dict("records")
                    ],
                    memory=memory.get(int(pid)),
                    provenance=provenance.get(int(pid), Provenance()),
                )
            )
        return out

    def _sampled_sockets(self) -> None:
        """Each process's socket samples on the time series' edges: the kernel's queue
        memory of its connections (0 in a sample that showed only its listener)."""
        sockets = self.trace.sockets
        if not self.series.wanted or sockets.empty:
            return
        conns = sockets[(sockets["family"] != "unix") & (sockets["state"] != "LISTEN")]
        kernel = conns[SOCKET_KERNEL_FIELDS].sum(axis=1).astype(np.int64)
        keys = [conns["pid"].to_numpy(np.int64), conns["ts_ns"].to_numpy(np.int64)]
        per_sample = pd.DataFrame({"kernel": kernel.groupby(keys).sum()})
        every = sockets[["pid", "ts_ns"]].drop_duplicates().astype(np.int64)
        every = every.sort_values(["pid", "ts_ns"], kind="stable")
        index = pd.MultiIndex.from_frame(every)
        per_sample = per_sample.reindex(index).fillna(0).astype(np.int64)
        pids = per_sample.index.get_level_values(0).to_numpy(np.int64)
        stamps = per_sample.index.get_level_values(1).to_numpy(np.int64)
        for pid in np.unique(pids).tolist():
            mine = pids == pid
            ts = stamps[mine]
            self.series.level("socket_kernel_bytes", pid, ts, per_sample["kernel"].to_numpy()[mine])

    def _first_samples(self) -> dict[int, float]:
        """Per pid, its first socket sample."""
        sockets = self.trace.sockets
        if sockets.empty:
            return {}
        first = sockets.groupby("pid")["ts_ns"].min()
        return dict(zip(first.index.astype(int).tolist(), first.astype(float).tolist()))

    def _timeline(self) -> list[TimelinePoint]:
        """Per pid and edge, the figures the passes left on the edges: counts from the
        start, sampled figures from their first sample (None before)."""
        edges = self.series.edges
        assert edges is not None
        meta = self.trace.meta
        memory = meta.memory is not None
        # the heap traced by the allocator probes; a walked one is not the heap (None)
        probed = set()
        if meta.memory is not None:
            probed = {a.pid for a in meta.memory.allocators if a.method == "probes"}
        sampled = self._first_samples()
        t_s = (edges - self.start) / 1e9
        out = []
        for pid in sorted(self.series.pids):
            columns: dict[str, list[int | None]] = {}
            for figure in TIMELINE_FIGURES:
                values = self.series.values(pid, figure)
                unmeasured = figure in SAMPLED_SERIES or (figure in MEMORY_SERIES and not memory)
                if figure == "heap_live_bytes" and memory and meta.memory is not None:
                    unmeasured |= not (meta.memory.alloc_probes or pid in probed)
                if values is None or (figure == "heap_live_bytes" and unmeasured):
                    columns[figure] = [None if unmeasured else 0] * len(edges)
                    continue
                if figure == "connections_open" and meta.targets.pids:
                    # attached late: what was open before the first sample was not seen
                    values = np.where(edges < sampled.get(pid, np.inf), np.nan, values)
                columns[figure] = [None if np.isnan(v) else int(v) for v in values]
            for i, t in enumerate(t_s.tolist()):
                out.append(
                    TimelinePoint(pid, float(t), **{f: columns[f][i] for f in TIMELINE_FIGURES})  # type: ignore[arg-type]
                )
        return out


def _summed(pieces: list[pd.DataFrame]) -> pd.DataFrame:
    full = [p for p in pieces if not p.empty]
    if not full:
        return pd.DataFrame(
            {"reads": pd.Series(dtype=np.int64), "bytes": pd.Series(dtype=np.int64)}
        )
    return pd.concat(full).groupby(level=0).sum()


def _totals(rows: pd.DataFrame) -> ReadCounts:
    return ReadCounts(**{k: int(rows[k].sum()) for k in SUMMARY_COUNTS})
