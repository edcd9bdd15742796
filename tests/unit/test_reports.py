"""The comparison table, HTML report and Perfetto timeline, from synthetic traces (no root).

Two recordings of 23 connections, 3 active, 4,099-byte buffers: a readiness server reading
into one pooled buffer, and a queued server with a read posted on every connection's own
buffer. Each socket holds 768 bytes of kernel memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import idlebuf
from tests.readers import read_report, read_timeline, render_in_chromium
from tests.synthetic import SOCKET_RMEM, server_trace

CONNECTIONS, ACTIVE, BUFFER = 23, 3, 4099
IDLE = CONNECTIONS - ACTIVE


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    base = tmp_path_factory.mktemp("compare")
    ready = server_trace(base / "ready", 4243, CONNECTIONS, ACTIVE, BUFFER, queued=False)
    queued = server_trace(base / "queued", 4242, CONNECTIONS, ACTIVE, BUFFER, queued=True)
    out = base / "out"
    done = idlebuf("compare", str(ready), str(queued), "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), out


def test_rows_carry_each_recordings_figures(compared: tuple[dict, Path]) -> None:
    result, out = compared
    ready, queued = result["rows"]
    assert (ready["model"], queued["model"]) == ("ready", "queued")
    assert (ready["connections"], ready["active"]) == (CONNECTIONS, ACTIVE)
    assert (ready["posted_reads"], ready["pinned_bytes"], ready["io_buffer_memory"]) == (
        0,
        0,
        BUFFER,
    )
    assert (queued["posted_reads"], queued["pinned_bytes"], queued["io_buffer_memory"]) == (
        CONNECTIONS,
        CONNECTIONS * BUFFER,
        CONNECTIONS * BUFFER,
    )
    assert ready["per_idle_connection_bytes"] == SOCKET_RMEM
    assert queued["per_idle_connection_bytes"] == SOCKET_RMEM + BUFFER
    assert queued["socket_kernel_bytes"] == CONNECTIONS * SOCKET_RMEM
    assert (ready["rss_growth"], queued["rss_growth"]) == (BUFFER, CONNECTIONS * BUFFER)
    assert (ready["ratio_to_readiness"], queued["ratio_to_readiness"]) == (1, CONNECTIONS)
    assert result["report"] == str(out / "report.html")
    assert result["timeline"] == str(out / "timeline.pftrace")


def test_html_report_has_the_table_and_a_line_per_model(compared: tuple[dict, Path]) -> None:
    result, _ = compared
    report = read_report(Path(result["report"]))
    header, *rows = report.table
    assert header[:4] == ["model", "connections", "active", "posted reads"]
    assert [r[0] for r in rows] == ["ready", "queued"]
    assert [r[3] for r in rows] == ["0", f"{CONNECTIONS}"]
    series = [t for t in report.charts if t.startswith(("Posted", "Bytes", "IO-buffer", "Res"))]
    assert len(series) == 4
    for title in series:
        lines = report.charts[title]
        assert set(lines) == {"ready", "queued"}
        # a point per step of the time series: 3 s at 0.5 s
        assert all(len(points.split()) == 6 for points in lines.values()), title
    (cost,) = [t for t in report.bars if t.startswith("Cost per idle")]
    assert report.bars[cost] == {"ready": SOCKET_RMEM, "queued": SOCKET_RMEM + BUFFER}


def test_perfetto_timeline_has_counter_tracks_per_process(compared: tuple[dict, Path]) -> None:
    result, _ = compared
    processes = read_timeline(Path(result["timeline"]))
    assert {name: p.pid for name, p in processes.items()} == {"ready": 4243, "queued": 4242}
    queued, ready = processes["queued"], processes["ready"]
    assert {"posted reads", "pinned bytes", "IO-buffer heap", "RSS", "socket memory"} <= set(
        queued.counters
    )
    assert queued.counters["posted reads"][-1] == (3_000_000_000, CONNECTIONS)
    assert queued.counters["pinned bytes"][-1][1] == CONNECTIONS * BUFFER
    assert queued.counters["socket memory"][-1][1] == CONNECTIONS * SOCKET_RMEM
    assert {v for _, v in ready.counters["posted reads"]} <= {0, 1}
    assert ready.counters["idle connections"][-1][1] == IDLE


def test_bad_inputs_get_one_line(tmp_path: Path) -> None:
    done = idlebuf("compare", str(tmp_path / "nothing"))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "error" in done.stderr
    broken = tmp_path / "comparison-dir"
    broken.mkdir()
    (broken / "comparison.json").write_text("{not json")
    done = idlebuf("compare", str(broken))
    assert done.returncode != 0 and "not a comparison idlebuf wrote" in done.stderr


def test_demo_and_sweep_refuse_in_one_line(tmp_path: Path) -> None:
    done = idlebuf("demo", "--models", "nosuch")
    assert done.returncode != 0 and "unknown model 'nosuch'" in done.stderr
    done = idlebuf("demo", "--active", "1.5")
    assert done.returncode != 0 and "between 0 and 1" in done.stderr
    done = idlebuf("sweep", "--connections", "10,x")
    assert done.returncode != 0 and "not a list of numbers" in done.stderr
    if os.geteuid() == 0:  # as nobody: refused before any server starts
        tmp_path.chmod(0o777)
        done = idlebuf("demo", "-o", str(tmp_path / "d"), preexec_fn=lambda: os.setuid(65534))
        assert done.returncode != 0 and "needs root" in done.stderr, done.stderr
        assert not (tmp_path / "d").exists()
    assert "Traceback" not in done.stderr


def test_html_report_renders_in_a_real_browser(compared: tuple[dict, Path], tmp_path: Path) -> None:
    """The page as headless Chromium lays it out: the table and every plot are there with a
    size, and no figure or model name wraps inside its cell (page.png is kept beside it)."""
    result, _ = compared
    page = render_in_chromium(Path(result["report"]), tmp_path)
    assert page.table is not None and min(page.table) > 0
    texts = [text for text, _ in page.cells]
    assert (
        "ready" in texts and "queued" in texts and f"{BUFFER * CONNECTIONS / 1024:.1f} KiB" in texts
    )
    wrapped = [text for text, lines in page.cells if lines > 1]
    assert not wrapped, wrapped
    titles = [c["title"] for c in page.charts]
    assert len(titles) == 7, titles  # 2 bars per model, 5 series over time (no writes)
    for chart in page.charts:
        assert min(chart["box"]) > 0, chart["title"]
        assert any(w > 0 for w, _ in chart["marks"]), chart["title"]  # something was drawn
    assert (tmp_path / "page.png").stat().st_size > 10_000
