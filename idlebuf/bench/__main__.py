"""`scripts/bench`: run the benchmarks, write their figures as JSON and print a table.

scripts/bench                       # everything (about 15 minutes on 2 cores)
scripts/bench --only analysis,scale --output /tmp/bench.json
scripts/bench --only owned          # the owned-state walk: 1,000 connections, a 200 MB heap
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from idlebuf.bench.common import Spread
from idlebuf.bench.overhead import CONFIGS
from idlebuf.reporters.text import table
from idlebuf.reporters.units import human_bytes
from probes.format.errors import IdlebufError

if TYPE_CHECKING:  # the parts are imported when run: each brings its own dependencies
    from idlebuf.bench.analysis_speed import AnalysisSpeed
    from idlebuf.bench.attach import AttachRun
    from idlebuf.bench.ceiling import Ceiling
    from idlebuf.bench.fleet_speed import FleetSpeed
    from idlebuf.bench.overhead import Overhead
    from idlebuf.bench.owned_walk import OwnedWalkRun
    from idlebuf.bench.scale import ScaleRun

PARTS = ("overhead", "ceiling", "analysis", "fleet", "scale", "attach", "owned")


@dataclass(frozen=True)
class Machine:
    kernel: str
    cpus: int
    cpu_model: str
    memory_bytes: int
    python: str


@dataclass
class BenchResults:
    """What one `scripts/bench` run measured: written as JSON, rendered as tables."""

    machine: Machine
    started: str
    overhead: Overhead | None = None
    ceiling: Ceiling | None = None
    analysis: AnalysisSpeed | None = None
    fleet: FleetSpeed | None = None
    scale: dict[str, ScaleRun] | None = None  # by server
    attach: dict[str, AttachRun] | None = None  # by server
    owned: dict[str, OwnedWalkRun] | None = None  # by server model
    errors: dict[str, str] = field(default_factory=dict)  # part -> why it failed

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def machine() -> Machine:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        models = {line.split(":", 1)[1].strip() for line in f if line.startswith("model name")}
    with open("/proc/meminfo", encoding="ascii") as f:
        mem_kib = int(f.readline().split()[1])
    return Machine(
        kernel=platform.release(),
        cpus=len(os.sched_getaffinity(0)),
        cpu_model=", ".join(sorted(models)),
        memory_bytes=mem_kib * 1024,
        python=platform.python_version(),
    )


def _cpus(cpus: list[int] | None) -> str:
    return ",".join(map(str, cpus)) if cpus else "any"


def _m(s: Spread, fmt: str = "{:.3f}") -> str:
    """min / median / max, formatted."""
    return " / ".join(fmt.format(v) for v in (s.min, s.median, s.max))


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _overhead(o: Overhead) -> str:
    rows = [
        [
            server,
            config,
            f"{r.untraced_requests_per_s.median:,.0f}",
            _m(r.throughput_ratio),
            _m(r.p99_ratio),
            str(r.throughput_ratio.n),
            f"{r.recorder_cpu_share.median:.0%}",
        ]
        for server in ("readiness", "threads")
        for config, r in o.servers.get(server, {}).items()
    ]
    return (
        f"Overhead on the traced server ({o.connections} connections back to back; "
        f"tracing switched off and on every {o.seconds:g} s, each traced window against "
        "the untraced ones on either side (first quarter of each left out), "
        "min / median / max over windows; server on CPU "
        f"{_cpus(o.server_cpus)}, load generator on CPU {_cpus(o.load_cpus)})\n"
        + table(
            ["server", "traced with", "untraced req/s", "throughput", "p99", "windows", "recorder"],
            rows,
        )
    )


def _ceiling(c: Ceiling) -> str:
    rows = [
        [
            f"storm x{procs}",
            _m(r.events_per_s.scaled(1e-6), "{:.2f}"),
            _m(r.drops, "{:,.0f}"),
            f"{r.recorder_cpu_share.median:.0%}",
            human_bytes(r.recorder_peak_rss_bytes),
            f"{r.untraced_events_per_s_equivalent / 1e6:.2f}",
        ]
        for procs, r in sorted(c.live.items())
    ]
    p = c.pipeline
    return (
        "Recorder ceiling (ping-pong storm: a 1-byte send and recv per turn, 4 events)\n"
        + table(
            ["load", "M events/s", "dropped", "recorder CPU", "recorder RSS", "untraced M/s"],
            rows,
        )
        + f"\nuser-space pipeline alone: {p.events_per_s / 1e6:.2f}M events/s wall, "
        f"{p.events_per_cpu_s / 1e6:.2f}M per CPU-second"
    )


def _analysis(a: AnalysisSpeed) -> str:
    rows = []
    for side in ("idlebuf", "duckdb", "idlebuf in memory"):
        runs = a.sides.get(side, [])
        if runs:
            walls = [r.wall_s for r in runs]
            rows.append(
                [
                    side,
                    _m(Spread(min(walls), _median(walls), max(walls), len(walls)), "{:.1f}"),
                    human_bytes(max(r.peak_rss_bytes for r in runs)),
                ]
            )
    text = (
        f"Analysis of a synthetic trace of {a.events:,} events, {a.connections:,} "
        "connections, every table of a --memory recording (a fresh process each run; "
        "idlebuf: the whole report, every figure, in windows as `report` reads it; in "
        "memory: the same as one window; DuckDB: what SQL can compute of it)\n"
        + table(["side", "seconds (min / median / max)", "peak RSS"], rows)
    )
    medians = {
        side: _median([r.wall_s for r in a.sides[side]])
        for side in ("idlebuf", "duckdb")
        if a.sides.get(side)
    }
    if len(medians) == 2:
        text += f"\nidlebuf / DuckDB (medians): {medians['idlebuf'] / medians['duckdb']:.2f}"
    huge = a.huge
    first = huge.runs.get("idlebuf") if huge else None
    if huge and first:
        per = first.wall_s / huge.events * 1e9
        text += (
            f"\n{huge.events:,} events, the whole report: {first.wall_s:.1f} s "
            f"({per:.0f} ns per event"
        )
        if "idlebuf" in medians:
            small = medians["idlebuf"] / a.events * 1e9
            text += f"; {small:.0f} at {a.events:,}: {per / small:.2f}x"
        text += f"), peak RSS {human_bytes(first.peak_rss_bytes)}"
        duck = huge.runs.get("duckdb")
        if duck:
            text += (
                f"; DuckDB on the same: {duck.wall_s:.1f} s, peak RSS "
                f"{human_bytes(duck.peak_rss_bytes)}"
            )
    return text


def _fleet(f: FleetSpeed) -> str:
    rows = []
    for side in ("dask (2 workers)", "one process"):
        runs = sorted(f.sides.get(side, []))
        if runs:
            rows.append([side, _m(Spread(runs[0], _median(runs), runs[-1], len(runs)), "{:.1f}")])
    return (
        f"Fleet of {f.traces:,} traces x {f.events_per_trace:,} events "
        "(`idlebuf fleet --json`, whole command)\n"
        + table(["side", "seconds (min / median / max)"], rows)
    )


def _scale(scale: dict[str, ScaleRun]) -> str:
    rows = [
        [
            name,
            f"{r.connections:,}",
            f"{r.posted_reads:,} / {r.truth_posted_reads:,}",
            "yes" if r.exact else "NO",
            f"{r.recorder.cpu_s:.1f}",
            human_bytes(r.recorder.peak_rss_bytes),
            human_bytes(r.trace_bytes),
        ]
        for name, r in scale.items()
    ]
    return "Scale (recorded from the server's start)\n" + table(
        ["server", "conns", "posted / server", "exact", "rec CPU-s", "rec RSS", "trace"], rows
    )


def _attach(attach: dict[str, AttachRun]) -> str:
    rows = [
        [
            name,
            f"{r.connections:,}",
            f"{r.found:,} / {r.truth_posted_reads:,}",
            "yes" if r.exact else "NO",
            f"{r.walk_ms:,.0f}",
            f"{r.record_wall_s:.1f}",
            f"{r.heap_walk_ms or 0:,.0f}",
            f"{r.heap_walk_end_ms or 0:,.0f}",
        ]
        for name, r in attach.items()
    ]
    return "State at attach (record -p on an idle server)\n" + table(
        [
            "server",
            "conns",
            "found / server",
            "exact",
            "walk ms",
            "record s",
            "heap walk ms",
            "at end ms",
        ],
        rows,
    )


def _owned(owned: dict[str, OwnedWalkRun]) -> str:
    rows = [
        [
            mode,
            f"{r.connections:,}",
            human_bytes(r.heap_bytes),
            f"{r.chunks:,}",
            f"{r.took_s:.1f}",
            f"{r.cpu_s:.1f}",
            f"{r.exact:,} / {r.connections:,}",
            f"{r.raced:,}",
        ]
        for mode, r in owned.items()
    ]
    title = (
        "The owned-state walk, attached to an idle server (workloads/c/owned_state.c; go: "
        "workloads/go_server, exact = at the median figure)\n"
    )
    return title + (
        table(["server", "conns", "heap", "chunks", "wall s", "CPU s", "exact", "raced"], rows)
    )


def render(results: BenchResults) -> str:
    out = []
    if results.overhead:
        out.append(_overhead(results.overhead))
    if results.ceiling:
        out.append(_ceiling(results.ceiling))
    if results.analysis:
        out.append(_analysis(results.analysis))
    if results.fleet:
        out.append(_fleet(results.fleet))
    if results.scale:
        out.append(_scale(results.scale))
    if results.attach:
        out.append(_attach(results.attach))
    if results.owned:
        out.append(_owned(results.owned))
    return "\n\n".join(out)


def run_part(
    name: str,
    args: argparse.Namespace,
    configs: list[str],
    log: Callable[[str], None],
    results: BenchResults,
) -> None:
    """Measure part `name` into `results`."""
    if name == "overhead":
        from idlebuf.bench import overhead

        results.overhead = overhead.run(args.rounds, args.seconds, args.connections, log, configs)
    elif name == "ceiling":
        from idlebuf.bench import ceiling

        results.ceiling = ceiling.run(args.storm, args.trials, log)
    elif name == "analysis":
        from idlebuf.bench import analysis_speed

        results.analysis = analysis_speed.run(
            args.workdir, args.events, args.repeats, log, args.huge_events
        )
    elif name == "fleet":
        from idlebuf.bench import fleet_speed

        results.fleet = fleet_speed.run(
            args.workdir, args.fleet_traces, args.fleet_events, args.repeats, log
        )
    elif name == "scale":
        from idlebuf.bench import scale

        results.scale = scale.run(args.scale, 16384, log)
    elif name == "attach":
        from idlebuf.bench import attach

        results.attach = attach.run(args.scale, 16384, log)
    elif name == "owned":
        from idlebuf.bench import owned_walk

        results.owned = {}
        budget = owned_walk.owned.DEFAULT_BUDGET_S
        for mode in ("threads", "epoll", "go"):
            conns, heap = args.owned_connections, args.owned_heap_mb
            log(f"owned: {conns:,} connections, {mode}, a {heap} MB heap")
            results.owned[mode] = (
                owned_walk.run_go(conns, heap, budget)
                if mode == "go"
                else owned_walk.run(mode, conns, heap, budget)
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument(
        "--rounds", type=int, default=30, help="traced windows per server and config (overhead)"
    )
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="seconds between switches (overhead)"
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma list of what the overhead part attaches, of {list(CONFIGS)}",
    )
    parser.add_argument("--connections", type=int, default=8, help="overhead load connections")
    parser.add_argument("--storm", type=int, default=1_000_003, help="storm turns per process")
    parser.add_argument("--trials", type=int, default=3, help="storm trials (ceiling)")
    parser.add_argument("--events", type=int, default=10_000_000, help="analysis trace size")
    parser.add_argument("--repeats", type=int, default=3, help="analysis runs per side")
    parser.add_argument(
        "--huge-events",
        type=int,
        default=100_000_000,
        help="analysis: a trace this big analysed once by each side (0: none)",
    )
    parser.add_argument("--fleet-traces", type=int, default=200, help="traces (fleet)")
    parser.add_argument(
        "--fleet-events", type=int, default=1_000_000, help="events per trace (fleet)"
    )
    parser.add_argument("--scale", type=int, default=10_000, help="connections (scale)")
    parser.add_argument("--owned-connections", type=int, default=1000, help="connections (owned)")
    parser.add_argument("--owned-heap-mb", type=int, default=200, help="heap to walk (owned)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/idlebuf-bench"))
    parser.add_argument("--output", type=Path, default=Path("bench-results.json"))
    args = parser.parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        print(f"bench: error: unknown part {sorted(unknown)[0]!r}", file=sys.stderr)
        return 2
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        print(f"bench: error: unknown config {sorted(unknown)[0]!r}", file=sys.stderr)
        return 2
    if set(parts) - {"analysis", "fleet"}:
        from probes.features import preflight
        from probes.format.errors import RecordError

        try:
            preflight()
        except RecordError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 1
    args.workdir.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    results = BenchResults(machine(), time.strftime("%Y-%m-%d %H:%M"))
    try:
        for name in parts:
            try:
                run_part(name, args, configs, log, results)
            except (
                IdlebufError,
                RuntimeError,
                OSError,
                ValueError,
            ) as exc:  # one failing part keeps the rest
                log(f"{name}: failed: {exc}")
                results.errors[name] = str(exc)
            args.output.write_text(results.to_json())  # nothing measured is lost
    except KeyboardInterrupt:
        print("bench: interrupted; keeping what was measured", file=sys.stderr)
    args.output.write_text(results.to_json())
    print(render(results))
    print(f"\nfigures: {args.output}")
    disagreement = results.analysis.disagreement if results.analysis else None
    if disagreement:  # figures that differ make the timings meaningless
        print(f"bench: FAILED: {disagreement}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
