"""Posted reads: from post/completion records to read lifetimes, a timeline, per-process totals.

Pure functions, DataFrames in and DataFrames out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from probes.layout import SYSCALL_NAMES, Source

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
    p = posts.assign(_is_post=True, ret=np.nan)
    c = completions.assign(_is_post=False)
    events = pd.concat([p, c], ignore_index=True, sort=False)
    # at equal timestamps a post comes before its completion
    events = events.sort_values(
        ["pid", "source", "key", "ts_ns", "_is_post"],
        ascending=[True, True, True, True, False],
        kind="stable",
    )
    group = events.groupby(["pid", "source", "key"], sort=False)
    next_ts = group["ts_ns"].shift(-1)
    next_is_post = group["_is_post"].shift(-1)
    next_ret = group["ret"].shift(-1)
    is_post = events["_is_post"].to_numpy(bool)
    out = events.loc[is_post, ["pid", "tid", "fd", "source", "op", "key", "addr", "len", "flags"]]
    out = out.rename(columns={})
    out["post_ns"] = events.loc[is_post, "ts_ns"].astype("int64")
    follows = next_is_post[is_post]
    out["end_ns"] = next_ts[is_post].astype("float64")
    out["ret"] = next_ret[is_post].where(follows == False)  # noqa: E712 - object dtype
    out["superseded"] = (follows == True).to_numpy(bool)  # noqa: E712
    return out.sort_values("post_ns", kind="stable").reset_index(drop=True)[_INTERVAL_COLUMNS]


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


def _label(source: int, op: int) -> str:
    if source == Source.SYSCALL:
        return SYSCALL_NAMES.get(op, f"syscall_{op}")
    return f"op_{op}"


def read_summary(intervals: pd.DataFrame) -> pd.DataFrame:
    """Per (pid, source, label): reads posted now, bytes pinned now, completed, received."""
    cols = [
        "pid",
        "source",
        "label",
        "posted_reads",
        "pinned_bytes",
        "reads_completed",
        "reads_failed",
        "bytes_received",
    ]
    if intervals.empty:
        return pd.DataFrame(columns=cols)
    df = intervals.assign(
        source=intervals["source"].map(SOURCE_NAMES),
        label=[_label(s, o) for s, o in zip(intervals["source"], intervals["op"])],
        open=intervals["end_ns"].isna(),
        ok=intervals["ret"] >= 0,
        failed=intervals["ret"] < 0,
    )
    df["pinned"] = df["len"].where(df["open"], 0)
    df["received"] = df["ret"].where(df["ok"], 0)
    g = df.groupby(["pid", "source", "label"], sort=True)
    out = pd.DataFrame(
        {
            "posted_reads": g["open"].sum(),
            "pinned_bytes": g["pinned"].sum(),
            "reads_completed": g["ok"].sum(),
            "reads_failed": g["failed"].sum(),
            "bytes_received": g["received"].sum(),
        }
    ).reset_index()
    for c in cols[3:]:
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
