"""The whole cost of an idle connection: its IO buffer, the other user memory it takes, and
the kernel's objects behind it.

- Kernel (a stated model): the slab objects one connection holds - its socket, inode, file,
  dentry, epoll item and wait entry when it is in an epoll set, an io_uring request per read
  in flight - each costing its share of a slab on the recording's kernel
  (meta.kernel_objects), plus the queue memory sock_diag reports.
- Other user memory: the heap in use (summed by walking the allocator, or live allocations
  seen by the allocator probes) fitted against the sockets the process held, over the
  recording's memory points; the slope is bytes per connection, less what its IO buffers
  account for. RSS and the kernel's queue memory are fitted the same way, for comparison.

The slope is Theil-Sen's (the median of the slopes between every two points), so a few
points off the line do not move it. A fit is refused when the connections did not change
enough (fewer than 3 distinct counts, or a span under max(8, 10% of the most)); it is low
confidence - and its figure is not used - when the slope's 95% interval (Sen's, rank-based:
6 points at least) is wider than max(64 B, 10% of the slope) (something else grew or shrank
meanwhile) or when connections churned faster than the samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.memory import SOCKET_KERNEL_FIELDS
from analysis.owned import Owning
from analysis.results import ConnectionFit, KernelPart, PerIdleConnection, SavingPart, Unknown
from analysis.waiters import Waiting, waiter_parts
from probes.format.meta import Meta, SlabCache

MIN_COUNTS = 3  # distinct connection counts a fit needs
MIN_SPAN = 8  # ...spanning at least this many connections (and 10% of the most)
CI_BYTES = 64.0  # a slope is confident when its 95% interval is within max(this, 10%)
CI_FRACTION = 0.10
CHURN_POINTS = 8  # low confidence when more points than max(this, 20%) moved under sampling
CHURN_FRACTION = 0.20

MAX_FIT_POINTS = 2000  # pairwise slopes: at most ~2M pairs
OWNED_AGREE = 0.15  # the walk and the fit disagree past this fraction of the larger
SPREAD = 4  # one connection owning this many times the median is flagged (a stale pointer?)


def theil_sen(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(slope, intercept, half the slope's 95% interval) by Theil-Sen: the median of the
    slopes between every two points of different x, with Sen's rank-based interval. A few
    points off the line (a server freeing a start-up buffer, a cache trimmed once) do not
    move it; memory driven by something else spreads the slopes and widens the interval."""
    if len(x) > MAX_FIT_POINTS:
        keep = np.linspace(0, len(x) - 1, MAX_FIT_POINTS).astype(int)
        x, y = x[keep], y[keep]
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    ok = dx != 0
    slopes = np.sort((y[j] - y[i])[ok] / dx[ok])
    n, pairs = len(x), len(slopes)
    slope = float(np.median(slopes))
    intercept = float(np.median(y - slope * x))
    c = 1.96 * math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    lower = int(math.floor((pairs - c) / 2))
    upper = int(math.ceil((pairs + c) / 2))
    if lower < 0 or upper >= pairs:
        return slope, intercept, math.inf  # too few points to bound it
    return slope, intercept, (float(slopes[upper]) - float(slopes[lower])) / 2


SETTLE_FRACTION = 0.5  # a count held for less than this share of the typical hold...
SETTLE_MIN_NS = 50_000_000  # ...(and at least this long) is a step caught half-way


def settled(points: pd.DataFrame) -> pd.DataFrame:
    """Points taken while the socket count held still: those not moving, and of each run of
    equal consecutive counts the last one (memory settles after connections arrive) - but
    only of runs that held for half the typical run at least (the median time a count held
    until the next was seen): a count seen once while a server was still accepting a step's
    connections is not a step of its own. (When such counts are most of the runs, they pass
    and the fit's interval says so: low confidence.)"""
    p = points[~points["moving"].astype(bool)].sort_values("ts_ns")
    if p.empty:
        return p
    run = (p["sockets"] != p["sockets"].shift()).cumsum()
    began = p.groupby(run, sort=False)["ts_ns"].min().astype("int64").to_numpy()
    # the first and last runs are cut by the recording (held since before it began, or
    # until after it ended): they count as held
    lasted = np.append(np.diff(began).astype(float), np.inf)
    lasted[0] = np.inf
    finite = lasted[np.isfinite(lasted)]
    typical = float(np.median(finite)) if finite.size else 0.0
    held = lasted >= max(SETTLE_MIN_NS, SETTLE_FRACTION * typical)
    last = p.groupby(run, sort=False).tail(1)
    return last[held[run[last.index].to_numpy() - 1]]


def fit_against_connections(
    connections: np.ndarray, memory: np.ndarray, source: str, moved: int = 0
) -> tuple[ConnectionFit | None, str | None]:
    """Bytes per connection from (connections, memory) points: the fit (None when refused)
    and why it was refused or is not confident."""
    x = np.asarray(connections, dtype=float)
    y = np.asarray(memory, dtype=float)
    distinct = len(np.unique(x))
    span = float(x.max() - x.min()) if len(x) else 0.0
    need = max(MIN_SPAN, CI_FRACTION * (float(x.max()) if len(x) else 0.0))
    if distinct < MIN_COUNTS or span < need:
        return None, (
            f"connections did not change enough: {distinct} distinct counts spanning "
            f"{span:.0f} (a fit needs {MIN_COUNTS} spanning {need:.0f})"
        )
    slope, intercept, ci = theil_sen(x, y)
    residual = y - (intercept + slope * x)
    spread = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((residual**2).sum()) / spread if spread else 1.0
    reasons = []
    if not math.isfinite(ci):
        reasons.append(
            f"low confidence: {len(x)} points are too few to bound the slope "
            f"({slope:,.0f} B per connection, R² {r2:.3f}; 6 settled points are needed)"
        )
    elif not ci <= max(CI_BYTES, CI_FRACTION * abs(slope)):
        reasons.append(
            f"low confidence: {slope:,.0f} ± {ci:,.0f} B per connection (95%), "
            f"R² {r2:.3f} over {len(x)} points - "
            "something else changed this memory meanwhile"
        )
    total = len(x) + moved
    if moved > max(CHURN_POINTS, CHURN_FRACTION * total):
        reasons.append(
            f"low confidence: connections churned faster than the samples ({moved} of "
            f"{total} points changed while taken)"
        )
    result = ConnectionFit(
        bytes_per_connection=round(slope, 1),
        r2=round(r2, 6),
        points=len(x),
        distinct_counts=distinct,
        ci95_bytes=round(ci, 1) if math.isfinite(ci) else None,
        source=source,
        confident=not reasons,
    )
    return result, "; ".join(reasons) or None


# --- the heap over time -------------------------------------------------------------------
def glibc_chunk(size: np.ndarray) -> np.ndarray:
    """malloc(size)'s chunk in glibc: size + 8, rounded up to 16, 32 at least."""
    return np.maximum(32, (np.asarray(size, dtype=np.int64) + 8 + 15) & ~15)


def jemalloc_class(size: np.ndarray) -> np.ndarray:
    """jemalloc 5's size class for `size` (what malloc_usable_size says): 8, then multiples
    of 16 up to 128, then four classes per doubling."""
    s = np.maximum(np.asarray(size, dtype=np.int64), 1)
    lg = np.ceil(np.log2(s)).astype(np.int64)
    spacing = np.where(s <= 128, 16, np.left_shift(1, np.maximum(lg - 3, 0)))
    out = -(-s // spacing) * spacing
    return np.where(s <= 8, 8, out)


Rounding = Callable[[np.ndarray], np.ndarray]


def allocator_rounding(library: str | None) -> tuple[str, Rounding]:
    """How the probed allocator rounds a request: (its name, the function)."""
    name = (library or "").rsplit("/", 1)[-1]
    if "jemalloc" in name:
        return "jemalloc size classes", jemalloc_class
    if not name or name.startswith("libc"):
        return "glibc chunks (request + 8, to 16)", glibc_chunk
    return "requested sizes", lambda s: np.asarray(s, dtype=np.int64)


def live_bytes_at(allocations: pd.DataFrame, stamps: np.ndarray, rounding: Rounding) -> np.ndarray:
    """Bytes the tracked allocations held at each instant (allocator rounding applied)."""
    if allocations.empty:
        return np.zeros(len(stamps))
    sizes = rounding(allocations["size"].to_numpy())
    made = allocations["alloc_ns"].to_numpy(dtype=float)
    order = np.argsort(made)
    made_cum = np.concatenate([[0], np.cumsum(sizes[order])])
    freed = allocations["free_ns"].to_numpy(dtype=float)
    gone = ~np.isnan(freed)
    f_order = np.argsort(freed[gone])
    freed_cum = np.concatenate([[0], np.cumsum(sizes[gone][f_order])])
    stamps = np.asarray(stamps, dtype=float)
    made_by = made_cum[np.searchsorted(made[order], stamps, side="right")]
    freed_by = freed_cum[np.searchsorted(freed[gone][f_order], stamps, side="right")]
    return (made_by - freed_by).astype(float)


def traced_heap_plan(meta: Meta, points: pd.DataFrame) -> dict[int, tuple[np.ndarray, Rounding]]:
    """Per pid whose heap is fitted from the allocations the probes traced: the instants
    at which the traced heap is needed (its settled memory points) and its allocator's
    rounding. The passes over the trace sum the heap there (analysis.passes.AllocPass)."""
    memory = meta.memory
    if memory is None or points.empty or memory.min_alloc > 0:
        return {}
    probed = {a.pid: a for a in memory.allocators if a.method == "probes"}
    out = {}
    for pid in sorted(set(points["pid"].tolist())):
        if not (memory.alloc_probes or pid in probed):
            continue
        allocator = probed.get(pid)
        _, rounding = allocator_rounding(allocator.library if allocator else None)
        mine = points[points["pid"] == pid]
        out[int(pid)] = (settled(mine)["ts_ns"].to_numpy(np.float64), rounding)
    return out


def heap_fit(
    points: pd.DataFrame,
    steady: pd.DataFrame,
    traced_heap: np.ndarray | None,
    meta: Meta,
    pid: int,
) -> tuple[ConnectionFit | None, str | None]:
    """The heap in use against the sockets held, over `steady` (settled(points)): walked
    sums where the allocator was walked, the live traced allocations (`traced_heap`, at
    each of `steady`'s instants) where it was probed."""
    memory = meta.memory
    assert memory is not None
    probed = {a.pid: a for a in memory.allocators if a.method == "probes"}
    moved = int(points["moving"].astype(bool).sum())
    if memory.alloc_probes or pid in probed:
        allocator = probed.get(pid)
        if memory.min_alloc > 0:
            return None, (
                f"allocations smaller than --min-alloc {memory.min_alloc:,} were not tracked: "
                "record with --min-alloc 0 (or without --alloc-probes) to fit the heap"
            )
        how, _ = allocator_rounding(allocator.library if allocator else None)
        live = traced_heap if traced_heap is not None else np.zeros(len(steady))
        source = f"allocations seen by the allocator probes ({how})"
        return fit_against_connections(steady["sockets"].to_numpy(), live, source, moved)
    walked = steady[steady["why"] == ""]
    if walked.empty:
        whys = points.loc[points["why"] != "", "why"]
        return None, str(whys.iloc[-1]) if not whys.empty else "no memory points"
    return fit_against_connections(
        walked["sockets"].to_numpy(),
        walked["heap_bytes"].to_numpy(),
        "the heap in use, walked (glibc chunks: request + 8, to 16)",
        moved,
    )


def rss_fit(points: pd.DataFrame, steady: pd.DataFrame) -> tuple[ConnectionFit | None, str | None]:
    moved = int(points["moving"].astype(bool).sum())
    return fit_against_connections(
        steady["sockets"].to_numpy(), steady["vm_rss"].to_numpy(), "RSS (/proc)", moved
    )


def socket_queue_fit(sockets: pd.DataFrame, pid: int) -> tuple[ConnectionFit | None, str | None]:
    """The kernel's queue memory (rmem_alloc + wmem_queued + fwd_alloc) of `pid`'s
    connections against how many it held, over the socket samples (one per flush)."""
    mine = sockets[(sockets["pid"] == pid) & (sockets["state"] != "LISTEN")]
    if mine.empty:
        return None, "no socket samples"
    g = mine.assign(q=mine[SOCKET_KERNEL_FIELDS].sum(axis=1)).groupby("ts_ns")
    per_sample = pd.DataFrame({"n": g.size(), "q": g["q"].sum()}).sort_index()
    return fit_against_connections(
        per_sample["n"].to_numpy(), per_sample["q"].to_numpy(), "kernel socket queues (sock_diag)"
    )


# --- the kernel's objects -----------------------------------------------------------------
def socket_cache(family: str, ipv6: bool, sock_type: int, caches: dict[str, SlabCache]) -> str:
    if family == "tcp":
        return "TCPv6" if ipv6 else "TCP"
    if family == "udp":
        return "UDPv6" if ipv6 else "UDP"
    return "UNIX-STREAM" if sock_type == 1 and "UNIX-STREAM" in caches else "UNIX"


def kernel_parts(
    sockets: pd.DataFrame, caches: dict[str, SlabCache], uring_requests: int = 0
) -> tuple[list[KernelPart], list[str]]:
    """The slab objects of these connections (rows of the sockets table, one per
    connection), per connection on average, and the caches this kernel did not show."""
    n = len(sockets)
    counts: dict[str, float] = {}
    # per kind of socket, in order of first appearance (a cache's place in the list is where
    # a connection first holds one), not per connection: thousands of idle ones, a few kinds
    kinds = (
        sockets.groupby(
            ["family", "ipv6", "sock_type", "epoll"], sort=False, observed=True, dropna=False
        )
        .size()
        .reset_index(name="alike")
    )
    for family, ipv6, sock_type, epoll, alike in zip(
        *(kinds[c].to_numpy().tolist() for c in ("family", "ipv6", "sock_type", "epoll", "alike"))
    ):
        for cache in (
            socket_cache(str(family), bool(ipv6), int(sock_type), caches),
            "sock_inode_cache",
            "filp",
            "dentry",
        ):
            counts[cache] = counts.get(cache, 0) + int(alike)
        if int(epoll):
            for cache in ("eventpoll_epi", "eventpoll_pwq"):
                counts[cache] = counts.get(cache, 0) + int(epoll) * int(alike)
    if uring_requests:
        counts["io_kiocb"] = float(uring_requests)
    parts, missing = [], []
    for cache, count in counts.items():
        geometry = caches.get(cache)
        if geometry is None:
            missing.append(cache)
            continue
        per = count / n if n else 0.0
        parts.append(
            KernelPart(
                cache=cache,
                objects=round(per, 4),
                object_bytes=round(geometry.object_cost, 1),
                bytes=round(per * geometry.object_cost, 1),
            )
        )
    return parts, missing


def idle_sockets(
    sockets: pd.DataFrame, connections: pd.DataFrame
) -> tuple[pd.DataFrame, list[Unknown]]:
    """The sockets table's last row of each idle connection (of every connection seen, when
    none is idle at the end), and the connections it lacks (not seen by sock_diag)."""
    idle = connections[connections["idle"]]
    if idle.empty:
        idle = connections
    if idle.empty:
        return sockets.iloc[0:0], []
    last = sockets.sort_values("ts_ns").drop_duplicates(["pid", "inode"], keep="last")
    found = last.merge(idle[["pid", "inode"]].dropna(), on=["pid", "inode"])
    unknown = []
    if len(found) < len(idle):
        unknown.append(
            Unknown(len(idle) - len(found), "connections sock_diag did not show: not modelled")
        )
    return found, unknown


# --- the buffer is its allocation ----------------------------------------------------------
def allocation_footprint(
    sizes: np.ndarray, allocators: np.ndarray, rounding: Rounding
) -> np.ndarray:
    """The bytes each allocation takes from its allocator, as its `allocator` found it: a
    glibc heap chunk is the block and its 8-byte size field; a glibc block of its own
    mapping is the mapping (the block and 16 bytes of header); a Go span object and a
    mapping are themselves; an allocation the probes traced (no allocator named) is its
    request as the probed allocator rounds it."""
    sizes = np.asarray(sizes, dtype=np.int64)
    kinds = np.asarray(allocators, dtype=object)
    out = sizes.copy()
    traced = np.array([not isinstance(k, str) or k == "" for k in kinds], dtype=bool)
    if traced.any():
        out[traced] = rounding(sizes[traced])
    chunk = np.array([isinstance(k, str) and k.startswith("glibc") for k in kinds], dtype=bool)
    mmapped = np.array([k == "glibc mmap" for k in kinds], dtype=bool)
    out[chunk & ~mmapped] += 8
    out[mmapped] += 16
    return out


@dataclass
class IdleBuffers:
    """What the buffers of one process's idle connections take: the allocations holding
    them (each once, rounding included), the bytes in mappings the program made itself,
    and those whose allocation was not seen (counted at their length), with how many."""

    allocation_bytes: int = 0
    mapped_bytes: int = 0
    unseen_bytes: int = 0
    unseen: int = 0
    uring_requests: int = 0  # io_uring reads posted by them (an io_kiocb each)


def _saving(out: PerIdleConnection, idle: int, active: int) -> None:
    """What a readiness design would free: each idle connection's buffer and waiter, less a
    pool of buffers for the active ones (one each, as large as the idle ones' buffers)."""
    buffer = out.buffer_bytes or 0.0
    parts = [SavingPart("buffers of idle connections", round(buffer * idle, 1))]
    if out.waiter_parts:
        waiters = sum(p.bytes for p in out.waiter_parts) * idle
        parts.append(SavingPart("waiters of idle connections", round(waiters, 1)))
    if active and buffer:
        parts.append(
            SavingPart("a pool of buffers for the active ones", -round(buffer * active, 1))
        )
    out.saving_parts = parts
    out.saving_bytes = round(max(0.0, sum(p.bytes for p in parts)), 1)
    out.saving_assumes = (
        f"frees the {idle:,} idle connections' buffers and waiters; one event loop; a pool "
        f"of one buffer per active connection ({active:,})"
    )


# --- the owned state -----------------------------------------------------------------------
def _go_program(meta: Meta, pid: int, owning: Owning | None) -> bool:
    """Whether `pid` is a Go program (its allocations are the Go runtime's, not glibc's)."""
    if owning is not None and owning.allocator == "go":
        return True
    memory = meta.memory
    return memory is not None and any(
        a.pid == pid and a.method == "walk:go+glibc" for a in memory.allocators
    )


def _reachable(out: PerIdleConnection, owning: Owning, idle: int) -> bool:
    """`out`'s owned state from the walk (the mean over the idle connections it covered),
    the fit beside it as a cross-check; whether it covered every idle connection."""
    per = owning.owned_bytes / owning.covered
    out.owned_bytes, out.owned_how = round(per, 1), "reachable"
    out.owned_connections = owning.covered
    out.owned_shared_bytes = owning.shared_bytes
    notes = []
    fitted = out.other_user_bytes
    if fitted is not None and abs(per - fitted) > OWNED_AGREE * max(abs(per), abs(fitted)):
        notes.append(
            f"the walk and the fit disagree: {per:,.0f} B reachable, {fitted:,.0f} B fitted "
            f"(more than {OWNED_AGREE:.0%} apart)"
        )
    elif fitted is not None:
        notes.append(f"the fit agrees: {fitted:,.0f} B")
    if owning.shared_bytes:
        notes.append(
            f"{owning.shared_bytes:,} B reached first by several connections together: "
            "shared, not counted as any one's"
        )
    if owning.max_bytes > SPREAD * max(owning.median_bytes, 1.0) and owning.covered >= 3:
        notes.append(
            f"one connection owns {owning.max_bytes:,} B, over {SPREAD}x the median "
            f"{owning.median_bytes:,.0f} B: a pointer left on its stack may reach the "
            "program's structures (counted as its own)"
        )
    if owning.raced:
        notes.append(f"{owning.raced:,} reads of the walk raced with the process")
    out.owned_check = "; ".join(notes) or None
    out.whole_unknown.extend(owning.unknown)
    return owning.covered >= idle


# --- one answer per process ---------------------------------------------------------------
def whole_cost(
    base: PerIdleConnection,
    meta: Meta,
    pid: int,
    points: pd.DataFrame,
    sockets: pd.DataFrame,
    connections: pd.DataFrame,
    traced_heap: np.ndarray | None,
    buffers: IdleBuffers,
    waiting: Waiting,
    owning: Owning | None = None,
) -> PerIdleConnection:
    """`base` (the measured per-idle-connection figures) completed with the whole cost:
    buffer + waiter + owned state + kernel = total, for process `pid`.

    `points`: its memory points; `sockets`: the sockets table; `connections`: its rows of
    analysis.memory.connection_table(); `traced_heap`: the traced allocations live at its
    settled memory points (traced_heap_plan), where its allocator was probed; `buffers`:
    what its idle connections' own buffers take (posted or retained; a shared pool is
    counted once). The buffer part is the allocations holding them, which the heap fit also
    counts: other user memory is the fit less those, per idle connection. `waiting`: what
    carries their waits (analysis.waiters); `owning`: the state they keep alive, walked
    (analysis.owned; None: not walked)."""
    idle = int(connections["idle"].sum())
    out = base  # completed in place
    out.io_buffer_bytes = round(base.user_buffer_bytes / idle, 1) if idle else 0.0
    held = buffers.allocation_bytes + buffers.mapped_bytes + buffers.unseen_bytes
    out.buffer_bytes = round(held / idle, 1) if idle else 0.0
    if buffers.unseen and idle:
        out.whole_unknown.append(
            Unknown(
                buffers.unseen,
                "buffer: allocations not seen (made before the attach, or the lookup "
                "failed): their buffers counted at their length",
                buffers.unseen_bytes,
            )
        )
    waiting.uring_requests += buffers.uring_requests
    out.waiter_parts, out.waiter_bytes, out.waiter_reason = waiter_parts(meta, waiting, idle)
    if out.waiter_bytes is None and idle:
        out.whole_unknown.append(Unknown(idle, f"waiter: {out.waiter_reason}"))
    # the kernel: the slab model on the idle connections, and their queue memory
    slab = 0.0
    if not meta.kernel_objects:
        out.kernel_reason = (
            meta.kernel_objects_why or "the recording did not read the kernel's slab caches"
        )
    else:
        found, unknown = idle_sockets(sockets, connections)
        out.whole_unknown.extend(unknown)
        # (an io_uring request's io_kiocb is its waiter's: counted there, once)
        out.kernel_parts, missing = kernel_parts(found, meta.kernel_objects)
        if found.empty:
            out.kernel_reason = "sock_diag showed none of the connections"
        else:
            slab = sum(p.bytes for p in out.kernel_parts)
            queues = base.socket_kernel_bytes / idle if idle else 0.0
            out.kernel_bytes = round(slab + queues, 1)
            if missing:
                out.kernel_reason = (
                    f"caches this kernel did not show, left out: {', '.join(missing)}"
                )
    # user memory beyond the IO buffers: the heap against the connections held
    mine = points[points["pid"] == pid] if not points.empty else points
    if mine.empty:
        out.reason = "no memory points: the trace was recorded without them"
    elif meta.memory is not None:
        steady = settled(mine)
        out.fit, out.reason = heap_fit(mine, steady, traced_heap, meta, pid)
        out.rss_fit, _ = rss_fit(mine, steady)
        out.socket_fit, _ = socket_queue_fit(sockets, pid)
        if out.fit is not None and _go_program(meta, pid, owning):
            # never a confident figure fitted on memory that is not the program's allocator
            out.fit.confident = False
            out.reason = (
                "not used: a Go program's heap is Go's, and the heap fitted is glibc's "
                "(its allocations are the runtime's: see the RSS fit)"
            )
        if out.fit is not None and out.fit.confident:
            per_buffer = buffers.allocation_bytes / idle if idle else 0.0
            out.other_user_bytes = round(out.fit.bytes_per_connection - per_buffer, 1)
            out.owned_bytes, out.owned_how = out.other_user_bytes, "fitted"
    owned_all = out.owned_bytes is not None
    if owning is not None and owning.covered and idle and not waiting.processes:
        owned_all = _reachable(out, owning, idle)
    if waiting.processes and idle:  # a process per connection: its private memory is its own
        owned = waiting.private_bytes - (held if waiting.processes == idle else 0)
        out.owned_bytes, out.owned_how = round(max(0.0, owned) / idle, 1), "private"
        owned_all = True
    if out.kernel_bytes is None and idle:
        out.whole_unknown.append(Unknown(idle, f"kernel: {out.kernel_reason}"))
    if out.owned_bytes is None and idle:
        out.whole_unknown.append(Unknown(idle, f"other user memory: {out.reason}"))
        if owning is not None and owning.unknown:  # why the walk did not know it either
            out.owned_check = "; ".join(
                f"{u.why} ({u.connections:,} idle connections)" for u in owning.unknown
            )
    waiter_known = sum(p.bytes for p in out.waiter_parts)
    out.total_at_least_bytes = round(
        out.buffer_bytes
        + waiter_known
        + max(0.0, out.owned_bytes or 0.0)
        + (out.kernel_bytes or 0.0),
        1,
    )
    parts = (out.waiter_bytes, out.owned_bytes, out.kernel_bytes)
    if all(p is not None for p in parts) and not buffers.unseen and owned_all:
        out.total_bytes = round(out.buffer_bytes + sum(p or 0.0 for p in parts), 1)
    _saving(out, idle, int((~connections["idle"] & connections["closed_ns"].isna()).sum()))
    out.resident_bytes = round(base.resident_bytes + slab + (out.other_user_bytes or 0.0), 1)
    return out
