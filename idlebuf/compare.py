"""The IO models side by side: the same load against each workload, recorded, one table.

Each model's server is launched under `idlebuf record --memory` (so io_uring requests are seen
from the first one), the load generator opens N connections of which a fraction exchange
messages at a steady rate, and the recording's figures become one row. A *comparison* is a
JSON-ready dict: {"scenario", "rows", "timelines" (per model), "models" (explanations)}; the
table, the HTML report and the Perfetto timeline are all rendered from it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from analysis.memory import rss_at
from analysis.summary import summarize
from analysis.trace import Trace, open_trace
from idlebuf.errors import IdlebufError
from idlebuf.models import Model
from idlebuf.output import output_dir, write_file
from idlebuf.render import human_bytes, table
from idlebuf.scenario import read_event, spawn, stop

COMPARISON_FILE = "comparison.json"
TIMELINE_POINTS = 60  # samples per model's time series


@dataclass(frozen=True)
class Load:
    """What the load generator does to every model."""

    connections: int
    active: int
    buffer_size: int = 16384
    duration: float = 5.0  # seconds recorded per model
    rate: float = 20.0  # messages per second per active connection
    netns: str | None = None  # run the load generator in this network namespace


def io_buffer_memory(memory: dict[str, Any], groups: list[dict[str, Any]]) -> tuple[int, int]:
    """(committed, resident) bytes of user memory held for reads at the end: posted or parked
    buffers (heap or the program's own mappings), buffers still held after their data (a pool's
    counted once), provided-buffer groups. Resident covers the posted and idle retained ones."""
    heap = memory["io_buffer_heap"]
    committed = heap["bytes"] + heap["mapped_bytes"] + memory["held_data_buffers"]["bytes"]
    committed += sum(g["bytes"] for g in groups)
    resident = heap["resident_bytes"] + memory["retained"]["resident_bytes"]
    return committed, resident


def model_row(
    trace: Trace,
    summary: dict[str, Any],
    pid: int,
    name: str,
    connections: int | None = None,
    active: int | None = None,
    since_ns: int | None = None,
) -> dict[str, Any]:
    """One process's figures at the end of a recording (made with --memory).

    Connections and active default to what the trace saw (open; open and not idle); RSS growth
    is counted from `since_ns`, or from the first sample.
    """
    (proc,) = [p for p in summary["processes"] if p["pid"] == pid]
    if "memory" not in proc:
        raise IdlebufError(f"{name}: recorded without --memory; no memory figures to compare")
    memory = proc["memory"]
    committed, resident = io_buffer_memory(memory, proc["buffer_groups"])
    seen = memory["connections"]
    base = rss_at(trace["rss"], pid, since_ns) if since_ns else memory["rss"]["first"]
    return {
        "model": name,
        "pid": pid,
        "connections": seen["open"] if connections is None else connections,
        "active": seen["open"] - seen["idle"] if active is None else active,
        "posted_reads": proc["posted_reads"]["now"],
        "pinned_bytes": proc["pinned_bytes"]["now"],
        "io_buffer_heap": committed,
        "io_buffer_heap_resident": resident,
        "rss_growth": memory["rss"]["peak"] - base,
        "rss_bytes": memory["rss"]["now"],
        "socket_kernel_bytes": memory["socket_kernel_bytes"],
        "per_idle_connection_bytes": round(memory["per_idle_connection"]["bytes"]),
        "pending_writes": proc["writes"]["pending_writes"],
        "pending_write_bytes": proc["writes"]["pending_write_bytes"],
        "write_buffer_heap": memory["write_buffer_heap"]["bytes"],
    }


def with_ratios(rows: list[dict[str, Any]], key: str = "io_buffer_heap") -> list[dict[str, Any]]:
    """Each row's IO-buffer memory (or `key`) over the first row's (the readiness baseline)."""
    baseline = rows[0][key] if rows else 0
    for row in rows:
        row["ratio_to_readiness"] = round(row[key] / max(baseline, 1), 1)
    return rows


def pid_timeline(summary: dict[str, Any], pid: int) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in point.items() if k != "pid"}
        for point in summary.get("timeline", [])
        if point["pid"] == pid
    ]


def record_model(
    model: Model, path: Path, load: Load, progress: Callable[[str], None] = lambda _: None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Record `model`'s server under `load`: (its row, its time series)."""
    progress(f"starting {model.about}")
    recorder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "idlebuf",
            "record",
            "-o",
            str(path),
            "--force",
            "--memory",
            "--duration",
            str(load.duration),
            "--",
            sys.executable,
            "-m",
            model.module,
            "--buffer-size",
            str(load.buffer_size),
            *(("--host", "0.0.0.0") if load.netns else ()),
            *model.args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    generator = None
    try:
        try:
            listening = read_event(recorder.stdout, "listening", 60)  # type: ignore[arg-type]
        except IdlebufError:
            stop(recorder)
            why = recorder.stderr.read().decode().strip() if recorder.stderr else ""
            raise IdlebufError(f"recording {model.name} did not start: {why}") from None
        ready_ns = time.monotonic_ns()  # the trace's clock: RSS growth is counted from here
        generator = spawn(model.client, *client_args(model.client, load, listening["port"]))
        connected = read_event(generator.stdout, "connected", 120)  # type: ignore[arg-type]
        progress(f"{connected['connections']:,} connections open, recording")
        out, err = recorder.communicate(timeout=load.duration + 180)
        if recorder.returncode != 0:
            raise IdlebufError(f"recording {model.name} failed: {err.decode().strip()}")
    finally:
        stop(recorder)
        if generator is not None:
            stop(generator)
    progress("analysing")
    trace = open_trace(path)
    summary = summarize(trace, timeline_s=max(0.1, load.duration / TIMELINE_POINTS))
    pid = listening["pid"]
    row = model_row(trace, summary, pid, model.name, load.connections, load.active, ready_ns)
    return {**row, "trace": str(path), "ground_truth": last_truth(out)}, pid_timeline(summary, pid)


def last_truth(stdout: bytes) -> dict[str, Any] | None:
    """What the server itself said last (it prints its ground truth as it exits)."""
    truth = None
    for line in stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "ground_truth":
            truth = {k: v for k, v in record.items() if k not in ("event", "buffers")}
    return truth


def client_args(client: str, load: Load, port: int) -> list[str]:
    """Arguments of the program that drives a model: the echo load generator, or the push
    server's slow readers. Either stops a second before the recording does, so that its
    "now" sees every read re-posted rather than a few caught between completion and re-post."""
    if client == "workloads.loadgen":
        pace = [
            *("--messages", str(int(load.duration * load.rate) + 100)),
            *("--rate", str(load.rate)),
        ]
    else:  # workloads.push_client: bytes/s per active reader
        pace = ["--rate", str(4 * load.buffer_size)]
    return [
        *(("--netns", load.netns, "--host", NETNS_SERVER) if load.netns else ()),
        *("--port", str(port), "--connections", str(load.connections)),
        *("--active", str(load.active)),
        *pace,
        *("--duration", str(max(0.5, load.duration - 1)), "--hold", "120"),
    ]


NETNS_SERVER = "10.231.0.1"  # the server's side of the veth pair the load generator is behind


def run_comparison(
    load: Load,
    chosen: Sequence[Model],
    base: Path,
    progress: Callable[[int, Model, str], None] = lambda *_: None,
    ratio_of: str = "io_buffer_heap",
) -> dict[str, Any]:
    """Record every chosen model under `load` into base/<model>; the comparison dict (also
    written to base/comparison.json). Ratios are of `ratio_of` to the first model's."""
    output_dir(base, "")
    comparison: dict[str, Any] = {
        "scenario": asdict(load),
        "rows": [],
        "timelines": {},
        "models": {},
        "complete": False,
    }
    for i, model in enumerate(chosen):
        row, series = record_model(
            model,
            base / model.name,
            load,
            lambda line, i=i, model=model: progress(i, model, line),  # type: ignore[misc]
        )
        comparison["rows"] = with_ratios([*comparison["rows"], row], ratio_of)
        comparison["timelines"][model.name] = series
        comparison["models"][model.name] = {
            "about": model.about,
            "explain": model.explain,
            "kind": model.kind,
        }
        comparison["complete"] = i == len(chosen) - 1
        # saved after every model: an interrupted run keeps the models already recorded
        write_file(base / COMPARISON_FILE, json.dumps(comparison, indent=1))
        progress(i, model, "done")
    return comparison


def comparison_of(paths: Sequence[Path], timeline_s: float = 0.5) -> dict[str, Any]:
    """Recordings side by side: a demo's or sweep's output directory (its comparison.json) or
    traces recorded with --memory (a row per process that did network reads)."""
    rows: list[dict[str, Any]] = []
    timelines: dict[str, list[dict[str, Any]]] = {}
    models: dict[str, dict[str, str]] = {}
    for path in paths:
        saved = path / COMPARISON_FILE
        if saved.is_file():
            try:
                earlier = json.loads(saved.read_text())
                rows += earlier["rows"]
                timelines.update(earlier["timelines"])
                models.update(earlier["models"])
            except (ValueError, KeyError, TypeError) as exc:
                raise IdlebufError(f"{saved}: not a comparison idlebuf wrote ({exc})") from None
            continue
        trace = open_trace(path)
        summary = summarize(trace, timeline_s=timeline_s)
        pids = [
            p["pid"]
            for p in summary["processes"]
            if "memory" in p and (p["posted_reads"]["peak"] or p["memory"]["connections"]["open"])
        ]
        if not pids:
            raise IdlebufError(
                f"{path}: no process with network reads recorded with --memory to compare"
            )
        for pid in pids:
            name = path.name if len(pids) == 1 else f"{path.name}:{pid}"
            rows.append({**model_row(trace, summary, pid, name), "trace": str(path)})
            timelines[name] = pid_timeline(summary, pid)
    return {"scenario": None, "rows": with_ratios(rows), "timelines": timelines, "models": models}


Column = tuple[str, str, Callable[[Any], str]]  # (header, row key, format)
_COUNT: Callable[[Any], str] = "{:,}".format
TABLE_COLUMNS: list[Column] = [
    ("model", "model", str),
    ("conns", "connections", _COUNT),
    ("active", "active", _COUNT),
    ("posted", "posted_reads", _COUNT),
    ("pinned", "pinned_bytes", human_bytes),
    ("IO-buffer memory", "io_buffer_heap", human_bytes),
    ("resident", "io_buffer_heap_resident", human_bytes),
    ("RSS growth", "rss_growth", human_bytes),
    ("socket mem", "socket_kernel_bytes", human_bytes),
    ("per idle conn", "per_idle_connection_bytes", human_bytes),
    ("x readiness", "ratio_to_readiness", "{:g}".format),
]
PUSH_COLUMNS: list[Column] = [
    *TABLE_COLUMNS[:3],
    ("pending writes", "pending_writes", _COUNT),
    ("pending bytes", "pending_write_bytes", human_bytes),
    ("write-buffer memory", "write_buffer_heap", human_bytes),
    *TABLE_COLUMNS[7:9],
    TABLE_COLUMNS[-1],
]


def render_table(rows: list[dict[str, Any]], columns: list[Column] = TABLE_COLUMNS) -> str:
    return table([c[0] for c in columns], [[fmt(r[key]) for _, key, fmt in columns] for r in rows])


def write_reports(comparison: dict[str, Any], directory: Path, title: str) -> dict[str, str]:
    """The HTML report and the Perfetto timeline of a comparison, written into `directory`."""
    from idlebuf.html_report import comparison_html
    from idlebuf.perfetto_timeline import timeline_trace

    pids = {r["model"]: int(r["pid"]) for r in comparison["rows"] if "pid" in r}
    report = write_file(directory / "report.html", comparison_html(comparison, title))
    timeline = write_file(
        directory / "timeline.pftrace",
        timeline_trace(comparison["timelines"], pids).SerializeToString(),
    )
    return {"report": str(report), "timeline": str(timeline)}
