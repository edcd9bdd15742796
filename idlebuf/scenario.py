"""Scenarios that compose a workload, the load generator and a recording."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import weakref
from typing import IO, Any

from idlebuf.errors import IdlebufError

# Bytes read past the last returned line, per workload stdout (lines can arrive together).
_pending: weakref.WeakKeyDictionary[IO[bytes], bytes] = weakref.WeakKeyDictionary()


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
