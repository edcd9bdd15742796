"""The comparison table, HTML report and Perfetto timeline, from synthetic traces (no root).

Two recordings of 23 connections, 3 active, 4,099-byte buffers: a readiness server reading
into one pooled buffer, and a queued server with a read posted on every connection's own
buffer. Each socket holds 768 bytes of kernel memory. Beside them, a comparison made by hand
(hand_made) with what these traces cannot give: every part of the whole cost, some of them
unknown, and time series with samples missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from analysis.comparison import ComparisonRow, with_ratios
from analysis.results import TimelinePoint
from idlebuf.experiments.comparison import Comparison, ModelInfo
from idlebuf.experiments.models import Load
from idlebuf.experiments.saved import COMPARISON_FILE, load_comparison, save_comparison
from idlebuf.reporters.html import comparison_html
from idlebuf.reporters.perfetto import timeline_trace
from idlebuf.reporters.text import render_timeline
from tests.helpers import idlebuf
from tests.readers import Rendered, read_report, read_timeline, render_in_chromium
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
    assert header == [
        "model",
        "connections",
        "active",
        "posted reads",
        "pinned",
        "IO-buffer memory",
        "RSS growth",
        "whole cost per idle connection",
        "x readiness",
    ]
    assert [r[0] for r in rows] == ["ready", "queued"]
    assert [r[3] for r in rows] == ["0", f"{CONNECTIONS}"]
    assert [r[7:] for r in rows] == [["unknown", "1"], ["unknown", f"{CONNECTIONS}"]]
    # the secondary figures, in each row's details line
    assert report.details["queued"]["per_idle_connection_bytes"] == (
        f"{(SOCKET_RMEM + BUFFER) / 1024:.1f} KiB"
    )
    assert report.details["ready"]["socket_kernel_bytes"] == (
        f"{CONNECTIONS * SOCKET_RMEM / 1024:.1f} KiB"
    )
    assert report.details["queued"]["kernel_per_connection_bytes"] == "unknown"
    series = [t for t in report.charts if t.startswith(("Posted", "Bytes", "IO-buffer", "Res"))]
    assert len(series) == 4
    for title in series:
        lines = report.charts[title]
        assert set(lines) == {"ready", "queued"}
        # one run per model, a point per step of the time series: 3 s at 0.5 s
        assert all(len(runs) == 1 and len(runs[0].split()) == 6 for runs in lines.values())
    # the whole cost by part: the traces read no slab caches and no memory points; the
    # buffer part is the allocation holding the buffer (glibc's chunk: request + 8, to 16)
    assert report.stacks["Whole cost per idle connection, by part"] == {
        "ready": {"IO buffer": 0, "waiter": 0, "other user memory": None, "kernel": None},
        "queued": {"IO buffer": (BUFFER + 8 + 15) // 16 * 16, "waiter": 0,
                   "other user memory": None, "kernel": None},
    }  # fmt: skip
    assert report.bars["IO-buffer memory at the end"] == {
        "ready": BUFFER,
        "queued": CONNECTIONS * BUFFER,
    }
    chunk = (BUFFER + 8 + 15) // 16 * 16  # what holds each buffer: its allocation
    assert report.headline == (
        f"{IDLE} of {CONNECTIONS} connections are idle. In queued, their IO buffers hold "
        f"{IDLE * chunk / 1024:.1f} KiB ({chunk / 1024:.1f} KiB each). The baseline, ready, "
        f"keeps {BUFFER / 1024:.1f} KiB of IO-buffer memory for all {CONNECTIONS} connections: "
        f"{CONNECTIONS}x less than its {CONNECTIONS * BUFFER / 1024:.1f} KiB."
    )


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
    """The page of two traces as headless Chromium lays it out at 1,280 px: nothing sideways,
    every figure on one line, every chart drawn (page-1280.png is kept beside it)."""
    result, _ = compared
    page = render_in_chromium(Path(result["report"]), tmp_path)
    fits_the_window(page, 1280)
    texts = [text for text, _, _ in page.cells]
    assert "ready" in texts and f"{BUFFER * CONNECTIONS / 1024:.1f} KiB" in texts
    titles = [c["title"] for c in page.charts]
    assert len(titles) == 7, titles  # 2 per model, 5 series over time (no writes)
    for chart in page.charts:
        left, top, right, bottom = chart["box"]
        assert right > left and bottom > top, chart["title"]
        assert any(m["box"][2] > m["box"][0] for m in chart["marks"]), chart["title"]
    cost = page.chart("Whole cost")
    assert {m["series"] for m in unknown_marks(cost)} == {"ready", "queued"}
    assert (tmp_path / "page-1280.png").stat().st_size > 10_000


def fits_the_window(page: Rendered, width: int) -> None:
    """Nothing scrolls sideways, no figure wraps, no chart text is cut off."""
    assert page.viewport[0] == width, page.viewport
    assert page.viewport[2] <= page.viewport[1], page.viewport  # the page: no scrollbar
    assert not page.overflowing, page.overflowing
    assert not page.clipped, page.clipped
    wrapped = [text for text, lines, tag in page.cells if lines > 1 and tag == "td"]
    assert not wrapped, wrapped


def unknown_marks(chart: dict) -> list[dict]:
    """The chart's unknown parts, each drawn with a width, hatched (an SVG pattern) and
    labelled "unknown" inside its box."""
    marks = [m for m in chart["marks"] if m["part"] == "unknown"]
    for m in marks:
        left, top, right, bottom = m["box"]
        assert right - left >= 6 and m["value"] == "unknown" and m["pattern"] == "pattern", m
        labels = [
            box
            for text, box in chart["texts"]
            if text == "unknown" and left <= (box[0] + box[2]) / 2 <= right
            and top <= (box[1] + box[3]) / 2 <= bottom
        ]  # fmt: skip
        assert labels, m
    return marks


# --- a comparison made by hand --------------------------------------------------------------
KERNEL, OTHER = 3989, 1031  # per idle connection
STEP, STEPS = 0.5, 12  # the time series: 0.5 s to 6 s
FIRST_RSS = 2.5  # RSS is not measured before
GAP = (4.0, 4.5)  # nor, for uring, then


def hand_made(names: tuple[str, ...] = ("ready", "queued", "uring", "older")) -> Comparison:
    """23 connections, 3 active. ready: one pooled buffer, every part of its whole cost
    known; queued: a buffer per connection, its other user memory unknown; uring: the same
    buffers, every part known; older: a row saved before the parts were (its total known,
    its IO buffer and other user memory unknown)."""

    def row(
        model: str, memory: int, parts: tuple[int | None, int | None, int | None]
    ) -> ComparisonRow:
        io, other, kernel = parts
        known = None not in parts
        return ComparisonRow(
            model=model,
            pid=5000 + len(model),
            connections=CONNECTIONS,
            active=ACTIVE,
            posted_reads=0 if model == "ready" else CONNECTIONS,
            pinned_bytes=0 if model == "ready" else CONNECTIONS * BUFFER,
            io_buffer_memory=memory,
            io_buffer_memory_resident=memory,
            rss_growth=memory,
            rss_bytes=memory + (8 << 20),
            socket_kernel_bytes=0,
            per_idle_connection_bytes=io or 0,
            pending_writes=0,
            pending_write_bytes=0,
            write_buffer_heap=0,
            io_buffer_per_idle_connection_bytes=io,
            waiter_per_idle_connection_bytes=0,  # the wait is the process's: no waiter
            other_user_per_idle_connection_bytes=other,
            kernel_per_connection_bytes=kernel,
            whole_per_idle_connection_bytes=sum(p or 0 for p in parts) if known else None,
            whole_unknown=[] if other is not None else ["other user memory: 2 connection counts"],
        )

    rows = {
        "ready": row("ready", BUFFER, (0, OTHER, KERNEL)),
        "queued": row("queued", CONNECTIONS * BUFFER, (BUFFER, None, KERNEL)),
        "uring": row("uring", CONNECTIONS * BUFFER, (BUFFER, OTHER, KERNEL)),
        "older": replace(
            row("older", 11 * BUFFER, (None, None, KERNEL)),
            whole_per_idle_connection_bytes=BUFFER + OTHER + KERNEL,
            waiter_per_idle_connection_bytes=None,  # saved before waiters were read
        ),
    }

    def series(r: ComparisonRow) -> list[TimelinePoint]:
        points = []
        for i in range(1, STEPS + 1):
            t = i * STEP
            gap = t < FIRST_RSS or (r.model == "uring" and GAP[0] <= t <= GAP[1])
            points.append(
                TimelinePoint(
                    pid=r.pid,
                    t_s=t,
                    posted_reads=r.posted_reads,
                    pinned_bytes=r.pinned_bytes,
                    io_buffer_heap_bytes=r.io_buffer_memory,
                    rss_bytes=None if gap else r.rss_bytes,
                    socket_kernel_bytes=SOCKET_RMEM * CONNECTIONS,
                    connections_open=CONNECTIONS,
                    idle_connections=None if t < FIRST_RSS else IDLE,
                )
            )
        return points

    chosen = with_ratios([rows[n] for n in names])
    return Comparison(
        Load(CONNECTIONS, ACTIVE, BUFFER, duration=STEP * STEPS),
        chosen,
        {r.model: series(r) for r in chosen},
        {
            "ready": ModelInfo("epoll, a pooled buffer", "The readiness model.", "readiness"),
            "queued": ModelInfo("a thread per connection", "The queued model.", "queued"),
        },
        complete=True,
    )


@pytest.fixture(scope="module")
def hand_made_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    page = tmp_path_factory.mktemp("hand-made") / "report.html"
    page.write_text(comparison_html(hand_made(), "idlebuf: made by hand"))
    return page


def kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


def test_headline_says_what_the_idle_connections_hold(hand_made_page: Path) -> None:
    report = read_report(hand_made_page)
    assert report.headline == (
        f"{IDLE} of {CONNECTIONS} connections are idle. In queued and uring, their IO buffers "
        f"hold {kib(IDLE * BUFFER)} ({kib(BUFFER)} each). A readiness design, ready, keeps "
        f"{kib(BUFFER)} of IO-buffer memory for all {CONNECTIONS} connections: "
        f"{CONNECTIONS}x less than their {kib(CONNECTIONS * BUFFER)}."
    )


def test_whole_cost_is_stacked_by_part_unknown_parts_as_unknown(hand_made_page: Path) -> None:
    report = read_report(hand_made_page)
    assert report.stacks["Whole cost per idle connection, by part"] == {
        "ready": {"IO buffer": 0, "waiter": 0, "other user memory": OTHER, "kernel": KERNEL},
        "queued": {"IO buffer": BUFFER, "waiter": 0, "other user memory": None, "kernel": KERNEL},
        "uring": {"IO buffer": BUFFER, "waiter": 0, "other user memory": OTHER, "kernel": KERNEL},
        "older": {"IO buffer": None, "waiter": None, "other user memory": None, "kernel": KERNEL},
    }
    # the table's whole cost is the stack's total: unknown where a part is
    whole = {r[0]: r[7] for r in report.table[1:]}
    assert whole == {
        "ready": kib(OTHER + KERNEL),
        "queued": "unknown",
        "uring": kib(BUFFER + OTHER + KERNEL),
        "older": kib(BUFFER + OTHER + KERNEL),
    }


def test_series_are_drawn_from_their_first_sample_with_gaps(hand_made_page: Path) -> None:
    report = read_report(hand_made_page)
    rss = report.charts["Resident set size"]
    points = {name: [len(run.split()) for run in runs] for name, runs in rss.items()}
    first = STEPS - round(FIRST_RSS / STEP) + 1  # samples from 2.5 s to 6 s
    assert points == {"ready": [first], "queued": [first], "older": [first], "uring": [3, 3]}
    posted = report.charts["Posted reads"]
    assert all(len(runs) == 1 and len(runs[0].split()) == STEPS for runs in posted.values())


def test_charts_are_as_tall_as_their_content(tmp_path: Path) -> None:
    page = tmp_path / "one.html"
    page.write_text(comparison_html(hand_made(("queued",))))
    one = read_report(page)
    page.write_text(comparison_html(hand_made()))
    four = read_report(page)
    for title in ("Whole cost per idle connection, by part", "IO-buffer memory at the end"):
        assert one.sizes[title][1] <= 80, title  # a single bar
        assert four.sizes[title][1] - one.sizes[title][1] == 3 * 24, title  # 24 px a bar
    # one row is its own baseline: nothing to compare it with
    assert one.headline.endswith("less a pool sized to the active connections.")


def test_saved_comparison_keeps_gaps_and_parts(tmp_path: Path) -> None:
    comparison = hand_made()
    save_comparison(comparison, tmp_path)
    loaded = load_comparison(tmp_path)
    assert loaded.rows == comparison.rows
    assert loaded.timelines == comparison.timelines
    assert loaded.timelines["uring"][7].rss_bytes is None  # 4.0 s
    # a file written before the parts: they are unknown, the rest as it was
    saved = json.loads((tmp_path / COMPARISON_FILE).read_text())
    for row in saved["rows"]:
        for key in (
            "io_buffer_per_idle_connection_bytes",
            "other_user_per_idle_connection_bytes",
            "whole_unknown",
        ):
            del row[key]
    del saved["ratio_of"]
    (tmp_path / COMPARISON_FILE).write_text(json.dumps(saved))
    older = load_comparison(tmp_path)
    for row, before in zip(older.rows, comparison.rows, strict=True):
        assert row == replace(
            before,
            io_buffer_per_idle_connection_bytes=None,
            other_user_per_idle_connection_bytes=None,
            whole_unknown=[],
        )
    assert older.ratio_of == "io_buffer_memory"


def test_timeline_and_text_leave_out_what_was_not_measured(tmp_path: Path) -> None:
    comparison = hand_made()
    path = tmp_path / "timeline.pftrace"
    path.write_bytes(timeline_trace(comparison.timelines, comparison.pids()).SerializeToString())
    processes = read_timeline(path)
    ns = lambda t: round(t * 1e9)  # noqa: E731
    rss = {name: [t for t, _ in p.counters["RSS"]] for name, p in processes.items()}
    measured = [ns(i * STEP) for i in range(1, STEPS + 1) if i * STEP >= FIRST_RSS]
    assert rss["queued"] == measured
    assert rss["uring"] == [t for t in measured if not ns(GAP[0]) <= t <= ns(GAP[1])]
    assert len(processes["queued"].counters["posted reads"]) == STEPS
    text = render_timeline(comparison.timelines["uring"])
    lines = text.splitlines()
    assert "unknown" in lines[3] and "unknown" not in lines[-1]  # 0.5 s, and 6 s


WIDTHS = (1280, 1800)


@pytest.mark.parametrize("width", WIDTHS)
def test_page_reads_at_a_glance_in_a_real_browser(
    hand_made_page: Path, tmp_path: Path, width: int
) -> None:
    """In headless Chromium: nothing scrolls sideways; the headline is on the first screen
    with its numbers; the stacked bars carry the parts in proportion, unknown parts hatched
    and labelled; no series is drawn before its first sample, and a gap stays a gap."""
    page = render_in_chromium(hand_made_page, tmp_path, width)
    fits_the_window(page, width)
    assert page.headline is not None
    assert page.headline["box"][3] <= 800, page.headline  # on the first screen
    assert f"hold {kib(IDLE * BUFFER)}" in page.headline["text"]
    # the two columns the page exists for, in the window
    headers = [text for text, _, tag in page.cells if tag == "th"]
    assert headers[-2:] == ["whole cost per idle connection", "x readiness"]

    cost = page.chart("Whole cost")
    bars = {(m["series"], m["part"]): m["box"] for m in cost["marks"]}

    def width_of(model: str, part: str) -> float:
        left, _, right, _ = bars[model, part]
        return right - left

    # in proportion: uring's IO buffer against its kernel part and against ready's other
    assert width_of("uring", "IO buffer") / width_of("uring", "kernel") == pytest.approx(
        BUFFER / KERNEL, rel=0.02
    )
    assert width_of("ready", "other user memory") / width_of("uring", "kernel") == (
        pytest.approx(OTHER / KERNEL, rel=0.03)
    )
    unknown = {m["series"]: m for m in unknown_marks(cost)}
    assert set(unknown) == {"queued", "older"}
    assert unknown["queued"]["parts"] == "other user memory"
    # older's total is known: its unknown parts take what the known kernel part leaves
    assert width_of("older", "unknown") == pytest.approx(
        width_of("uring", "IO buffer") + width_of("uring", "other user memory"), abs=1
    )

    rss = page.chart("Resident set size")
    ticks = [(float(label), x) for label, x in rss["ticks"]]
    (t0, x0), (t1, x1) = ticks[0], ticks[-1]

    def x_of(t: float) -> float:
        return x0 + (x1 - x0) * (t - t0) / (t1 - t0)

    lines = [m for m in rss["marks"] if m["tag"] == "polyline"]
    assert {m["series"] for m in lines} == {"ready", "queued", "uring", "older"}
    for m in lines:  # stroke: a pixel or two either side
        assert m["box"][0] >= x_of(FIRST_RSS) - 2, m
    uring = sorted((m["box"][0], m["box"][2]) for m in lines if m["series"] == "uring")
    assert len(uring) == 2
    assert uring[0][1] <= x_of(GAP[0] - STEP) + 2 and uring[1][0] >= x_of(GAP[1] + STEP) - 2
