"""The IO models side by side: the same load against each model's server, recorded, one row
each.

Each model's server is launched under `idlebuf record --memory` (so io_uring requests are seen
from the first one), its client opens N connections of which a fraction exchange data at a
steady rate, and the recording's figures become one row. A `Comparison` holds the rows, each
model's time series and what each model is; the reporters render it, `saved` stores it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from analysis.comparison import ComparisonRow, comparison_row, with_ratios
from analysis.memory import resident_events, rss_at
from analysis.results import JsonObject, Result, TimelinePoint
from analysis.summary import summarize, timeline_step
from idlebuf.experiments.models import Load, Model
from idlebuf.experiments.processes import RecorderProcess, read_event, spawn, stop
from probes.format.errors import IdlebufError, RecordError
from probes.format.reader import open_trace

TIMELINE_POINTS = 60  # samples per model's time series


@dataclass(frozen=True)
class ModelInfo(Result):
    about: str
    explain: str
    kind: str

    @classmethod
    def of(cls, model: Model) -> ModelInfo:
        return cls(model.about, model.explain, model.kind)


@dataclass
class Comparison:
    scenario: Load | None  # None: recordings compared as they were made
    rows: list[ComparisonRow] = field(default_factory=list)
    timelines: dict[str, list[TimelinePoint]] = field(default_factory=dict)  # per row's model
    models: dict[str, ModelInfo] = field(default_factory=dict)  # explained models
    complete: bool = False  # every model asked for was recorded
    ratio_of: str = "io_buffer_memory"  # the figure "x readiness" divides (write side: writes')

    def pids(self) -> dict[str, int]:
        return {r.model: r.pid for r in self.rows}


def record_model(
    model: Model, path: Path, load: Load, progress: Callable[[str], None] = lambda _: None
) -> tuple[ComparisonRow, list[TimelinePoint]]:
    """Record `model`'s server under `load`: its row and its time series."""
    progress(f"starting {model.about}")
    recorder = RecorderProcess(
        path,
        *("--memory", "--duration", str(load.duration), "--", *model.server_command(load)),
        stdout=-1,  # subprocess.PIPE: the server announces itself there
    )
    generator = None
    with recorder:
        try:
            listening = read_event(recorder.proc.stdout, "listening", 60)  # type: ignore[arg-type]
        except IdlebufError:
            stop(recorder.proc)
            raise RecordError(
                f"recording {model.name} did not start: {recorder.why_it_failed()}"
            ) from None
        ready_ns = time.monotonic_ns()  # the trace's clock: RSS growth is counted from here
        ready_rss = resident_now(listening["pid"])
        try:
            generator = spawn(model.client.module, *model.client.args(load, listening["port"]))
            connected = read_event(generator.stdout, "connected", 120)  # type: ignore[arg-type]
            progress(f"{connected['connections']:,} connections open, recording")
            try:
                out = recorder.wait(load.duration + 180)
            except RecordError as exc:
                raise RecordError(f"recording {model.name}: {exc}") from None
        finally:
            if generator is not None:
                stop(generator)
    progress("analysing")
    trace = open_trace(path)
    summary = summarize(trace, timeline_s=max(0.1, load.duration / TIMELINE_POINTS))
    pid = listening["pid"]
    row = comparison_row(
        summary.process(pid),
        model.name,
        load.connections,
        load.active,
        ready_rss
        if ready_rss is not None
        else rss_at(resident_events(trace["rss"], trace["proc_status"]), pid, ready_ns),
    )
    row.trace, row.ground_truth = str(path), last_truth(out)
    if row.ground_truth is not None and "rss_bytes" in listening:
        row.ground_truth["rss_at_listening"] = listening["rss_bytes"]
    return row, summary.timeline_of(pid)


def resident_now(pid: int) -> int | None:
    """`pid`'s resident set size now, from /proc (exact, unlike the kmem:rss_stat samples,
    which lag by up to a per-CPU batch on each CPU); None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def last_truth(stdout: bytes) -> JsonObject | None:
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


def run_comparison(
    load: Load,
    chosen: Sequence[Model],
    base: Path,
    progress: Callable[[int, Model, str], None] = lambda *_: None,
    ratio_of: str = "io_buffer_memory",
    save: Callable[[Comparison], object] = lambda _: None,
) -> Comparison:
    """Record every chosen model under `load` into base/<model>. Ratios are of the rows'
    `ratio_of` to the first model's. `save` is called after every model, so an interrupted
    run keeps the models already recorded."""
    comparison = Comparison(load, ratio_of=ratio_of)
    for i, model in enumerate(chosen):
        row, series = record_model(
            model,
            base / model.name,
            load,
            lambda line, i=i, model=model: progress(i, model, line),  # type: ignore[misc]
        )
        comparison.rows = with_ratios([*comparison.rows, row], ratio_of)
        comparison.timelines[model.name] = series
        comparison.models[model.name] = ModelInfo.of(model)
        comparison.complete = i == len(chosen) - 1
        save(comparison)
        progress(i, model, "done")
    return comparison


def traces_compared(paths: Sequence[Path], timeline_s: float = 0.5) -> Comparison:
    """Traces recorded with --memory side by side: a row per process that did network reads
    (named after the trace, with its pid when a trace has several)."""
    out = Comparison(None, complete=True)
    for path in paths:
        trace = open_trace(path)
        summary = summarize(trace, timeline_s=timeline_step(trace, timeline_s, at_most=True))
        chosen = [
            p
            for p in summary.processes
            if p.memory is not None and (p.posted_reads.peak or p.memory.connections.open)
        ]
        if not chosen:
            raise IdlebufError(
                f"{path}: no process with network reads recorded with --memory to compare"
            )
        for process in chosen:
            name = path.name if len(chosen) == 1 else f"{path.name}:{process.pid}"
            row = comparison_row(process, name)
            row.trace = str(path)
            out.rows.append(row)
            out.timelines[name] = summary.timeline_of(process.pid)
    out.rows = with_ratios(out.rows)
    return out


def renamed(comparison: Comparison, prefix: str) -> Comparison:
    """The same comparison with every model's name prefixed (to merge several apart)."""
    return Comparison(
        comparison.scenario,
        [dataclasses.replace(r, model=prefix + r.model) for r in comparison.rows],
        {prefix + name: points for name, points in comparison.timelines.items()},
        {prefix + name: info for name, info in comparison.models.items()},
        comparison.complete,
        comparison.ratio_of,
    )


def merged(comparisons: Sequence[Comparison]) -> Comparison:
    """Several comparisons as one (ratios to the first row of all, of the first's figure)."""
    out = Comparison(
        comparisons[0].scenario if len(comparisons) == 1 else None,
        complete=True,
        ratio_of=comparisons[0].ratio_of,
    )
    for c in comparisons:
        out.rows += c.rows
        out.timelines.update(c.timelines)
        out.models.update(c.models)
        out.complete &= c.complete
    out.rows = with_ratios(out.rows, out.ratio_of)
    return out
