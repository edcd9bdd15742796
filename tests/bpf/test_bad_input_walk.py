"""Bad input for the waiters and the owned-state walk, on real processes (issue 23): memory
idlebuf cannot read is unknown with why and how many connections, never a number, never a
crash.

- `idlebuf record` as root of a user namespace of its own: one line, a non-zero exit.
- A recording whose targets' memory and blocked calls may not be read (refused in the
  recorder as Yama's ptrace_scope 3 refuses them to root; the setting itself cannot be
  undone without a reboot): the waiter and the owned state of its 23 idle connections
  unknown, with why.
- A thread that exits, a process that forks, a process that exits during the walk of
  workloads/c/owned_state (a thread per connection, each with a known state): each made to
  happen at a chosen step of the walk.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from probes.allocators.base import Mappings
from probes.attach import owned, waiters
from probes.memory_side import walk_owned
from probes.process_memory import ProcessMemory
from tests.helpers import ROOT, compiled_c, read_event, report_json, stop, wait_until

pytestmark = pytest.mark.bpf

CONNECTIONS = 23


def test_record_in_a_user_namespace_says_why_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-m", "idlebuf", "record",
         "-o", str(tmp_path / "t"), "--duration", "1", "--", "sleep", "5"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        "idlebuf record: error: recording needs root in the initial user namespace: this "
        "process runs in a user namespace of its own (unshare --user, a rootless container), "
        "whose root the kernel does not let load BPF programs"
    ], done.stderr
    assert not (tmp_path / "t").exists()


# `idlebuf` with the targets' /proc/PID/mem and /proc/PID/task/TID/syscall refused (EPERM)
REFUSING = """
import builtins, errno, os, re, sys
REFUSED = re.compile(r"^/proc/(\\d+)/(mem|syscall|task/\\d+/syscall)$")
def refused(path):
    m = REFUSED.match(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
    return m is not None and int(m.group(1)) != os.getpid()
def refusing(real):
    def open_(path, *args, **kwargs):
        if refused(path):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), path)
        return real(path, *args, **kwargs)
    return open_
builtins.open, os.open = refusing(builtins.open), refusing(os.open)
from idlebuf.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compiled_c(tmp_path_factory.mktemp("c"), "owned_state", "-pthread")


def test_a_target_whose_memory_cannot_be_read_is_unknown_with_why(
    tmp_path: Path, server: Path
) -> None:
    trace = tmp_path / "trace"
    recorder = subprocess.Popen(
        [sys.executable, "-c", REFUSING, "record", "-o", str(trace), "--force", "--memory",
         "--", str(server), "0", str(CONNECTIONS), "threads"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    clients: list[socket.socket] = []
    try:
        assert recorder.stdout is not None
        listening = read_event(recorder.stdout, "listening", 120)  # BPF compiles slowly
        clients = [
            socket.create_connection(("127.0.0.1", listening["port"])) for _ in range(CONNECTIONS)
        ]
        read_event(recorder.stdout, "ground_truth", 30)
        time.sleep(2.5)  # every connection idle past the threshold
        recorder.send_signal(signal.SIGINT)
        _, err = recorder.communicate(timeout=120)
        assert recorder.returncode == 0, err.decode()
        assert b"Traceback" not in err, err.decode()
    finally:
        for c in clients:
            c.close()
        stop(recorder)
    (process,) = [p for p in report_json(trace)["processes"] if p["pid"] == listening["pid"]]
    memory = process["memory"]
    assert memory["connections"] == {"open": CONNECTIONS, "idle": CONNECTIONS}
    cost = memory["per_idle_connection"]
    pid = listening["pid"]
    # the waiter: 23 threads wait, one a connection: unknown, not 0
    refused = f"what its threads wait in cannot be read (/proc/{pid}/task/{pid}/syscall: "
    assert cost["waiter_bytes"] is None
    assert cost["waiter_reason"] == refused + "Operation not permitted)"
    unknown = {u["why"]: u["connections"] for u in cost["whole_unknown"]}
    assert unknown[f"waiter: {cost['waiter_reason']}"] == CONNECTIONS
    # the state each keeps alive: unknown, and why
    assert cost["owned_bytes"] is None and cost["total_bytes"] is None
    why = f"cannot read the memory of pid {pid}: Operation not permitted"
    assert unknown[f"other user memory: {why}"] == CONNECTIONS
    assert cost["owned_check"] == f"owned state: {why} ({CONNECTIONS} idle connections)"


@pytest.fixture
def threads(server: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[socket.socket], dict]]:
    """owned_state with a thread per connection, its 23 connections set up: (the server,
    its clients, each connection's truth by the server's fd)."""
    proc = subprocess.Popen([str(server), "0", str(CONNECTIONS), "threads"], stdout=subprocess.PIPE)
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        listening = read_event(proc.stdout, "listening", 30)
        clients = [
            socket.create_connection(("127.0.0.1", listening["port"])) for _ in range(CONNECTIONS)
        ]
        truth = {}
        for _ in range(CONNECTIONS):
            event = read_event(proc.stdout, "connection", 30)
            truth[event["fd"]] = event
        read_event(proc.stdout, "ground_truth", 30)
        wait_until(lambda: len(waiters.thread_waiters(proc.pid)) == CONNECTIONS, 30)
        yield proc, clients, truth
    finally:
        for c in clients:
            c.close()
        stop(proc)


class AtFirstBulkRead(ProcessMemory):
    """The process's memory, `then()` called once, as the walk takes its snapshot of the
    heap (its first bulk read: the chunk chains have been walked)."""

    def __init__(self, pid: int, then: Any) -> None:
        super().__init__(pid)
        self.then = then

    def read_into(self, addr: int, buf: memoryview) -> int:
        if self.then is not None:
            then, self.then = self.then, None
            then()
        return super().read_into(addr, buf)


def walk(pid: int, then: Any = None) -> owned.Walked:
    """The recorder's walk of `pid` at the end, `then()` happening during it."""
    mappings = Mappings(pid).all
    found = waiters.thread_waiters(pid)
    roots, others = owned.roots_of(pid, found, waiters.connection_fds(pid), {}, mappings)
    with AtFirstBulkRead(pid, then) as mem:
        return walk_owned(pid, mem, mappings, roots, others, 10.0)


def owned_by_fd(walked: owned.Walked) -> dict[int, tuple[int, str]]:
    return {c.fd: (c.owned_bytes, c.why) for c in walked.connections}


def test_a_thread_that_exits_during_the_walk(threads: Any) -> None:
    """Its connection closed once the roots were found, the thread gone before the heap is
    read: the walk goes on, the 22 others' states exact (the closed one is no connection
    any more: what its stale roots reach is of no idle connection)."""
    proc, clients, truth = threads
    before = {w.fd for w in waiters.thread_waiters(proc.pid)}
    gone: list[int] = []

    def close() -> None:
        clients[0].close()
        wait_until(lambda: len(waiters.thread_waiters(proc.pid)) == CONNECTIONS - 1, 10)
        gone.extend(before - {w.fd for w in waiters.thread_waiters(proc.pid)})

    walked = walk(proc.pid, close)
    (fd,) = gone
    assert walked.why == "", walked
    got = owned_by_fd(walked)
    assert set(got) == set(truth)
    assert {f: got[f] for f in truth if f != fd} == {
        f: (t["owned"], "") for f, t in truth.items() if f != fd
    }


def test_a_process_that_exits_during_the_walk(threads: Any) -> None:
    """Killed once its chunk chains are walked: every connection unknown, with why - not
    the zeros its vanished memory reads as."""
    proc, _, truth = threads

    def kill() -> None:
        proc.kill()
        proc.wait()

    walked = walk(proc.pid, kill)
    assert walked.why.startswith("the process's memory went away during the walk ("), walked
    assert walked.why.endswith(" reads failed): it exited or ran another program")
    rows = walked.rows(1, "end")
    assert {r["fd"] for r in rows} == {-1, *truth}
    assert all(r["why"] == walked.why for r in rows)


# loaded into owned_state (LD_PRELOAD): on SIGUSR2 the process forks, and the child waits
# (it dies with its parent)
FORKER = r"""
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>
static void on_usr2(int sig) {
    (void)sig;
    if (fork() == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        for (;;)
            pause();
    }
}
__attribute__((constructor)) static void install(void) { signal(SIGUSR2, on_usr2); }
"""


@pytest.fixture(scope="module")
def forker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("forker")
    (where / "forker.c").write_text(FORKER)
    out = where / "forker.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(out), str(where / "forker.c")],
                   check=True)  # fmt: skip
    return out


def children_of(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def test_a_process_that_forks_during_the_walk(server: Path, forker: Path) -> None:
    """A child forked as the walk reads the heap: the parent's memory is the same (its
    pages now shared with the child, copied on write), the walk's figures exact."""
    proc = subprocess.Popen(
        [str(server), "0", str(CONNECTIONS), "threads"],
        stdout=subprocess.PIPE, env=os.environ | {"LD_PRELOAD": str(forker)},
    )  # fmt: skip
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        listening = read_event(proc.stdout, "listening", 30)
        clients = [
            socket.create_connection(("127.0.0.1", listening["port"])) for _ in range(CONNECTIONS)
        ]
        truth = {}
        for _ in range(CONNECTIONS):
            event = read_event(proc.stdout, "connection", 30)
            truth[event["fd"]] = event
        read_event(proc.stdout, "ground_truth", 30)
        wait_until(lambda: len(waiters.thread_waiters(proc.pid)) == CONNECTIONS, 30)
        assert children_of(proc.pid) == []

        def fork() -> None:
            os.kill(proc.pid, signal.SIGUSR2)
            wait_until(lambda: len(children_of(proc.pid)) == 1, 10, "the fork")

        walked = walk(proc.pid, fork)
        assert len(children_of(proc.pid)) == 1
        assert walked.why == "" and walked.raced == 0, walked
        assert owned_by_fd(walked) == {f: (t["owned"], "") for f, t in truth.items()}
    finally:
        for c in clients:
            c.close()
        stop(proc)
