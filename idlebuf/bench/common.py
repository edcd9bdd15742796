"""What every benchmark shares: spreads of repeated ratios, trace row counts and drops (the
recorder they run is idlebuf.experiments.processes.RecorderProcess)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq

from probes.format.reader import read_meta


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of repeated measurements (or ratios)."""
    if not values:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan"), "n": 0}
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "n": len(values),
    }


def table_rows(trace: Path, *tables: str) -> int:
    """Rows in these tables of a trace, from the Parquet footers (no data read)."""
    total = 0
    for name in tables:
        for part in sorted((trace / name).glob("part-*.parquet")):
            total += pq.ParquetFile(part).metadata.num_rows
    return total


def trace_drops(trace: Path) -> dict[str, int]:
    return dict(read_meta(trace).drops)
