"""Posted reads: from post/completion records to read lifetimes, a timeline, per-process totals.

Pure functions, DataFrames in and DataFrames out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from probes.format.schema import SYSCALL_NAMES, URING_OP_NAMES, URING_WAIT_OPS, PostFlag, Source

URING_POLL_ADD = URING_WAIT_OPS["POLL_ADD"]

SOURCE_NAMES = {s.value: s.name.lower() for s in Source}

_INTERVAL_COLUMNS = [
    "pid",
    "stack_id",  # posts only: the user stack that posted it
    "tid",
    "fd",
    "source",
    "op",
    "key",
    "addr",
    "len",
    "nvec",
    "flags",
    "post_ns",
    "end_ns",
    "ret",
    "superseded",
    "seq",  # analysis.reading: the post's number in the trace
    "attr",  # analysis.reading: bytes of its buffer in an allocation, at its first edge
    "gen",  # analysis.reading: its connection on the fd (one more after each end of stream)
]


def _without_swept_duplicates(posts: pd.DataFrame) -> pd.DataFrame:
    """--min-wait records a long call twice when the recorder's sweep saw it waiting (flagged
    SWEPT) and it returned during the recording: keep the kernel's record of it."""
    swept = (posts["flags"].to_numpy(np.int64) & PostFlag.SWEPT) != 0
    if not swept.any():
        return posts
    keys = ["pid", "source", "key", "ts_ns"]
    kernel = posts.loc[~swept, keys].drop_duplicates()
    twice = posts.loc[swept, keys].merge(kernel, on=keys, how="left", indicator=True)
    keep = ~swept
    keep[np.flatnonzero(swept)[(twice["_merge"] == "left_only").to_numpy()]] = True
    return posts[keep]


def _uniform(a: pd.DataFrame, b: pd.DataFrame, column: str) -> bool:
    """Whether `column` holds one value in both frames (together)."""
    values = [f[column].to_numpy() for f in (a, b) if len(f)]
    return len({int(x) for v in values for x in (v.min(), v.max())}) <= 1


def _group_ids(keys: list[np.ndarray]) -> np.ndarray:
    """A dense id per distinct combination of `keys` (equal-length arrays), as small an
    integer as fits (numpy sorts 16-bit keys by radix: linear)."""
    if len(keys) == 1:
        key = keys[0]
        low = key.min()
        if key.max() - low < 2**16:  # thread ids, say: the key is its own group number
            return (key - low).astype(np.uint16)
    group = np.zeros(len(keys[0]), np.int64)
    for key in keys:
        ids, uniques = pd.factorize(key)
        group *= max(len(uniques), 1)
        group += ids
    return group.astype(np.uint16) if len(group) and group.max() < 2**16 else group


def next_event(
    ts: np.ndarray, keys: list[np.ndarray], n_first: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For events 0..n_first-1 (openings: posts, allocations) among the events that follow
    (closings: completions, frees), in (key, time) order with an opening before a closing at
    one instant: (rows: the openings in that order, has_next: another event of the same key
    follows, nxt: that event's index). Two stable integer sorts (time, then a dense id of
    the key) instead of a many-key lexsort; temporaries are dropped as soon as they are
    used (at 10M events each is tens of MB)."""
    n = len(ts)
    stamp = ts * 2
    stamp[n_first:] += 1
    # a stable sort: numpy's (timsort) merges the runs a recorder's time-ordered tables make
    by_time = np.argsort(stamp, kind="stable")
    del stamp
    group = _group_ids(keys)[by_time]
    by_group = np.argsort(group, kind="stable")
    order = by_time[by_group]
    del by_time
    group = group[by_group]
    del by_group
    same = np.zeros(n, dtype=bool)  # the next event is on the same key
    same[:-1] = group[1:] == group[:-1]
    del group
    at_first = np.flatnonzero(order < n_first)
    has_next = same[at_first]
    del same
    nxt = order[np.minimum(at_first + 1, n - 1)]  # the next event, in input order
    return order[at_first], has_next, nxt


def read_intervals(posts: pd.DataFrame, completions: pd.DataFrame) -> pd.DataFrame:
    """One row per posted read: when it was posted and when (and how) it ended.

    A completion ends the post before it on the same (pid, source, key). A post followed by
    another post on the same key ended unseen (its completion was lost) and is `superseded`
    at the second post. `end_ns` is NaN (and `ret` NaN) for reads still posted at the end.
    """
    if posts.empty:
        return pd.DataFrame(columns=_INTERVAL_COLUMNS)
    p = _without_swept_duplicates(posts)
    if not isinstance(p.index, pd.RangeIndex) or p.index.start != 0 or p.index.step != 1:
        p = p.reset_index(drop=True)
    n_posts = len(p)

    def both(col: str, dtype: str) -> np.ndarray:
        return np.concatenate([p[col].to_numpy(dtype), completions[col].to_numpy(dtype)])

    # Rows 0..n_posts-1 are the posts, the rest the completions.
    ts = both("ts_ns", "int64")
    if _uniform(p, completions, "pid") and _uniform(p, completions, "source"):
        keys = [both("key", "uint64")]  # one process, one source: the key alone
    else:
        who = both("pid", "int64") << 8
        who |= both("source", "int64")
        keys = [who, both("key", "uint64")]
    rows, has_next, nxt = next_event(ts, keys, n_posts)
    del keys
    next_is_post = nxt < n_posts
    # scatter back to the posts' own order (they come in time order, so no sort is needed)
    end_ns = np.empty(n_posts)
    end_ns[rows] = np.where(has_next, ts[nxt], np.nan)
    del ts
    rets = completions["ret"].to_numpy("float64")
    ret = np.empty(n_posts)
    completed = has_next & ~next_is_post
    if len(rets):
        ret[rows] = np.where(completed, rets[np.where(completed, nxt - n_posts, 0)], np.nan)
    else:
        ret[rows] = np.nan
    superseded = np.empty(n_posts, dtype=bool)
    superseded[rows] = has_next & next_is_post
    made = {
        "post_ns": p["ts_ns"].to_numpy("int64"),
        "end_ns": end_ns,
        "ret": ret,
        "superseded": superseded,
    }
    # the columns as they are (one block each, no copy into a consolidated frame)
    out = pd.DataFrame(
        {
            c: made[c] if c in made else p[c].to_numpy()
            for c in _INTERVAL_COLUMNS
            if c in made or c in p
        },
        copy=False,
    )
    if not out["post_ns"].is_monotonic_increasing:
        out = out.sort_values("post_ns", kind="stable").reset_index(drop=True)
    return out


EAGAIN = 11


def _next_post(
    rows: pd.DataFrame, time_col: str, reads: pd.DataFrame, by: list[str], value: str
) -> pd.Series:
    """For each row, `value` ("at" or "next_fd") of the first read in `reads` posted after
    rows[time_col] with the same `by` columns; NaN if there is none."""
    later = reads[[*by, "post_ns"]].assign(
        at=reads["post_ns"].astype("float64"), next_fd=reads["fd"].astype("float64")
    )
    left = rows[by].assign(_t=rows[time_col].astype("float64")).reset_index()
    merged = pd.merge_asof(
        left.sort_values("_t"),
        later.drop(columns="post_ns").sort_values("at"),
        left_on="_t",
        right_on="at",
        by=by,
        direction="forward",
        allow_exact_matches=False,
    ).set_index("index")
    return merged[value].reindex(rows.index)


def next_user_of_buffer(rows: pd.DataFrame, time_col: str, reads: pd.DataFrame) -> pd.Series:
    """The fd of the next read into the same buffer (same pid and address) after each row's
    time; -1 where the buffer is not read into again."""
    return _next_post(rows, time_col, reads, ["pid", "addr"], "next_fd").fillna(-1)


def wait_spans(waits: pd.DataFrame, wait_ends: pd.DataFrame | None) -> pd.DataFrame:
    """Each readiness wait (pid, tid, begin) with its `end`: the first wait end of the same
    thread at or after it (inf: none seen)."""
    w = (
        waits[["pid", "tid", "ts_ns"]]
        .astype({"ts_ns": "float64"})
        .rename(columns={"ts_ns": "begin"})
    )
    if wait_ends is not None and not wait_ends.empty:
        ends = wait_ends[["pid", "tid", "ts_ns"]].astype({"ts_ns": "float64"})
        w = pd.merge_asof(
            w.sort_values("begin"),
            ends.rename(columns={"ts_ns": "end"}).sort_values("end"),
            left_on="begin",
            right_on="end",
            by=["pid", "tid"],
            direction="forward",
        )
    else:
        w = w.assign(end=np.nan)
    return w.assign(end=w["end"].fillna(np.inf))


def waiting_between(rows: pd.DataFrame, spans: pd.DataFrame) -> pd.Series:
    """For each row (pid, end_ns = an EAGAIN's return, `retry` = the next read's post or NaN),
    whether some thread of the process was in a readiness wait (`spans`, wait_spans()) at
    some moment in between: a wait begun before the retry and not ended before the EAGAIN. A
    process's netpoller may have been blocked in epoll_wait since long before (one thread
    waits for all)."""
    w = spans.sort_values(["pid", "begin"], kind="stable")
    w["latest_end"] = w.groupby("pid")["end"].cummax()  # of the waits begun so far
    left = rows[["pid"]].assign(
        _t=rows["retry"].fillna(np.inf).astype("float64"), _eagain=rows["end_ns"]
    )
    found = pd.merge_asof(
        left.reset_index().sort_values("_t"),
        w[["pid", "begin", "latest_end"]].sort_values("begin"),
        left_on="_t",
        right_on="begin",
        by="pid",
        direction="backward",
    ).set_index("index")
    return (found["latest_end"] >= found["_eagain"]).reindex(rows.index).fillna(False)


def _waiting_between(
    rows: pd.DataFrame, waits: pd.DataFrame, wait_ends: pd.DataFrame | None
) -> pd.Series:
    """waiting_between() over the readiness waits and their ends."""
    return waiting_between(rows, wait_spans(waits, wait_ends))


def parked_reads(
    intervals: pd.DataFrame,
    waits: pd.DataFrame | None = None,
    wait_ends: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Buffers held by threads parked on readiness after a non-blocking read (source `parked`).

    The pattern (Go's netpoller, green threads, virtual threads): a socket read returns EAGAIN,
    the program waits for readiness, then retries with the same buffer, which it held all
    along. One row per such wait, in the shape of `read_intervals`: posted when the EAGAIN
    returned, ended by the next read on the same fd (NaN: still parked). Not counted: a wait
    with no readiness wait (epoll/poll/select) of the process in progress at some moment
    between the EAGAIN and the retry (when `waits`, and their `wait_ends`, are given), or
    whose buffer the program next reads into for another fd (a pool's buffer, not a parked
    thread's).
    """
    syscall = intervals[intervals["source"] == Source.SYSCALL] if not intervals.empty else intervals
    candidates = syscall[syscall["ret"] == -EAGAIN] if not syscall.empty else syscall
    if candidates.empty:
        return intervals.iloc[0:0]
    next_fd = next_user_of_buffer(candidates, "end_ns", syscall)
    retry = _next_post(candidates, "end_ns", syscall, ["pid", "fd"], "at")
    return parked_of(candidates, retry, next_fd, waits, wait_ends)


def parked_of(
    candidates: pd.DataFrame,
    retry: pd.Series,
    next_fd: pd.Series,
    waits: pd.DataFrame | None,
    wait_ends: pd.DataFrame | None,
) -> pd.DataFrame:
    """parked_reads()'s rows from its candidates (EAGAIN returns), given for each the next
    read posted on its fd (`retry`, NaN: none) and the fd of the next read into its buffer
    (`next_fd`, -1: none), both indexed as `candidates`."""
    keep = (next_fd == -1) | (next_fd == candidates["fd"])
    if waits is not None:
        keep &= _waiting_between(candidates.assign(retry=retry), waits, wait_ends)
    keep_arr = keep.to_numpy()
    out = candidates[keep_arr].copy()
    out["post_ns"] = out["end_ns"].astype("int64")
    out["end_ns"] = retry[keep_arr]
    out["ret"] = np.nan
    out["superseded"] = False
    out["source"] = Source.PARKED
    return out.reset_index(drop=True)


def parked_at_attach(intervals: pd.DataFrame) -> pd.DataFrame:
    """`intervals` with the parked reads found at attach (posts of source `parked`: goroutines
    the recorder found parked in a read) ended by the next read the process makes on the same
    fd, as parked_reads() ends those it derives; NaN: still parked at the end."""
    if intervals.empty:
        return intervals
    seeded = (intervals["source"] == Source.PARKED).to_numpy()
    if not seeded.any():
        return intervals
    out = intervals.copy()
    syscall = intervals[intervals["source"] == Source.SYSCALL]
    rows = intervals[seeded]
    out.loc[seeded, "end_ns"] = _next_post(rows, "post_ns", syscall, ["pid", "fd"], "at")
    return out


def posted_timeline(intervals: pd.DataFrame) -> pd.DataFrame:
    """Per pid, the number of posted reads and pinned bytes after every change."""
    if intervals.empty:
        return pd.DataFrame(columns=["pid", "ts_ns", "posted_reads", "pinned_bytes"])
    end = intervals["end_ns"].to_numpy(np.float64)
    ended = ~np.isnan(end)
    pid = intervals["pid"].to_numpy(np.int64)
    length = intervals["len"].to_numpy(np.int64)
    ts = np.concatenate([intervals["post_ns"].to_numpy(np.int64), end[ended].astype(np.int64)])
    pids = np.concatenate([pid, pid[ended]])
    d_reads = np.concatenate([np.ones(len(pid), np.int64), -np.ones(int(ended.sum()), np.int64)])
    d_bytes = np.concatenate([length, -length[ended]])
    # by pid and time; at one instant, ends before starts so peaks are not overstated
    order = np.lexsort((d_reads, ts, pids))
    pids, ts, d_reads, d_bytes = pids[order], ts[order], d_reads[order], d_bytes[order]
    reads, pinned = np.cumsum(d_reads), np.cumsum(d_bytes)
    # restart the running sums at each pid
    first = np.flatnonzero(np.r_[True, pids[1:] != pids[:-1]])
    group = np.cumsum(np.r_[False, pids[1:] != pids[:-1]])
    reads -= (reads[first] - d_reads[first])[group]
    pinned -= (pinned[first] - d_bytes[first])[group]
    return pd.DataFrame({"pid": pids, "ts_ns": ts, "posted_reads": reads, "pinned_bytes": pinned})


def _source_and_label(source: int, op: int, flags: int) -> tuple[str, str]:
    """Where a read counts: "syscall" and "uring" are network reads, "file" is not."""
    if source == Source.SYSCALL:
        return "syscall", SYSCALL_NAMES.get(op, f"syscall_{op}")
    if source == Source.PARKED:
        return "parked", SYSCALL_NAMES.get(op, f"syscall_{op}")
    if source == Source.URING:
        name = URING_OP_NAMES.get(op, f"op_{op}")
        if op == URING_POLL_ADD:  # a readiness wait on one socket, not a read
            return "uring poll", name
        if flags & PostFlag.SOCKET:
            return "uring", name
        if flags & PostFlag.FIXED_FILE:  # a registered file: not known to be a socket
            return "uring", f"{name} (fixed file)"
        return "file", f"uring {name}"
    return SOURCE_NAMES.get(source, str(source)), f"op_{op}"


def label_reads(intervals: pd.DataFrame) -> pd.DataFrame:
    """`intervals` with where each read counts (`source_name`) and what it is (`label`).

    Labelled once per distinct (source, op, flags), not once per read: a trace has millions
    of reads and a handful of kinds."""
    if intervals.empty:
        return intervals.assign(source_name=pd.Series(dtype=object), label=pd.Series(dtype=object))
    combo = (
        intervals["source"].to_numpy(np.int64) << 48
        | intervals["op"].to_numpy(np.int64) << 32
        | intervals["flags"].to_numpy(np.int64) & 0xFFFFFFFF
    )
    kinds, which = np.unique(combo, return_inverse=True)
    pairs = [
        _source_and_label(int(c >> 48), int(c >> 32) & 0xFFFF, int(c) & 0xFFFFFFFF) for c in kinds
    ]
    names = np.array([p[0] for p in pairs], dtype=object)
    labels = np.array([p[1] for p in pairs], dtype=object)
    return intervals.assign(source_name=names[which], label=labels[which])


def is_poll(intervals: pd.DataFrame) -> np.ndarray:
    """Which rows are io_uring POLL_ADDs on sockets: readiness waits, not reads."""
    uring = intervals["source"].to_numpy() == Source.URING
    return uring & (intervals["op"].to_numpy() == URING_POLL_ADD)


def is_network(intervals: pd.DataFrame) -> np.ndarray:
    """Which reads are on sockets (reads of files through io_uring are not, nor POLL_ADDs:
    they read nothing)."""
    flags = intervals["flags"].to_numpy(np.int64)
    file = (intervals["source"].to_numpy() == Source.URING) & (
        flags & (PostFlag.SOCKET | PostFlag.FIXED_FILE) == 0
    )
    return ~file & ~is_poll(intervals)


def network_reads(intervals: pd.DataFrame) -> pd.DataFrame:
    """Only reads on sockets (reads of files through io_uring are left out)."""
    if intervals.empty:
        return intervals
    network = is_network(intervals)
    return intervals if network.all() else intervals[network]  # most traces: no copy


SUMMARY_COUNTS = [
    "posted_reads",
    "pinned_bytes",
    "buffer_select_posted",
    "multishot_posted",
    "reads_completed",
    "reads_failed",
    "bytes_received",
]


KIND_LIMITS = (2**31, 16, 4096, 65536)  # pid, source, op, flags: what read_summary packs


def columns_of(frame: pd.DataFrame, where: np.ndarray | None) -> Callable[[str, Any], np.ndarray]:
    """column(name, dtype): a column of `frame` as an array, only the rows `where` says (a
    mask or positions; all without it) - a few columns picked, not the whole frame copied."""
    if where is not None and where.dtype == bool and where.all():
        where = None  # every row: no copy

    def column(name: str, dtype: Any) -> np.ndarray:
        values = frame[name].to_numpy(dtype)
        return values if where is None else values[where]

    return column


KIND_COLUMNS = ["pid", "source", "op", "flags"]


@dataclass
class KindCounts:
    """read_summary()'s counts per kind of read (pid, source, op, flags), not labelled yet:
    a trace has millions of reads and a handful of kinds, so windows add up these arrays and
    the labels are put on once."""

    kinds: np.ndarray  # (n, 4) int64: KIND_COLUMNS
    counts: np.ndarray  # (n, len(SUMMARY_COUNTS)) int64

    @staticmethod
    def none() -> KindCounts:
        return KindCounts(np.zeros((0, 4), np.int64), np.zeros((0, len(SUMMARY_COUNTS)), np.int64))

    def __add__(self, other: KindCounts) -> KindCounts:
        kinds = np.concatenate([self.kinds, other.kinds])
        if not len(kinds):
            return self
        unique, codes = np.unique(kinds, axis=0, return_inverse=True)
        counts = np.zeros((len(unique), len(SUMMARY_COUNTS)), np.int64)
        np.add.at(counts, codes.ravel(), np.concatenate([self.counts, other.counts]))
        return KindCounts(unique, counts)

    def frame(self) -> pd.DataFrame:
        """read_summary()'s rows: per (pid, source, label)."""
        cols = ["pid", "source", "label", *SUMMARY_COUNTS]
        if not len(self.kinds):
            return pd.DataFrame(columns=cols)
        kinds = pd.DataFrame(
            {
                **{c: self.kinds[:, i] for i, c in enumerate(KIND_COLUMNS)},
                **{c: self.counts[:, i] for i, c in enumerate(SUMMARY_COUNTS)},
            }
        )
        kinds = label_reads(kinds).assign(source=lambda k: k["source_name"])
        out = kinds.groupby(["pid", "source", "label"], sort=True)[SUMMARY_COUNTS].sum()
        return out.astype(np.int64).reset_index()[cols]


def kind_counts(intervals: pd.DataFrame, where: np.ndarray | None = None) -> KindCounts:
    """read_summary()'s counts (of the rows `where` says, if given), per kind of read."""
    if intervals.empty or (where is not None and not where.any()):
        return KindCounts.none()
    # every row's figures, those left out counted into one more group, dropped: no column
    # is copied for the rows kept
    column = columns_of(intervals, None)
    end = column("end_ns", np.float64)
    is_open = np.isnan(end)
    ret = column("ret", np.float64)
    ok = ret >= 0
    flags = column("flags", np.int64)
    parts = [column(c, np.int64) for c in KIND_COLUMNS]
    pid, source, op = parts[:3]
    poll = (source == Source.URING) & (op == URING_POLL_ADD)  # its result is an event mask
    figures = [
        is_open,
        np.where(is_open, column("len", np.int64), 0),
        is_open & ((flags & PostFlag.BUFFER_SELECT) != 0),
        is_open & ((flags & PostFlag.MULTISHOT) != 0),
        ok,
        ret < 0,
        np.where(ok & ~poll, ret, 0).astype(np.int64),
    ]
    if all(v.min() == v.max() for v in parts):  # one kind of read (one server's, say)
        codes, n = np.zeros(len(pid), np.int64), 1
    elif all(v.min() >= 0 and v.max() < limit for v, limit in zip(parts, KIND_LIMITS)):
        # one int64 key per read (pid < 2^31, source < 16, op < 4096, flags < 2^16): one
        # hash of the rows
        kind = pid << 32
        kind |= source << 28
        kind |= op << 16
        kind |= flags
        codes, uniques = pd.factorize(kind)
        n = len(uniques)
    else:
        codes = _group_ids(parts).astype(np.int64)
        n = int(codes.max()) + 1
    kinds, counts = [], []
    if n > FEW_KINDS:  # each kind's rows picked by its code, the left-out rows as code n
        if where is not None:
            codes = np.where(where, codes, n)
        rows = np.bincount(codes, minlength=n + 1)[:n]
        first = np.full(n + 1, len(codes))
        np.minimum.at(first, codes, np.arange(len(codes)))
        sums = [np.bincount(codes, v, minlength=n + 1)[:n] for v in figures]
        seen = np.flatnonzero(rows)
        kinds = [[v[first[k]] for v in parts] for k in seen]
        counts = [[s[k] for s in sums] for k in seen]
    for k in range(n if n <= FEW_KINDS else 0):  # a few kinds: a sum per kind and figure
        mine = None if n == 1 else codes == k
        rows_of = where if mine is None else mine if where is None else mine & where
        if rows_of is not None and not rows_of.any():
            continue
        kinds.append([v[0 if rows_of is None else int(np.argmax(rows_of))] for v in parts])
        counts.append([_total(v, rows_of) for v in figures])
    return KindCounts(
        np.array(kinds, np.int64).reshape(-1, len(KIND_COLUMNS)),
        np.array(counts, np.float64).astype(np.int64).reshape(-1, len(SUMMARY_COUNTS)),
    )


FEW_KINDS = 8  # up to this many kinds of read in a window, each is summed on its own


def _total(values: np.ndarray, where: np.ndarray | None) -> int:
    """The sum of `values` (the rows `where` says), exactly."""
    if values.dtype == bool:
        return int(np.count_nonzero(values if where is None else values & where))
    return int(np.add.reduce(values, where=True if where is None else where))


def read_summary(intervals: pd.DataFrame, where: np.ndarray | None = None) -> pd.DataFrame:
    """Per (pid, source, label): reads posted now, bytes pinned now, completed, received
    (of the rows `where` says, if given).

    `buffer_select_posted` counts posted reads that pin no buffer of their own (they take one
    from a provided-buffer group when data arrives); `multishot_posted` those that stay posted
    across completions.
    """
    return kind_counts(intervals, where).frame()


def process_peaks(timeline: pd.DataFrame) -> pd.DataFrame:
    """Per pid, the highest posted reads and pinned bytes seen at any instant."""
    if timeline.empty:
        return pd.DataFrame(columns=["pid", "posted_peak", "pinned_peak"])
    g = timeline.groupby("pid")
    return pd.DataFrame(
        {"posted_peak": g["posted_reads"].max(), "pinned_peak": g["pinned_bytes"].max()}
    ).reset_index()


def write_summary(intervals: pd.DataFrame) -> pd.DataFrame:
    """Per pid, writes to sockets (`read_intervals` of the writes tables): pending now (began,
    not returned) and at peak, with the bytes their buffers hold, and the writes that
    returned (bytes sent)."""
    columns = [
        "pid",
        "pending_writes",
        "pending_write_bytes",
        "pending_peak",
        "pending_bytes_peak",
        "writes_completed",
        "bytes_sent",
    ]
    if intervals.empty:
        return pd.DataFrame(columns=columns)
    pending = intervals[intervals["end_ns"].isna()]
    done = intervals[intervals["ret"] > 0]
    peaks = process_peaks(posted_timeline(intervals)).set_index("pid")
    out = pd.DataFrame(
        {
            "pending_writes": pending.groupby("pid").size(),
            "pending_write_bytes": pending.groupby("pid")["len"].sum(),
            "pending_peak": peaks["posted_peak"],
            "pending_bytes_peak": peaks["pinned_peak"],
            "writes_completed": done.groupby("pid").size(),
            "bytes_sent": done.groupby("pid")["ret"].sum(),
        }
    )
    return out.fillna(0).astype("int64").reset_index(names="pid")[columns]
