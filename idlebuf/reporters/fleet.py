"""A fleet's figures (analysis.fleet): the terminal tables and the HTML page, from one list
of columns."""

from __future__ import annotations

from html import escape

from analysis.fleet import FleetSummary, Group, ProcessDigest
from idlebuf.reporters.columns import Column
from idlebuf.reporters.html import html_table
from idlebuf.reporters.svg import STYLE
from idlebuf.reporters.text import table
from idlebuf.reporters.units import count, human_bytes, printable

GROUP_COLUMNS = [
    Column("key", "", "", str),
    Column("processes", "procs", "processes", count),
    Column("traces", "traces", "traces", count),
    Column("without_memory", "no --memory", "recorded without --memory", count),
    Column("connections", "conns", "connections", count),
    Column("idle_connections", "idle", "idle connections", count),
    Column("posted_reads", "posted", "posted reads", count),
    Column("pinned_bytes", "pinned", "pinned", human_bytes),
    Column("io_buffer_memory", "IO-buffer memory", "IO-buffer memory", human_bytes),
    Column("idle_buffer_bytes", "of idle conns", "of idle connections", human_bytes),
    Column("per_idle_p50", "per idle p50", "per idle connection p50", human_bytes),
    Column("per_idle_p90", "p90", "p90", human_bytes),
    Column("per_idle_max", "max", "max", human_bytes),
    Column("whole_p50", "whole p50", "whole cost p50", human_bytes),
    Column("whole_max", "whole max", "whole cost max", human_bytes),
]
TOP_COLUMNS = [
    Column("program", "program", "program", str),
    Column("host", "host", "host", str),
    Column("pid", "pid", "pid", str),
    Column("model", "model", "IO model", str),
    Column("idle_connections", "idle", "idle connections", count),
    Column("idle_buffer_bytes", "of idle conns", "IO-buffer memory of idle connections",
           human_bytes),
    Column("per_idle_connection_bytes", "per idle conn", "per idle connection", human_bytes),
    Column("whole_per_idle_connection_bytes", "whole/idle conn", "whole cost per idle connection",
           human_bytes),
    Column("trace", "trace", "trace", str),
]  # fmt: skip

NOTE = (
    "per idle p50/p90/max: IO buffer + kernel socket memory per idle connection, over the "
    "processes; whole: + other user memory + the kernel's objects, where it could be fitted"
)


def _rows(columns: list[Column], items: list[Group] | list[ProcessDigest]) -> list[list[str]]:
    return [[c.fmt(getattr(item, c.key)) for c in columns] for item in items]


def render_fleet(summary: FleetSummary) -> str:
    out = [f"idlebuf fleet: {summary.read:,} of {summary.traces:,} traces summarised"]
    for title, groups in (
        ("host", summary.by_host),
        ("program", summary.by_program),
        ("IO model", summary.by_model),
    ):
        headers = [title, *(c.short for c in GROUP_COLUMNS[1:])]
        out += ["", table(headers, _rows(GROUP_COLUMNS, groups))]
    out += ["", f"top {len(summary.top)} processes by IO-buffer memory of idle connections"]
    out.append(table([c.short for c in TOP_COLUMNS], _rows(TOP_COLUMNS, summary.top)))
    out += ["", NOTE]
    out += [f"FAILED {printable(f.trace)}: {printable(f.reason)}" for f in summary.failures]
    return "\n".join(out)


def fleet_html(summary: FleetSummary, title: str = "idlebuf: fleet") -> str:
    def groups(name: str, items: list[Group]) -> str:
        shown = [Column("key", "", name, str), *GROUP_COLUMNS[1:]]
        return f"<h2>By {escape(name)}</h2>" + html_table(f"by-{name}", shown, items)

    failures = "".join(
        f"<li><code>{escape(f.trace)}</code>: {escape(f.reason)}</li>" for f in summary.failures
    )
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}"
        f"</title><style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
        f"<p>{summary.read:,} of {summary.traces:,} traces summarised. {escape(NOTE)}.</p>"
        + groups("host", summary.by_host)
        + groups("program", summary.by_program)
        + groups("IO model", summary.by_model)
        + "<h2>Top processes</h2>"
        + html_table("top", TOP_COLUMNS, summary.top)
        + (f"<h2>Traces not summarised</h2><ul>{failures}</ul>" if failures else "")
        + "</body></html>"
    )
