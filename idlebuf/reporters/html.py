"""The HTML reporter: a comparison, or a sweep, as one self-contained page (table, SVG plots,
explanations; no script). It renders typed results and computes nothing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape
from types import SimpleNamespace

from analysis.comparison import ComparisonRow
from idlebuf.experiments.comparison import Comparison, ModelInfo
from idlebuf.experiments.models import Load
from idlebuf.experiments.sweep import Sweep, SweepPoint
from idlebuf.reporters import columns
from idlebuf.reporters.columns import Column
from idlebuf.reporters.svg import STYLE, Series, bar_chart, line_chart
from idlebuf.reporters.units import human_bytes

# the time series drawn per model: (timeline column, title, formatter)
SERIES: list[tuple[str, str, Callable[[float], str]]] = [
    ("posted_reads", "Posted reads", lambda v: f"{v:,.0f}"),
    ("pinned_bytes", "Bytes pinned by posted reads", human_bytes),
    ("io_buffer_heap_bytes", "IO-buffer heap (posted or parked reads' allocations)", human_bytes),
    ("rss_bytes", "Resident set size", human_bytes),
    ("socket_kernel_bytes", "Kernel socket memory", human_bytes),
    ("pending_write_bytes", "Bytes held by pending writes", human_bytes),
]

GLOSSARY = (
    "<p><b>Posted reads</b> are reads the kernel holds waiting for data (a blocked recv(), an "
    "io_uring request, a green thread parked on readiness); <b>pinned</b> bytes are their "
    "buffers. <b>IO-buffer memory</b> is the user memory committed to reads at the end: posted "
    "or parked buffers, buffers kept after their data, and provided-buffer groups. <b>Per idle "
    "connection</b> is that memory plus kernel socket memory, over the connections that "
    "exchanged nothing for the last second. <b>Kernel per connection</b> is the slab objects "
    "one idle connection holds (its socket, inode, file, dentry, epoll item), from this "
    "kernel's slab caches, plus its queue memory. <b>Whole cost per idle connection</b> adds "
    "them up: IO buffer + other user memory (the heap fitted against the connections held "
    "while they were opened) + kernel; unknown when the connections did not change enough "
    "during the recording to fit. <b>x readiness</b> divides each model's IO-buffer "
    "memory by the first row's.</p>"
)


def _table(rows: Sequence[ComparisonRow]) -> str:
    shown = columns.READS[:-1]
    if any(r.pending_writes or r.write_buffer_heap for r in rows):
        shown += columns.WRITE_FIGURES  # the write side was exercised: show it
    return html_table("rows", [*shown, columns.RATIO], rows)


def html_table(table_id: str, shown: Sequence[Column], rows: Sequence[object]) -> str:
    """A table of `rows` (objects with the columns' keys as attributes); the first column
    is text, the others are figures, aligned right."""

    def cls(i: int) -> str:
        return "" if i == 0 else "num"

    head = "".join(f'<th class="{cls(i)}">{escape(c.title)}</th>' for i, c in enumerate(shown))
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{cls(i)}">{escape(c.fmt(getattr(row, c.key)))}</td>'
            for i, c in enumerate(shown)
        )
        + "</tr>"
        for row in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _scenario(load: Load | None) -> str:
    if not load:
        return '<p class="note">Recordings compared as they were made.</p>'
    return (
        f"<p>{load.connections:,} connections, {load.active:,} active "
        f"({load.active / max(load.connections, 1):.0%}), "
        f"{human_bytes(load.buffer_size)} buffers; each model recorded for "
        f"{load.duration:g} s while its active connections exchanged "
        f"{load.rate:g} messages/s each"
        f"{' from a separate network namespace' if load.netns else ''}.</p>"
    )


def _explanations(models: dict[str, ModelInfo]) -> str:
    if not models:
        return ""
    items = "".join(
        f"<dt>{escape(name)} <span class='note'>({escape(m.kind)})</span></dt>"
        f"<dd>{escape(m.explain)}</dd>"
        for name, m in models.items()
    )
    return f'<h2>The models</h2><dl id="models">{items}</dl>'


def comparison_html(comparison: Comparison, title: str = "idlebuf: IO models compared") -> str:
    rows, timelines = comparison.rows, comparison.timelines
    charts = [
        line_chart(
            name,
            [
                (model, [p.t_s for p in points], [p.figure(column) for p in points])
                for model, points in timelines.items()
                if points
            ],
            fmt,
            "seconds since the recording started",
            binary=fmt is human_bytes,
        )
        for column, name, fmt in SERIES
        # a series no model ever moved (the write side of a read-only scenario) is left out
        if any(p.figure(column) for points in timelines.values() for p in points)
    ]
    cost = bar_chart(
        "Cost per idle connection (user buffers + kernel socket memory)",
        [(r.model, r.per_idle_connection_bytes) for r in rows],
        human_bytes,
    )
    memory = bar_chart(
        "IO-buffer memory at the end",
        [(r.model, r.io_buffer_memory) for r in rows],
        human_bytes,
    )
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}"
        f"</title><style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
        + _scenario(comparison.scenario)
        + _table(rows)
        + GLOSSARY
        + f'<h2>Per model</h2><div class="charts" id="by-model">{cost}{memory}</div>'
        + f'<h2>Over time</h2><div class="charts" id="time-series">{"".join(charts)}</div>'
        + _explanations(comparison.models)
        + "</body></html>\n"
    )


FIT_COLUMNS = [
    columns.MODEL,
    Column("per_idle_connection_bytes", "", "per idle connection", lambda v: _fitted(v)),
    Column("per_active_connection_bytes", "", "per active connection", lambda v: _fitted(v)),
    Column("r2", "", "R²", lambda v: "-" if v is None else f"{v:.3f}"),
]


def _fitted(v: float | None) -> str:
    return "-" if v is None else human_bytes(round(v))  # round: no "-0 B"


def sweep_html(sweep: Sweep) -> str:
    names = list(sweep.fits)
    most = max(sweep.connections)

    def series(select: Callable[[SweepPoint], bool], x: str) -> list[Series]:
        return [(name, *sweep.series(name, select, x)) for name in names]

    def at_fraction(f: float) -> Callable[[SweepPoint], bool]:
        return lambda p: bool(p.fraction == f)

    charts = [
        line_chart(
            f"Memory vs connections ({f:.0%} active)",
            series(at_fraction(f), "connections"),
            human_bytes,
            "connections",
            lambda v: f"{v:,.0f}",
            markers=True,
            binary=True,
        )
        for f in sweep.fractions
    ]
    if len(sweep.fractions) > 1:
        charts.append(
            line_chart(
                f"Memory vs active fraction ({most:,} connections)",
                series(lambda p: p.connections == most, "fraction"),
                human_bytes,
                "active fraction",
                lambda v: f"{v:.0%}",
                markers=True,
                binary=True,
            )
        )
    fits = [SimpleNamespace(model=name, **f.to_json()) for name, f in sweep.fits.items()]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>idlebuf sweep"
        f"</title><style>{STYLE}</style></head><body><h1>idlebuf sweep</h1>"
        "<p>Memory = IO-buffer memory + kernel socket memory at the end of each recording, "
        "fitted per model as fixed + per idle connection x idle + per active connection x "
        "active.</p>"
        + html_table("fits", FIT_COLUMNS, fits)
        + f"<div class='charts' id='sweep'>{''.join(charts)}</div></body></html>\n"
    )
