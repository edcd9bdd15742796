"""The sweep's fit and page, from rows with known costs (no root)."""

from __future__ import annotations

import math
from pathlib import Path

from analysis.comparison import ComparisonRow
from idlebuf.experiments.sweep import Sweep, SweepPoint, fit
from idlebuf.reporters.html import sweep_html
from tests.readers import read_report

PER_IDLE, PER_ACTIVE, FIXED = 16411, 4099, 65537


def row(model: str, connections: int, active: int, per_idle: int) -> ComparisonRow:
    memory = FIXED + per_idle * (connections - active) + PER_ACTIVE * active
    return ComparisonRow(
        model=model,
        pid=0,
        connections=connections,
        active=active,
        posted_reads=0,
        pinned_bytes=0,
        io_buffer_memory=memory - 768 * connections,
        io_buffer_memory_resident=0,
        rss_growth=0,
        rss_bytes=0,
        socket_kernel_bytes=768 * connections,
        per_idle_connection_bytes=0,
        pending_writes=0,
        pending_write_bytes=0,
        write_buffer_heap=0,
    )


def grid(per_idle: dict[str, int]) -> Sweep:
    points = [
        SweepPoint(n, f, [row(m, n, round(n * f), cost) for m, cost in per_idle.items()])
        for n in (101, 307, 1009)
        for f in (0.05, 0.2)
    ]
    return Sweep.fitted([101, 307, 1009], [0.05, 0.2], points)


def test_fit_recovers_the_costs_per_idle_and_active_connection() -> None:
    sweep = grid({"queued": PER_IDLE, "readiness": 0})
    queued, readiness = sweep.fits["queued"], sweep.fits["readiness"]
    assert math.isclose(queued.per_idle_connection_bytes, PER_IDLE, rel_tol=1e-9)
    assert queued.per_active_connection_bytes is not None
    assert math.isclose(queued.per_active_connection_bytes, PER_ACTIVE, rel_tol=1e-9)
    assert math.isclose(queued.fixed_bytes, FIXED, rel_tol=1e-6)
    assert abs(readiness.per_idle_connection_bytes) < 1e-6
    assert queued.r2 is not None and queued.r2 > 0.999999 and queued.points == 6


def test_one_fraction_cannot_separate_active_from_idle() -> None:
    points = [row("queued", n, round(n * 0.05), PER_IDLE) for n in (101, 307, 1009)]
    result = fit(points)
    assert result.per_active_connection_bytes is None  # cannot be told: not a number
    assert result.per_idle_connection_bytes > 0


def test_page_plots_memory_against_connections_and_fraction(tmp_path: Path) -> None:
    page = tmp_path / "sweep.html"
    page.write_text(sweep_html(grid({"queued": PER_IDLE, "readiness": 0})))
    report = read_report(page)
    assert set(report.charts) == {
        "Memory vs connections (5% active)",
        "Memory vs connections (20% active)",
        "Memory vs active fraction (1,009 connections)",
    }
    for lines in report.charts.values():
        assert set(lines) == {"queued", "readiness"}
    assert [r[0] for r in report.table[1:]] == ["queued", "readiness"]
    assert report.table[1][1] == "16.0 KiB"  # 16,411 bytes per idle connection
