"""Memory idlebuf cannot read gives "unknown, with why and how many connections": never a
number, never a crash (issue 23's bad input).

The owned-state walk (probes.attach.owned.walk, and the recorder's walk_owned around it) on
fake process memory laid out as glibc lays out its heap: readable, it finds each
connection's state exactly; refused (EPERM, as Yama's ptrace_scope 3 refuses even root),
failing (EIO), or gone half-way (the process exited or exec'd during the walk), each
connection is unknown with why. The waiters (probes.attach.waiters) of a real child whose
blocked calls or memory may not be read (the reads refused here, as ptrace_scope 3 refuses
them): unknown with why, or, where no memory needs reading, found all the same; and the
analysis of such a recording: the waiter part unknown, not 0. No root needed.
"""

from __future__ import annotations

import builtins
import errno
import os
import subprocess
import sys
import time
from typing import Any

import pandas as pd
import pytest

from analysis.owned import owning_of
from analysis.waiters import Waiting, latest_waiters, waiter_parts, waiting_of
from probes.allocators.base import Mapping
from probes.attach import owned, waiters
from probes.format.meta import Meta
from probes.memory_side import walk_owned
from probes.process_memory import PAGE, MemoryReadError
from tests.unit.test_glibc_walk import FakeMemory, anon, chain, heap

HEAP_LO = 0x5555_5600_0000
STACKS = 0x7F00_0000_0000  # one mapping, a page of stack per connection
CONNS = 3
STATE = 112  # each connection's state: a chunk of 112 bytes its stack alone points to
SIZES = [0x290, *([STATE] * CONNS), 224, 8 * PAGE - 0x290 - CONNS * STATE - 224]


class HeapMemory(FakeMemory):
    """FakeMemory with the bulk reads the walk makes (read_into), as ProcessMemory's."""

    def read_into(self, addr: int, buf: memoryview) -> int:
        try:
            data = self.read(addr, len(buf))
        except MemoryReadError:
            return 0
        buf[: len(data)] = data
        return len(data)

    def gone(self) -> bool:
        return False


def server() -> tuple[HeapMemory, list[Mapping], list[owned.Roots]]:
    """A brk heap holding a chunk of state per connection, each pointed to from that
    connection's waiter's stack alone (its stack pointer at the page's start)."""
    mappings = [heap(HEAP_LO, HEAP_LO + 8 * PAGE), anon(STACKS, STACKS + CONNS * PAGE)]
    mem = HeapMemory(mappings)
    chain(mem, HEAP_LO, SIZES, set())
    roots = []
    for c in range(CONNS):
        state = HEAP_LO + 0x290 + c * STATE + 16  # the chunk's user memory
        sp = STACKS + c * PAGE
        mem.words(sp + 64, state)
        roots.append(
            owned.Roots(
                fd=10 + c, tid=100 + c, stack=(sp, sp + PAGE), stack_mapping=(sp, sp + PAGE)
            )
        )
    return mem, mappings, roots


def walked(mem: Any, mappings: list[Mapping], roots: list[owned.Roots]) -> owned.Walked:
    return owned.walk(4242, mem, mappings, roots, [], budget_s=10.0)


def unknowns(result: owned.Walked, connections: int = CONNS) -> list[tuple[int, str]]:
    """What the analysis makes of the walk's rows for `connections` idle connections: the
    covered count must be 0 and every connection unknown."""
    rows = pd.DataFrame(result.rows(1, "end"))
    idle = pd.DataFrame({"pid": [4242] * connections, "fd": [10 + c for c in range(connections)]})
    owning = owning_of(rows, idle)[4242]
    assert (owning.covered, owning.owned_bytes) == (0, 0), owning
    return [(u.connections, u.why) for u in owning.unknown]


def test_readable_each_connection_owns_its_state() -> None:
    """The control: the same fake, readable, gives every connection its chunk exactly -
    so the unknowns below are the failures', not the fake's."""
    mem, mappings, roots = server()
    result = walked(mem, mappings, roots)
    assert result.why == "" and result.raced == 0, result
    assert [(c.fd, c.owned_bytes, c.allocations, c.why) for c in result.connections] == [
        (10 + c, STATE, 1, "") for c in range(CONNS)
    ]


class Refused(HeapMemory):
    """Memory whose every read fails with `error` (EPERM: reading it is refused; EIO: it
    cannot be read)."""

    def __init__(self, mappings: list[Mapping], error: int) -> None:
        super().__init__(mappings)
        self.error = error

    def _fail(self, addr: int, size: int) -> MemoryReadError:
        return MemoryReadError(
            f"pid 4242: cannot read {size} bytes at {addr:#x}: {os.strerror(self.error)}"
        )

    def read(self, addr: int, size: int) -> bytes:
        raise self._fail(addr, size)

    def touched_pages(self, start: int, end: int) -> list[int]:
        raise self._fail(start, 8 * ((end - start) // PAGE))


@pytest.mark.parametrize("error", [errno.EPERM, errno.EIO], ids=["EPERM", "EIO"])
def test_memory_that_cannot_be_read_leaves_every_connection_unknown_with_why(error: int) -> None:
    _, mappings, roots = server()
    result = walked(Refused(mappings, error), mappings, roots)
    assert result.why.startswith("glibc's heap could not be read: ")
    assert os.strerror(error) in result.why
    assert result.heap_bytes == 0 and all(c.owned_bytes == 0 for c in result.connections)
    # each connection's row says why (not a known 0), and the analysis counts them
    assert all(r["why"] == result.why for r in result.rows(1, "end"))
    assert unknowns(result) == [(CONNS, f"owned state: {result.why}")]


class VanishingMemory(HeapMemory):
    """The process's memory as it exits (or execs) during the walk: the chunk chains read,
    then every read gives nothing (/proc/PID/mem reads 0 bytes once the address space is
    gone)."""

    def __init__(self, mappings: list[Mapping]) -> None:
        super().__init__(mappings)
        self.went = False

    def read_into(self, addr: int, buf: memoryview) -> int:
        self.went = True  # the chains are walked with read(); the snapshot is read_into()
        return 0

    def read(self, addr: int, size: int) -> bytes:
        if self.went:
            raise MemoryReadError(f"pid 4242: short read at {addr:#x}")
        return super().read(addr, size)

    def touched_pages(self, start: int, end: int) -> list[int]:
        if self.went:
            raise MemoryReadError("pid 4242: cannot read the page map")
        return super().touched_pages(start, end)

    def gone(self) -> bool:
        return self.went


def vanishing_server() -> tuple[VanishingMemory, list[Mapping], list[owned.Roots]]:
    mem, mappings, roots = server()
    gone = VanishingMemory(mappings)
    gone.pages = mem.pages
    return gone, mappings, roots


def test_memory_gone_during_the_walk_is_counted_and_makes_the_walk_unknown() -> None:
    """The walk itself counts the reads that failed (raced), never a silent zero; the
    recorder's walk_owned, seeing the memory gone, makes every connection unknown."""
    mem, mappings, roots = vanishing_server()
    bare = walked(mem, mappings, roots)
    assert bare.raced > 0, bare
    mem, mappings, roots = vanishing_server()
    result = walk_owned(4242, mem, mappings, roots, [], 10.0)  # type: ignore[arg-type]
    assert result.raced > 0
    assert result.why.startswith("the process's memory went away during the walk"), result
    assert unknowns(result) == [(CONNS, f"owned state: {result.why}")]


def test_reads_that_race_with_a_live_process_are_counted_not_made_unknown() -> None:
    """A read that fails while the process lives on (a mapping unmapped since) is a race:
    counted, the walk's figures kept (the report says how many raced)."""
    mem, mappings, roots = server()
    calls = [0]
    real = mem.read_into

    def one_fails(addr: int, buf: memoryview) -> int:
        calls[0] += 1
        return 0 if calls[0] == 1 else real(addr, buf)

    mem.read_into = one_fails  # type: ignore[method-assign]
    result = walk_owned(4242, mem, mappings, roots, [], 10.0)  # type: ignore[arg-type]
    assert result.raced >= 1 and result.why == "", result


# --- waiters ---------------------------------------------------------------------------------
EPERM = os.strerror(errno.EPERM)
CHILD = """
import socket, sys, threading
a, b = socket.socketpair()
c, d = socket.socketpair()
threading.Thread(target=lambda: a.recv(10), daemon=True).start()
print("ready", flush=True)
import select
p = select.poll()
p.register(c, select.POLLIN)
p.poll()
"""


@pytest.fixture
def child() -> Any:
    """A process with a thread blocked in recv() on a socket, its main thread in poll() on
    another socket alone: two connections' waiters."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    deadline = time.monotonic() + 10
    while len(waiters.thread_waiters(proc.pid)) < 2:
        assert time.monotonic() < deadline, "the child's threads did not wait"
        time.sleep(0.05)
    yield proc
    proc.kill()
    proc.wait()


def refusing(monkeypatch: pytest.MonkeyPatch, pid: int, what: tuple[str, ...]) -> None:
    """Opening `pid`'s /proc files whose names end with `what` refused (EPERM), as Yama's
    ptrace_scope 3 refuses /proc/PID/mem and /proc/PID/task/TID/syscall to root."""

    def refused(path: Any) -> bool:
        path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
        return path.startswith(f"/proc/{pid}/") and path.endswith(what)

    real_open, real_os_open = builtins.open, os.open

    def open_(file: Any, *args: Any, **kwargs: Any) -> Any:
        if refused(file):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), file)
        return real_open(file, *args, **kwargs)

    def os_open(path: Any, *args: Any, **kwargs: Any) -> int:
        if refused(path):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), path)
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)


def test_waiters_found_when_readable(child: subprocess.Popen[bytes]) -> None:
    found, why = waiters.waiters_of(child.pid)
    assert why == "" and sorted(w.call for w in found) == [7, 45], found  # poll, recvfrom


def test_blocked_calls_that_cannot_be_read_make_the_waiters_unknown(
    child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not "no waiter": any thread may be a connection's waiter."""
    refusing(monkeypatch, child.pid, ("/syscall",))
    found, why = waiters.waiters_of(child.pid)
    assert found == []
    assert why.startswith("what its threads wait in cannot be read (/proc/")
    assert why.endswith("/syscall: Operation not permitted)")


def test_memory_that_cannot_be_read_leaves_poll_s_waiter_unknown_not_recv_s(
    child: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread in recv() is known from its call alone; one in poll() needs its pollfd
    read from memory: refused, the process's waiters are unknown."""
    refusing(monkeypatch, child.pid, ("/mem",))
    found, why = waiters.waiters_of(child.pid)
    assert found == []
    assert why == f"what its threads wait in cannot be read (/proc/{child.pid}/mem: {EPERM})"


def test_recv_waiters_need_no_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process whose threads wait in recv() alone: its memory refused, they are found."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD.split("import select")[0] + "threading.Event().wait()"],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 10
        while not waiters.thread_waiters(proc.pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        refusing(monkeypatch, proc.pid, ("/mem",))
        found, why = waiters.waiters_of(proc.pid)
        assert why == "" and [w.call for w in found] == [45], found
    finally:
        proc.kill()
        proc.wait()


def test_the_analysis_makes_an_unreadable_process_s_waiter_unknown_not_0() -> None:
    why = (
        "what its threads wait in cannot be read (/proc/7/task/7/syscall: Operation not permitted)"
    )
    rows = pd.DataFrame(
        [{"ts_ns": 5, "pid": 7, "tid": 0, "fd": -1, "kind": "unreadable", "call": -1,
          "stack_bytes": 0, "stack_size": 0, "what": "end", "why": why}]
    )  # fmt: skip
    idle = pd.DataFrame({"pid": [7] * 4, "fd": [3, 4, 5, 6]})
    waiting = waiting_of(latest_waiters(rows), idle)
    assert waiting == {7: Waiting(why=why)}
    parts, total, reason = waiter_parts(Meta(kernel_stack_bytes=16384), waiting[7], 4)
    assert (parts, total, reason) == ([], None, why)
    # a process whose waiters were read, with none of its own: 0, known
    assert waiter_parts(Meta(kernel_stack_bytes=16384), Waiting(), 4) == ([], 0.0, None)
