"""Fleet speed: `idlebuf fleet` over N synthetic traces of M events each, on a local Dask
cluster of 2 worker processes against one process (`--serial`), alternating; both must give
the same JSON answer (the benchmark fails when they differ). Each run is a fresh
`idlebuf fleet` process: its wall time is the whole command's, a cluster's start included."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from idlebuf.bench.synthetic import synthetic_trace

HOSTS = 7


def make_fleet(root: Path, traces: int, events: int, log: Callable[[str], None]) -> None:
    connections, other = 1009, events // 10
    reads = (events - connections - 2 * other) // 2 + connections // 2
    for i in range(traces):
        path = root / f"host=h{i % HOSTS}" / f"run-{i:04d}"
        if (path / "meta.json").exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic_trace(path, reads, connections, other)
        meta = json.loads((path / "meta.json").read_text())
        meta.setdefault("host", {})["hostname"] = f"h{i % HOSTS}"
        (path / "meta.json").write_text(json.dumps(meta))
        if (i + 1) % 20 == 0:
            log(f"fleet: {i + 1}/{traces} traces written")


@dataclass(frozen=True)
class FleetSpeed:
    traces: int
    events_per_trace: int
    sides: dict[str, list[float]]  # "dask (2 workers)", "one process": wall seconds per run


def _run(root: Path, *args: str) -> tuple[float, object]:
    """`idlebuf fleet --json ARGS ROOT`: its wall time and its answer (compared whole)."""
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "idlebuf", "fleet", "--json", *args, str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return time.perf_counter() - began, json.loads(proc.stdout)


def run(
    workdir: Path, traces: int, events: int, repeats: int, log: Callable[[str], None]
) -> FleetSpeed:
    root = workdir / f"fleet-{traces}x{events}"
    make_fleet(root, traces, events, log)
    sides: dict[str, list[float]] = {"dask (2 workers)": [], "one process": []}
    answers = []
    for r in range(repeats):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            wall_s, answer = (
                _run(root, "--workers", "2") if name.startswith("dask") else _run(root, "--serial")
            )
            sides[name].append(wall_s)
            answers.append(answer)
            log(f"fleet {name} {r + 1}/{repeats}: {wall_s:.1f} s")
    if any(a != answers[0] for a in answers):
        raise RuntimeError("fleet: the Dask and serial answers differ")
    return FleetSpeed(traces, events, sides)
