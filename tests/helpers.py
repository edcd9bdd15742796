"""Running idlebuf and the workloads as real processes, for the tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from idlebuf.experiments.processes import RecorderProcess, read_event, spawn, stop
from probes.format.reader import recording_started

ROOT = Path(__file__).resolve().parent.parent


def idlebuf(*args: str, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "idlebuf", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        **kwargs,
    )


def report_json(trace: Path) -> dict[str, Any]:
    done = idlebuf("report", "--json", str(trace))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def spawn_idlebuf(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "idlebuf", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )


def spawn_workload(module: str, *args: str, stdin: int | None = None) -> subprocess.Popen[bytes]:
    return spawn(module, *args, stdin=stdin)


# read, readv, recvfrom, recvmsg on x86_64
_READ_SYSCALLS = {"0", "19", "45", "47"}


def start_loadgen(
    port: int,
    connections: int,
    active: int,
    messages: int,
    size: int,
    *extra: str,
    stdin: int | None = None,
) -> subprocess.Popen[bytes]:
    """The load generator: `active` of `connections` send `messages` of `size` bytes each."""
    counts = {
        "--port": port,
        "--connections": connections,
        "--active": active,
        "--messages": messages,
        "--size": size,
    }
    args = [str(a) for pair in counts.items() for a in pair]
    return spawn_workload("workloads.loadgen", *args, *extra, stdin=stdin)


def go(load: subprocess.Popen[bytes]) -> None:
    """Let a load generator started with --wait-start begin its exchanges."""
    assert load.stdin is not None
    load.stdin.write(b"go\n")
    load.stdin.flush()


def threads_in_socket_reads(pid: int) -> int:
    """Threads of `pid` now blocked in a socket read (a test precondition, read from /proc)."""
    count = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            call = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
            target = os.readlink(f"/proc/{pid}/fd/{int(call[1], 16)}")
            if call[0] in _READ_SYSCALLS and target.startswith("socket:"):
                count += 1
        except (OSError, IndexError, ValueError):
            continue
    return count


def wait_until(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_trace_started(trace: Path, timeout: float = 60.0) -> None:
    """The recorder writes meta.json with attached probes once it is tracing."""
    wait_until(lambda: recording_started(trace), timeout, "the recorder to attach")


__all__ = [
    "read_event",
    "idlebuf",
    "report_json",
    "spawn_idlebuf",
    "spawn_workload",
    "start_loadgen",
    "go",
    "threads_in_socket_reads",
    "wait_until",
    "wait_for_trace_started",
    "stop",
    "Recording",
    "python_module",
    "compiled_c",
    "finish_recording",
]


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def compiled_c(workdir: Path, name: str, *flags: str) -> Path:
    """workloads/c/NAME.c built with gcc into `workdir` (the bootstrap installs gcc)."""
    if shutil.which("gcc") is None:
        raise AssertionError("gcc is not installed (scripts/bootstrap installs it)")
    out = workdir / name
    source = ROOT / "workloads" / "c" / f"{name}.c"
    subprocess.run(
        ["gcc", "-O2", "-o", str(out), str(source), *flags], check=True
    )  # libraries last
    return out


def finish_recording(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Stop `idlebuf record` as a user would (SIGINT) and check it ended well."""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()


class Recording:
    """`idlebuf record ... -- COMMAND` running a workload that announces itself.

    `pid`/`port` come from its "listening" line; `truth()` asks it for its ground truth
    (SIGUSR1); `wait_for(ok)` asks until `ok(truth)`; `finish()` stops the recording with
    SIGINT and checks it ended well.
    """

    def __init__(self, trace: Path, command: list[str], record_args: tuple[str, ...] = ()):
        self.recorder = RecorderProcess(trace, *record_args, "--", *command, stdout=subprocess.PIPE)
        self.proc = self.recorder.proc
        try:
            self.listening = read_event(self.proc.stdout, "listening", 60)  # type: ignore[arg-type]
        except BaseException:
            stop(self.proc)
            raise
        self.pid: int = self.listening["pid"]
        self.port: int = self.listening["port"]

    def truth(self) -> dict[str, Any]:
        os.kill(self.pid, signal.SIGUSR1)
        return read_event(self.proc.stdout, "ground_truth", 10)  # type: ignore[arg-type]

    def wait_for(self, ok: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        truth = self.truth()
        while not ok(truth):
            assert time.monotonic() < deadline, {k: v for k, v in truth.items() if k != "buffers"}
            time.sleep(0.1)
            truth = self.truth()
        return truth

    def finish(self) -> None:
        finish_recording(self.proc)

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.proc)
