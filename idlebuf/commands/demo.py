"""`idlebuf demo`: the mission's scenario against every IO model, recorded, compared (root)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path

from idlebuf.commands.options import number
from idlebuf.experiments.comparison import run_comparison
from idlebuf.experiments.models import Load, Model, chosen_models, models
from idlebuf.experiments.saved import COMPARISON_FILE, save_comparison
from idlebuf.output import check_free, output_dir
from idlebuf.reporters import columns
from idlebuf.reporters.json import rows_json
from idlebuf.reporters.report_files import REPORT_FILES, write_reports
from idlebuf.reporters.text import render_comparison
from idlebuf.reporters.units import human_bytes
from probes.features import preflight
from probes.format.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="record every IO model under 1,000 mostly idle connections and compare them",
        description="Run the same load - N connections, a fraction F of them exchanging "
        "messages - against a server of each IO model in turn (readiness with a pool or "
        "retained buffers, threads, green threads, io_uring, and two io_uring mitigations), "
        "record each with `idlebuf record --memory`, and print one table. Writes an HTML "
        "report with plots and a Perfetto timeline (open it at ui.perfetto.dev) beside the "
        "traces. Needs root.",
    )
    p.add_argument(
        "--connections",
        type=number(int, 1),
        default=1000,
        metavar="N",
        help="connections (default 1000)",
    )
    p.add_argument(
        "--active",
        type=number(float, 0, 1, what="a fraction, between 0 and 1"),
        default=0.05,
        metavar="F",
        help="fraction of them exchanging messages (default 0.05)",
    )
    p.add_argument(
        "--buffer-size",
        type=number(int, 64),
        default=16384,
        metavar="BYTES",
        help="read buffer (or pushed chunk) per connection (default 16384)",
    )
    p.add_argument(
        "--duration",
        type=number(float, 1),
        default=5.0,
        metavar="S",
        help="seconds recorded per model (default 5)",
    )
    p.add_argument(
        "--models",
        metavar="NAME,...",
        help="only these models (default: all; the first is the ratios' baseline): "
        + ", ".join(m.name for m in models(0)),
    )
    p.add_argument(
        "--push",
        action="store_true",
        help="the write side instead: a server streaming to mostly stalled readers, queued "
        "(a thread blocked in send() per connection) against readiness (EPOLLOUT)",
    )
    p.add_argument(
        "--netns",
        action="store_true",
        help="run the load generator in its own network namespace (a separate host)",
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="write the traces and reports here (default: a new directory under /tmp)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help=argparse.SUPPRESS,  # what `demo` does now; kept so older commands still work
    )
    p.add_argument(
        "--force", action="store_true", help="replace files of an earlier run in the output"
    )
    p.set_defaults(run=run)


def validate(args: argparse.Namespace) -> Load:
    if args.connections < 1:
        raise UsageError("--connections must be at least 1")
    if not 0 <= args.active <= 1:
        raise UsageError("--active is a fraction, between 0 and 1")
    if args.buffer_size < 64:
        raise UsageError("--buffer-size must be at least 64 bytes")
    if args.duration < 1:
        raise UsageError("--duration must be at least 1 second")
    return Load(
        connections=args.connections,
        active=round(args.connections * args.active),
        buffer_size=args.buffer_size,
        duration=args.duration,
    )


class Progress:
    """One line per model on stderr, updated in place on a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()

    def __call__(self, i: int, model: Model, what: str) -> None:
        head = f"[{i + 1}/{self.total}] {model.name}"
        if what == "done":
            line = f"{head}: done in {time.monotonic() - self.started:.0f}s"
            self.started = time.monotonic()
        else:
            line = f"{head}: {what}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if what == "done" else ""))
        else:  # a log: every step on its own line
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    load = validate(args)
    chosen = chosen_models(args.models, load.active, args.push)
    preflight()
    base = output_dir(Path(args.output) if args.output else None, "idlebuf-demo-")
    check_free(base, [COMPARISON_FILE, *REPORT_FILES, *(m.name for m in chosen)], args.force)
    progress = Progress(len(chosen))
    print(
        f"demo: {load.connections:,} connections, {load.active:,} active, "
        f"{human_bytes(load.buffer_size)} buffers, {load.duration:g}s per model; "
        f"{len(chosen)} models; output in {base}",
        file=sys.stderr,
    )
    with contextlib.ExitStack() as stack:
        if args.netns:
            from workloads.netns import client_namespace

            load = replace(load, netns=stack.enter_context(client_namespace()))
        try:
            ratio_of = "write_buffer_heap" if args.push else "io_buffer_memory"
            comparison = run_comparison(
                load, chosen, base, progress, ratio_of, lambda c: save_comparison(c, base)
            )
        except KeyboardInterrupt:
            print(
                f"\ndemo: interrupted; the models recorded so far are in {base} "
                f"(`idlebuf compare {base}`)",
                file=sys.stderr,
            )
            raise
    title = f"idlebuf: {load.connections:,} connections, {load.active:,} active, " + (
        "pushing to slow readers" if args.push else "every IO model"
    )
    paths = write_reports(comparison, base, title)
    if args.json:
        print(rows_json(comparison, **paths, output=str(base)))
        return 0
    if args.push:
        print(render_comparison(comparison.rows, columns.WRITES))
        print(
            f"\n{load.connections:,} connections, {load.active:,} reading, "
            f"{human_bytes(load.buffer_size)} chunks. Write-buffer memory: live allocations "
            "that writes were sent from; x readiness: over the first row's."
        )
    else:
        print(render_comparison(comparison.rows))
        print(
            f"\n{load.connections:,} connections, {load.active:,} active, "
            f"{human_bytes(load.buffer_size)} buffers. IO-buffer memory: user memory committed "
            "to reads at the end; x readiness: over the first row's."
        )
    print(f"report:   {paths['report']}\ntimeline: {paths['timeline']} (ui.perfetto.dev)")
    print(f"traces:   {base}/<model>  (`idlebuf report DIR`, `idlebuf compare {base}`)")
    return 0
