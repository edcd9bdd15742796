"""Posted reads: from post/completion records to read lifetimes, a timeline, per-process totals.

Pure functions, DataFrames in and DataFrames out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from probes.layout import SYSCALL_NAMES, URING_OP_NAMES, PostFlag, Source

SOURCE_NAMES = {s.value: s.name.lower() for s in Source}

_INTERVAL_COLUMNS = [
    "pid",
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
]


def read_intervals(posts: pd.DataFrame, completions: pd.DataFrame) -> pd.DataFrame:
    """One row per posted read: when it was posted and when (and how) it ended.

    A completion ends the post before it on the same (pid, source, key). A post followed by
    another post on the same key ended unseen (its completion was lost) and is `superseded`
    at the second post. `end_ns` is NaN (and `ret` NaN) for reads still posted at the end.
    """
    if posts.empty:
        return pd.DataFrame(columns=_INTERVAL_COLUMNS)
    p = posts.reset_index(drop=True)
    keys = ["pid", "source", "key"]
    events = pd.concat(
        [
            p[keys + ["ts_ns"]].assign(post_row=np.arange(len(p)), ret=np.nan),
            completions[keys + ["ts_ns"]].assign(
                post_row=-1, ret=completions["ret"].astype("float64")
            ),
        ],
        ignore_index=True,
    )
    # at equal timestamps a post comes before its completion
    events = events.sort_values(
        keys + ["ts_ns", "post_row"], ascending=[True, True, True, True, False], kind="stable"
    )
    group = events.groupby(keys, sort=False)
    is_post = (events["post_row"] >= 0).to_numpy()
    next_row = group["post_row"].shift(-1)[is_post].to_numpy()  # NaN: none, -1: completion
    rows = events["post_row"].to_numpy()[is_post]
    out = p.iloc[rows].reset_index(drop=True)
    out["post_ns"] = out["ts_ns"].astype("int64")
    out["end_ns"] = group["ts_ns"].shift(-1)[is_post].to_numpy("float64")
    out["ret"] = np.where(next_row == -1, group["ret"].shift(-1)[is_post].to_numpy(), np.nan)
    out["superseded"] = next_row >= 0
    return out.sort_values("post_ns", kind="stable").reset_index(drop=True)[_INTERVAL_COLUMNS]


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


def parked_reads(intervals: pd.DataFrame, waits: pd.DataFrame | None = None) -> pd.DataFrame:
    """Buffers held by threads parked on readiness after a non-blocking read (source `parked`).

    The pattern (Go's netpoller, green threads, virtual threads): a socket read returns EAGAIN,
    the program waits for readiness, then retries with the same buffer, which it held all
    along. One row per such wait, in the shape of `read_intervals`: posted when the EAGAIN
    returned, ended by the next read on the same fd (NaN: still parked). Not counted: a wait
    with no readiness wait (epoll/poll/select) by the process between the EAGAIN and the
    retry (when `waits` are given), or whose buffer the program next reads into for another
    fd (a pool's buffer, not a parked thread's).
    """
    syscall = intervals[intervals["source"] == Source.SYSCALL] if not intervals.empty else intervals
    candidates = syscall[syscall["ret"] == -EAGAIN] if not syscall.empty else syscall
    if candidates.empty:
        return intervals.iloc[0:0]
    next_fd = next_user_of_buffer(candidates, "end_ns", syscall)
    retry = _next_post(candidates, "end_ns", syscall, ["pid", "fd"], "at")
    keep = (next_fd == -1) | (next_fd == candidates["fd"])
    if waits is not None:
        started = waits.rename(columns={"ts_ns": "post_ns"}).assign(fd=-1)
        wait_at = _next_post(candidates, "end_ns", started, ["pid"], "at")
        keep &= wait_at.notna() & ~(wait_at > retry)
    keep_arr = keep.to_numpy()
    out = candidates[keep_arr].copy()
    out["post_ns"] = out["end_ns"].astype("int64")
    out["end_ns"] = retry[keep_arr]
    out["ret"] = np.nan
    out["superseded"] = False
    out["source"] = Source.PARKED
    return out.reset_index(drop=True)


def posted_timeline(intervals: pd.DataFrame) -> pd.DataFrame:
    """Per pid, the number of posted reads and pinned bytes after every change."""
    if intervals.empty:
        return pd.DataFrame(columns=["pid", "ts_ns", "posted_reads", "pinned_bytes"])
    starts = pd.DataFrame(
        {
            "pid": intervals["pid"],
            "ts_ns": intervals["post_ns"],
            "d_reads": 1,
            "d_bytes": intervals["len"].astype("int64"),
        }
    )
    ended = intervals[intervals["end_ns"].notna()]
    ends = pd.DataFrame(
        {
            "pid": ended["pid"],
            "ts_ns": ended["end_ns"].astype("int64"),
            "d_reads": -1,
            "d_bytes": -ended["len"].astype("int64"),
        }
    )
    steps = pd.concat([starts, ends], ignore_index=True)
    # at one instant, apply ends before starts so peaks are not overstated
    steps = steps.sort_values(["pid", "ts_ns", "d_reads"], kind="stable")
    by_pid = steps.groupby("pid", sort=False)
    steps["posted_reads"] = by_pid["d_reads"].cumsum()
    steps["pinned_bytes"] = by_pid["d_bytes"].cumsum()
    return steps[["pid", "ts_ns", "posted_reads", "pinned_bytes"]].reset_index(drop=True)


def _source_and_label(source: int, op: int, flags: int) -> tuple[str, str]:
    """Where a read counts: "syscall" and "uring" are network reads, "file" is not."""
    if source == Source.SYSCALL:
        return "syscall", SYSCALL_NAMES.get(op, f"syscall_{op}")
    if source == Source.PARKED:
        return "parked", SYSCALL_NAMES.get(op, f"syscall_{op}")
    if source == Source.URING:
        name = URING_OP_NAMES.get(op, f"op_{op}")
        if flags & PostFlag.SOCKET:
            return "uring", name
        if flags & PostFlag.FIXED_FILE:  # a registered file: not known to be a socket
            return "uring", f"{name} (fixed file)"
        return "file", f"uring {name}"
    return SOURCE_NAMES.get(source, str(source)), f"op_{op}"


def label_reads(intervals: pd.DataFrame) -> pd.DataFrame:
    """`intervals` with where each read counts (`source_name`) and what it is (`label`)."""
    pairs = [
        _source_and_label(s, o, f)
        for s, o, f in zip(intervals["source"], intervals["op"], intervals["flags"])
    ]
    return intervals.assign(source_name=[p[0] for p in pairs], label=[p[1] for p in pairs])


def network_reads(intervals: pd.DataFrame) -> pd.DataFrame:
    """Only reads on sockets (reads of files through io_uring are left out)."""
    if intervals.empty:
        return intervals
    return intervals[label_reads(intervals)["source_name"] != "file"]


SUMMARY_COUNTS = [
    "posted_reads",
    "pinned_bytes",
    "buffer_select_posted",
    "multishot_posted",
    "reads_completed",
    "reads_failed",
    "bytes_received",
]


def read_summary(intervals: pd.DataFrame) -> pd.DataFrame:
    """Per (pid, source, label): reads posted now, bytes pinned now, completed, received.

    `buffer_select_posted` counts posted reads that pin no buffer of their own (they take one
    from a provided-buffer group when data arrives); `multishot_posted` those that stay posted
    across completions.
    """
    cols = ["pid", "source", "label", *SUMMARY_COUNTS]
    if intervals.empty:
        return pd.DataFrame(columns=cols)
    df = label_reads(intervals)
    is_open = df["end_ns"].isna()
    ok = df["ret"] >= 0
    df = df.assign(
        source=df["source_name"],
        open=is_open,
        ok=ok,
        failed=df["ret"] < 0,
        pinned=df["len"].where(is_open, 0),
        received=df["ret"].where(ok, 0),
        select_open=is_open & ((df["flags"] & PostFlag.BUFFER_SELECT) != 0),
        multishot_open=is_open & ((df["flags"] & PostFlag.MULTISHOT) != 0),
    )
    g = df.groupby(["pid", "source", "label"], sort=True)
    out = pd.DataFrame(
        {
            "posted_reads": g["open"].sum(),
            "pinned_bytes": g["pinned"].sum(),
            "buffer_select_posted": g["select_open"].sum(),
            "multishot_posted": g["multishot_open"].sum(),
            "reads_completed": g["ok"].sum(),
            "reads_failed": g["failed"].sum(),
            "bytes_received": g["received"].sum(),
        }
    ).reset_index()
    for c in SUMMARY_COUNTS:
        out[c] = out[c].astype("int64")
    return out[cols]


def process_peaks(timeline: pd.DataFrame) -> pd.DataFrame:
    """Per pid, the highest posted reads and pinned bytes seen at any instant."""
    if timeline.empty:
        return pd.DataFrame(columns=["pid", "posted_peak", "pinned_peak"])
    g = timeline.groupby("pid")
    return pd.DataFrame(
        {"posted_peak": g["posted_reads"].max(), "pinned_peak": g["pinned_bytes"].max()}
    ).reset_index()


def write_summary(writes: pd.DataFrame, completions: pd.DataFrame) -> pd.DataFrame:
    """Per pid, writes to sockets: pending now (began, not returned) and at peak, with the
    bytes their buffers hold, and the writes that returned (bytes sent, failures)."""
    columns = [
        "pid",
        "pending_writes",
        "pending_write_bytes",
        "pending_peak",
        "pending_bytes_peak",
        "writes_completed",
        "bytes_sent",
    ]
    intervals = read_intervals(writes, completions)
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
