"""The processes an experiment runs: workloads (which announce themselves in JSON lines) and
`idlebuf record` in the background. Demo, sweep and the benchmarks all launch them here."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from probes.format.errors import IdlebufError, RecordError
from probes.format.reader import recording_started

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Bytes read past the last returned line, per workload stdout (lines can arrive together).
_pending: weakref.WeakKeyDictionary[IO[bytes], bytes] = weakref.WeakKeyDictionary()


# A workload's JSON line stays a mapping: its fields depend on the event and on the workload
# (each server prints its own ground truth), and workloads import nothing of ours to share
# a type with (DESIGN.md rule 2); callers take the fields they know.
def read_event(stream: IO[bytes], event: str, timeout: float) -> dict[str, Any]:
    """The next JSON line with {"event": event} a workload prints, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    buffered = _pending.get(stream, b"")
    try:
        while True:
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("event") == event:
                    return record
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([stream.fileno()], [], [], max(0.0, remaining))
            chunk = os.read(stream.fileno(), 65536) if ready else b""
            if not chunk:
                raise IdlebufError(f"workload did not report {event!r} within {timeout:.0f}s")
            buffered += chunk
    finally:
        _pending[stream] = buffered


def spawn(
    module: str, *args: str, stdin: int | None = None, cpus: set[int] | None = None
) -> subprocess.Popen[bytes]:
    """`python -m module args`, in its own session; on `cpus` only, if given (set before it
    runs, so every thread it starts inherits them)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stdin=stdin,
        start_new_session=True,
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


@dataclass(frozen=True)
class Footprint:
    """What a background recorder has cost since it attached."""

    cpu_s: float
    cpu_share: float  # of one CPU
    peak_rss_bytes: int  # so far


class RecorderProcess:
    """`idlebuf record -o TRACE --force ARGS` in the background. With `stdout=PIPE`, a
    launched command's output (a workload's JSON lines) is readable from `proc.stdout`."""

    def __init__(self, trace: Path, *args: str, stdout: int | None = subprocess.DEVNULL):
        self.trace = trace
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "idlebuf", "record", "-o", str(trace), "--force", *args],
            stdout=stdout,
            stderr=subprocess.PIPE,
        )
        self.cpu_at_attach = 0.0
        self.attached_at = 0.0

    def why_it_failed(self) -> str:
        """What the recorder said on stderr (once it has exited)."""
        return self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""

    def wait_attached(self, timeout: float = 60) -> None:
        """Until the recorder is tracing (its meta.json says so); RecordError if it exits or
        does not get there in time."""
        deadline = time.monotonic() + timeout
        while not recording_started(self.trace):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                stop(self.proc)
                raise RecordError(f"the recorder did not attach: {self.why_it_failed()}")
            time.sleep(0.05)
        self.cpu_at_attach = cpu_seconds(self.proc.pid)
        self.attached_at = time.monotonic()

    def footprint(self) -> Footprint:
        cpu = cpu_seconds(self.proc.pid) - self.cpu_at_attach
        wall = max(time.monotonic() - self.attached_at, 1e-9)
        return Footprint(cpu, cpu / wall, peak_rss(self.proc.pid))

    def wait(self, timeout: float) -> bytes:
        """Until the recorder stops by itself (--duration, targets exited): what it printed
        on stdout, if piped. RecordError if it failed."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(self.proc)
            raise RecordError(f"the recorder did not stop within {timeout:.0f}s") from None
        if self.proc.returncode != 0:
            raise RecordError(f"the recorder failed: {err.decode(errors='replace').strip()}")
        return out or b""

    def finish(self, timeout: float = 120) -> None:
        """Stop it as Ctrl-C would (it finalizes the trace); RecordError if it failed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop(self.proc)
        if self.proc.returncode not in (0, None):
            raise RecordError(f"the recorder failed: {self.why_it_failed()}")

    def __enter__(self) -> RecorderProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.proc)
