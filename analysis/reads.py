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
