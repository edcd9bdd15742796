"""The terminal reporter: a trace's summary, a comparison's rows, a sweep's fits, as text
tables. It renders typed results and computes nothing."""

from __future__ import annotations

from collections.abc import Sequence

from analysis.comparison import ComparisonRow
from analysis.results import (
    QUIET,
    ConnectionFit,
    MemoryFigures,
    PerIdleConnection,
    ProcessSummary,
    ReadCounts,
    TimelinePoint,
    TraceSummary,
    Unknown,
)
from idlebuf.experiments.sweep import Sweep
from idlebuf.reporters import columns
from idlebuf.reporters.columns import Column
from idlebuf.reporters.units import count, human_bytes, printable
from probes.format.meta import ProcessAtAttach


def table(headers: list[str], rows: list[list[str]]) -> str:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def render_report(summary: TraceSummary, title: str) -> str:
    out = [f"idlebuf report: {printable(title)}"]
    out += [f"WARNING: {printable(w)}" for w in summary.warnings]
    if not summary.complete:
        out.append(
            "WARNING: the recording did not finish (killed?); figures cover its flushed prefix only"
        )
    if summary.alternate_s:
        out.append(
            f"NOTE: recorded with --alternate {summary.alternate_s:g}: traced half the time "
            "(to measure its cost); calls in flight across a switch are incomplete"
        )
    drops = {k: v for k, v in summary.drops.items() if v}
    if drops:
        out.append(
            "WARNING: events were dropped, figures are lower bounds: "
            + ", ".join(f"{k} {v:,}" for k, v in drops.items())
        )
    if not summary.processes:
        out.append("no process of the targets made a socket read")
    if summary.uring and summary.uring != "traced":
        out.append(f"note: io_uring was not traced: {printable(summary.uring)}")
    for pid in summary.uring_before_attach:
        out.append(
            f"note: pid {pid} had io_uring instances open before the recording whose requests "
            "could only be counted, not read (see UNKNOWN below)"
        )
    for proc in summary.processes:
        out.append("")
        out.append(f"pid {proc.pid} ({printable(proc.comm) or '?'})")
        rows = [_totals_row(proc)]
        for source, figures in proc.by_source.items():
            for op, o in figures.by_op.items():
                rows.append(_row(f"  {source}:{op}", o))
        attach = [a for a in summary.at_attach if a.pid == proc.pid]
        out.append(
            table(
                [
                    "",
                    "posted now",
                    "peak",
                    "pinned now",
                    "peak",
                    "buf-select",
                    "completed",
                    "received",
                ],
                rows,
            )
        )
        out += _provenance_lines(proc, attach[0] if attach else None)
        w = proc.writes
        if w.pending_peak:
            out.append(
                f"writes to sockets: {w.pending_writes:,} pending now holding "
                f"{human_bytes(w.pending_write_bytes)} (peak {w.pending_peak:,}, "
                f"{human_bytes(w.pending_bytes_peak)}); {w.writes_completed:,} returned, "
                f"{human_bytes(w.bytes_sent)} sent"
            )
        if proc.memory is not None:
            out.append("")
            out.append(render_memory(proc.memory, summary.idle_threshold_s))
        if proc.buffer_groups:
            out.append("")
            out.append("provided-buffer groups (buffers taken only when data arrives)")
            out.append(
                table(
                    ["ring", "group", "how", "buffers", "memory", "consumed", "available"],
                    [
                        [
                            f"{g.ring:#x}",
                            str(g.group),
                            g.how,
                            f"{g.buffers:,}",
                            human_bytes(g.bytes),
                            f"{g.consumed:,}",
                            f"{g.available:,}",
                        ]
                        for g in proc.buffer_groups
                    ],
                )
            )
    server = _server_cost(summary)
    if server:
        out += ["", server]
    if summary.timeline:
        out.append("")
        out.append(render_timeline(summary.timeline))
    return "\n".join(out)


def _provenance_lines(proc: ProcessSummary, attach: ProcessAtAttach | None) -> list[str]:
    """Where the posted reads come from, and what could not be known."""
    lines = []
    prov = proc.provenance
    if attach is not None:
        found = [f"{attach.blocked_syscalls:,} threads blocked in socket reads (/proc)"]
        for ring in attach.rings:
            what = "walked" if ring.how == "walked" else "counted from fdinfo"
            found.append(
                f"io_uring ring fd {ring.fd} ({what}): {ring.requests:,} read requests"
                + (f", {ring.groups} buffer groups" if ring.groups else "")
            )
        if attach.go is not None:
            found.append(
                f"{attach.go.parked_reads:,} goroutines parked in socket reads (Go runtime)"
            )
        lines.append(
            f"found at attach ({attach.walk_ms:,.0f} ms): "
            + "; ".join(found)
            + f". Posted now: {prov.at_attach:,} found at attach, {prov.live:,} seen live."
        )
    lines += [_unknown("posted reads", u) for u in prov.unknown]
    return lines


def _unknown(figure: str, u: Unknown) -> str:
    size = f", {human_bytes(u.bytes)}" if u.bytes else ""
    return f"UNKNOWN {figure}: {u.connections:,} connections{size}: {printable(u.why)}"


def _plus_unknown(n: float, unknown: list[Unknown]) -> str:
    """A figure with a part that is not known: never shown as if complete."""
    return human_bytes(n) + (" + unknown" if unknown else "")


def render_timeline(rows: list[TimelinePoint]) -> str:
    sizes = [
        "pinned_bytes",
        "io_buffer_heap_bytes",
        "heap_live_bytes",
        "rss_bytes",
        "socket_kernel_bytes",
    ]
    body = [
        [
            str(r.pid),
            f"{r.t_s:.1f}",
            f"{r.posted_reads:,}",
            *(human_bytes(r.figure(c)) for c in sizes),
            count(r.connections_open),
            count(r.idle_connections),
        ]
        for r in rows
    ]
    return "timeline\n" + table(
        [
            "pid",
            "t (s)",
            "posted",
            "pinned",
            "IO-buffer heap",
            "heap live",
            "RSS",
            "socket mem",
            "conns",
            "idle",
        ],
        body,
    )


def render_memory(memory: MemoryFigures, idle_threshold_s: float) -> str:
    io_heap, heap, rss = memory.io_buffer_heap, memory.heap_live, memory.rss
    estimate = " (estimated from a sample)" if heap.estimated else ""
    if heap.since_attach:
        estimate += " made since the attach"
    found_by = {
        "probes": "allocator probes (every allocation traced)",
        "walk:glibc": "walking glibc's heap",
        "walk:go+glibc": "walking Go's heap (and glibc's)",
    }.get(memory.allocations_found_by, memory.allocations_found_by)
    rows = [
        ["allocations found by", "", found_by],
        [
            "IO-buffer heap (posted reads' buffers)",
            _plus_unknown(io_heap.bytes, io_heap.unknown),
            f"in {io_heap.allocations:,} allocations of " + human_bytes(io_heap.allocation_bytes),
        ],
        [
            f"  of idle connections (no data for {idle_threshold_s:g}s)",
            human_bytes(io_heap.idle_bytes),
            f"{memory.idle_posted_reads:,} posted reads; resident "
            + human_bytes(io_heap.idle_resident_bytes),
        ],
        *(
            [
                [
                    "  in memory the program mapped itself",
                    human_bytes(io_heap.mapped_bytes),
                    f"{human_bytes(io_heap.idle_mapped_bytes)} of idle connections",
                ]
            ]
            if io_heap.mapped_bytes
            else []
        ),
        [
            "retained buffers of idle connections",
            _plus_unknown(memory.retained.bytes, memory.retained.unknown),
            f"{memory.retained.buffers:,} buffers kept after their last data",
        ],
        [
            "heap live (tracked allocations)",
            human_bytes(heap.bytes) if heap.bytes is not None else "not traced",
            f"{heap.allocations:,} allocations{estimate}"
            if heap.allocations is not None
            else "buffers' allocations were looked up in the allocator (--alloc-probes traces all)",
        ],
        ["resident memory", human_bytes(rss.now), f"peak {human_bytes(rss.peak)} ({rss.source})"],
        [
            "kernel socket memory",
            human_bytes(memory.socket_kernel_bytes),
            f"{memory.connections.open:,} connections open, {memory.connections.idle:,} idle",
        ],
        [
            "per idle connection",
            _plus_unknown(memory.per_idle_connection.bytes, memory.per_idle_connection.unknown),
            "user buffer + kernel socket memory (committed)",
        ],
        *_whole_cost_rows(memory),
    ]
    sites = [
        f"  {site.buffers:,} reads, {human_bytes(site.bytes)}: "
        + printable(" <- ".join(site.stack[:4] or ["(no frames)"]))
        for site in memory.read_sites
    ]
    if sites:
        sites.insert(0, "posted from (the code holding these buffers, innermost frame first):")
    unknowns = [
        _unknown(figure, u)
        for figure, found in (
            ("IO-buffer heap", io_heap.unknown),
            ("retained buffers", memory.retained.unknown),
            ("whole cost", memory.per_idle_connection.whole_unknown),
        )
        for u in found
    ]
    return "\n".join([table(["memory", "now", ""], rows), *unknowns, *sites])


def _fit_text(fit: ConnectionFit) -> str:
    r2 = f"R² {fit.r2:.3f}" if fit.r2 is not None else "R² n/a"
    ci = f" ± {fit.ci95_bytes:,.0f}" if fit.ci95_bytes is not None else ""
    return (
        f"{fit.bytes_per_connection:,.0f}{ci} B per connection, {r2}, {fit.points} points, "
        f"{fit.distinct_counts} connection counts: {fit.source}"
    )


def _whole_cost_rows(memory: MemoryFigures) -> list[list[str]]:
    """IO buffer + other user memory + kernel = the whole cost of an idle connection (none
    where the process holds no idle connection: a server's helper processes)."""
    if not memory.connections.idle:
        return []
    return _cost_rows(memory.per_idle_connection, memory.connections.idle)


def _server_cost(summary: TraceSummary) -> str | None:
    """The recording's targets as one server (a postmaster and its backends): the whole
    cost per idle connection over all of them, where there are several."""
    cost = summary.per_idle_connection
    mems = [p.memory for p in summary.processes if p.memory is not None]
    idle = sum(m.connections.idle for m in mems)
    if cost is None or len(summary.processes) < 2 or not idle:
        return None
    title = f"all {len(summary.processes):,} processes as one server ({idle:,} idle connections)"
    unknowns = [_unknown("whole cost", u) for u in cost.whole_unknown]
    return "\n".join([table([title, "", ""], _cost_rows(cost, idle)), *unknowns])


def _cost_rows(cost: PerIdleConnection, idle: int) -> list[list[str]]:
    """The rows of a whole cost per idle connection (`idle` of them)."""

    def known(n: float | None) -> str:
        return "unknown" if n is None else human_bytes(n)

    waiter_why = cost.waiter_reason or "none of its own (its wait is the process's)"
    if cost.waiter_parts:
        waiter_why = (
            " + ".join(f"{p.waiter} {p.part} {human_bytes(p.bytes)}" for p in cost.waiter_parts)
            + f" ({cost.waiter_parts[0].provenance.replace('_', ' ')})"
        )
        if cost.waiter_reason:
            waiter_why += f"; {cost.waiter_reason}"
    fit_why = cost.reason or ""
    if cost.fit is not None:
        fit_why = _fit_text(cost.fit) + (f" - {cost.reason}" if cost.reason else "")
    owned_why = {
        "reachable": f"what each connection's roots alone reach, walked "
        f"({cost.owned_connections or 0:,} of {idle:,} idle connections)"
        + (f"; {cost.owned_check}" if cost.owned_check else ""),
        "private": "its private memory (a process per connection)",
    }.get(cost.owned_how or "", fit_why)
    parts = " + ".join(f"{p.cache} {human_bytes(p.bytes)}" for p in cost.kernel_parts)
    queues = cost.socket_kernel_bytes / idle if idle else 0
    kernel_why = (parts + f" + queues {human_bytes(queues)}") if parts else ""
    if cost.kernel_reason:
        kernel_why = f"{kernel_why} ({cost.kernel_reason})" if kernel_why else cost.kernel_reason
    rows = [
        ["per idle connection (whole)",
         known(cost.total_bytes) if cost.total_bytes is None
         else _plus_unknown(cost.total_bytes, _beyond_owned(cost)),
         "buffer + waiter + owned state + kernel (committed); at least "
         + human_bytes(cost.total_at_least_bytes) + "; resident "
         + _plus_unknown(cost.resident_bytes, cost.whole_unknown)],
        ["  buffer", known(cost.buffer_bytes),
         f"the allocations holding the buffers ({_plus_unknown(cost.io_buffer_bytes, cost.unknown)}"
         " posted or kept)" + _not_told_apart(cost)],
        ["  waiter", known(cost.waiter_bytes), printable(waiter_why)],
        ["  owned state", known(cost.owned_bytes), printable(owned_why)],
        ["  kernel (model)", known(cost.kernel_bytes), printable(kernel_why)],
    ]  # fmt: skip
    if cost.owned_how in ("reachable", "private") and cost.fit is not None:
        rows.append(["  the heap fit", known(cost.other_user_bytes), printable(fit_why)])
    rows.append(
        [
            "a readiness design would save",
            _plus_unknown(cost.saving_bytes, cost.unknown + cost.whole_unknown),
            printable(cost.saving_assumes or ""),
        ]
    )
    if cost.rss_fit is not None:
        rows.append(["  RSS against connections", "", _fit_text(cost.rss_fit)])
    if cost.socket_fit is not None:
        rows.append(["  socket queues against them", "", _fit_text(cost.socket_fit)])
    return rows


def _beyond_owned(cost: PerIdleConnection) -> list[Unknown]:
    """What the total does not hold: the connections' unknowns, less the buffers of those
    quiet since the attach where the owned state (which holds them) is known."""
    return [u for u in cost.unknown if u.why != QUIET or cost.owned_bytes is None]


def _not_told_apart(cost: PerIdleConnection) -> str:
    """Where idle connections read nothing since the attach and their owned state is known:
    their buffers are in it, not told apart (the total holds them)."""
    quiet = sum(u.connections for u in cost.unknown if u.why == QUIET)
    if not quiet or cost.owned_bytes is None:
        return ""
    return f"; {quiet:,} with no data since the attach: in the owned state, not told apart"


def _totals_row(proc: ProcessSummary) -> list[str]:
    """A process's own row: now and peak."""
    select = proc.buffer_select_posted
    return [
        "all",
        f"{proc.posted_reads.now:,}",
        f"{proc.posted_reads.peak:,}",
        human_bytes(proc.pinned_bytes.now),
        human_bytes(proc.pinned_bytes.peak),
        f"{select:,}" if select else "",
        f"{proc.reads_completed:,}",
        human_bytes(proc.bytes_received),
    ]


def _row(name: str, figures: ReadCounts) -> list[str]:
    """A source's or operation's row: now only."""
    select = figures.buffer_select_posted
    return [
        name,
        f"{figures.posted_reads:,}",
        "",
        human_bytes(figures.pinned_bytes),
        "",
        f"{select:,}" if select else "",
        f"{figures.reads_completed:,}",
        human_bytes(figures.bytes_received),
    ]


def render_comparison(
    rows: Sequence[ComparisonRow], shown: Sequence[Column] = columns.READS
) -> str:
    return table(
        [c.short for c in shown], [[c.fmt(getattr(r, c.key)) for c in shown] for r in rows]
    )


def render_fits(sweep: Sweep) -> str:
    def fmt(v: float | None) -> str:
        return "-" if v is None else human_bytes(round(v))  # round: no "-0 B"

    return table(
        ["model", "per idle connection", "per active connection", "fixed", "R^2", "points"],
        [
            [
                name,
                fmt(f.per_idle_connection_bytes),
                fmt(f.per_active_connection_bytes),
                fmt(f.fixed_bytes),
                "-" if f.r2 is None else f"{f.r2:.3f}",
                str(f.points),
            ]
            for name, f in sweep.fits.items()
        ],
    )
