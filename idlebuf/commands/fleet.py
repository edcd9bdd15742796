"""`idlebuf fleet TRACE_OR_DIR...`: many traces summarised in parallel on Dask, aggregated per
host, per program and per IO model (no root needed; the workers need only idlebuf's analysis
package)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from analysis.fleet import STREAM_ABOVE_EVENTS, Digest, aggregate, digest, find_traces
from idlebuf.commands.options import add_idle_threshold, number
from idlebuf.output import write_file
from idlebuf.reporters.fleet import fleet_html, render_fleet
from idlebuf.reporters.json import dumps
from probes.format.errors import TraceError, UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fleet",
        help="summarise many traces (hosts, runs) in parallel on Dask",
        description="Summarise every trace given, or found below the directories given, in "
        "parallel on Dask - a local cluster by default, or the scheduler at --scheduler - "
        "and aggregate per host, per program and per IO model: idle connections, posted "
        "reads, pinned bytes, IO-buffer memory, the cost per idle connection (p50, p90, "
        "max over processes) and the processes holding most IO-buffer memory for idle "
        "connections. A trace that cannot be read is listed with its reason; the others "
        "still count.",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="TRACE_OR_DIR")
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="a running Dask scheduler (tcp://host:8786); default: a local cluster",
    )
    p.add_argument(
        "--workers",
        type=number(int, 1),
        default=2,
        metavar="N",
        help="worker processes of the local cluster (default 2)",
    )
    p.add_argument(
        "--serial",
        action="store_true",
        help="no Dask: summarise the traces one by one in this process",
    )
    add_idle_threshold(p)
    p.add_argument(
        "--stream-above",
        type=number(int, 0),
        default=STREAM_ABOVE_EVENTS,
        metavar="EVENTS",
        help="read a trace of more events than this in windows, in bounded memory, on its "
        f"worker (the same figures; default {STREAM_ABOVE_EVENTS:,})",
    )
    p.add_argument("--top", type=number(int, 1), default=10, metavar="N", help="top N processes")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--html", type=Path, metavar="FILE", help="also write an HTML page")
    p.add_argument("--force", action="store_true", help="replace an existing --html file")
    p.set_defaults(run=run)


class _Progress:
    """One line on stderr, rewritten, when it is a terminal; else nothing."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.began = total, 0, time.monotonic()
        self.shown = sys.stderr.isatty()

    def step(self) -> None:
        self.done += 1
        if self.shown:
            took = time.monotonic() - self.began
            print(f"\rfleet: {self.done:,}/{self.total:,} traces, {took:.0f} s", end="",
                  file=sys.stderr, flush=True)  # fmt: skip
            if self.done == self.total:
                print(file=sys.stderr)


def summarise_serially(
    traces: list[str], idle_threshold_s: float, stream_above: int = STREAM_ABOVE_EVENTS
) -> list[Digest]:
    progress = _Progress(len(traces))
    out = []
    for path in traces:
        out.append(digest(path, idle_threshold_s, stream_above))
        progress.step()
    return out


def _client(args: argparse.Namespace) -> Any:
    """A Dask client: of the scheduler given (failing in one line when it cannot be reached,
    before any work), or of a local cluster of worker processes."""
    import logging  # noqa: PLC0415

    from dask.distributed import Client, LocalCluster  # noqa: PLC0415

    logging.getLogger("distributed").setLevel(logging.ERROR)
    if args.scheduler:
        try:
            return Client(args.scheduler, timeout="5s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise UsageError(
                f"cannot reach the Dask scheduler at {args.scheduler}: {exc}"
            ) from None
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers, which also turns off glibc's
    # dynamic mmap threshold: every large array is then mmapped and faulted in afresh, and
    # the analysis takes ~1.5x the CPU (measured). Our workers keep glibc's defaults.
    import dask  # noqa: PLC0415

    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    cluster = LocalCluster(
        n_workers=args.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    return Client(cluster)


def summarise_on_dask(
    client: Any, traces: list[str], idle_threshold_s: float, stream_above: int = STREAM_ABOVE_EVENTS
) -> list[Digest]:
    from dask.distributed import as_completed  # noqa: PLC0415

    progress = _Progress(len(traces))
    futures = client.map(
        digest, traces, idle_threshold_s=idle_threshold_s, stream_above=stream_above, pure=False
    )
    out = []
    for future in as_completed(futures):
        out.append(future.result())
        progress.step()
    return out


def run(args: argparse.Namespace) -> int:
    traces, missing = find_traces(args.paths)
    if not traces and missing:
        if not missing[0].readable:  # a trace error, as report and compare give it
            raise TraceError(missing[0].reason)
        raise UsageError(f"{missing[0].trace}: {missing[0].reason}")
    if args.serial:
        digests = summarise_serially(traces, args.idle_threshold, args.stream_above)
    else:
        client = _client(args)
        try:
            digests = summarise_on_dask(client, traces, args.idle_threshold, args.stream_above)
        finally:
            cluster = client.cluster if not args.scheduler else None
            client.close()
            if cluster is not None:
                cluster.close()
    summary = aggregate(digests, args.top, missing)
    if args.html:
        write_file(args.html, fleet_html(summary), args.force)
    if args.json:
        print(dumps(summary.to_json()))
    else:
        print(render_fleet(summary))
        if args.html:
            print(f"page: {args.html}")
    return 0
