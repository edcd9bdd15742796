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
    drops = {k: v for k, v in summary["drops"].items() if v}
    if drops:
        out.append(
            "WARNING: events were dropped, figures are lower bounds: "
            + ", ".join(f"{k} {v:,}" for k, v in drops.items())
        )
    if not summary["processes"]:
        out.append("no process of the targets made a socket read")
    for proc in summary["processes"]:
        out.append("")
        out.append(f"pid {proc['pid']} ({proc['comm'] or '?'})")
        rows = [
            [
                "all",
                f"{proc['posted_reads']['now']:,}",
                f"{proc['posted_reads']['peak']:,}",
                human_bytes(proc["pinned_bytes"]["now"]),
                human_bytes(proc["pinned_bytes"]["peak"]),
                f"{proc['reads_completed']:,}",
                human_bytes(proc["bytes_received"]),
            ]
        ]
        for source, s in proc["by_source"].items():
            for op, o in s["by_op"].items():
                rows.append(
                    [
                        f"  {source}:{op}",
                        f"{o['posted_reads']:,}",
                        "",
                        human_bytes(o["pinned_bytes"]),
                        "",
                        f"{o['reads_completed']:,}",
                        human_bytes(o["bytes_received"]),
                    ]
                )
        out.append(
            table(["", "posted now", "peak", "pinned now", "peak", "completed", "received"], rows)
        )
    return "\n".join(out)
