"""comparison.json and sweep.json: experiments saved beside their traces, and read back.

Each file names its format and version; a foreign or newer one is refused in one line. A
comparison.json written before files carried a version (format 0) is read with its one
renamed figure (`io_buffer_heap`, now `io_buffer_memory`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analysis.comparison import ComparisonRow
from analysis.results import JsonObject, TimelinePoint, to_json
from idlebuf.experiments.comparison import (
    Comparison,
    ModelInfo,
    merged,
    renamed,
    traces_compared,
)
from idlebuf.experiments.models import Load
from idlebuf.experiments.sweep import MemoryFit, Sweep, SweepPoint
from idlebuf.output import write_file
from probes.format.errors import TraceError

COMPARISON_FILE = "comparison.json"
SWEEP_FILE = "sweep.json"
COMPARISON_FORMAT = ("idlebuf-comparison", 1, "comparison")  # name, version, what it is
SWEEP_FORMAT = ("idlebuf-sweep", 1, "sweep")
MAX_BYTES = 256 << 20  # a saved experiment is a few MiB at most


def comparison_json(comparison: Comparison) -> JsonObject:
    return {
        "format": COMPARISON_FORMAT[0],
        "format_version": COMPARISON_FORMAT[1],
        "scenario": dataclasses.asdict(comparison.scenario) if comparison.scenario else None,
        "rows": to_json(comparison.rows),
        "timelines": {
            name: [{k: v for k, v in p.to_json().items() if k != "pid"} for p in points]
            for name, points in comparison.timelines.items()
        },
        "models": to_json(comparison.models),
        "complete": comparison.complete,
        "ratio_of": comparison.ratio_of,
    }


def sweep_json(sweep: Sweep) -> JsonObject:
    return {
        "format": SWEEP_FORMAT[0],
        "format_version": SWEEP_FORMAT[1],
        "scenario": {"connections": sweep.connections, "fractions": sweep.fractions},
        "points": [
            {"connections": p.connections, "fraction": p.fraction, "rows": to_json(p.rows)}
            for p in sweep.points
        ],
        "fits": to_json(sweep.fits),
    }


def save_comparison(comparison: Comparison, directory: Path) -> Path:
    """comparison.json, replaced if there (callers check first: output.check_free)."""
    body = json.dumps(comparison_json(comparison), indent=1)
    return write_file(directory / COMPARISON_FILE, body, force=True)


def save_sweep(sweep: Sweep, directory: Path) -> Path:
    """sweep.json, replaced if there (callers check first: output.check_free)."""
    return write_file(directory / SWEEP_FILE, json.dumps(sweep_json(sweep), indent=1), force=True)


def _read(path: Path, expected: tuple[str, int, str]) -> JsonObject:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES >> 20} MiB")
        data = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise TraceError(f"{path}: not a {expected[2]} idlebuf wrote ({exc})") from None
    if not isinstance(data, dict):
        raise TraceError(f"{path}: not a {expected[2]} idlebuf wrote (not a JSON object)")
    name, version = data.get("format", expected[0]), data.get("format_version", 0)
    if name != expected[0] or not isinstance(version, int) or isinstance(version, bool):
        raise TraceError(f"{path}: not a {expected[2]} idlebuf wrote (its format is {name!r})")
    if version > expected[1]:
        raise TraceError(
            f"{path} is {expected[0]} version {version}, newer than this idlebuf reads "
            f"({expected[1]}); upgrade idlebuf"
        )
    return data


def _rows(raw: Any, version: int) -> list[ComparisonRow]:
    rows = []
    for row in raw:
        if version == 0:  # before the figure's rename
            row = {**row, "io_buffer_memory": row.get("io_buffer_heap")}
            row["io_buffer_memory_resident"] = row.get("io_buffer_heap_resident")
        rows.append(ComparisonRow.from_json(row))
    return rows


def _ratio_of(figure: Any) -> str:
    if figure not in ("io_buffer_memory", "write_buffer_heap"):
        raise TypeError(f"ratio_of {figure!r} is not a figure rows are compared by")
    return str(figure)


def load_comparison(directory: Path) -> Comparison:
    path = directory / COMPARISON_FILE
    data = _read(path, COMPARISON_FORMAT)
    try:
        rows = _rows(data["rows"], data.get("format_version", 0))
        pids = {r.model: r.pid for r in rows}
        return Comparison(
            scenario=Load(**data["scenario"]) if data.get("scenario") else None,
            rows=rows,
            timelines={
                name: [TimelinePoint(pid=pids.get(name, 0), **p) for p in points]
                for name, points in data["timelines"].items()
            },
            models={name: ModelInfo(**m) for name, m in data["models"].items()},
            complete=bool(data.get("complete", True)),
            ratio_of=_ratio_of(data.get("ratio_of", "io_buffer_memory")),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise TraceError(f"{path}: not a comparison idlebuf wrote ({exc!r})") from None


def load_sweep(directory: Path) -> Sweep:
    path = directory / SWEEP_FILE
    data = _read(path, SWEEP_FORMAT)
    try:
        version = data.get("format_version", 0)
        return Sweep(
            connections=list(data["scenario"]["connections"]),
            fractions=list(data["scenario"]["fractions"]),
            points=[
                SweepPoint(p["connections"], p["fraction"], _rows(p["rows"], version))
                for p in data["points"]
            ],
            fits={name: MemoryFit(**f) for name, f in data["fits"].items()},
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise TraceError(f"{path}: not a sweep idlebuf wrote ({exc!r})") from None


def comparison_of(paths: Sequence[Path], timeline_s: float = 0.5) -> Comparison:
    """Recordings side by side: a demo's or sweep's output directory (its comparison.json,
    or the comparisons of a sweep's points) or traces recorded with --memory."""
    parts = []
    for path in paths:
        if (path / COMPARISON_FILE).is_file():
            parts.append(load_comparison(path))
        elif (path / SWEEP_FILE).is_file():  # each point's models, named after the point
            for point in sorted(p.parent for p in path.glob(f"*/{COMPARISON_FILE}")):
                parts.append(renamed(load_comparison(point), f"{point.name}/"))
        else:
            parts.append(traces_compared([path], timeline_s))
    return merged(parts)
