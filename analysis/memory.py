"""The memory behind posted reads: heap allocations, IO-buffer heap, idle connections, RSS.

Pure functions over the trace's tables (DataFrames in, DataFrames out).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.groups import dense_codes, first_rows, minima, nan_maxima, nan_sums, sums
from analysis.idle import connection_keys
from analysis.reads import columns_of, next_event
from probes.format.schema import RssMember

ALLOCATION_COLUMNS = ["pid", "addr", "size", "fn", "stack_id", "alloc_ns", "free_ns"]


def allocation_intervals(allocs: pd.DataFrame, frees: pd.DataFrame) -> pd.DataFrame:
    """One row per tracked allocation: when it was made and freed (`free_ns` NaN: live).

    A free ends the allocation made before it at the same (pid, address); the same address
    allocated again without a free seen ends the first one (its free was not seen).
    """
    if allocs.empty:
        return pd.DataFrame(columns=ALLOCATION_COLUMNS)
    a = allocs.reset_index(drop=True)
    if "stack_id" not in a:
        a = a.assign(stack_id=0)
    n_allocs = len(a)

    def both(col: str, dtype: str) -> np.ndarray:
        return np.concatenate([a[col].to_numpy(dtype), frees[col].to_numpy(dtype)])

    ts = both("ts_ns", "int64")
    pids = [f["pid"].to_numpy() for f in (a, frees) if len(f)]
    one = len({int(x) for v in pids for x in (v.min(), v.max())}) == 1
    keys = [both("addr", "uint64")] if one else [both("pid", "int64"), both("addr", "uint64")]
    rows, has_next, nxt = next_event(ts, keys, n_allocs)
    free_ns = np.empty(n_allocs)
    free_ns[rows] = np.where(has_next, ts[nxt], np.nan)
    out = a.assign(alloc_ns=a["ts_ns"].astype("int64"), free_ns=free_ns)
    # grouped by (pid, address), in time order within each
    out = out.iloc[rows].reset_index(drop=True)
    return out[ALLOCATION_COLUMNS]


def walked_blocks(blocks: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The allocator walkers' findings (heap_blocks), each buffer's latest: (allocations in
    the shape of allocation_intervals(), the program's own mappings in the shape of
    mapping_intervals(), and the lookups that failed: pid, buffer, why). A block counts from
    when it was first found."""
    latest = blocks.sort_values("ts_ns", kind="stable").drop_duplicates(
        ["pid", "buffer"], keep="last"
    )
    found = latest[latest["size"] > 0]
    first = blocks.groupby(["pid", "addr", "size"])["ts_ns"].min().rename("since").reset_index()
    found = found.merge(first, on=["pid", "addr", "size"], how="left")
    heap = found[found["allocator"] != "mapping"].drop_duplicates(["pid", "addr"])
    own = found[found["allocator"] == "mapping"].drop_duplicates(["pid", "addr"])
    allocations = pd.DataFrame(
        {
            "pid": heap["pid"],
            "addr": heap["addr"],
            "size": heap["size"],
            "fn": 0,
            "stack_id": 0,
            "alloc_ns": heap["since"].astype("int64"),
            "free_ns": np.nan,
            "allocator": heap["allocator"],
        }
    )
    mappings = pd.DataFrame(
        {
            "pid": own["pid"],
            "addr": own["addr"],
            "size": own["size"],
            "fn": 0,
            "map_ns": own["since"].astype("int64"),
            "unmap_ns": np.nan,
        }
    )
    failed = latest.loc[latest["size"] == 0, ["pid", "buffer", "why"]]
    return (
        allocations.reset_index(drop=True)[[*ALLOCATION_COLUMNS, "allocator"]],
        mappings.reset_index(drop=True),
        failed.reset_index(drop=True),
    )


def live_at(intervals: pd.DataFrame, at_ns: int, start: str, end: str) -> pd.DataFrame:
    """Rows of `intervals` alive at `at_ns` (started at or before it, not ended by it)."""
    return intervals[(intervals[start] <= at_ns) & ~(intervals[end] <= at_ns)]


def buffer_attribution(reads: pd.DataFrame, allocations: pd.DataFrame) -> pd.DataFrame:
    """Each read's buffer joined to the allocation that contains it (an interval join on
    addresses, per process). `reads` and `allocations` must be those alive at one instant;
    allocations of a process never overlap then.

    Adds `alloc_addr`, `alloc_size` (0 when no tracked allocation contains the buffer) and
    `attributed_bytes`: the bytes of the buffer inside that allocation.
    """
    out = reads.assign(alloc_addr=0, alloc_size=0, attributed_bytes=0).reset_index(drop=True)
    for pid, idx in out.groupby("pid").groups.items():
        heap = allocations[allocations["pid"] == pid].sort_values("addr")
        if heap.empty:
            continue
        starts = heap["addr"].to_numpy(np.uint64)
        sizes = heap["size"].to_numpy(np.uint64)
        addrs = out.loc[idx, "addr"].to_numpy(np.uint64)
        lens = out.loc[idx, "len"].to_numpy(np.uint64)
        pos = np.searchsorted(starts, addrs, side="right") - 1  # last allocation at or below
        found = pos >= 0
        pos = np.where(found, pos, 0)
        ends = starts[pos] + sizes[pos]
        inside = found & (addrs < ends)
        overlap = np.where(inside, np.minimum(addrs + lens, ends) - addrs, 0)
        out.loc[idx, "alloc_addr"] = np.where(inside, starts[pos], 0).astype(np.uint64)
        out.loc[idx, "alloc_size"] = np.where(inside, sizes[pos], 0).astype(np.uint64)
        out.loc[idx, "attributed_bytes"] = overlap.astype(np.int64)
    return out


def write_buffer_heap(writes: pd.DataFrame, live: pd.DataFrame) -> pd.DataFrame:
    """Per pid, the allocations still live that some write to a socket sent from, each once:
    the memory a program keeps to produce what it writes (a chunk per connection, or one)."""
    if writes.empty:
        return pd.DataFrame(columns=["pid", "allocations", "bytes"])
    held = buffer_attribution(writes, live)
    held = held[held["alloc_size"] > 0].drop_duplicates(["pid", "alloc_addr"])
    g = held.groupby("pid")
    return pd.DataFrame({"allocations": g.size(), "bytes": g["alloc_size"].sum()}).reset_index()


def idle_reads(posted: pd.DataFrame, connections: pd.DataFrame) -> pd.Series:
    """For each posted read, whether its connection is idle (connection_table())."""
    rows = posted.assign(gen=generations_of(posted))[CONNECTION_KEYS]
    joined = rows.merge(connections[[*CONNECTION_KEYS, "idle"]], on=CONNECTION_KEYS, how="left")
    return pd.Series(joined["idle"].fillna(False).astype(bool).to_numpy(), index=posted.index)


def resident_events(rss: pd.DataFrame, status: pd.DataFrame) -> pd.DataFrame:
    """kmem:rss_stat events with the /proc/PID/status samples (at attach and at the end) as
    events of the same shape: a sample sets the anonymous, file and shared counters at once.
    A sample whose address space is unknown (mm_id 0) takes the process's last one seen."""
    if status.empty:
        return rss
    members = {"rss_anon": RssMember.ANON, "rss_file": RssMember.FILE, "rss_shmem": RssMember.SHMEM}
    samples = status.assign(mm_id=status["mm_id"].astype("uint64"))
    unknown = samples["mm_id"] == 0
    if unknown.any() and not rss.empty:
        last = rss.sort_values("ts_ns").groupby("pid")["mm_id"].last()
        samples.loc[unknown, "mm_id"] = samples.loc[unknown, "pid"].map(last).fillna(0)
    rows = [
        samples[["ts_ns", "pid", "mm_id"]].assign(member=int(member), bytes=samples[column])
        for column, member in members.items()
    ]
    combined = pd.concat([rss, *rows], ignore_index=True)
    return combined.astype({c: rss[c].dtype for c in rss.columns if c in combined})


def rss_at(rss: pd.DataFrame, pid: int, ts_ns: int) -> int:
    """Resident bytes (anonymous + file + shared) of `pid`'s last address space at `ts_ns`."""
    resident = (RssMember.ANON, RssMember.FILE, RssMember.SHMEM)
    r = rss[(rss["pid"] == pid) & rss["member"].isin(resident)].sort_values("ts_ns")
    if r.empty:
        return 0
    r = r[(r["mm_id"] == r["mm_id"].iloc[-1]) & (r["ts_ns"] <= ts_ns)]
    return int(r.groupby("member")["bytes"].last().sum())


# Memory a socket holds in the kernel: received data (rmem_alloc), queued for sending
# (wmem_queued, which includes what is in flight) and reserved ahead (fwd_alloc).
SOCKET_KERNEL_FIELDS = ["rmem_alloc", "wmem_queued", "fwd_alloc"]

CONNECTION_COLUMNS = [
    "pid",
    "fd",
    "gen",  # which connection on the fd (one more after each end of stream)
    "inode",
    "family",
    "local",
    "remote",
    "opened_ns",
    "closed_ns",
    "bytes_received",
    "last_data_ns",
    "idle_ns",
    "idle",
    "posted_bytes",
    "retained_bytes",
    "socket_kernel_bytes",
]


CONNECTION_KEYS = ["pid", "fd", "gen"]  # a connection: an fd's stream (see analysis.idle)


def generations_of(frame: pd.DataFrame, where: np.ndarray | None = None) -> np.ndarray:
    """The `gen` column (each read's connection on its fd), 0 where a frame has none."""
    if "gen" not in frame:
        n = len(frame) if where is None else len(np.arange(len(frame))[where])
        return np.zeros(n, np.int64)
    gen = frame["gen"].to_numpy()
    if where is not None:
        gen = gen[where]
    if gen.dtype.kind == "f":
        gen = np.where(np.isnan(gen), 0.0, gen)
    return gen.astype(np.int64)


def read_activity(intervals: pd.DataFrame, where: np.ndarray | None = None) -> pd.DataFrame:
    """Per connection (index pid, fd, gen), what its reads (the rows `where` says, if given)
    say: bytes received, first read posted, last data arrived (NaN: never), buffer bytes of
    reads posted now (NaN: none), the end of its stream (a read returned 0; NaN: none seen).
    Sums, minima and maxima: the activity of a trace's pieces merges into the whole's
    (merge_activity)."""
    column = columns_of(intervals, where)
    ret = column("ret", np.float64)
    end = column("end_ns", np.float64)
    data = ret > 0
    pid = column("pid", np.int64)
    fd = column("fd", np.int64)
    gen = generations_of(intervals, where)
    # one int64 key per connection, grouped by numpy: a window holds a few thousand
    codes, keys = dense_codes(connection_keys(pid, fd, gen))
    n = len(keys)
    rows = first_rows(codes, n)
    pids, fds, gens = pid[rows], fd[rows], gen[rows]
    order = np.lexsort((gens, fds, pids))
    posted = np.where(np.isnan(end), column("len", np.float64), np.nan)
    figures = {
        "bytes_received": sums(codes, np.where(data, ret, 0.0), n),
        "first_ns": _first_posts(codes, column("post_ns", np.int64), rows),
        "last_data_ns": nan_maxima(codes, np.where(data, end, np.nan), n),
        "posted_bytes": nan_sums(codes, posted, n),
        "eof_ns": nan_maxima(codes, np.where(ret == 0, end, np.nan), n),
    }
    index = pd.MultiIndex.from_arrays(
        [
            pids[order].astype(intervals["pid"].dtype),
            fds[order].astype(intervals["fd"].dtype),
            gens[order],
        ],
        names=CONNECTION_KEYS,
    )
    return pd.DataFrame({k: v[order] for k, v in figures.items()}, index=index)


def _first_posts(codes: np.ndarray, post: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Each connection's earliest post: that of its first row when the reads are in post
    order (a window's are), else the least."""
    if len(post) < 2 or (post[1:] >= post[:-1]).all():
        return post[first]
    return minima(codes, post, len(first))


def merge_activity(pieces: list[pd.DataFrame]) -> pd.DataFrame:
    """read_activity() of several pieces of a trace's reads, as of all of them."""
    pieces = [p for p in pieces if not p.empty]
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        return read_activity(pd.DataFrame(columns=["pid", "fd", "post_ns", "end_ns", "ret", "len"]))
    g = pd.concat(pieces).groupby(level=CONNECTION_KEYS)
    return pd.DataFrame(
        {
            "bytes_received": g["bytes_received"].sum(),
            "first_ns": g["first_ns"].min(),
            "last_data_ns": g["last_data_ns"].max(),
            "posted_bytes": g["posted_bytes"].sum(min_count=1),
            "eof_ns": g["eof_ns"].max(),
        }
    )


def connection_table(
    intervals: pd.DataFrame,
    sockets: pd.DataFrame,
    retained: pd.DataFrame,
    at_ns: int,
    idle_threshold_ns: int,
) -> pd.DataFrame:
    """One row per connection (pid, fd) seen reading or in a socket sample.

    opened/closed are the first and last sample that showed the socket (closed NaN: open at
    the end; opened is the first read if that was earlier); bytes received and last data come
    from the reads; `posted_bytes` is the buffer of a read posted or parked now,
    `retained_bytes` a buffer kept after the last data; `socket_kernel_bytes` the kernel
    memory of the socket in the last sample (rmem_alloc + wmem_queued + fwd_alloc).
    """
    return connections_from_activity(
        read_activity(intervals), sockets, retained, at_ns, idle_threshold_ns
    )


def connections_from_activity(
    activity: pd.DataFrame,
    sockets: pd.DataFrame,
    retained: pd.DataFrame,
    at_ns: int,
    idle_threshold_ns: int,
) -> pd.DataFrame:
    """connection_table() from the reads' read_activity(). A connection whose stream ended
    (a read returned 0) closed then, if no later sample showed it; `sockets` may carry each
    sample's generation (`gen`: which connection on its fd it showed)."""
    keys = CONNECTION_KEYS
    if "gen" not in sockets:
        sockets = sockets.assign(gen=0)
    if "gen" not in retained:
        retained = retained.assign(gen=0)
    if not sockets.empty:
        # the last sample: of every socket (a listener still open shows a sample in which
        # every connection had closed)
        last_sample = sockets["ts_ns"].max()
        s = sockets[(sockets["family"] != "unix") & (sockets["state"] != "LISTEN")]
        s = s.sort_values("ts_ns")
        g = s.groupby(keys)
        seen = g.agg(
            inode=("inode", "last"),
            family=("family", "last"),
            local=("local", "last"),
            remote=("remote", "last"),
            opened_ns=("ts_ns", "min"),
            closed_ns=("ts_ns", "max"),
        )
        seen.loc[seen["closed_ns"] == last_sample, "closed_ns"] = np.nan
        last = g.tail(1).set_index(keys)
        seen["socket_kernel_bytes"] = last[SOCKET_KERNEL_FIELDS].sum(axis=1)
        table = seen.join(activity, how="outer")
    else:
        table = activity
    table["retained_bytes"] = retained.groupby(keys)["attributed_bytes"].sum()
    table = table.reset_index()
    for col in CONNECTION_COLUMNS:
        if col not in table:
            table[col] = np.nan
    # a socket is first sampled up to one interval after it opened; its first read may be earlier
    table["opened_ns"] = table[["opened_ns", "first_ns"]].min(axis=1)
    if "eof_ns" in table:  # the end of its stream, unless sampled open later
        ended = table["eof_ns"].notna() & ~(table["closed_ns"] > table["eof_ns"])
        table.loc[ended, "closed_ns"] = table.loc[ended, "eof_ns"]
        table.loc[ended, "retained_bytes"] = 0  # a closed connection keeps no buffer
    # no data seen: silent since it was first seen (sampled, or its first read)
    since = table["last_data_ns"].fillna(table["opened_ns"])
    table["idle_ns"] = at_ns - since
    table["idle"] = (table["idle_ns"] >= idle_threshold_ns) & table["closed_ns"].isna()
    for col in ("bytes_received", "posted_bytes", "retained_bytes", "socket_kernel_bytes"):
        table[col] = table[col].fillna(0).astype("int64")
    return table[CONNECTION_COLUMNS]


def idle_connection_cost(connections: pd.DataFrame) -> pd.DataFrame:
    """Per pid: idle connections and what one costs on average: user buffer bytes (posted,
    parked or retained: committed heap) plus kernel socket bytes."""
    idle = connections[connections["idle"]]
    g = idle.groupby("pid")
    out = pd.DataFrame(
        {
            "idle_connections": g.size(),
            "user_buffer_bytes": g["posted_bytes"].sum() + g["retained_bytes"].sum(),
            "socket_kernel_bytes": g["socket_kernel_bytes"].sum(),
        }
    )
    out["per_idle_connection_bytes"] = (
        out["user_buffer_bytes"] + out["socket_kernel_bytes"]
    ) / out["idle_connections"]
    return out.reset_index()


def with_residency(buffers: pd.DataFrame, residency: pd.DataFrame, what: str) -> pd.Series:
    """Resident bytes of each buffer (pid, fd, addr, len) as measured at the end for `what`
    ("posted", "last_data" or "parked"); NaN where it was not measured."""
    keys = ["pid", "fd", "addr", "len"]
    measured = residency[residency["what"] == what][[*keys, "resident_bytes"]]
    measured = measured.drop_duplicates(keys, keep="last")
    joined = (
        buffers[keys]
        .astype("int64")
        .merge(measured.astype({k: "int64" for k in keys}), on=keys, how="left")
    )
    return pd.Series(joined["resident_bytes"].to_numpy(), index=buffers.index)


MAPPING_COLUMNS = ["pid", "addr", "size", "fn", "map_ns", "unmap_ns"]


def mapping_intervals(maps: pd.DataFrame, unmaps: pd.DataFrame) -> pd.DataFrame:
    """Address ranges the targets mapped (mmap, and mremap's new range), with when they went
    (`unmap_ns` NaN: still mapped): the first later munmap covering the range's start, or an
    mremap that moved it. brk records are not ranges and are left out, and so are the
    anonymous mappings found at attach: whose they are (an allocator's arena, or the
    program's own pool) cannot be told from /proc/PID/maps."""
    from probes.format.schema import MapFn  # noqa: PLC0415

    ranges = maps[(maps["fn"] != MapFn.BRK) & (maps["fn"] != MapFn.AT_ATTACH)]
    if ranges.empty:
        return pd.DataFrame(columns=MAPPING_COLUMNS)
    out = ranges.rename(columns={"len": "size", "ts_ns": "map_ns"}).reset_index(drop=True)
    out["unmap_ns"] = np.nan
    ends = pd.concat(
        [
            unmaps[["pid", "ts_ns", "addr", "len"]],
            maps[maps["fn"] == MapFn.MREMAP][["pid", "ts_ns", "old_addr"]]
            .rename(columns={"old_addr": "addr"})
            .assign(len=1),
        ],
        ignore_index=True,
    )
    for pid, idx in out.groupby("pid").groups.items():
        mine = ends[ends["pid"] == pid].sort_values("ts_ns")
        if mine.empty:
            continue
        starts = out.loc[idx, "addr"].to_numpy(np.uint64)
        born = out.loc[idx, "map_ns"].to_numpy(np.int64)
        gone = np.full(len(idx), np.nan)
        for ts, addr, length in zip(mine["ts_ns"], mine["addr"], mine["len"]):
            hit = (starts >= addr) & (starts < addr + length) & (born < ts) & np.isnan(gone)
            gone[hit] = ts
        out.loc[idx, "unmap_ns"] = gone
    return out[MAPPING_COLUMNS]


def program_break(maps: pd.DataFrame) -> pd.DataFrame:
    """Per pid: the brk heap's size, the last program break minus the first one seen."""
    from probes.format.schema import MapFn  # noqa: PLC0415

    brk = maps[maps["fn"] == MapFn.BRK].sort_values("ts_ns")
    g = brk.groupby("pid")["addr"]
    return (g.last() - g.first()).rename("brk_heap_bytes").reset_index()


SITE_COLUMNS = ["pid", "stack_id", "bytes", "buffers", "symbols"]


def buffer_sites(
    attributed: pd.DataFrame, allocations: pd.DataFrame, stacks: pd.DataFrame, top: int = 5
) -> pd.DataFrame:
    """Where the allocations holding IO buffers were made: per (pid, stack) the attributed
    bytes and buffers, largest first, with the stack's symbols (innermost first)."""
    held = attributed[attributed["alloc_size"] > 0]
    if held.empty:
        return pd.DataFrame(columns=SITE_COLUMNS)
    sites = held.drop(columns=["stack_id"], errors="ignore").merge(
        allocations[["pid", "addr", "stack_id"]].rename(columns={"addr": "alloc_addr"}),
        on=["pid", "alloc_addr"],
        how="left",
    )
    sites["stack_id"] = sites["stack_id"].fillna(0).astype("int64")
    return _top_sites(sites, "attributed_bytes", stacks, "alloc", top)


def _top_sites(
    rows: pd.DataFrame, size: str, stacks: pd.DataFrame, kind: str, top: int
) -> pd.DataFrame:
    """Per (pid, stack_id) of `rows` the bytes (`size` summed) and buffers, with the
    symbols of the stacks of `kind`, the `top` largest per pid."""
    g = rows.groupby(["pid", "stack_id"])
    out = pd.DataFrame({"bytes": g[size].sum(), "buffers": g.size()}).reset_index()
    named = stacks[stacks["kind"] == kind].astype({"stack_id": "int64"})
    out = out.merge(named[["pid", "stack_id", "symbols"]], on=["pid", "stack_id"], how="left")
    out["symbols"] = out["symbols"].apply(
        lambda s: list(s) if isinstance(s, (list, np.ndarray)) else []
    )
    out = out.sort_values(["pid", "bytes"], ascending=[True, False])
    return out.groupby("pid").head(top)[SITE_COLUMNS].reset_index(drop=True)


def read_sites(posted: pd.DataFrame, stacks: pd.DataFrame, top: int = 5) -> pd.DataFrame:
    """Where the reads posted now were posted from: per (pid, user stack of the posting
    code) their buffers and bytes, largest first, with the stack's symbols (innermost
    first). Reads with no stack (not recorded with --memory, found at attach) are left out."""
    with_stack = posted[posted["stack_id"] > 0]
    if with_stack.empty:
        return pd.DataFrame(columns=SITE_COLUMNS)
    with_stack = with_stack.assign(stack_id=with_stack["stack_id"].astype("int64"))
    return _top_sites(with_stack, "len", stacks, "post", top)
