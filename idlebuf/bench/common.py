"""What every benchmark shares: spreads of repeated ratios, a recorder run as a subprocess
with its own CPU and memory measured from /proc, and trace row counts."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq

from analysis.trace import recording_started
from idlebuf.scenario import stop

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of repeated measurements (or ratios)."""
    if not values:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan"), "n": 0}
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "n": len(values),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (not its children)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss(pid: int) -> int:
    """The process's high-water resident set (VmHWM), bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class RecorderRun:
    """`idlebuf record -o TRACE ARGS` in the background; CPU counted from attach on."""

    def __init__(self, trace: Path, *args: str, stdout: int | None = subprocess.DEVNULL):
        self.trace = trace
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "idlebuf", "record", "-o", str(trace), "--force", *args],
            stdout=stdout,
            stderr=subprocess.PIPE,
        )
        self.cpu_at_attach = 0.0
        self.attached_at = 0.0

    def wait_attached(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not recording_started(self.trace):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"the recorder did not attach: {err.strip()}")
            time.sleep(0.05)
        self.cpu_at_attach = cpu_seconds(self.proc.pid)
        self.attached_at = time.monotonic()

    def footprint(self) -> dict[str, float]:
        """CPU seconds and share of one CPU since attach, and peak RSS so far."""
        cpu = cpu_seconds(self.proc.pid) - self.cpu_at_attach
        wall = max(time.monotonic() - self.attached_at, 1e-9)
        return {"cpu_s": cpu, "cpu_share": cpu / wall, "peak_rss_bytes": peak_rss(self.proc.pid)}

    def finish(self, timeout: float = 120) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop(self.proc)
        if self.proc.returncode not in (0, None):
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"the recorder failed: {err.strip()}")


def table_rows(trace: Path, *tables: str) -> int:
    """Rows in these tables of a trace, from the Parquet footers (no data read)."""
    total = 0
    for name in tables:
        for part in sorted((trace / name).glob("part-*.parquet")):
            total += pq.ParquetFile(part).metadata.num_rows
    return total


def trace_drops(trace: Path) -> dict[str, int]:
    meta = json.loads((trace / "meta.json").read_text())
    return {k: int(v) for k, v in meta.get("drops", {}).items()}
