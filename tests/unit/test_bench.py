"""The overhead benchmark's arithmetic: windows between switches, each traced window against
the untraced ones on either side (no root: synthetic switches and exchanges)."""

from __future__ import annotations

import numpy as np
import pytest

from idlebuf.bench.overhead import compare, windows
from probes.format.meta import Switch

S = 1_000_000_000


def switches(n: int, every: float = 1.0, switch: float = 0.1) -> list[Switch]:
    """The attach at 0, then n switches: each begins `every` s after the previous one ended."""
    out = [Switch(0, 0, True)]
    for i in range(n):
        began = out[-1].to_ns + int(every * S)
        out.append(Switch(began, began + int(switch * S), i % 2 == 1))
    return out


def exchanges(stretches: list[tuple[float, float, bool]], traced: float, untraced: float):
    """Exchanges ending at a steady rate in each stretch; traced ones take 2 ms, others 1 ms."""
    ends, lat = [], []
    for lo, hi, tracing in stretches:
        rate = traced if tracing else untraced
        e = np.arange(lo, hi, 1 / rate)
        ends.append(e)
        lat.append(np.full(e.size, 0.002 if tracing else 0.001))
    return np.concatenate(ends), np.concatenate(lat)


def test_windows_leave_out_switches_and_cut_stretches() -> None:
    alts = switches(6)
    got = windows(alts, start=0.5, end=5.9, seconds=1.0)
    # each stretch starts a quarter of a window after its switch ended; the first (0..1) is
    # cut to 0.5 s by the load's start: kept; the last (5.5..6.5) is cut to 0.15 s by its
    # end: left out
    assert [(round(lo, 3), round(hi, 3), t) for lo, hi, t in got] == [
        (0.5, 1.0, True),
        (1.35, 2.1, False),
        (2.45, 3.2, True),
        (3.55, 4.3, False),
        (4.65, 5.4, True),
    ]


def test_each_traced_window_is_compared_with_its_neighbours() -> None:
    alts = switches(11)
    stretches = windows(alts, 0.0, alts[-1].to_ns / S + 1.0, 1.0)
    ends, lat = exchanges(stretches, traced=9_000, untraced=10_000)
    throughput, p99, base = compare(stretches, ends, lat)
    # traced stretches 2, 4, ..., 10 have untraced ones on both sides; the first has not
    assert len(throughput) == 5
    assert throughput == pytest.approx([0.9] * 5, abs=1e-3)
    assert p99 == pytest.approx([2.0] * 5)
    assert base == pytest.approx([10_000] * 5, rel=1e-3)


def test_analysis_sides_must_agree_or_the_benchmark_fails() -> None:
    from idlebuf.bench.analysis_speed import AnswersDiffer, check_answers

    same = {"posted_reads": 10007, "pinned_bytes": 1, "idle_io_buffer_bytes": 2,
            "idle_connections": 9506, "pending_writes": 501, "bytes_sent": 3,
            "heap_live_bytes": 4, "rss_now_bytes": 5}  # fmt: skip
    sides = {"idlebuf": [dict(same, wall_s=9.0)], "duckdb": [dict(same), dict(same)]}
    assert check_answers(sides) == same
    sides["duckdb"][1]["idle_connections"] = 9505
    with pytest.raises(AnswersDiffer, match="duckdb run 2 says idle_connections = 9,505"):
        check_answers(sides)
