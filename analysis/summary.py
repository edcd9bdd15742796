"""The figures `idlebuf report` shows, gathered from one trace into plain data (JSON-ready)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from analysis.reads import posted_timeline, process_peaks, read_intervals, read_summary
from analysis.trace import Trace


def summarize(trace: Trace) -> dict[str, Any]:
    """`{"processes": [...], "drops": {...}, "complete": bool}`; "now" = end of recording."""
    intervals = read_intervals(trace["posts"], trace["completions"])
    by_label = read_summary(intervals)
    peaks = process_peaks(posted_timeline(intervals)).set_index("pid")
    processes = trace["processes"].drop_duplicates("pid").set_index("pid")
    pids = sorted(set(processes.index) | set(by_label["pid"]))
    out = []
    for pid in pids:
        rows = by_label[by_label["pid"] == pid]
        by_source: dict[str, Any] = {}
        for source, src_rows in rows.groupby("source"):
            by_source[str(source)] = {
                **_totals(src_rows),
                "by_op": {str(r.label): _totals(pd.DataFrame([r])) for r in src_rows.itertuples()},
            }
        totals = _totals(rows)
        out.append(
            {
                "pid": int(pid),
                "comm": str(processes["comm"].get(pid, "")) if pid in processes.index else "",
                "posted_reads": {
                    "now": totals["posted_reads"],
                    "peak": int(peaks["posted_peak"].get(pid, 0)),
                },
                "pinned_bytes": {
                    "now": totals["pinned_bytes"],
                    "peak": int(peaks["pinned_peak"].get(pid, 0)),
                },
                "by_source": by_source,
                "reads_completed": totals["reads_completed"],
                "reads_failed": totals["reads_failed"],
                "bytes_received": totals["bytes_received"],
            }
        )
    return {
        "processes": out,
        "drops": {k: int(v) for k, v in trace.drops.items()},
        "complete": trace.complete,
        "duration_s": trace.meta.get("elapsed_s"),
        "stop_reason": trace.meta.get("stop_reason"),
    }


def _totals(rows: pd.DataFrame) -> dict[str, int]:
    return {
        k: int(rows[k].sum())
        for k in (
            "posted_reads",
            "pinned_bytes",
            "reads_completed",
            "reads_failed",
            "bytes_received",
        )
    }
