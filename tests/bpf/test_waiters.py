"""What carries an idle connection's wait: a thread blocked on it alone, found and costed.

A small C server (workloads/c/stack_threads.c) serves each of 23 connections with a thread of
its own that touches a known part of its stack and then waits on its socket - in recv(), or
in poll() on that socket alone (as MariaDB's threads do). The truth is outside idlebuf: the
kernel's stack memory growth as the threads started (/proc/meminfo KernelStack), the slab
caches' geometry (/sys/kernel/slab), and the bytes the program wrote on each stack."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, RecorderProcess, read_event, report_json, stop

pytestmark = pytest.mark.bpf

CONNECTIONS, TOUCHED = 23, 100_003
PAGE = os.sysconf("SC_PAGE_SIZE")


def kernel_stack() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("KernelStack:"))


def slab_cost(cache: str) -> float:
    where = Path("/sys/kernel/slab") / cache
    order = int((where / "order").read_text())
    return (PAGE << order) / int((where / "objs_per_slab").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is not installed (scripts/bootstrap installs it)")
    out = tmp_path_factory.mktemp("c") / "stack_threads"
    subprocess.run(
        ["gcc", "-O2", "-pthread", "-o", str(out), str(ROOT / "workloads/c/stack_threads.c")],
        check=True,
    )
    return out


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
        before = kernel_stack()
        clients = [
            socket.create_connection(("127.0.0.1", listening["port"])) for _ in range(CONNECTIONS)
        ]
        truth = read_event(stdout, "ground_truth", 30)
        grown = kernel_stack() - before  # the 23 threads' kernel stacks
        time.sleep(2.5)  # every connection idle past the threshold (and a socket sample)
        recorder.proc.send_signal(2)
        _, err = recorder.proc.communicate(timeout=60)
        assert recorder.proc.returncode == 0, err.decode()
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
    assert abs(thread_size - grown / CONNECTIONS) <= 0.10 * thread_size
    assert parts[("thread", "kernel stack")]["bytes"] == meta["kernel_stack_bytes"]
    assert parts[("thread", "task_struct")]["bytes"] == round(slab_cost("task_struct"), 1)
    assert parts[("thread", "pid")]["bytes"] == round(slab_cost("pid"), 1)
    # the user stack: what each thread's mapping holds in RAM as the thread itself counted it
    # (mincore), at least the bytes it wrote; never the 356 KiB reservation
    stack = parts[("thread", "user stack")]["bytes"]
    resident = truth["stack_resident"] / CONNECTIONS
    assert -(-TOUCHED // PAGE) * PAGE <= resident <= stack <= resident + PAGE, (stack, resident)
    assert all(p["provenance"] == "at_end" for p in parts.values())
    truth_waiter = grown / CONNECTIONS + slab_cost("task_struct") + slab_cost("pid") + resident
    assert abs(cost["waiter_bytes"] - truth_waiter) <= 0.10 * truth_waiter
    # what a readiness design would free: at least the 23 waiters
    saving = {p["part"]: p["bytes"] for p in cost["saving_parts"]}
    assert saving["waiters of idle connections"] == pytest.approx(
        cost["waiter_bytes"] * CONNECTIONS, abs=CONNECTIONS
    )
