"""`scripts/bench`: run the benchmarks, write their figures as JSON and print a table.

scripts/bench                       # everything (about 15 minutes on 2 cores)
scripts/bench --only analysis,scale --output /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from idlebuf.bench.overhead import CONFIGS
from idlebuf.reporters.text import table
from idlebuf.reporters.units import human_bytes
from probes.format.errors import IdlebufError

PARTS = ("overhead", "ceiling", "analysis", "fleet", "scale", "attach")


def machine() -> dict[str, Any]:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        models = {line.split(":", 1)[1].strip() for line in f if line.startswith("model name")}
    with open("/proc/meminfo", encoding="ascii") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "kernel": platform.release(),
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": ", ".join(sorted(models)),
        "memory_bytes": mem_kib * 1024,
        "python": platform.python_version(),
    }


def _cpus(cpus: list[int] | None) -> str:
    return ",".join(map(str, cpus)) if cpus else "any"


def _m(s: dict[str, float], fmt: str = "{:.3f}") -> str:
    """min / median / max, formatted."""
    return " / ".join(fmt.format(s[k]) for k in ("min", "median", "max"))


def render(results: dict[str, Any]) -> str:
    out = []
    if "overhead" in results:
        o = results["overhead"]
        rows = []
        for server in ("readiness", "threads"):
            for config, r in o.get(server, {}).items():
                rows.append(
                    [
                        server,
                        config,
                        f"{r['untraced_requests_per_s']['median']:,.0f}",
                        _m(r["throughput_ratio"]),
                        _m(r["p99_ratio"]),
                        str(r["throughput_ratio"]["n"]),
                        f"{r['recorder_cpu_share']['median']:.0%}",
                    ]
                )
        out.append(
            f"Overhead on the traced server ({o['connections']} connections back to back; "
            f"tracing switched off and on every {o['seconds']:g} s, each traced window against "
            "the untraced ones on either side (first quarter of each left out), "
            "min / median / max over windows; server on CPU "
            f"{_cpus(o.get('server_cpus'))}, load generator on CPU {_cpus(o.get('load_cpus'))})\n"
            + table(
                [
                    "server",
                    "traced with",
                    "untraced req/s",
                    "throughput",
                    "p99",
                    "windows",
                    "recorder",
                ],
                rows,
            )
        )
    if "ceiling" in results:
        c = results["ceiling"]
        rows = []
        for procs in (1, 2):
            r = c[f"live_{procs}"]
            rows.append(
                [
                    f"storm x{procs}",
                    _m({k: v / 1e6 for k, v in r["events_per_s"].items() if k != "n"}, "{:.2f}"),
                    _m(r["drops"], "{:,.0f}"),
                    f"{r['recorder_cpu_share']['median']:.0%}",
                    human_bytes(r["recorder_peak_rss_bytes"]),
                    f"{r['untraced_events_per_s_equivalent'] / 1e6:.2f}",
                ]
            )
        p = c["pipeline"]
        out.append(
            "Recorder ceiling (ping-pong storm: a 1-byte send and recv per turn, 4 events)\n"
            + table(
                ["load", "M events/s", "dropped", "recorder CPU", "recorder RSS", "untraced M/s"],
                rows,
            )
            + f"\nuser-space pipeline alone: {p['events_per_s'] / 1e6:.2f}M events/s wall, "
            f"{p['events_per_cpu_s'] / 1e6:.2f}M per CPU-second"
        )
    if "analysis" in results:
        a = results["analysis"]
        rows = []
        for side in ("idlebuf", "duckdb", "idlebuf in memory"):
            runs = a.get(side, [])
            if runs:
                rows.append(
                    [
                        side,
                        _m(
                            {
                                "min": min(r["wall_s"] for r in runs),
                                "median": sorted(r["wall_s"] for r in runs)[len(runs) // 2],
                                "max": max(r["wall_s"] for r in runs),
                            },
                            "{:.1f}",
                        ),
                        human_bytes(max(r["peak_rss_bytes"] for r in runs)),
                    ]
                )
        text = (
            f"Analysis of a synthetic trace of {a['events']:,} events, {a['connections']:,} "
            "connections (load + relate, in a fresh process; idlebuf: the relate step "
            "streamed, as `report --stream`; in memory: the whole report)\n"
            + table(["side", "seconds (min / median / max)", "peak RSS"], rows)
        )
        medians = {
            side: sorted(r["wall_s"] for r in a[side])[len(a[side]) // 2]
            for side in ("idlebuf", "duckdb")
            if a.get(side)
        }
        if len(medians) == 2:
            text += f"\nidlebuf / DuckDB (medians): {medians['idlebuf'] / medians['duckdb']:.2f}"
        huge = a.get("huge")
        if huge:
            per = huge["wall_s"] / huge["events"] * 1e9
            text += (
                f"\nstreamed {huge['events']:,} events: {huge['wall_s']:.1f} s "
                f"({per:.0f} ns per event"
                + (
                    f"; {medians['idlebuf'] / a['events'] * 1e9:.0f} at {a['events']:,}"
                    if "idlebuf" in medians
                    else ""
                )
                + f"), peak RSS {human_bytes(huge['peak_rss_bytes'])}"
            )
            duck = a.get("huge_duckdb")
            if duck:
                text += (
                    f"; DuckDB on the same: {duck['wall_s']:.1f} s, peak RSS "
                    f"{human_bytes(duck['peak_rss_bytes'])}"
                )
        out.append(text)
    if "fleet" in results:
        f = results["fleet"]
        rows = []
        for side in ("dask (2 workers)", "one process"):
            runs = sorted(f.get(side, []))
            if runs:
                stats = {"min": runs[0], "median": runs[len(runs) // 2], "max": runs[-1]}
                rows.append([side, _m(stats, "{:.1f}")])
        out.append(
            f"Fleet of {f['traces']:,} traces x {f['events_per_trace']:,} events "
            "(`idlebuf fleet --json`, whole command)\n"
            + table(["side", "seconds (min / median / max)"], rows)
        )
    if "scale" in results:
        rows = [
            [
                name,
                f"{r['connections']:,}",
                f"{r['posted_reads']:,} / {r['truth_posted_reads']:,}",
                "yes" if r["exact"] else "NO",
                f"{r['cpu_s']:.1f}",
                human_bytes(r["peak_rss_bytes"]),
                human_bytes(r["trace_bytes"]),
            ]
            for name, r in results["scale"].items()
        ]
        out.append(
            "Scale (recorded from the server's start)\n"
            + table(
                ["server", "conns", "posted / server", "exact", "rec CPU-s", "rec RSS", "trace"],
                rows,
            )
        )
    if "attach" in results:
        rows = [
            [
                name,
                f"{r['connections']:,}",
                f"{r['found']:,} / {r['truth_posted_reads']:,}",
                "yes" if r["exact"] else "NO",
                f"{r['walk_ms']:,.0f}",
                f"{r['record_wall_s']:.1f}",
                f"{r.get('heap_walk_ms') or 0:,.0f}",
                f"{r.get('heap_walk_end_ms') or 0:,.0f}",
            ]
            for name, r in results["attach"].items()
        ]
        out.append(
            "State at attach (record -p on an idle server)\n"
            + table(
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
        )
    return "\n\n".join(out)


def _part(name: str) -> Any:
    import importlib  # noqa: PLC0415

    return importlib.import_module(f"idlebuf.bench.{name}")


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
        help="analysis: the trace streamed once in bounded memory (0: none)",
    )
    parser.add_argument("--fleet-traces", type=int, default=200, help="traces (fleet)")
    parser.add_argument(
        "--fleet-events", type=int, default=1_000_000, help="events per trace (fleet)"
    )
    parser.add_argument("--scale", type=int, default=10_000, help="connections (scale)")
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

    results: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M")}
    runners = {
        "overhead": lambda: _part("overhead").run(
            args.rounds, args.seconds, args.connections, log, configs
        ),
        "ceiling": lambda: _part("ceiling").run(args.storm, args.trials, log),
        "analysis": lambda: _part("analysis_speed").run(
            args.workdir, args.events, args.repeats, log, args.huge_events
        ),
        "fleet": lambda: _part("fleet_speed").run(
            args.workdir, args.fleet_traces, args.fleet_events, args.repeats, log
        ),
        "scale": lambda: _part("scale").run(args.scale, 16384, log),
        "attach": lambda: _part("attach").run(args.scale, 16384, log),
    }
    try:
        for name in parts:
            try:
                results[name] = runners[name]()
            except (
                IdlebufError,
                RuntimeError,
                OSError,
                ValueError,
            ) as exc:  # one failing part keeps the rest
                log(f"{name}: failed: {exc}")
                results[name + "_error"] = str(exc)
            args.output.write_text(json.dumps(results, indent=1))  # nothing measured is lost
    except KeyboardInterrupt:
        print("bench: interrupted; keeping what was measured", file=sys.stderr)
    args.output.write_text(json.dumps(results, indent=1))
    print(render(results))
    print(f"\nfigures: {args.output}")
    disagreement = results.get("analysis", {}).get("disagreement")
    if disagreement:  # figures that differ make the timings meaningless
        print(f"bench: FAILED: {disagreement}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
