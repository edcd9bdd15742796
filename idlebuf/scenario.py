"""Scenarios that compose a workload, the load generator and a recording."""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from analysis.summary import summarize
from analysis.trace import open_trace
from idlebuf.errors import IdlebufError
from idlebuf.render import human_bytes, render_report
from probes.recorder import RecordConfig, Recorder

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


def spawn(module: str, *args: str, stdin: int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stdin=stdin,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_demo(args: argparse.Namespace) -> int:
    """Thread-per-connection server, N connections, F active, recorded for a few seconds."""
    active = round(args.connections * args.active)
    log = sys.stderr
    with ExitStack() as cleanup:
        output = (
            Path(args.output)
            if args.output
            else Path(cleanup.enter_context(tempfile.TemporaryDirectory())) / "trace"
        )
        print(
            f"demo: starting a thread-per-connection server ({args.buffer_size:,}-byte buffers)",
            file=log,
        )
        server = spawn("workloads.threaded_server", "--buffer-size", str(args.buffer_size))
        cleanup.callback(stop, server)
        listening = read_event(server.stdout, "listening", 30)  # type: ignore[arg-type]
        print(f"demo: opening {args.connections:,} connections, {active:,} active", file=log)
        load = spawn(
            "workloads.loadgen",
            "--port",
            str(listening["port"]),
            "--connections",
            str(args.connections),
            "--active",
            str(active),
            "--messages",
            str(int(args.duration * 20) + 100),
            "--rate",
            "20",
            "--duration",
            str(args.duration + 5),
            "--hold-stdin",
            "--hold",
            "120",
            stdin=subprocess.PIPE,
        )
        cleanup.callback(stop, load)
        read_event(load.stdout, "connected", 60)  # type: ignore[arg-type]
        print(f"demo: recording the server (pid {server.pid}) for {args.duration:g}s", file=log)

        def progress(line: str) -> None:
            if log.isatty():
                log.write("\r\033[K" + line)
                log.flush()

        Recorder(
            RecordConfig(
                output=output, pids=[server.pid], duration=args.duration, force=bool(args.output)
            ),
            progress=progress,
        ).run()
        if log.isatty():
            log.write("\n")
        summary = summarize(open_trace(output))
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(
                render_report(
                    summary,
                    f"{args.connections:,} connections, {active:,} active, thread per connection",
                )
            )
            idle = args.connections - active
            print(
                f"\n{idle:,} idle connections each hold a "
                f"{human_bytes(args.buffer_size)} buffer in a posted read: "
                f"{human_bytes(idle * args.buffer_size)} waiting for data that is not "
                "coming."
            )
            if args.output:
                print(f"trace kept in {output}; `idlebuf report {output}` shows it again")
    return 0
