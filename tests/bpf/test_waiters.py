"""What carries an idle connection's wait: a thread blocked on it alone, found and costed.

A small C server (workloads/c/stack_threads.c) serves each of 23 connections with a thread of
its own that touches a known part of its stack and then waits on its socket - in recv(), or
in poll() on that socket alone (as MariaDB's threads do). The truth is outside idlebuf: the
kernel's stack memory growth as the threads started (/proc/meminfo KernelStack), the slab
caches' geometry (/sys/kernel/slab), and the bytes the program wrote on each stack."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import (
    RecorderProcess,
    Recording,
    compiled_c,
    finish_recording,
    read_event,
    report_json,
    start_loadgen,
    stop,
)
from tests.real_servers import MemoryGroup

pytestmark = pytest.mark.bpf

CONNECTIONS, TOUCHED = 23, 100_003
PAGE = os.sysconf("SC_PAGE_SIZE")


def slab_cost(cache: str) -> float:
    where = Path("/sys/kernel/slab") / cache
    order = int((where / "order").read_text())
    return (PAGE << order) / int((where / "objs_per_slab").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compiled_c(tmp_path_factory.mktemp("c"), "stack_threads", "-pthread")


@pytest.mark.parametrize("waits_in", ["recv", "poll"])
def test_a_thread_per_connection_is_each_connection_s_waiter(
    tmp_path: Path, server: Path, waits_in: str
) -> None:
    trace = tmp_path / "trace"
    command = [str(server), "0", str(CONNECTIONS), str(TOUCHED)]
    if waits_in == "poll":
        command.append("poll")
    recorder = RecorderProcess(trace, "--memory", "--", *command, stdout=subprocess.PIPE)
    clients: list[socket.socket] = []
    try:
        stdout = recorder.proc.stdout
        assert stdout is not None
        listening = read_event(stdout, "listening", 60)
        pid = listening["pid"]
        # each thread's kernel stack as KernelStack grew when it started, in a window opened
        # when the machine held still and in which the machine's tasks grew by one, the
        # thread (test_a_process_per_connection_...: another process's threads, the
        # recorder's and this one's included, cannot move it then)
        stacks: list[int] = []
        threads = tasks_of(pid)
        for _ in range(CONNECTIONS):
            before = still_counters()
            clients.append(socket.create_connection(("127.0.0.1", listening["port"])))
            threads.add(waiting(lambda: tasks_of(pid), threads, (waits_in,)))
            after = vm_counters()
            if after["tasks"] - before["tasks"] == 1:
                stacks.append(after["KernelStack"] - before["KernelStack"])
        truth = read_event(stdout, "ground_truth", 30)
        time.sleep(2.5)  # every connection idle past the threshold (and a socket sample)
        finish_recording(recorder.proc)
    finally:
        for c in clients:
            c.close()
        stop(recorder.proc)
    assert truth["waits_in"] == waits_in
    process = next(p for p in report_json(trace)["processes"] if p["pid"] == truth["pid"])
    memory = process["memory"]
    assert memory["connections"] == {"open": CONNECTIONS, "idle": CONNECTIONS}
    # in recv(), each thread has a read posted; in poll(), none (waiting for readiness)
    assert process["posted_reads"]["now"] == (CONNECTIONS if waits_in == "recv" else 0)
    cost = memory["per_idle_connection"]
    parts = {(p["waiter"], p["part"]): p for p in cost["waiter_parts"]}
    assert set(parts) == {
        ("thread", "kernel stack"),
        ("thread", "task_struct"),
        ("thread", "pid"),
        ("thread", "user stack"),
    }
    meta = json.loads((trace / "meta.json").read_text())
    # the kernel stack: THREAD_SIZE as the kernel's own count grew, thread by thread
    thread_size = meta["kernel_stack_bytes"]
    assert len(stacks) >= 3, f"{len(stacks)} still windows"  # a median of 3 at least
    grown = statistics.median(stacks)  # a thread's
    assert abs(thread_size - grown) <= 0.10 * thread_size, stacks
    assert parts[("thread", "kernel stack")]["bytes"] == meta["kernel_stack_bytes"]
    assert parts[("thread", "task_struct")]["bytes"] == round(slab_cost("task_struct"), 1)
    assert parts[("thread", "pid")]["bytes"] == round(slab_cost("pid"), 1)
    # the user stack: what each thread's mapping holds in RAM as the thread itself counted it
    # (mincore), at least the bytes it wrote; never the 356 KiB reservation
    stack = parts[("thread", "user stack")]["bytes"]
    resident = truth["stack_resident"] / CONNECTIONS
    assert -(-TOUCHED // PAGE) * PAGE <= resident <= stack <= resident + PAGE, (stack, resident)
    assert all(p["provenance"] == "at_end" for p in parts.values())
    truth_waiter = grown + slab_cost("task_struct") + slab_cost("pid") + resident
    assert abs(cost["waiter_bytes"] - truth_waiter) <= 0.10 * truth_waiter
    # what a readiness design would free: at least the 23 waiters
    saving = {p["part"]: p["bytes"] for p in cost["saving_parts"]}
    assert saving["waiters of idle connections"] == pytest.approx(
        cost["waiter_bytes"] * CONNECTIONS, abs=CONNECTIONS
    )


def meminfo(*keys: str) -> dict[str, int]:
    with open("/proc/meminfo") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return {k: fields[k] for k in keys}


PRIVATE = 1_000_003  # bytes each child writes of its own
KERNEL = ("KernelStack", "PageTables")  # the kernel's counters a child's start grows


def vm_counters() -> dict[str, int]:
    """KernelStack and PageTables as of now, every CPU's pending changes folded in
    (/proc/sys/vm/stat_refresh: else they lag by up to a second), and the machine's tasks
    (/proc/loadavg)."""
    Path("/proc/sys/vm/stat_refresh").write_text("1")
    counters = meminfo(*KERNEL)
    counters["tasks"] = tasks()
    return counters


def tasks() -> int:
    return int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])


def still_counters(timeout: float = 2.0) -> dict[str, int]:
    """vm_counters() at a moment the machine holds still - its task count alike in three
    readings 10 ms apart: no task started or ended for 20 ms - or once `timeout` has
    passed. (The task count is cheap to read; folding the counters, stat_refresh, makes
    every CPU run a kernel worker: not a hundred times a second beside the recorder.)"""
    deadline = time.monotonic() + timeout
    readings = [tasks()]
    while time.monotonic() < deadline:
        time.sleep(0.01)
        readings = [*readings[-2:], tasks()]
        if len(readings) == 3 and readings[0] == readings[1] == readings[2]:
            break
    return vm_counters()


CALLS = {"recv": "45", "poll": "7"}  # recvfrom, poll (x86_64)


def tasks_of(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def children_of(pid: int) -> set[int]:
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def waiting(now: Callable[[], set[int]], known: set[int], calls: tuple[str, ...]) -> int:
    """The task of `now()` not in `known`, once it waits in one of `calls` (a thread, or a
    child, done starting: its stack or private memory written)."""
    deadline = time.monotonic() + 10
    while True:
        assert time.monotonic() < deadline, f"no new task waiting in {calls}"
        for task in now() - known:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{task}/syscall").read_text().split()[0] in map(CALLS.get, calls):
                    return task
        time.sleep(0.005)  # (polled faster, it took the CPU the recorder needed)


@pytest.fixture(scope="module")
def forking(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compiled_c(tmp_path_factory.mktemp("c"), "fork_per_connection")


def test_a_process_per_connection_is_its_connection_s_waiter(tmp_path: Path, forking: Path) -> None:
    """A child forked for each of 23 connections (PostgreSQL's backends, pre-fork servers):
    the kernel's part of each process, and its private memory as the connection's owned
    state. The truth is the kernel's own counters, out of reach of whatever else the
    machine runs: the anonymous memory charged to a memory cgroup that holds the server and
    its children alone (memory.stat rss); the kernel stacks and page tables
    (/proc/meminfo's KernelStack, PageTables) taken as each child started, connection by
    connection, in a window of milliseconds opened when the machine holds still: the
    median child's over the windows in which the machine's tasks grew by one, the child
    (in the others, another process's task started or ended; a window disturbed some
    other way is an outlier, which the median leaves out)."""
    trace = tmp_path / "trace"
    recorder = RecorderProcess(
        trace, "--memory", "--", str(forking), str(CONNECTIONS), str(PRIVATE),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    group = MemoryGroup("fork-per-connection")
    clients: list[socket.socket] = []
    grown: dict[str, list[int]] = {k: [] for k in KERNEL}
    try:
        stdout = recorder.proc.stdout
        assert stdout is not None
        listening = read_event(stdout, "listening", 60)
        server = listening["pid"]
        # the server moves into the group before its first child: what it had is charged
        # where it was, what it and its children take from now on to the group
        (group.path / "cgroup.procs").write_text(str(server))
        anon_before = group.anon()
        children: set[int] = set()
        for _ in range(CONNECTIONS):
            before = still_counters()
            clients.append(socket.create_connection(("127.0.0.1", listening["port"])))
            children.add(waiting(lambda: children_of(server), children, ("recv",)))
            after = vm_counters()
            if after["tasks"] - before["tasks"] == 1:
                for k in KERNEL:
                    grown[k].append(after[k] - before[k])
        truth = read_event(stdout, "ground_truth", 30)
        assert set(truth["children"]) == children
        time.sleep(2.5)  # every connection idle past the threshold (and a socket sample)
        anon_after = group.anon()  # the group's statistics are flushed every 2 s at least
        finish_recording(recorder.proc)
    finally:
        for c in clients:
            c.close()
        stop(recorder.proc)
        with contextlib.suppress(OSError):
            group.remove()
    # a median of 3 at least (seen under load: 4 windows of 23, all 16,384 bytes)
    assert len(grown["KernelStack"]) >= 3, f"{len(grown['KernelStack'])} still windows"
    per_child = {k: statistics.median(v) for k, v in grown.items()}
    per_child["AnonPages"] = (anon_after - anon_before) / CONNECTIONS
    report = report_json(trace)
    children_ = {p["pid"]: p for p in report["processes"] if p["pid"] in truth["children"]}
    assert len(children_) == CONNECTIONS
    owned, parts = [], []
    for pid, p in children_.items():
        memory = p["memory"]
        assert memory["connections"] == {"open": 1, "idle": 1}, pid
        cost = memory["per_idle_connection"]
        assert cost["owned_how"] == "private", pid
        assert cost["owned_bytes"] >= PRIVATE, pid  # what it wrote, at least
        by_part = {(w["waiter"], w["part"]): w["bytes"] for w in cost["waiter_parts"]}
        assert (
            by_part[("process", "kernel stack")]
            == json.loads((trace / "meta.json").read_text())["kernel_stack_bytes"]
        )
        assert by_part[("process", "task_struct")] == round(slab_cost("task_struct"), 1)
        assert by_part[("process", "mm_struct")] == round(slab_cost("mm_struct"), 1)
        assert by_part[("process", "vm_area_struct")] > 10 * slab_cost("vm_area_struct")
        owned.append(cost["owned_bytes"] + cost["buffer_bytes"])  # its private memory
        parts.append(by_part)
    mean = sum(owned) / len(owned)
    # its private memory against the anonymous memory the kernel gave the children
    assert abs(mean - per_child["AnonPages"]) <= 0.10 * per_child["AnonPages"], (mean, per_child)
    stacks = sum(p[("process", "kernel stack")] for p in parts) / len(parts)
    assert abs(stacks - per_child["KernelStack"]) <= 0.10 * stacks, (per_child, grown)
    # page tables: within the per-CPU drift the global count was once read with (vmstat's
    # threshold, at most 125 pages a CPU on a machine this size: a few pages a child),
    # though stat_refresh now folds it in before each reading
    tables = sum(p[("process", "page tables")] for p in parts) / len(parts)
    drift = (os.cpu_count() or 1) * 125 * PAGE / CONNECTIONS
    assert abs(tables - per_child["PageTables"]) <= drift, (tables, per_child, grown, drift)


def test_a_goroutine_parked_in_a_read_is_its_connection_s_waiter(tmp_path: Path) -> None:
    """A real Go server (workloads/go_server): each of 23 idle connections is read by a
    goroutine of its own, parked in conn.Read. Its waiter is that goroutine: its stack and
    its runtime.g. The truth is the Go runtime's own count of goroutine stacks
    (runtime.MemStats.StackInuse) as the connections arrived."""
    from tests.bpf.test_attach_late import GO_SERVER

    assert GO_SERVER.exists(), "workloads/go_server is not built: run scripts/bootstrap"
    trace = tmp_path / "trace"
    with Recording(trace, [str(GO_SERVER), "--buffer-size", "4096"], ("--memory",)) as rec:
        before = rec.truth()
        load = start_loadgen(rec.port, CONNECTIONS, 0, 1, 100, "--hold", "60")
        try:
            truth = rec.wait_for(lambda t: t["posted_reads"] == CONNECTIONS)
            time.sleep(2.5)  # idle past the threshold
            rec.finish()
        finally:
            stop(load)
    # the runtime's stack memory over the goroutines it started; StackInuse also counts the
    # stacks each P keeps cached for the next goroutines (up to 16 KiB each: _StackCacheSize/2)
    started = truth["goroutines"] - before["goroutines"]
    assert started == CONNECTIONS
    grown = (truth["stack_inuse"] - before["stack_inuse"]) / started
    cached = (os.cpu_count() or 1) * (16 << 10) / started
    process = next(p for p in report_json(trace)["processes"] if p["pid"] == rec.pid)
    cost = process["memory"]["per_idle_connection"]
    assert process["memory"]["connections"]["idle"] == CONNECTIONS
    parts = {(p["waiter"], p["part"]): p["bytes"] for p in cost["waiter_parts"]}
    assert set(parts) == {("goroutine", "stack"), ("goroutine", "g")}
    stack = parts[("goroutine", "stack")]
    assert stack >= 2048 and abs(stack - grown) <= cached, (parts, grown)
    assert 200 <= parts[("goroutine", "g")] <= 1024  # sizeof(runtime.g), from its DWARF
    assert cost["waiter_bytes"] == round(sum(parts.values()), 1)
    assert cost["waiter_reason"] is None
