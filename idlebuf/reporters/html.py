"""The HTML reporter: a comparison, or a sweep, as one self-contained page (headline, table,
SVG plots, explanations; no script). It renders typed results and computes nothing.

The comparison's page reads at a glance from 1,280 px up: a headline in words and numbers, a
table of the figures compared (the others in a details line under each row, so that nothing
scrolls sideways), the whole cost per idle connection stacked by its parts, and the time
series, each drawn from its first measured sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape
from types import SimpleNamespace

from analysis.comparison import ComparisonRow, Headline, headline
from idlebuf.experiments.comparison import Comparison, ModelInfo
from idlebuf.experiments.models import Load
from idlebuf.experiments.sweep import Sweep, SweepPoint
from idlebuf.reporters import columns
from idlebuf.reporters.columns import Column
from idlebuf.reporters.svg import (
    IO_BUFFER_COLOR,
    STYLE,
    Series,
    Stack,
    bar_chart,
    line_chart,
    stacked_bar_chart,
)
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
# the figure the ratios divide: its name in a sentence, and its chart's title
FIGURES = {
    "io_buffer_memory": ("IO-buffer memory", "IO-buffer memory at the end"),
    "write_buffer_heap": ("write-buffer memory", "Write-buffer memory at the end"),
}

GLOSSARY = (
    "<p class='glossary'><b>Posted reads</b> are reads the kernel holds waiting for data (a "
    "blocked recv(), an io_uring request, a green thread parked on readiness); <b>pinned</b> "
    "bytes are their buffers. <b>IO-buffer memory</b> is the user memory committed to reads "
    "at the end: posted or parked buffers, buffers kept after their data, and provided-buffer "
    "groups; <b>resident</b> is the part of it in RAM. <b>Whole cost per idle connection</b> "
    "is IO buffer + other user memory (the heap fitted against the connections held while "
    "they were opened) + kernel (the slab objects one idle connection holds - its socket, "
    "inode, file, dentry, epoll item - from this kernel's slab caches, plus its queue "
    "memory); a part that could not be known is shown as unknown, never as 0, and the known "
    "parts are then a lower bound. <b>IO buffer + socket memory per idle connection</b> is the "
    "measured part alone, over the connections that exchanged nothing for the last second. "
    "<b>x readiness</b> divides each model's {figure} by the first row's.</p>"
)


def comparison_html(comparison: Comparison, title: str = "idlebuf: IO models compared") -> str:
    rows = comparison.rows
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body><main>"
        f"<h1>{escape(title)}</h1>"
        + _scenario(comparison.scenario)
        + _headline(headline(rows, comparison.ratio_of), comparison)
        + _table(comparison)
        + GLOSSARY.format(figure=FIGURES[comparison.ratio_of][0])
        + '<h2>Per model</h2><div class="charts" id="by-model">'
        # the whole cost is the reads' (the write side's table does not show it either)
        + ("" if comparison.ratio_of == "write_buffer_heap" else _whole_cost_chart(rows))
        + bar_chart(
            FIGURES[comparison.ratio_of][1],
            [(r.model, getattr(r, comparison.ratio_of)) for r in rows],
            human_bytes,
            color=IO_BUFFER_COLOR,  # as the IO buffer's part of the whole cost
        )
        + "</div>"
        + "<h2>Over time</h2><p class='note'>Each line starts at its first sample; a gap is a "
        "time when the figure was not measured.</p>"
        + f'<div class="charts" id="time-series">{_series(comparison)}</div>'
        + _explanations(comparison.models)
        + "</main></body></html>\n"
    )


def _names(models: Sequence[str]) -> str:
    names = [f"<b>{escape(m)}</b>" for m in models]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _headline(head: Headline | None, comparison: Comparison) -> str:
    """The sentence on the first screen: how many connections are idle, what they hold (part
    by part, as the headline lists them), what the baseline keeps."""
    if head is None:
        return ""
    writes = head.figure == "write_buffer_heap"
    idle = f"{head.idle:,} of {head.connections:,} connections"
    idle += "' readers do not read." if writes else " are idle."
    # on the write side every connection of a queued server may have a write pending, the
    # readers' too: not "theirs"
    whose = "" if writes else "their "
    held = [
        f"{whose}{escape(h.what)} hold <b>{human_bytes(h.bytes)}</b>"
        + ("" if h.per_connection is None else f" ({human_bytes(h.per_connection)} each)")
        if h.bytes is not None
        else f"what {whose}{escape(h.what)} hold is unknown"
        for h in head.held
    ]
    held_text = held[0] if len(held) == 1 else ", ".join(held[:-1]) + " and " + held[-1]
    sentence = f"<b>{idle}</b> In {_names(head.models)}, {held_text}."
    figure = FIGURES[head.figure][0]
    if head.baseline is not None and head.baseline_bytes is not None:
        info = comparison.models.get(head.baseline)
        who = "A readiness design" if info and info.kind == "readiness" else "The baseline"
        base = next(r for r in comparison.rows if r.model == head.baseline)
        sentence += (
            f" {who}, {_names([head.baseline])}, keeps <b>{human_bytes(head.baseline_bytes)}"
            f"</b> of {figure} for all {base.connections:,} connections: <b>{head.ratio:,g}x "
            f"less</b> than {'its' if len(head.models) == 1 else 'their'} "
            f"{human_bytes(head.bytes)}."
        )
    else:
        sentence += (
            " A readiness design would free them, less a pool sized to the active connections."
        )
    return f'<section id="headline"><p>{sentence}</p></section>'


def _table(comparison: Comparison) -> str:
    rows = comparison.rows
    if comparison.ratio_of == "write_buffer_heap":
        return html_table("rows", columns.PAGE_WRITES, rows)
    details = list(columns.PAGE_READS_DETAILS)
    if any(r.pending_writes or r.write_buffer_heap for r in rows):
        details += columns.WRITE_FIGURES  # the write side was exercised too: show it
    return html_table("rows", columns.PAGE_READS, rows, details, columns.KEY)


def html_table(
    table_id: str,
    shown: Sequence[Column],
    rows: Sequence[object],
    details: Sequence[Column] = (),
    key: Sequence[Column] = (),
) -> str:
    """A table of `rows` (objects with the columns' keys as attributes); the first column
    is text, the others are figures, aligned right. `details`: figures shown in a line under
    each row rather than as columns; `key`: columns highlighted."""

    def cls(i: int, c: Column) -> str:
        return ("model" if i == 0 else "num") + (" key" if c in key else "")

    head = "".join(
        f'<th class="{cls(i, c)}" scope="col">{escape(c.title)}</th>' for i, c in enumerate(shown)
    )
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="{cls(i, c)}">{escape(c.fmt(getattr(row, c.key)))}</td>'
            for i, c in enumerate(shown)
        )
        if not details:
            body.append(f"<tr>{cells}</tr>")
            continue
        figures = "".join(
            f'<span class="figure" data-key="{c.key}">{escape(c.title)} '
            f"<b>{escape(c.fmt(getattr(row, c.key)))}</b></span>"
            for c in details
        )
        body.append(
            f'<tr class="has-details">{cells}</tr><tr class="details"><td></td>'
            f'<td colspan="{len(shown) - 1}"><div class="figures">{figures}</div></td></tr>'
        )
    return (
        f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _whole_cost_chart(rows: Sequence[ComparisonRow]) -> str:
    stacks = [
        Stack(
            r.model,
            [(part.name, value) for part, value in r.whole_cost_parts()],
            r.whole_per_idle_connection_bytes,
            "; ".join(r.whole_unknown),
        )
        for r in rows
    ]
    why = "".join(
        f"<li><b>{escape(r.model)}</b>: {escape('; '.join(r.whole_unknown))}</li>"
        for r in rows
        if r.whole_unknown and any(v is None for _, v in r.whole_cost_parts())
    )
    return stacked_bar_chart(
        "Whole cost per idle connection, by part",
        stacks,
        human_bytes,
        f"Unknown parts: <ul class='why'>{why}</ul>" if why else "",
    )


def _series(comparison: Comparison) -> str:
    timelines = comparison.timelines
    return "".join(
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
    )


def _scenario(load: Load | None) -> str:
    if not load:
        return '<p class="note">Recordings compared as they were made.</p>'
    return (
        f"<p class='note'>{load.connections:,} connections, {load.active:,} active "
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
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>idlebuf sweep</title><style>{STYLE}</style></head><body><main>"
        "<h1>idlebuf sweep</h1>"
        "<p>Memory = IO-buffer memory + kernel socket memory at the end of each recording, "
        "fitted per model as fixed + per idle connection x idle + per active connection x "
        "active.</p>"
        + html_table("fits", FIT_COLUMNS, fits)
        + f"<div class='charts' id='sweep'>{''.join(charts)}</div></main></body></html>\n"
    )
