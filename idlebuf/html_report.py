"""The comparison (and the sweep) as one self-contained HTML page: table, plots, explanations."""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

from idlebuf.plots import STYLE, bar_chart, line_chart
from idlebuf.render import human_bytes

# the time series drawn per model: (timeline column, title, formatter)
SERIES: list[tuple[str, str, Callable[[float], str]]] = [
    ("posted_reads", "Posted reads", lambda v: f"{v:,.0f}"),
    ("pinned_bytes", "Bytes pinned by posted reads", human_bytes),
    ("io_buffer_heap_bytes", "IO-buffer heap (posted or parked reads' allocations)", human_bytes),
    ("rss_bytes", "Resident set size", human_bytes),
    ("socket_kernel_bytes", "Kernel socket memory", human_bytes),
    ("pending_write_bytes", "Bytes held by pending writes", human_bytes),
]

COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("model", "model", str),
    ("connections", "connections", lambda v: f"{v:,}"),
    ("active", "active", lambda v: f"{v:,}"),
    ("posted_reads", "posted reads", lambda v: f"{v:,}"),
    ("pinned_bytes", "pinned", human_bytes),
    ("io_buffer_heap", "IO-buffer memory", human_bytes),
    ("io_buffer_heap_resident", "resident", human_bytes),
    ("rss_growth", "RSS growth", human_bytes),
    ("socket_kernel_bytes", "kernel socket memory", human_bytes),
    ("per_idle_connection_bytes", "per idle connection", human_bytes),
    ("ratio_to_readiness", "x readiness", lambda v: f"{v:g}"),
]

GLOSSARY = (
    "<p><b>Posted reads</b> are reads the kernel holds waiting for data (a blocked recv(), an "
    "io_uring request, a green thread parked on readiness); <b>pinned</b> bytes are their "
    "buffers. <b>IO-buffer memory</b> is the user memory committed to reads at the end: posted "
    "or parked buffers, buffers kept after their data, and provided-buffer groups. <b>Per idle "
    "connection</b> is that memory plus kernel socket memory, over the connections that "
    "exchanged nothing for the last second. <b>x readiness</b> divides each model's IO-buffer "
    "memory by the first row's.</p>"
)


WRITE_COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("pending_writes", "pending writes", lambda v: f"{v:,}"),
    ("pending_write_bytes", "pending write bytes", human_bytes),
    ("write_buffer_heap", "write-buffer memory", human_bytes),
]


def _table(rows: list[dict[str, Any]]) -> str:
    columns = COLUMNS[:-1]
    if any(r.get("pending_writes") or r.get("write_buffer_heap") for r in rows):
        columns += WRITE_COLUMNS  # the write side was exercised: show it
    columns.append(COLUMNS[-1])
    head = "".join(
        f'<th class="{"" if key == "model" else "num"}">{escape(title)}</th>'
        for key, title, _ in columns
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"" if key == "model" else "num"}">{escape(fmt(row.get(key, 0)))}</td>'
            for key, _, fmt in columns
        )
        + "</tr>"
        for row in rows
    )
    return f'<table id="rows"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _scenario(scenario: dict[str, Any] | None) -> str:
    if not scenario:
        return '<p class="note">Recordings compared as they were made.</p>'
    return (
        f"<p>{scenario['connections']:,} connections, {scenario['active']:,} active "
        f"({scenario['active'] / max(scenario['connections'], 1):.0%}), "
        f"{human_bytes(scenario['buffer_size'])} buffers; each model recorded for "
        f"{scenario['duration']:g} s while its active connections exchanged "
        f"{scenario['rate']:g} messages/s each"
        f"{' from a separate network namespace' if scenario.get('netns') else ''}.</p>"
    )


def _explanations(models: dict[str, dict[str, str]]) -> str:
    if not models:
        return ""
    items = "".join(
        f"<dt>{escape(name)} <span class='note'>({escape(m['kind'])})</span></dt>"
        f"<dd>{escape(m['explain'])}</dd>"
        for name, m in models.items()
    )
    return f'<h2>The models</h2><dl id="models">{items}</dl>'


def comparison_html(comparison: dict[str, Any], title: str = "idlebuf: IO models compared") -> str:
    rows, timelines = comparison["rows"], comparison["timelines"]
    charts = [
        line_chart(
            name,
            [
                (model, [p["t_s"] for p in points], [p[column] for p in points])
                for model, points in timelines.items()
                if points
            ],
            fmt,
            "seconds since the recording started",
            binary=fmt is human_bytes,
        )
        for column, name, fmt in SERIES
        # a series no model ever moved (the write side of a read-only scenario) is left out
        if any(p.get(column) for points in timelines.values() for p in points)
    ]
    cost = bar_chart(
        "Cost per idle connection (user buffers + kernel socket memory)",
        [(r["model"], r["per_idle_connection_bytes"]) for r in rows],
        human_bytes,
    )
    memory = bar_chart(
        "IO-buffer memory at the end",
        [(r["model"], r["io_buffer_heap"]) for r in rows],
        human_bytes,
    )
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}"
        f"</title><style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
        + _scenario(comparison.get("scenario"))
        + _table(rows)
        + GLOSSARY
        + f'<h2>Per model</h2><div class="charts" id="by-model">{cost}{memory}</div>'
        + f'<h2>Over time</h2><div class="charts" id="time-series">{"".join(charts)}</div>'
        + _explanations(comparison.get("models", {}))
        + "</body></html>\n"
    )
