"""Terminal rendering of report data; computes nothing."""

from __future__ import annotations

from typing import Any


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def render_report(summary: dict[str, Any], title: str) -> str:
    out = [f"idlebuf report: {title}"]
    if not summary["complete"]:
        out.append(
            "WARNING: the recording did not finish (killed?); figures cover its flushed prefix only"
        )
    if summary.get("alternate_s"):
        out.append(
            f"NOTE: recorded with --alternate {summary['alternate_s']:g}: traced half the time "
            "(to measure its cost); calls in flight across a switch are incomplete"
        )
    drops = {k: v for k, v in summary["drops"].items() if v}
    if drops:
        out.append(
            "WARNING: events were dropped, figures are lower bounds: "
            + ", ".join(f"{k} {v:,}" for k, v in drops.items())
        )
    if not summary["processes"]:
        out.append("no process of the targets made a socket read")
    if summary.get("uring") and summary["uring"] != "traced":
        out.append(f"note: io_uring was not traced: {summary['uring']}")
    for pid in summary.get("uring_before_attach", []):
        out.append(
            f"note: pid {pid} had io_uring instances open before the recording: requests it "
            "submitted earlier (and buffer rings it registered) are not visible"
        )
    for proc in summary["processes"]:
        out.append("")
        out.append(f"pid {proc['pid']} ({proc['comm'] or '?'})")
        rows = [_row("all", proc, peaks=True)]
        for source, s in proc["by_source"].items():
            for op, o in s["by_op"].items():
                rows.append(_row(f"  {source}:{op}", o))
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
        w = proc.get("writes", {})
        if w.get("pending_peak"):
            out.append(
                f"writes to sockets: {w['pending_writes']:,} pending now holding "
                f"{human_bytes(w['pending_write_bytes'])} (peak {w['pending_peak']:,}, "
                f"{human_bytes(w['pending_bytes_peak'])}); {w['writes_completed']:,} returned, "
                f"{human_bytes(w['bytes_sent'])} sent"
            )
        if proc.get("memory"):
            out.append("")
            out.append(render_memory(proc["memory"], summary.get("idle_threshold_s", 1.0)))
        if proc.get("buffer_groups"):
            out.append("")
            out.append("provided-buffer groups (buffers taken only when data arrives)")
            out.append(
                table(
                    ["ring", "group", "how", "buffers", "memory", "consumed", "available"],
                    [
                        [
                            f"{g['ring']:#x}",
                            str(g["group"]),
                            g["how"],
                            f"{g['buffers']:,}",
                            human_bytes(g["bytes"]),
                            f"{g['consumed']:,}",
                            f"{g['available']:,}",
                        ]
                        for g in proc["buffer_groups"]
                    ],
                )
            )
    if summary.get("timeline"):
        out.append("")
        out.append(render_timeline(summary["timeline"]))
    return "\n".join(out)


def render_timeline(rows: list[dict[str, Any]]) -> str:
    sizes = [
        "pinned_bytes",
        "io_buffer_heap_bytes",
        "heap_live_bytes",
        "rss_bytes",
        "socket_kernel_bytes",
    ]
    body = [
        [
            str(r["pid"]),
            f"{r['t_s']:.1f}",
            f"{r['posted_reads']:,}",
            *(human_bytes(r[c]) for c in sizes),
            f"{r['connections_open']:,}",
            f"{r['idle_connections']:,}",
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


def render_memory(memory: dict[str, Any], idle_threshold_s: float) -> str:
    io_heap, heap, rss = memory["io_buffer_heap"], memory["heap_live"], memory["rss"]
    estimate = " (estimated from a sample)" if heap["estimated"] else ""
    rows = [
        [
            "IO-buffer heap (posted reads' buffers)",
            human_bytes(io_heap["bytes"]),
            f"in {io_heap['allocations']:,} allocations of "
            + human_bytes(io_heap["allocation_bytes"]),
        ],
        [
            f"  of idle connections (no data for {idle_threshold_s:g}s)",
            human_bytes(io_heap["idle_bytes"]),
            f"{memory['idle_posted_reads']:,} posted reads; resident "
            + human_bytes(io_heap["idle_resident_bytes"]),
        ],
        *(
            [
                [
                    "  in memory the program mapped itself",
                    human_bytes(io_heap["mapped_bytes"]),
                    f"{human_bytes(io_heap['idle_mapped_bytes'])} of idle connections",
                ]
            ]
            if io_heap.get("mapped_bytes")
            else []
        ),
        [
            "retained buffers of idle connections",
            human_bytes(memory["retained"]["bytes"]),
            f"{memory['retained']['buffers']:,} buffers kept after their last data",
        ],
        [
            "heap live (tracked allocations)",
            human_bytes(heap["bytes"]),
            f"{heap['allocations']:,} allocations{estimate}",
        ],
        ["resident memory", human_bytes(rss["now"]), f"peak {human_bytes(rss['peak'])}"],
        [
            "kernel socket memory",
            human_bytes(memory["socket_kernel_bytes"]),
            f"{memory['connections']['open']:,} connections open, "
            f"{memory['connections']['idle']:,} idle",
        ],
        [
            "per idle connection",
            human_bytes(memory["per_idle_connection"]["bytes"]),
            "user buffer + kernel socket memory (committed); resident: "
            + human_bytes(memory["per_idle_connection"]["resident_bytes"]),
        ],
    ]
    return table(["memory", "now", ""], rows)


def _row(name: str, figures: dict[str, Any], peaks: bool = False) -> list[str]:
    posted, pinned = figures["posted_reads"], figures["pinned_bytes"]
    if peaks:  # process totals: {"now", "peak"}
        cells = [
            f"{posted['now']:,}",
            f"{posted['peak']:,}",
            human_bytes(pinned["now"]),
            human_bytes(pinned["peak"]),
        ]
        select = figures.get("buffer_select_posted", 0)
    else:
        cells = [f"{posted:,}", "", human_bytes(pinned), ""]
        select = figures.get("buffer_select_posted", 0)
    return [
        name,
        *cells,
        f"{select:,}" if select else "",
        f"{figures['reads_completed']:,}",
        human_bytes(figures["bytes_received"]),
    ]
