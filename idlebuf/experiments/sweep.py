"""A grid of loads (connections x active fraction) against every model, and a linear fit of
each model's memory: memory = fixed + per_idle x idle connections + per_active x active ones.

"Memory" here is what a connection can cost while it waits: the IO-buffer memory (user) plus
the kernel's socket memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from analysis.comparison import ComparisonRow
from analysis.fit import linear_fit
from analysis.results import Result
from idlebuf.experiments.comparison import Comparison, run_comparison
from idlebuf.experiments.models import Load, Model


def memory_of(row: ComparisonRow) -> int:
    return row.io_buffer_memory + row.socket_kernel_bytes


@dataclass(frozen=True)
class MemoryFit(Result):
    """A model's memory as fixed + per idle connection x idle + per active x active."""

    fixed_bytes: float
    per_idle_connection_bytes: float
    per_active_connection_bytes: float | None  # None: the grid cannot separate it from idle
    r2: float | None  # None: too few points to judge the fit
    points: int


def fit(rows: Sequence[ComparisonRow]) -> MemoryFit:
    """Least squares of memory on idle and active connections (active left out when the
    grid has a single active count per idle count, which cannot separate them)."""
    result = linear_fit(
        {
            "idle": np.array([r.connections - r.active for r in rows], dtype=float),
            "active": np.array([r.active for r in rows], dtype=float),
        },
        np.array([memory_of(r) for r in rows], dtype=float),
    )
    active = result.slopes["active"]
    return MemoryFit(
        fixed_bytes=result.intercept,
        per_idle_connection_bytes=result.slopes["idle"],
        per_active_connection_bytes=None if math.isnan(active) else active,
        r2=result.r2,
        points=result.points,
    )


@dataclass
class SweepPoint:
    connections: int
    fraction: float
    rows: list[ComparisonRow]


@dataclass
class Sweep:
    connections: list[int]
    fractions: list[float]
    points: list[SweepPoint]
    fits: dict[str, MemoryFit]

    @classmethod
    def fitted(cls, connections: list[int], fractions: list[float], points: list[SweepPoint]):
        names = list(dict.fromkeys(r.model for p in points for r in p.rows))
        fits = {name: fit([r for p in points for r in p.rows if r.model == name]) for name in names}
        return cls(connections, fractions, points, fits)

    def series(self, name: str, select: Callable[[SweepPoint], bool], x: str) -> Any:
        """(xs, memory) of model `name` over the points `select` keeps, by `x`."""
        xy = sorted(
            (float(getattr(p, x)), memory_of(r))
            for p in self.points
            if select(p)
            for r in p.rows
            if r.model == name
        )
        return [a for a, _ in xy], [b for _, b in xy]


def run_sweep(
    connections: Sequence[int],
    fractions: Sequence[float],
    chosen: Callable[[int], Sequence[Model]],
    base: Path,
    template: Load,
    progress: Callable[[str], None],
) -> Sweep:
    """Every model at each (connections, fraction) of the grid, recorded under base/n<N>-f<F>;
    `chosen(active)` gives the models for a point's number of active connections."""
    grid = [(n, f) for n in connections for f in fractions]
    points = []
    for k, (n, f) in enumerate(grid, 1):
        load = replace(template, connections=n, active=round(n * f))
        models = chosen(load.active)
        where = f"[{k}/{len(grid)}] {n:,} connections, {f:.0%} active: [{{}}/{len(models)}]"
        comparison: Comparison = run_comparison(
            load,
            models,
            base / f"n{n}-f{f:g}",
            lambda i, m, what, where=where: progress(  # type: ignore[misc]
                f"{where.format(i + 1)} {m.name}: {what}"
            ),
        )
        points.append(SweepPoint(n, f, comparison.rows))
    return Sweep.fitted(list(connections), list(fractions), points)
