"""A grid of loads (connections x active fraction) against every model, and a linear fit of
each model's memory: memory = fixed + per_idle x idle connections + per_active x active ones.

"Memory" here is what a connection can cost while it waits: the IO-buffer memory (user) plus
the kernel's socket memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from idlebuf.compare import Load, run_comparison
from idlebuf.models import Model
from idlebuf.plots import STYLE, Series, line_chart
from idlebuf.render import human_bytes, table


def memory_of(row: dict[str, Any]) -> int:
    return int(row["io_buffer_heap"]) + int(row["socket_kernel_bytes"])


def fit(points: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Least squares of memory on idle and active connections (active dropped when the grid
    has a single active count per idle count, which cannot separate them)."""
    idle = np.array([p["connections"] - p["active"] for p in points], dtype=float)
    active = np.array([p["active"] for p in points], dtype=float)
    memory = np.array([memory_of(p) for p in points], dtype=float)
    columns = [np.ones_like(idle), idle]
    both = np.column_stack([np.ones_like(idle), idle, active])
    separable = len(points) > 3 and np.linalg.matrix_rank(both) == 3
    if separable:
        columns.append(active)
    x = np.column_stack(columns)
    coef, *_ = np.linalg.lstsq(x, memory, rcond=None)
    predicted = x @ coef
    spread = float(((memory - memory.mean()) ** 2).sum())
    r2 = 1 - float(((memory - predicted) ** 2).sum()) / spread if spread else 1.0
    return {
        "fixed_bytes": float(coef[0]),
        "per_idle_connection_bytes": float(coef[1]),
        "per_active_connection_bytes": float(coef[2]) if separable else float("nan"),
        "r2": r2,
        "points": len(points),
    }


def run_sweep(
    connections: Sequence[int],
    fractions: Sequence[float],
    chosen: Sequence[Model] | Callable[[int], Sequence[Model]],
    base: Path,
    template: Load,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    grid = [(n, f) for n in connections for f in fractions]
    points = []
    for k, (n, f) in enumerate(grid, 1):
        load = replace(template, connections=n, active=round(n * f))
        models = chosen(load.active) if callable(chosen) else chosen
        where = f"[{k}/{len(grid)}] {n:,} connections, {f:.0%} active: [{{}}/{len(models)}]"
        comparison = run_comparison(
            load,
            models,
            base / f"n{n}-f{f:g}",
            lambda i, m, what, where=where: progress(  # type: ignore[misc]
                f"{where.format(i + 1)} {m.name}: {what}"
            ),
        )
        points.append({"connections": n, "fraction": f, "rows": comparison["rows"]})
    names = [r["model"] for r in points[0]["rows"]]
    fits = {
        name: fit([r for p in points for r in p["rows"] if r["model"] == name]) for name in names
    }
    return {
        "scenario": {"connections": list(connections), "fractions": list(fractions)},
        "points": points,
        "fits": fits,
    }


def render_fits(sweep: dict[str, Any]) -> str:
    def fmt(v: float) -> str:
        return "-" if np.isnan(v) else human_bytes(round(v))  # round: no "-0 B"

    return table(
        ["model", "per idle connection", "per active connection", "fixed", "R^2", "points"],
        [
            [
                name,
                fmt(f["per_idle_connection_bytes"]),
                fmt(f["per_active_connection_bytes"]),
                fmt(f["fixed_bytes"]),
                f"{f['r2']:.3f}",
                str(f["points"]),
            ]
            for name, f in sweep["fits"].items()
        ],
    )


def sweep_html(sweep: dict[str, Any]) -> str:
    points = sweep["points"]
    names = list(sweep["fits"])
    fractions = sweep["scenario"]["fractions"]
    most = max(sweep["scenario"]["connections"])

    Point = dict[str, Any]

    def series(select: Callable[[Point], bool], x: Callable[[Point], float]) -> list[Series]:
        out: list[Series] = []
        for name in names:
            xy = sorted(
                (x(p), memory_of(r))
                for p in points
                if select(p)
                for r in p["rows"]
                if r["model"] == name
            )
            out.append((name, [a for a, _ in xy], [b for _, b in xy]))
        return out

    def at_fraction(f: float) -> Callable[[Point], bool]:
        return lambda p: bool(p["fraction"] == f)

    charts = [
        line_chart(
            f"Memory vs connections ({f:.0%} active)",
            series(at_fraction(f), lambda p: p["connections"]),
            human_bytes,
            "connections",
            lambda v: f"{v:,.0f}",
            markers=True,
            binary=True,
        )
        for f in fractions
    ]
    if len(fractions) > 1:
        charts.append(
            line_chart(
                f"Memory vs active fraction ({most:,} connections)",
                series(lambda p: p["connections"] == most, lambda p: p["fraction"]),
                human_bytes,
                "active fraction",
                lambda v: f"{v:.0%}",
                markers=True,
                binary=True,
            )
        )

    def fmt(v: float) -> str:
        return "-" if np.isnan(v) else escape(human_bytes(round(v)))

    fits = "".join(
        f"<tr><td>{escape(name)}</td><td class='num'>{fmt(f['per_idle_connection_bytes'])}</td>"
        f"<td class='num'>{fmt(f['per_active_connection_bytes'])}</td>"
        f"<td class='num'>{f['r2']:.3f}</td></tr>"
        for name, f in sweep["fits"].items()
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>idlebuf sweep"
        f"</title><style>{STYLE}</style></head><body><h1>idlebuf sweep</h1>"
        "<p>Memory = IO-buffer memory + kernel socket memory at the end of each recording, "
        "fitted per model as fixed + per idle connection x idle + per active connection x "
        "active.</p>"
        "<table id='fits'><thead><tr><th>model</th><th class='num'>per idle connection</th>"
        "<th class='num'>per active connection</th><th class='num'>R&sup2;</th></tr></thead>"
        f"<tbody>{fits}</tbody></table>"
        f"<div class='charts' id='sweep'>{''.join(charts)}</div></body></html>\n"
    )
