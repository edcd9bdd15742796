"""`idlebuf sweep`: memory of every IO model over a grid of connections and active fractions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from analysis.results import to_json
from idlebuf.commands.options import number, numbers
from idlebuf.experiments.models import Load, chosen_models
from idlebuf.experiments.saved import SWEEP_FILE, save_sweep
from idlebuf.experiments.sweep import run_sweep
from idlebuf.output import check_free, output_dir, write_file
from idlebuf.reporters.html import sweep_html
from idlebuf.reporters.text import render_fits
from probes.features import preflight
from probes.format.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="record every IO model over a grid of connection counts and active fractions",
        description="For every connection count N and active fraction F of the grid, record "
        "each model as `idlebuf demo` does; then fit each model's memory (IO-buffer memory + "
        "kernel socket memory) as fixed + per idle connection x idle + per active connection "
        "x active, and plot memory against connections and against the active fraction. "
        "Writes sweep.json and sweep.html. Needs root; takes about 12 s per model and point.",
    )
    p.add_argument(
        "--connections",
        type=numbers(int, 1),
        default=[101, 307, 1009],
        metavar="N,...",
        help="connection counts (default 101,307,1009)",
    )
    p.add_argument(
        "--active",
        type=numbers(float, 0, 1, what="a fraction, between 0 and 1"),
        default=[0.05, 0.2],
        metavar="F,...",
        help="active fractions (default 0.05,0.2)",
    )
    p.add_argument(
        "--buffer-size",
        type=number(int, 64),
        default=16384,
        metavar="BYTES",
        help="(default 16384)",
    )
    p.add_argument(
        "--duration", type=number(float, 1), default=3.0, metavar="S", help="seconds per model"
    )
    p.add_argument("--models", metavar="NAME,...", help="only these models (default: all)")
    p.add_argument("--json", action="store_true", help="print the fits as JSON")
    p.add_argument("-o", "--output", type=Path, metavar="DIR", help="default: a new /tmp dir")
    p.add_argument(
        "--force", action="store_true", help="replace files of an earlier run in the output"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if any(n < 1 for n in args.connections) or any(not 0 <= f <= 1 for f in args.active):
        raise UsageError("connections must be positive and fractions between 0 and 1")
    if args.duration < 1:
        raise UsageError("--duration must be at least 1 second")
    chosen_models(args.models, 0)  # fails early on an unknown name
    preflight()
    base = output_dir(args.output, "idlebuf-sweep-")
    check_free(base, [SWEEP_FILE, "sweep.html"], args.force)
    template = Load(connections=0, active=0, buffer_size=args.buffer_size, duration=args.duration)
    tty = sys.stderr.isatty()

    def progress(line: str) -> None:
        sys.stderr.write(("\r\033[K" + line) if tty else line + "\n")
        sys.stderr.flush()

    sweep = run_sweep(
        args.connections,
        args.active,
        lambda active: chosen_models(args.models, active),
        base,
        template,
        progress,
    )
    if tty:
        sys.stderr.write("\n")
    save_sweep(sweep, base)
    report = write_file(base / "sweep.html", sweep_html(sweep), force=True)
    if args.json:
        print(json.dumps({"fits": to_json(sweep.fits), "report": str(report), "output": str(base)}))
        return 0
    print(render_fits(sweep))
    print(f"\nreport: {report}\ndata:   {base / SWEEP_FILE}")
    return 0
