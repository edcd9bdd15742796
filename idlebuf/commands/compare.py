"""`idlebuf compare PATH...`: recordings side by side (no root needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from idlebuf.commands.options import number
from idlebuf.experiments.saved import comparison_of
from idlebuf.output import check_free, output_dir
from idlebuf.reporters.json import rows_json
from idlebuf.reporters.report_files import REPORT_FILES, write_reports
from idlebuf.reporters.text import render_comparison
from probes.format.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="put recordings side by side: one row per recorded server",
        description="Compare recordings made with `idlebuf record --memory` (one row per "
        "process that did network reads), or the output directories of `idlebuf demo` and "
        "`idlebuf sweep`. The first row is the baseline of the 'x readiness' ratio. "
        "With --output, also writes an HTML report and a Perfetto timeline there.",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="trace or demo directory")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument(
        "-o", "--output", type=Path, metavar="DIR", help="write report.html and timeline.pftrace"
    )
    p.add_argument(
        "--timeline-step",
        type=number(float, 0, above=True),
        default=0.5,
        metavar="S",
        help="seconds between time-series points of traces (default 0.5)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace files of an earlier run in the output"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.timeline_step <= 0:
        raise UsageError("--timeline-step must be positive")
    comparison = comparison_of(args.paths, args.timeline_step)
    paths = {}
    if args.output:
        title = "idlebuf: " + ", ".join(p.name for p in args.paths)
        directory = output_dir(args.output, "")
        check_free(directory, REPORT_FILES, args.force)
        paths = write_reports(comparison, directory, title)
    if args.json:
        print(rows_json(comparison, **paths))
        return 0
    print(render_comparison(comparison.rows))
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0
