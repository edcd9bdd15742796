"""The entry points of the analysis: a trace -> a TraceSummary (analysis.engine).

`summarize` takes a trace opened with probes.format.reader.open_trace (the experiments and
tests open one to look at it too); `analyze` takes its directory. Both run the one engine.
"""

from __future__ import annotations

from collections.abc import Callable

from analysis.engine import analyze, step_for_span
from analysis.results import TraceSummary
from analysis.windows import WINDOW_ROWS
from probes.format.reader import Trace

__all__ = ["analyze", "recording_span", "step_for_span", "summarize", "timeline_step"]


def summarize(
    trace: Trace,
    idle_threshold_s: float = 1.0,
    timeline_s: float | None = None,
    progress: Callable[[str], None] = lambda _: None,
    window_rows: int | None = WINDOW_ROWS,
) -> TraceSummary:
    """Every process's figures of `trace` (analysis.engine.analyze of its directory)."""
    return analyze(trace.path, idle_threshold_s, timeline_s, window_rows, progress)


def recording_span(trace: Trace) -> tuple[int, int]:
    """(start, end) of an opened trace's recording, CLOCK_MONOTONIC ns: from meta.json, or
    its first and last events (a killed recording ends at its last event)."""
    meta = trace.meta
    start = meta.tracing_since_ns or meta.clock.monotonic_ns
    end = meta.end_monotonic_ns
    if end is None or not start:
        stamps = [
            (int(df["ts_ns"].min()), int(df["ts_ns"].max()))
            for df in trace.tables.values()
            if "ts_ns" in df and not df.empty
        ]
        if end is None:
            end = max((last for _, last in stamps), default=0)
        if not start:
            start = min((first for first, _ in stamps), default=end)
    return start, max(start, end)


def timeline_step(trace: Trace, wanted_s: float, at_most: bool = False) -> float:
    """step_for_span() over an opened trace's recording."""
    return step_for_span(*recording_span(trace), wanted_s, at_most)
