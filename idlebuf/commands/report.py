"""`idlebuf report`: what a trace shows, per process, as a table or JSON (no root needed)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from analysis.engine import analyze
from analysis.windows import WINDOW_ROWS
from idlebuf.commands.options import add_idle_threshold, number
from idlebuf.reporters.json import report_json
from idlebuf.reporters.text import render_report
from probes.format.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="summarize a trace directory",
        description="Per process: posted reads and pinned bytes (at the end of the recording "
        "and at peak), reads completed, bytes received, breakdown by source, drops; with "
        "--memory recordings, the buffers' memory, connections and the whole cost of an idle "
        "one. A trace of any size: it is read a window of time at a time, in bounded memory.",
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
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--stream",
        action="store_true",
        help=f"read the trace in windows of {WINDOW_ROWS:,} events, in bounded memory (the "
        "default)",
    )
    how.add_argument(
        "--in-memory",
        action="store_true",
        help="load the whole trace as one window, however big it is (the same figures, in "
        "more memory and time)",
    )
    p.set_defaults(run=run)


class Progress:
    """Stages of a long analysis on stderr - on a terminal, once it has taken 2 s."""

    def __init__(self, after_s: float = 2.0) -> None:
        self.began, self.after_s = time.monotonic(), after_s
        self.shown = sys.stderr.isatty()

    def __call__(self, stage: str) -> None:
        took = time.monotonic() - self.began
        if self.shown and took >= self.after_s:
            print(f"idlebuf report: {took:5.1f} s: {stage}...", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.timeline is not None and args.timeline <= 0:
        raise UsageError("--timeline must be positive")
    summary = analyze(
        args.trace,
        idle_threshold_s=args.idle_threshold,
        timeline_s=args.timeline,
        window_rows=None if args.in_memory else WINDOW_ROWS,
        progress=Progress(),
    )
    if args.json:
        print(report_json(summary, args.connections))
    else:
        print(render_report(summary, str(args.trace)))
    return 0
