"""`idlebuf report`: what a trace shows, per process, as a table or JSON (no root needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis.summary import summarize
from idlebuf.commands.options import add_idle_threshold, number
from idlebuf.reporters.json import report_json
from idlebuf.reporters.text import render_report
from probes.format.errors import UsageError
from probes.format.reader import open_trace


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="summarize a trace directory",
        description="Per process: posted reads and pinned bytes (at the end of the recording "
        "and at peak), reads completed, bytes received, breakdown by source, drops.",
    )
    p.add_argument("trace", type=Path, help="trace directory written by `idlebuf record`")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    add_idle_threshold(p)
    p.add_argument(
        "--connections",
        action="store_true",
        help="with --json: include the per-connection table (memory recordings)",
    )
    p.add_argument(
        "--timeline",
        type=number(float, 0, above=True),
        metavar="SECONDS",
        help="add a per-process time series at this resolution",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.timeline is not None and args.timeline <= 0:
        raise UsageError("--timeline must be positive")
    summary = summarize(
        open_trace(args.trace),
        idle_threshold_s=args.idle_threshold,
        timeline_s=args.timeline,
    )
    if args.json:
        print(report_json(summary, args.connections))
    else:
        print(render_report(summary, str(args.trace)))
    return 0
