"""`idlebuf report` of a streamed trace (analysis.stream.Relation): the table and JSON."""

from __future__ import annotations

import json

from analysis.results import Unknown
from analysis.stream import Relation
from idlebuf.reporters.text import _plus_unknown, _unknown, table
from idlebuf.reporters.units import human_bytes, printable


def _known(value: int | None, unknown: list[Unknown] | None = None) -> str:
    """Bytes; "unknown" when not measured, "+ unknown" when part of them could not be."""
    return "unknown" if value is None else _plus_unknown(value, unknown or [])


def render_relation(relation: Relation, title: str) -> str:
    """The streamed figures per process, then what they leave out."""
    rows = []
    for p in relation.processes:
        conns = p.connections
        rows.append(
            [
                str(p.pid),
                printable(p.comm),
                f"{p.posted_reads.now:,}",
                f"{p.posted_reads.peak:,}",
                human_bytes(p.pinned_bytes.now),
                human_bytes(p.pinned_bytes.peak),
                f"{p.reads_completed:,}",
                human_bytes(p.bytes_received),
                "unknown" if conns is None else f"{conns.open:,}",
                "unknown" if conns is None else f"{conns.idle:,}",
                _known(p.io_buffer_bytes, p.io_buffer_unknown),
                _known(p.idle_io_buffer_bytes, p.io_buffer_unknown),
                _known(p.retained.bytes if p.retained else None, p.retained_unknown),
                "-"
                if conns is not None and not conns.idle
                else _known(
                    None
                    if p.per_idle_connection_bytes is None
                    else round(p.per_idle_connection_bytes),
                    p.retained_unknown,
                ),
            ]
        )
    headers = [
        "pid", "comm", "posted", "peak", "pinned", "peak", "completed", "received",
        "conns", "idle", "IO-buffer heap", "of idle conns", "retained", "per idle conn",
    ]  # fmt: skip
    lines = [
        f"{title}: streamed, {relation.events:,} events in {relation.windows:,} windows "
        f"(idle: no data for {relation.idle_threshold_s:g} s)",
        "",
        table(headers, rows) if rows else "no process read from a socket",
    ]
    if any(p.connections is None for p in relation.processes):
        lines.append("conns, IO-buffer heap: unknown (recorded without --memory)")
    for p in relation.processes:  # where the figures come from, and what could not be seen
        said = [
            *(_unknown("posted reads", u) for u in p.provenance.unknown),
            *(_unknown("IO-buffer heap", u) for u in p.io_buffer_unknown),
            *(_unknown("retained buffers", u) for u in p.retained_unknown),
        ]
        if p.provenance.at_attach:
            said.insert(
                0,
                f"posted now: {p.provenance.at_attach:,} found at attach, "
                f"{p.provenance.live:,} seen live",
            )
        lines += [f"pid {p.pid}: {line}" for line in said]
    if relation.timeline:
        lines += ["", "Posted reads over time", ""]
        lines.append(
            table(
                ["pid", "t (s)", "posted", "pinned"],
                [
                    [str(t.pid), f"{t.t_s:g}", f"{t.posted_reads:,}", human_bytes(t.pinned_bytes)]
                    for t in relation.timeline
                ],
            )
        )
    lines += [""]
    lines.append(
        "Streamed: reads, the buffers' allocations and mappings, connections and the measured "
        "cost per idle connection (user buffers + socket memory). The whole cost, allocation "
        "sites, writes, residency, heap and RSS figures need the in-memory report "
        "(--in-memory)."
    )
    return "\n".join(lines)


def relation_json(relation: Relation, connections: bool = False) -> str:
    """`report --stream --json`: with `connections`, each process's per-connection table."""
    return json.dumps({"streamed": True, **relation.to_json(connections)}, indent=2)
