"""What every benchmark shares: spreads of repeated ratios, trace row counts and drops (the
recorder they run is idlebuf.experiments.processes.RecorderProcess)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from probes.format.reader import read_meta


@dataclass(frozen=True)
class Spread:
    """min / median / max of repeated measurements (or ratios), and how many there were."""

    min: float
    median: float
    max: float
    n: int

    def scaled(self, factor: float) -> Spread:
        return Spread(self.min * factor, self.median * factor, self.max * factor, self.n)


def spread(values: Sequence[float]) -> Spread:
    if not values:
        return Spread(float("nan"), float("nan"), float("nan"), 0)
    return Spread(min(values), statistics.median(values), max(values), len(values))


def table_rows(trace: Path, *tables: str) -> int:
    """Rows in these tables of a trace, from the Parquet footers (no data read)."""
    total = 0
    for name in tables:
        for part in sorted((trace / name).glob("part-*.parquet")):
            total += pq.ParquetFile(part).metadata.num_rows
    return total


def trace_drops(trace: Path) -> dict[str, int]:
    return dict(read_meta(trace).drops)
