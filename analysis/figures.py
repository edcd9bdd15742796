"""What the passes over a trace come to, per process: its memory side (IO-buffer heap,
retained buffers, connections, the whole cost of an idle connection) from the reads
posted at the end, the allocations live then and the small tables.

Pure functions: frames and the passes' results in, typed results (analysis.results) out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.cost import (
    IdleBuffers,
    Rounding,
    allocation_footprint,
    allocator_rounding,
    whole_cost,
)
from analysis.idle import socket_generations
from analysis.memory import (
    CONNECTION_KEYS,
    buffer_attribution,
    buffer_sites,
    connections_from_activity,
    generations_of,
    idle_connection_cost,
    idle_reads,
    live_at,
    mapping_intervals,
    program_break,
    read_sites,
    walked_blocks,
    with_residency,
    write_buffer_heap,
)
from analysis.owned import latest_walks, owned_columns, owning_of
from analysis.reading import ReadsAtEnd
from analysis.results import (
    QUIET,
    Allocations,
    Buffers,
    BufferSite,
    ConnectionCounts,
    HeapLive,
    IoBufferHeap,
    KernelPart,
    MemoryFigures,
    PerIdleConnection,
    Provenance,
    ResidentMemory,
    RetainedBuffers,
    SavingPart,
    Unknown,
)
from analysis.waiters import Waiting, latest_waiters, merged_parts, waiting_of
from probes.format.meta import MemoryOptions, Meta
from probes.format.schema import PostFlag, Source


def _stacked(*frames: pd.DataFrame) -> pd.DataFrame:
    full = [f for f in frames if not f.empty]
    if not full:
        return frames[0]
    return full[0] if len(full) == 1 else pd.concat(full, ignore_index=True)


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
        int(pid): [Unknown(int(n), QUIET)]
        for pid, n in zip(counts.index.tolist(), counts.tolist())
        if n
    }


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


@dataclass
class Resident:
    """Per pid, resident bytes first seen, at the end, at peak (analysis.passes.RssPass)."""

    first: dict[int, int]
    now: dict[int, int]
    peak: dict[int, int]
    sources: dict[int, str]  # where they come from


def rss_sources(rss_pids: set[int], status: pd.DataFrame) -> dict[int, str]:
    """Per pid, where its resident-memory figures come from."""
    out = {}
    for pid in set(status["pid"].tolist()) | rss_pids:
        what = set(status.loc[status["pid"] == pid, "what"].tolist())
        parts = [f"/proc/PID/status at {' and '.join(sorted(what))}"] if what else []
        if pid in rss_pids:
            parts.append("kmem:rss_stat while recording")
        out[int(pid)] = "; ".join(parts)
    return out


@dataclass
class MemoryInputs:
    """What the memory side of a trace is computed from."""

    meta: Meta
    state: dict[str, pd.DataFrame]  # the small tables (analysis.windows.STATE_TABLES)
    sockets: pd.DataFrame
    reads: ReadsAtEnd
    traced_live: pd.DataFrame  # allocations the probes saw live at the end
    write_buffers: pd.DataFrame
    resident: Resident
    fitted_heap: dict[int, np.ndarray]  # pid -> traced heap at its settled memory points
    end_ns: int
    threshold_ns: int


def memory_by_process(m: MemoryInputs) -> dict[int, MemoryFigures]:
    """Per pid: IO-buffer heap (all posted reads, and those of idle connections), the heap
    tracked live, resident memory, connections and the whole cost of an idle one. Sampled
    allocation figures are scaled and flagged."""
    meta, state = m.meta, m.state
    memory = meta.memory
    if memory is None:
        return {}
    sample = memory.sample_every
    probed, walked_heap, walked_maps, failed = walked_for(memory, state["heap_blocks"])
    live = _stacked(m.traced_live, walked_heap)
    posted = m.reads.posted
    attributed = buffer_attribution(posted, live)
    # buffers outside every allocation: in memory the program mapped itself?
    mapped = mappings_live(state["maps"], state["unmaps"], walked_maps, m.end_ns)
    attributed = with_mapped_bytes(attributed, mapped)
    brk = program_break(state["maps"]).set_index("pid")
    sites = buffer_sites(attributed, live, state["stacks"])
    posted_from = read_sites(attributed, state["stacks"])
    # every connection's last data buffer still held, idle or not (a pool's buffers once each);
    # those of idle connections are the retained buffers
    held = m.reads.data.buffers(posted, live, m.end_ns, 0)
    retained = held[m.end_ns - held["end_ns"] >= m.threshold_ns].reset_index(drop=True)
    # resident bytes, where the recorder measured them (NaN -> 0: not measured)
    residency = state["residency"]
    parked = attributed["source"] == Source.PARKED
    attributed["resident_bytes"] = (
        with_residency(attributed, residency, "posted")
        .where(~parked, with_residency(attributed, residency, "parked"))
        .fillna(0)
    )
    retained["resident_bytes"] = with_residency(retained, residency, "last_data").fillna(0)
    write_heap = write_buffer_heap(m.write_buffers, live).set_index("pid")
    sockets = m.sockets.assign(gen=socket_generations(m.sockets, m.reads.ends_of_stream))
    connections = connections_from_activity(
        m.reads.activity.copy(), sockets, retained, m.end_ns, m.threshold_ns
    )
    connections = closed_by_exit(connections, exited_while_recorded(state))
    # the posted reads of idle connections (silent since first seen: sampled, or read)
    idle = idle_reads(attributed, connections)
    # a connection whose stream ended keeps no buffer: the fd's next connection is another
    going = connections.loc[connections["closed_ns"].isna(), CONNECTION_KEYS]
    retained = retained.assign(gen=generations_of(retained)).merge(going, on=CONNECTION_KEYS)
    # io_uring POLL_ADDs armed on idle connections: a request (io_kiocb) each, in the kernel
    polls = m.reads.polls
    idle_keys = connections.loc[connections["idle"], CONNECTION_KEYS]
    polling = polls.assign(gen=generations_of(polls))[CONNECTION_KEYS].merge(idle_keys)
    polls_of = polling.groupby("pid").size()
    # what carries the idle connections' waits (a recording made before idlebuf read them:
    # unknown)
    waiters = latest_waiters(state["waiters"])
    waiting = waiting_of(waiters, connections.loc[connections["idle"]])
    looked = meta.format_version >= 2
    # the state they keep alive, walked (recordings before format 3 did not: unknown)
    walks = latest_walks(state["owned"])
    owning = owning_of(walks, connections.loc[connections["idle"]])
    cost = idle_connection_cost(connections).set_index("pid")
    late = bool(meta.targets.pids)
    if memory.alloc_probes:  # every allocator probed
        probed |= set(attributed["pid"].tolist())
    heap_unknowns = buffer_unknowns(attributed, memory, probed, failed, late)
    retained_unknowns = quiet_unknowns(connections, late)
    methods = {a.pid: a.method for a in memory.allocators}
    resident = m.resident
    out = {}
    pids = set(live["pid"]) | set(attributed["pid"]) | set(resident.now) | set(connections["pid"])
    for pid in sorted(pids):
        conns = connections[connections["pid"] == pid]
        open_conns = conns[conns["closed_ns"].isna()]
        mine = attributed[attributed["pid"] == pid]
        mine_idle = mine[idle[mine.index]]
        holders = mine[mine["alloc_size"] > 0].drop_duplicates("alloc_addr")
        heap = m.traced_live[m.traced_live["pid"] == pid]
        mine_retained = retained[retained["pid"] == pid]
        retained_unknown = retained_unknowns.get(int(pid), [])
        walked_pid = not memory.alloc_probes and int(pid) not in probed
        sites_here = sites[sites["pid"] == pid].to_dict("records")
        from_here = posted_from[posted_from["pid"] == pid].to_dict("records")
        figures = MemoryFigures(
            io_buffer_heap=IoBufferHeap(
                bytes=int(mine["attributed_bytes"].sum()),
                idle_bytes=int(mine_idle["attributed_bytes"].sum()),
                allocations=len(holders),
                allocation_bytes=int(holders["alloc_size"].sum()),
                mapped_bytes=int(mine["mapped_bytes"].sum()),
                idle_mapped_bytes=int(mine_idle["mapped_bytes"].sum()),
                resident_bytes=int(mine["resident_bytes"].sum()),
                idle_resident_bytes=int(mine_idle["resident_bytes"].sum()),
                unknown=heap_unknowns.get(int(pid), []),
            ),
            idle_posted_reads=int(len(mine_idle)),
            io_buffer_sites=[_site(r) for r in sites_here],
            read_sites=[_site(r) for r in from_here],
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
                resident.first.get(int(pid)),
                resident.now.get(int(pid)),
                resident.peak.get(int(pid)),
                resident.sources.get(int(pid), "unknown") if pid in resident.now else "unknown",
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
            connection_rows=owned_columns(conns, walks[walks["pid"] == pid]),
        )
        figures.per_idle_connection = whole_cost(
            figures.per_idle_connection,
            meta,
            int(pid),
            state["memory_points"],
            m.sockets,
            conns,
            m.fitted_heap.get(int(pid)),
            idle_buffers(
                mine_idle,
                mine_retained,
                live,
                rounding_of(memory, int(pid)),
                int(polls_of.get(pid, 0)),
            ),
            dataclasses.replace(
                waiting.get(int(pid), Waiting(read=looked)),
                parked=parked_without_waiter(mine_idle, waiters),
            ),
            owning.get(int(pid)),
        )
        out[int(pid)] = figures
    return out


def exited_while_recorded(state: dict[str, pd.DataFrame]) -> set[int]:
    """The targets that exited before the recording ended: seen (processes), but not among
    those whose status the recorder read as it ended (proc_status 'end', every live
    target's). None in a trace without those reads (older, or cut short)."""
    status = state["proc_status"]
    ended = status.loc[status["what"] == "end", "pid"]
    if ended.empty:
        return set()
    return set(state["processes"]["pid"].astype(int).tolist()) - set(ended.astype(int).tolist())


def closed_by_exit(connections: pd.DataFrame, exited: set[int]) -> pd.DataFrame:
    """Connections of processes that exited are closed, at their last sign of life (last
    data, or its first read or sample) when nothing closed them before: a PostgreSQL backend reads
    the client's Terminate message, or a startup it refuses, and exits - no read returns 0,
    no later sample shows the socket gone, and it had stayed an idle connection open."""
    if not exited:
        return connections
    gone = connections["pid"].isin(list(exited)) & connections["closed_ns"].isna()
    if not gone.any():
        return connections
    out = connections.copy()
    last = out[["last_data_ns", "opened_ns"]].max(axis=1)
    out.loc[gone, "closed_ns"] = last[gone]
    out.loc[gone, "idle"] = False
    out.loc[gone, "retained_bytes"] = 0
    return out


def parked_without_waiter(idle_reads: pd.DataFrame, waiters: pd.DataFrame) -> int:
    """Reads parked on idle connections (EAGAIN, then a readiness wait) whose wait no thread
    or process found on that connection alone carries: a runtime's (green threads,
    goroutines). MariaDB's threads read with MSG_DONTWAIT and then poll() their own socket,
    a PostgreSQL backend epoll_waits on its own: their parked reads have a waiter."""
    parked = idle_reads[idle_reads["source"] == Source.PARKED]
    if parked.empty or waiters.empty:
        return len(parked)
    carried = waiters[waiters["kind"].isin(["thread", "process"])][["pid", "fd"]]
    marked = parked[["pid", "fd"]].merge(carried.drop_duplicates(), how="left", indicator=True)
    return int((marked["_merge"] == "left_only").sum())


def rounding_of(memory: MemoryOptions, pid: int) -> Rounding:
    """How the allocator the probes traced in `pid` rounds a request."""
    probed = {a.pid: a for a in memory.allocators if a.method == "probes"}
    allocator = probed.get(pid)
    return allocator_rounding(allocator.library if allocator else None)[1]


def idle_buffers(
    posted: pd.DataFrame,
    retained: pd.DataFrame,
    live: pd.DataFrame,
    rounding: Rounding,
    polls: int = 0,
) -> IdleBuffers:
    """What one process's idle connections' buffers take: `posted` its idle posted or
    parked reads (with_mapped_bytes() rows), `retained` its retained buffers, `live` the
    allocations live at the end (an `allocator` column for those the walkers found). An
    allocation holding several of them (a pool's buffer) is counted once. `polls`: io_uring
    POLL_ADDs armed on them (their requests are counted with the reads')."""
    columns = ["pid", "alloc_addr", "alloc_size"]
    held = pd.concat([posted[columns], retained[columns]], ignore_index=True)
    held = held[held["alloc_size"] > 0].drop_duplicates(["pid", "alloc_addr"])
    kinds = live.reindex(columns=["pid", "addr", "allocator"]).rename(
        columns={"addr": "alloc_addr"}
    )
    held = held.merge(kinds.drop_duplicates(["pid", "alloc_addr"]), how="left")
    footprint = allocation_footprint(
        held["alloc_size"].to_numpy(np.int64), held["allocator"].to_numpy(object), rounding
    )
    unseen = (posted["alloc_size"] == 0) & (posted["mapped_bytes"] == 0) & (posted["len"] > 0)
    return IdleBuffers(
        allocation_bytes=int(footprint.sum()),
        mapped_bytes=int(posted["mapped_bytes"].sum()),
        unseen_bytes=int(posted.loc[unseen, "len"].sum()),
        unseen=int(unseen.sum()),
        uring_requests=int((posted["source"] == Source.URING).sum()) + polls,
    )


def _site(row: dict[Hashable, Any]) -> BufferSite:
    return BufferSite(int(row["bytes"]), int(row["buffers"]), [str(x) for x in row["symbols"]])


def _per_connection(total: float, connections: int) -> float:
    return float(total) / connections if connections else 0.0


def server_cost(processes: list[MemoryFigures]) -> PerIdleConnection | None:
    """The recording's targets as one server (PostgreSQL's postmaster and its backends): each
    part per idle connection of them all, weighted by each process's idle connections; a
    part unknown in any process with idle connections is unknown. None without any."""
    weights = [(m, m.connections.idle) for m in processes if m.connections.idle]
    idle = sum(n for _, n in weights)
    if not idle:
        return None
    costs = [(m.per_idle_connection, n) for m, n in weights]

    def mean(name: str) -> float | None:
        values = [(getattr(c, name), n) for c, n in costs]
        if any(v is None for v, _ in values):
            return None
        return round(sum(v * n for v, n in values) / idle, 1)

    out = PerIdleConnection(
        user_buffer_bytes=sum(c.user_buffer_bytes for c, _ in costs),
        socket_kernel_bytes=sum(c.socket_kernel_bytes for c, _ in costs),
        io_buffer_bytes=mean("io_buffer_bytes") or 0.0,
        buffer_bytes=mean("buffer_bytes"),
        waiter_bytes=mean("waiter_bytes"),
        waiter_parts=merged_parts([(c.waiter_parts, n) for c, n in costs], idle),
        owned_bytes=mean("owned_bytes"),
        owned_how="; ".join(sorted({c.owned_how for c, _ in costs if c.owned_how})) or None,
        owned_connections=sum(c.owned_connections or 0 for c, _ in costs) or None,
        owned_shared_bytes=sum(c.owned_shared_bytes or 0 for c, _ in costs) or None,
        owned_check="; ".join(c.owned_check for c, _ in costs if c.owned_check) or None,
        kernel_bytes=mean("kernel_bytes"),
        total_bytes=mean("total_bytes"),
        total_at_least_bytes=mean("total_at_least_bytes") or 0.0,
        saving_bytes=round(sum(c.saving_bytes for c, _ in costs), 1),
        resident_bytes=mean("resident_bytes") or 0.0,
    )
    out.bytes = round((out.user_buffer_bytes + out.socket_kernel_bytes) / idle, 1)
    if out.kernel_bytes is not None:  # every process's slab model: their mean, cache by cache
        out.kernel_parts = _merged_kernel_parts([(c.kernel_parts, n) for c, n in costs], idle)
    reasons = {c.kernel_reason for c, _ in costs if c.kernel_reason}
    out.kernel_reason = "; ".join(sorted(reasons)) or None
    saving: dict[str, float] = {}
    for c, _ in costs:
        for part in c.saving_parts:
            saving[part.part] = saving.get(part.part, 0.0) + part.bytes
    out.saving_parts = [SavingPart(name, round(b, 1)) for name, b in saving.items()]
    active = sum(max(0, m.connections.open - m.connections.idle) for m in processes)
    out.saving_assumes = (
        f"frees the {idle:,} idle connections' buffers and waiters, in every process; one "
        f"event loop; a pool of one buffer per active connection ({active:,})"
    )
    out.whole_unknown = merged_unknowns([u for c, _ in costs for u in c.whole_unknown])
    out.unknown = merged_unknowns([u for c, _ in costs for u in c.unknown])
    return out


def _merged_kernel_parts(
    weighted: list[tuple[list[KernelPart], int]], idle: int
) -> list[KernelPart]:
    """Slab parts of several processes (each with its idle connections) per idle connection
    of them all."""
    objects: dict[str, float] = {}
    sizes: dict[str, float] = {}
    for parts, n in weighted:
        for p in parts:
            objects[p.cache] = objects.get(p.cache, 0.0) + p.objects * n
            sizes[p.cache] = p.object_bytes
    return [
        KernelPart(cache, round(o / idle, 4), sizes[cache], round(o / idle * sizes[cache], 1))
        for cache, o in objects.items()
    ]


def merged_unknowns(unknowns: list[Unknown]) -> list[Unknown]:
    """One line per reason, with the connections (and bytes) of every process it concerns:
    PostgreSQL's 101 backends with one idle connection each had listed the same reason 101
    times, each for 1 connection."""
    by_why: dict[str, Unknown] = {}
    for u in unknowns:
        seen = by_why.get(u.why)
        if seen is None:
            by_why[u.why] = Unknown(u.connections, u.why, u.bytes)
            continue
        seen.connections += u.connections
        seen.bytes = None if seen.bytes is None or u.bytes is None else seen.bytes + u.bytes
    return list(by_why.values())
