"""The recorder's targets as processes: launching a command held before exec (so it is traced
from its first instruction), following it, and stopping it with the recording."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable, Iterable

from probes.format.errors import RecordError


def proc_text(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def check_targets(pids: list[int]) -> None:
    for pid in pids:
        if pid <= 0 or not alive(pid):
            raise RecordError(f"no process with PID {pid}")


class Child:
    """A command the recorder launched (a forked process, so it can be held before exec)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
        return self.returncode

    def signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a forked child: SIGKILL when the recorder (its parent) exits, however it exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the recorder died before the call took effect
        os._exit(127)


def launch_paused(command: list[str], attach: Callable[[int], None]) -> Child:
    """Start `command` held before exec, `attach` the probes to it, then let it exec.

    The forked child waits on a pipe until its pid is in the target table, so the probes see
    the command from its first instruction. A second, close-on-exec pipe reports exec failure.
    The command is killed if the recorder dies (PR_SET_PDEATHSIG): a recorder killed with
    SIGKILL leaves no orphan behind.
    """
    gate_r, gate_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: wait for the gate, then become the command
        try:
            os.close(gate_w)
            os.close(err_r)
            _die_with_parent()
            os.read(gate_r, 1)
            os.close(gate_r)
            os.execvp(command[0], command)
        except OSError as exc:
            os.write(err_w, (exc.strerror or "exec failed").encode())
        finally:
            os._exit(127)
    os.close(gate_r)
    os.close(err_w)
    child = Child(pid)
    try:
        attach(pid)
    finally:
        os.write(gate_w, b"g")
        os.close(gate_w)
    with os.fdopen(err_r, "rb") as err:
        failure = err.read().decode(errors="replace")
    if failure:
        child.wait()
        raise RecordError(f"cannot run {command[0]}: {failure}")
    return child


def finish_child(child: Child | None, followed: Iterable[int], grace: float = 3.0) -> int | None:
    """Stop a launched command that is still running, and the children it started."""
    if child is None:
        return None
    others = [p for p in followed if p != child.pid and is_process(p)]
    if child.poll() is None or any(alive(p) for p in others):
        child.signal(signal.SIGTERM)
        for pid in others:
            kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        child.wait(grace)
        while any(alive(p) for p in others) and time.monotonic() < deadline:
            time.sleep(0.02)
        child.signal(signal.SIGKILL)
        for pid in others:
            if alive(pid):
                kill(pid, signal.SIGKILL)
        child.wait()
    return child.returncode


def is_process(pid: int) -> bool:
    """A thread-group leader (the target table also holds thread ids of followed children)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            return any(line.split() == ["Tgid:", str(pid)] for line in f)
    except OSError:
        return False


def kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
