"""The figures `idlebuf report` shows, gathered from one trace into a TraceSummary."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from analysis.buffers import buffer_group_summary
from analysis.cost import whole_cost
from analysis.memory import (
    allocation_intervals,
    buffer_attribution,
    buffer_sites,
    buffer_timeline,
    connection_activity,
    connection_table,
    idle_connection_cost,
    idle_reads,
    live_at,
    mapping_intervals,
    process_timeline,
    program_break,
    read_sites,
    resident_events,
    retained_buffers,
    rss_now_and_peak,
    timeline_edges,
    walked_blocks,
    with_residency,
    write_buffer_heap,
)
from analysis.reads import (
    SUMMARY_COUNTS,
    network_reads,
    parked_at_attach,
    parked_reads,
    posted_timeline,
    process_peaks,
    read_intervals,
    read_summary,
    write_summary,
)
from analysis.results import (
    TIMELINE_FIGURES,
    Allocations,
    BufferGroup,
    Buffers,
    BufferSite,
    ConnectionCounts,
    HeapLive,
    IoBufferHeap,
    MemoryFigures,
    NowAndPeak,
    PerIdleConnection,
    ProcessSummary,
    Provenance,
    ReadCounts,
    ReadinessWaits,
    ResidentMemory,
    RetainedBuffers,
    SourceFigures,
    TimelinePoint,
    TraceSummary,
    Unknown,
    WriteFigures,
)
from probes.format.errors import UsageError
from probes.format.meta import MemoryOptions, Meta
from probes.format.reader import Trace
from probes.format.schema import PostFlag, Source

# Sources whose reads count in a process's totals (io_uring reads of files do not).
NETWORK_SOURCES = ("syscall", "uring", "parked")


def end_of_recording(trace: Trace) -> int:
    """The instant "now" refers to: the recording's end (its last event if it was killed)."""
    if trace.meta.end_monotonic_ns is not None:
        return trace.meta.end_monotonic_ns
    stamps = [
        int(df["ts_ns"].max()) for df in trace.tables.values() if "ts_ns" in df and not df.empty
    ]
    return max(stamps, default=0)


def walked_for(
    memory: MemoryOptions, heap_blocks: pd.DataFrame
) -> tuple[set[int], pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(pids whose allocator was probed, and the walkers' allocations, mappings and failed
    lookups for the others: walked_blocks() of what the probes did not see)."""
    probed = {a.pid for a in memory.allocators if a.method == "probes"}
    walked_heap, walked_maps, failed = walked_blocks(heap_blocks)
    if memory.alloc_probes:  # the probes saw it all; the walk is a cross-check
        return probed, walked_heap.iloc[0:0], walked_maps.iloc[0:0], failed
    walked_heap = walked_heap[~walked_heap["pid"].isin(probed)]
    walked_maps = walked_maps[~walked_maps["pid"].isin(probed)]
    return probed, walked_heap, walked_maps, failed


def mappings_live(
    maps: pd.DataFrame, unmaps: pd.DataFrame, walked_maps: pd.DataFrame, at_ns: int
) -> pd.DataFrame:
    """The program's own mappings live at `at_ns`: those traced and those the walkers found."""
    mapped = live_at(mapping_intervals(maps, unmaps), at_ns, "map_ns", "unmap_ns")
    return _stacked(mapped, walked_maps).drop_duplicates(["pid", "addr"])


def with_mapped_bytes(attributed: pd.DataFrame, mapped: pd.DataFrame) -> pd.DataFrame:
    """buffer_attribution()'s rows with `mapped_bytes`: of a buffer in no allocation, the
    bytes inside a mapping the program made itself."""
    outside = attributed["alloc_size"] == 0
    in_maps = buffer_attribution(
        attributed[outside].drop(columns=["alloc_addr", "alloc_size", "attributed_bytes"]), mapped
    )
    attributed = attributed.assign(mapped_bytes=0)
    attributed.loc[outside, "mapped_bytes"] = in_maps["attributed_bytes"].to_numpy()
    return attributed


def buffer_unknowns(
    attributed: pd.DataFrame,
    memory: MemoryOptions,
    probed: set[int],
    failed: pd.DataFrame,
    late: bool,
) -> dict[int, list[Unknown]]:
    """Per pid, the posted buffers (with_mapped_bytes() rows) in no allocation and no
    mapping whose allocation could not be seen: by the probes, made before the attach or
    smaller than what they track; by the walkers, the lookup `failed` (and says why). The
    others are not heap."""
    unseen = (attributed["alloc_size"] == 0) & (attributed["mapped_bytes"] == 0)
    unseen &= attributed["len"] > 0  # a buffer-select read pins no buffer of its own
    by_probes = attributed["pid"].isin(probed)
    too_small = unseen & by_probes & (attributed["len"] < memory.min_alloc)
    before = unseen & by_probes & ~too_small & late
    why_failed = attributed[["pid", "addr"]].merge(
        failed.rename(columns={"buffer": "addr"}), on=["pid", "addr"], how="left"
    )["why"]
    why_failed.index = attributed.index
    lookup_failed = unseen & ~by_probes & why_failed.notna()
    out: dict[int, list[Unknown]] = {}
    for _, mine in attributed.groupby("pid"):
        found = [
            Unknown(int(rows.sum()), why, int(mine.loc[rows[rows].index, "len"].sum()))
            for rows, why in (
                (before[mine.index], "buffers allocated before the attach: not traced"),
                (too_small[mine.index], f"buffers smaller than --min-alloc {memory.min_alloc:,}"),
            )
            if rows.any()
        ]
        failed_here = lookup_failed[mine.index]
        for why, rows in mine[failed_here].groupby(why_failed[mine.index][failed_here]):
            found.append(Unknown(len(rows), str(why), int(rows["len"].sum())))
        if found:
            out[int(mine["pid"].iloc[0])] = found
    return out


def quiet_unknowns(connections: pd.DataFrame, late: bool) -> dict[int, list[Unknown]]:
    """Per pid, the idle connections that received nothing since the attach and hold no
    read now: what they kept from before cannot be seen."""
    if not late:
        return {}
    quiet = connections["idle"] & connections["last_data_ns"].isna()
    quiet &= connections["posted_bytes"] == 0
    counts = connections[quiet].groupby("pid").size()
    return {
        int(pid): [Unknown(int(n), "idle connections with no data since the attach")]
        for pid, n in zip(counts.index.tolist(), counts.tolist())
        if n
    }


def memory_by_process(
    trace: Trace,
    reads: pd.DataFrame,
    allocations: pd.DataFrame,
    end_ns: int,
    idle_threshold_s: float,
) -> dict[int, MemoryFigures]:
    """Per pid: IO-buffer heap (all posted reads, and those of idle connections), the heap
    tracked live, resident memory. Sampled allocation figures are scaled and flagged.

    `reads` are the network reads' intervals, `allocations` allocation_intervals()."""
    if trace.meta.memory is None:
        return {}
    sample = trace.meta.memory.sample_every
    probed, walked_heap, walked_maps, failed = walked_for(trace.meta.memory, trace["heap_blocks"])
    live = live_at(allocations, end_ns, "alloc_ns", "free_ns")
    tracked = live  # what the allocator probes saw (heap live)
    live = _stacked(live, walked_heap)
    posted = reads[reads["end_ns"].isna()]
    attributed = buffer_attribution(posted, live)
    # buffers outside every allocation: in memory the program mapped itself?
    mapped = mappings_live(trace["maps"], trace["unmaps"], walked_maps, end_ns)
    attributed = with_mapped_bytes(attributed, mapped)
    brk = program_break(trace["maps"]).set_index("pid")
    sites = buffer_sites(attributed, live, trace["stacks"])
    posted_from = (
        read_sites(attributed, trace["stacks"])
        if "stack_id" in attributed
        else read_sites(attributed.assign(stack_id=0), trace["stacks"])
    )
    idle = idle_reads(attributed, connection_activity(reads), end_ns, int(idle_threshold_s * 1e9))
    # every connection's last data buffer still held, idle or not (a pool's buffers once each);
    # those of idle connections are the retained buffers
    held = retained_buffers(reads, live, end_ns, 0)
    retained = held[end_ns - held["end_ns"] >= int(idle_threshold_s * 1e9)].reset_index(drop=True)
    # resident bytes, where the recorder measured them (NaN -> 0: not measured)
    residency = trace["residency"]
    parked = attributed["source"] == Source.PARKED
    attributed["resident_bytes"] = (
        with_residency(attributed, residency, "posted")
        .where(~parked, with_residency(attributed, residency, "parked"))
        .fillna(0)
    )
    retained["resident_bytes"] = with_residency(retained, residency, "last_data").fillna(0)
    rss = rss_now_and_peak(resident_events(trace["rss"], trace["proc_status"])).set_index("pid")
    write_heap = write_buffer_heap(trace["writes"], live).set_index("pid")
    connections = connection_table(
        reads, trace["sockets"], retained, end_ns, int(idle_threshold_s * 1e9)
    )
    cost = idle_connection_cost(connections).set_index("pid")
    late = bool(trace.meta.targets.pids)
    if trace.meta.memory.alloc_probes:  # every allocator probed
        probed |= set(attributed["pid"].tolist())
    heap_unknowns = buffer_unknowns(attributed, trace.meta.memory, probed, failed, late)
    retained_unknowns = quiet_unknowns(connections, late)
    sources = _rss_sources(trace)
    methods = {a.pid: a.method for a in trace.meta.memory.allocators}
    out = {}
    for pid in set(live["pid"]) | set(attributed["pid"]) | set(rss.index):
        conns = connections[connections["pid"] == pid]
        open_conns = conns[conns["closed_ns"].isna()]
        mine = attributed[attributed["pid"] == pid]
        mine_idle = mine[idle[mine.index]]
        holders = mine[mine["alloc_size"] > 0].drop_duplicates("alloc_addr")
        heap = tracked[tracked["pid"] == pid]
        mine_retained = retained[retained["pid"] == pid]
        heap_unknown = heap_unknowns.get(int(pid), [])
        retained_unknown = retained_unknowns.get(int(pid), [])
        walked_pid = int(pid) not in probed
        out[int(pid)] = MemoryFigures(
            io_buffer_heap=IoBufferHeap(
                bytes=int(mine["attributed_bytes"].sum()),
                idle_bytes=int(mine_idle["attributed_bytes"].sum()),
                allocations=len(holders),
                allocation_bytes=int(holders["alloc_size"].sum()),
                mapped_bytes=int(mine["mapped_bytes"].sum()),
                idle_mapped_bytes=int(mine_idle["mapped_bytes"].sum()),
                resident_bytes=int(mine["resident_bytes"].sum()),
                idle_resident_bytes=int(mine_idle["resident_bytes"].sum()),
                unknown=heap_unknown,
            ),
            idle_posted_reads=int(len(mine_idle)),
            io_buffer_sites=[
                BufferSite(int(r["bytes"]), int(r["buffers"]), [str(x) for x in r["symbols"]])
                for r in sites[sites["pid"] == pid].to_dict("records")
            ],
            read_sites=[
                BufferSite(int(r["bytes"]), int(r["buffers"]), [str(x) for x in r["symbols"]])
                for r in posted_from[posted_from["pid"] == pid].to_dict("records")
            ],
            write_buffer_heap=Allocations(
                int(write_heap["allocations"].get(pid, 0)), int(write_heap["bytes"].get(pid, 0))
            ),
            held_data_buffers=Buffers(
                int((held["pid"] == pid).sum()),
                int(held.loc[held["pid"] == pid, "attributed_bytes"].sum()),
            ),
            retained=RetainedBuffers(
                len(mine_retained),
                int(mine_retained["attributed_bytes"].sum()),
                int(mine_retained["resident_bytes"].sum()),
                retained_unknown,
            ),
            heap_live=HeapLive(
                allocations=None if walked_pid else len(heap) * sample,
                bytes=None if walked_pid else int(heap["size"].sum()) * sample,
                estimated=sample > 1,
                brk_heap_bytes=int(brk["brk_heap_bytes"].get(pid, 0)),
                mappings=int((mapped["pid"] == pid).sum()),
                mapped_bytes=int(mapped.loc[mapped["pid"] == pid, "size"].sum()),
                since_attach=late,
            ),
            rss=ResidentMemory(
                _maybe_int(rss["rss_first"].get(pid)),
                _maybe_int(rss["rss_now"].get(pid)),
                _maybe_int(rss["rss_peak"].get(pid)),
                sources.get(int(pid), "unknown") if pid in rss.index else "unknown",
            ),
            connections=ConnectionCounts(len(open_conns), int(open_conns["idle"].sum())),
            socket_kernel_bytes=int(open_conns["socket_kernel_bytes"].sum()),
            per_idle_connection=PerIdleConnection(
                resident_bytes=_per_connection(
                    mine_idle["resident_bytes"].sum()
                    + mine_retained["resident_bytes"].sum()
                    + cost["socket_kernel_bytes"].get(pid, 0),
                    int(cost["idle_connections"].get(pid, 0)),
                ),
                user_buffer_bytes=int(cost["user_buffer_bytes"].get(pid, 0)),
                socket_kernel_bytes=int(cost["socket_kernel_bytes"].get(pid, 0)),
                bytes=float(cost["per_idle_connection_bytes"].get(pid, 0.0)),
                unknown=retained_unknown,
            ),
            allocations_found_by=methods.get(int(pid), "probes"),
            connection_rows=conns,
        )
        figures = out[int(pid)]
        figures.per_idle_connection = whole_cost(
            figures.per_idle_connection,
            trace.meta,
            int(pid),
            trace["memory_points"],
            trace["sockets"],
            conns,
            allocations,
            figures.io_buffer_heap.idle_bytes + figures.retained.bytes,
            int((mine_idle["source"] == Source.URING).sum()),
        )
    return out


MAX_TIMELINE_POINTS = 10_000  # per process: each point is an address join


def recording_span(trace: Trace) -> tuple[int, int]:
    """(start, end) of the recording, CLOCK_MONOTONIC ns."""
    start = trace.meta.tracing_since_ns or trace.meta.clock.monotonic_ns
    end = end_of_recording(trace)
    if not start:
        stamps = [
            int(df["ts_ns"].min()) for df in trace.tables.values() if "ts_ns" in df and not df.empty
        ]
        start = min(stamps, default=end)
    return start, max(start, end)


def timeline_step(trace: Trace, wanted_s: float, at_most: bool = False) -> float:
    """`wanted_s` if the recording's time series at that step has at most
    MAX_TIMELINE_POINTS points; else, with `at_most`, the step that gives that many, and
    without, a UsageError saying why (a hostile trace's timestamps cannot make it allocate
    without bound)."""
    return step_for_span(*recording_span(trace), wanted_s, at_most)


def step_for_span(start: int, end: int, wanted_s: float, at_most: bool = False) -> float:
    """timeline_step() for a recording from `start` to `end`."""
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


def timeline(
    trace: Trace,
    reads: pd.DataFrame,
    posted: pd.DataFrame,
    allocations: pd.DataFrame,
    writes: pd.DataFrame,
    resolution_s: float,
    idle_threshold_s: float,
) -> list[TimelinePoint]:
    """The per-process time series. `reads`: the network reads' intervals,
    `posted` their posted_timeline(), `allocations` allocation_intervals(), `writes` the
    writes' intervals."""
    start, end = recording_span(trace)
    resolution = max(1, int(resolution_s * 1e9))
    buffers = buffer_timeline(
        reads,
        allocations,
        timeline_edges(start, end, resolution),
        int(idle_threshold_s * 1e9),
        trace["sockets"],
    )
    frame = process_timeline(
        posted,
        allocations,
        resident_events(trace["rss"], trace["proc_status"]),
        trace["sockets"],
        start,
        end,
        resolution,
        buffers,
        posted_timeline(writes),
    )
    return [
        TimelinePoint(
            pid=int(row["pid"]),
            t_s=float(row["t_s"]),
            **{k: int(row[k]) for k in TIMELINE_FIGURES},
        )
        for row in frame.to_dict("records")
    ]


def summarize(
    trace: Trace,
    idle_threshold_s: float = 1.0,
    timeline_s: float | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> TraceSummary:
    """Every process's figures; "now" is the end of the recording. `progress` is told each
    stage as it begins."""
    if timeline_s is not None:
        timeline_s = timeline_step(trace, timeline_s)
    progress("read lifetimes")
    completed = parked_at_attach(read_intervals(trace["posts"], trace["completions"]))
    parked = parked_reads(completed, trace["waits"], trace["wait_ends"])
    intervals = pd.concat([completed, parked], ignore_index=True) if not parked.empty else completed
    end_ns = end_of_recording(trace)
    reads = network_reads(intervals)
    provenance = posted_provenance(reads[reads["end_ns"].isna()], trace.meta)
    posted = posted_timeline(reads)
    write_intervals = read_intervals(trace["writes"], trace["write_completions"])
    progress("buffers and allocations")
    allocations = allocation_intervals(trace["allocs"], trace["frees"])
    memory = memory_by_process(trace, reads, allocations, end_ns, idle_threshold_s)
    progress("per-process figures")
    by_label = read_summary(intervals)
    peaks = process_peaks(posted).set_index("pid")
    groups = buffer_group_summary(
        trace["buffer_groups"], trace["buffer_rings"], trace["buffer_uses"]
    )
    # multishot requests complete many times before their final completion; those
    # intermediate completions are buffer uses without a request pointer
    uses = trace["buffer_uses"]
    # the last name each process had (a process that execs is noted again)
    processes = trace["processes"].drop_duplicates("pid", keep="last").set_index("pid")
    writes = write_summary(write_intervals).set_index("pid")
    waits_begun = trace["waits"].groupby("pid").size()
    waits_ended = trace["wait_ends"].groupby("pid").size()
    pids = sorted(
        set(processes.index)
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
        extra = _intermediate(uses[uses["pid"] == pid])
        if "uring" in by_source:
            by_source["uring"].reads_completed += extra.reads_completed
            by_source["uring"].bytes_received += extra.bytes_received
        out.append(
            ProcessSummary(
                pid=int(pid),
                comm=str(processes["comm"].get(pid, "")) if pid in processes.index else "",
                posted_reads=NowAndPeak(totals.posted_reads, int(peaks["posted_peak"].get(pid, 0))),
                pinned_bytes=NowAndPeak(totals.pinned_bytes, int(peaks["pinned_peak"].get(pid, 0))),
                buffer_select_posted=totals.buffer_select_posted,
                by_source=by_source,
                readiness_waits=ReadinessWaits(
                    int(waits_begun.get(pid, 0)),
                    int(waits_begun.get(pid, 0) - waits_ended.get(pid, 0)),
                ),
                writes=WriteFigures(
                    **{k: int(writes[k].get(pid, 0)) for k in WriteFigures.__dataclass_fields__}
                ),
                reads_completed=totals.reads_completed + extra.reads_completed,
                reads_failed=totals.reads_failed,
                bytes_received=totals.bytes_received + extra.bytes_received,
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
    meta = trace.meta
    if timeline_s:
        progress("time series")
    return TraceSummary(
        processes=out,
        drops={k: int(v) for k, v in meta.drops.items()},
        complete=meta.complete,
        duration_s=meta.elapsed_s,
        stop_reason=meta.stop_reason,
        alternate_s=meta.alternate_s,
        uring=meta.probes.reads.uring,
        uring_before_attach=list(meta.uring_before_attach),
        idle_threshold_s=idle_threshold_s,
        timeline=(
            timeline(
                trace,
                reads,
                posted,
                _stacked(allocations, walked_blocks(trace["heap_blocks"])[0]),
                write_intervals,
                timeline_s,
                idle_threshold_s,
            )
            if timeline_s
            else None
        ),
        memory=meta.memory,
        at_attach=list(meta.at_attach),
        warnings=list(trace.warnings),
    )


def _stacked(*frames: pd.DataFrame) -> pd.DataFrame:
    """Frames of the same columns one after the other; empty ones (whose columns have no
    dtype) left out so that the others' dtypes stay."""
    full = [f for f in frames if not f.empty]
    if not full:
        return frames[0]
    return full[0] if len(full) == 1 else pd.concat(full, ignore_index=True)


def _maybe_int(value: object) -> int | None:
    return None if value is None or pd.isna(value) else int(value)  # type: ignore[call-overload]


def _rss_sources(trace: Trace) -> dict[int, str]:
    """Per pid, where its resident-memory figures come from."""
    status = trace["proc_status"]
    live = set(trace["rss"]["pid"].tolist())
    out = {}
    for pid in set(status["pid"].tolist()) | live:
        what = set(status.loc[status["pid"] == pid, "what"].tolist())
        parts = [f"/proc/PID/status at {' and '.join(sorted(what))}"] if what else []
        if pid in live:
            parts.append("kmem:rss_stat while recording")
        out[int(pid)] = "; ".join(parts)
    return out


def posted_provenance(posted_now: pd.DataFrame, meta: Meta) -> dict[int, Provenance]:
    """Per pid, where its posted reads now come from: found at attach (flagged SCANNED) or
    seen live, and what could not be found (rings only counted, stripped Go binaries)."""
    scanned = (posted_now["flags"].to_numpy(np.int64) & PostFlag.SCANNED) != 0
    found = pd.Series(scanned, index=posted_now.index).groupby(posted_now["pid"]).sum()
    total = posted_now.groupby("pid").size()
    out = {
        int(pid): Provenance(live=int(total[pid] - found[pid]), at_attach=int(found[pid]))
        for pid in total.index
    }
    for process in meta.at_attach:
        unknown = out.setdefault(process.pid, Provenance()).unknown
        for ring in process.rings:
            if ring.how != "walked" and ring.requests:
                unknown.append(
                    Unknown(
                        ring.requests,
                        f"io_uring requests posted before the attach on ring fd {ring.fd}, "
                        f"counted from /proc but not read: {ring.why}",
                    )
                )
        go = process.go
        if go is not None and go.why:
            unknown.append(Unknown(go.sockets, f"sockets of {go.why}: readers unknown"))
    return out


def _per_connection(total: float, connections: int) -> float:
    return float(total) / connections if connections else 0.0


def _intermediate(uses: pd.DataFrame) -> ReadCounts:
    """Data delivered by multishot completions other than the final one (which carry no
    request pointer and are not in the completions table)."""
    mid = uses[(uses["request"] == 0) & (uses["bytes"] > 0)]
    return ReadCounts(reads_completed=len(mid), bytes_received=int(mid["bytes"].sum()))


def _totals(rows: pd.DataFrame) -> ReadCounts:
    return ReadCounts(**{k: int(rows[k].sum()) for k in SUMMARY_COUNTS})
