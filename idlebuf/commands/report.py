"""`idlebuf report`: what a trace shows, per process, as a table or JSON (no root needed)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from analysis.stream import IN_MEMORY_BYTES_PER_EVENT, relate, trace_events
from analysis.summary import summarize
from idlebuf.commands.options import add_idle_threshold, number
from idlebuf.reporters.json import report_json
from idlebuf.reporters.stream import relation_json, render_relation
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
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--stream",
        action="store_true",
        help="relate the trace a window of time at a time, in bounded memory (the read, "
        "buffer and connection figures, not the whole cost); the default for traces too big "
        "to load",
    )
    how.add_argument(
        "--in-memory",
        action="store_true",
        help="load the whole trace and show every figure, however big it is",
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


def available_memory() -> int:
    """MemAvailable, bytes (0 if /proc/meminfo does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def streamed(args: argparse.Namespace) -> bool:
    """--stream, --in-memory, or else: stream when loading the trace would take more than
    half the memory available."""
    if args.stream or args.in_memory:
        return bool(args.stream)
    needs = trace_events(args.trace) * IN_MEMORY_BYTES_PER_EVENT
    free = available_memory()
    if free and needs > free // 2:
        print(
            f"idlebuf report: loading this trace would take about {needs / 2**30:,.1f} GiB of "
            f"the {free / 2**30:,.1f} GiB available: streaming it (--in-memory to load it "
            "anyway)",
            file=sys.stderr,
        )
        return True
    return False


def run(args: argparse.Namespace) -> int:
    if args.timeline is not None and args.timeline <= 0:
        raise UsageError("--timeline must be positive")
    progress = Progress()
    if streamed(args):
        relation = relate(
            args.trace,
            idle_threshold_s=args.idle_threshold,
            timeline_s=args.timeline,
            progress=progress,
        )
        if args.json:
            print(relation_json(relation, args.connections))
        else:
            print(render_relation(relation, str(args.trace)))
        return 0
    progress("reading the trace")
    trace = open_trace(args.trace)
    summary = summarize(
        trace,
        idle_threshold_s=args.idle_threshold,
        timeline_s=args.timeline,
        progress=progress,
    )
    if args.json:
        print(report_json(summary, args.connections))
    else:
        print(render_report(summary, str(args.trace)))
    return 0
