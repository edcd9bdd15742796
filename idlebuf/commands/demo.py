"""`idlebuf demo`: the mission's scenario, recorded and reported (root)."""

from __future__ import annotations

import argparse
from pathlib import Path

from idlebuf.scenario import run_demo


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="record a thread-per-connection server with 1,000 mostly idle connections",
        description="Start the thread-per-connection server, open N connections of which a "
        "fraction F exchange messages, record the server for a few seconds and print the "
        "report: every idle connection holds a posted read and its buffer.",
    )
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--active", type=float, default=0.05, help="fraction of active connections")
    p.add_argument("--buffer-size", type=int, default=16384)
    p.add_argument("--duration", type=float, default=5.0, help="seconds to record")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-o", "--output", help="keep the trace(s) in this directory")
    p.add_argument(
        "--compare",
        action="store_true",
        help="record every IO model (readiness, retaining, threads, green threads, io_uring, "
        "provided-buffer ring) under the same load and print one comparison table",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.compare:
        from idlebuf.compare import compare

        return compare(
            args.connections,
            args.active,
            args.buffer_size,
            args.duration,
            Path(args.output) if args.output else None,
            args.json,
        )
    return run_demo(args)
