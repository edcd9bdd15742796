"""The state a connection keeps alive, found without waiting for it to change: what its roots
alone reach in the heap, walked from outside the process.

A small C server (workloads/c/owned_state.c) sets up each of 23 connections with a state of
known size - a struct pointing to 3 allocations and a read buffer - held by the connection's
roots alone, while a global list or array also points at every connection's struct (global
data cannot veto). The truth is glibc's own count of the bytes in use (mallinfo2) as each
connection was set up: its state, and for a thread, what glibc allocates for the thread
itself (its TLS's dtv, its tcache). Three servers:
- threads: a thread per connection, blocked in recv() on its buffer (the buffer part, left
  out of the owned state), its state held by its stack;
- epoll: one event loop; epoll's data for each connection is its struct (no read posted:
  the buffer is in the owned state, not told apart);
- slots: one event loop whose connection structs are slots of one array (as nginx keeps
  them): each connection's root is its slot. Without that, the array is every
  connection's at once, and what hangs from it is shared: owned 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probes.format import schema
from probes.format.reader import read_meta, read_table
from tests.helpers import (
    ROOT,
    RecorderProcess,
    compiled_c,
    finish_recording,
    idlebuf,
    read_event,
    report_json,
    stop,
)

pytestmark = pytest.mark.bpf

CONNECTIONS = 23


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compiled_c(tmp_path_factory.mktemp("c"), "owned_state", "-pthread")


def record(trace: Path, server: Path, mode: str) -> dict[int, dict]:
    """Record the server with --memory while 23 connections sit idle; its truth per fd."""
    recorder = RecorderProcess(
        trace, "--memory", "--", str(server), "0", str(CONNECTIONS), mode, stdout=subprocess.PIPE
    )
    clients: list[socket.socket] = []
    truth: dict[int, dict] = {}
    try:
        stdout = recorder.proc.stdout
        assert stdout is not None
        listening = read_event(stdout, "listening", 60)
        clients = [
            socket.create_connection(("127.0.0.1", listening["port"])) for _ in range(CONNECTIONS)
        ]
        for _ in range(CONNECTIONS):
            event = read_event(stdout, "connection", 30)
            truth[event["fd"]] = event
        read_event(stdout, "ground_truth", 30)
        time.sleep(2.5)  # every connection idle past the threshold (and a socket sample)
        finish_recording(recorder.proc, timeout=120)
    finally:
        for c in clients:
            c.close()
        stop(recorder.proc)
    return truth


@pytest.mark.parametrize("mode", ["threads", "epoll", "slots"])
def test_each_connection_owns_exactly_what_its_roots_alone_reach(
    tmp_path: Path, server: Path, mode: str
) -> None:
    trace = tmp_path / "trace"
    truth = record(trace, server, mode)
    meta = read_meta(trace)
    assert meta.format_version == schema.FORMAT_VERSION
    rows = read_table(trace, schema.OWNED, meta)
    end = rows[rows["what"] == "end"]
    (process,) = end[end["fd"] < 0].to_dict("records")
    assert process["allocator"] == "glibc" and process["why"] == ""
    assert process["took_ms"] < 10_000 and process["raced"] == 0, process
    found = {r["fd"]: r for r in end[end["fd"] >= 0].to_dict("records")}
    assert set(found) == set(truth)
    root = "stack" if mode == "threads" else "epoll"
    for fd, t in truth.items():
        r = found[fd]
        assert (r["root"], r["how"], r["why"]) == (root, "reachable", ""), r
        # exact to glibc's rounding: every chunk of the state, and nothing else
        assert r["owned_bytes"] == t["owned"], (fd, r, t)
        # a read posted on it: its buffer's chunk is the buffer part, not owned state
        assert r["buffer_bytes"] == (t["buffer"] if mode == "threads" else 0), (fd, r, t)
        assert t["owned"] >= t["graph"]  # a thread's own (dtv, tcache) come on top
    assert process["shared_bytes"] == 0
    # the report: the mean over the 23 idle connections, found by the walk
    done = idlebuf("report", "--json", "--connections", str(trace))
    assert done.returncode == 0, done.stderr
    (proc,) = [p for p in json.loads(done.stdout)["processes"] if p["pid"] == process["pid"]]
    cost = proc["memory"]["per_idle_connection"]
    mean = sum(t["owned"] for t in truth.values()) / CONNECTIONS
    assert (cost["owned_how"], cost["owned_connections"]) == ("reachable", CONNECTIONS)
    assert cost["owned_bytes"] == round(mean, 1)
    assert not [u for u in cost["whole_unknown"] if u["why"].startswith("owned state")]
    table = {c["fd"]: c for c in proc["memory"]["connection_table"] if c["closed_ns"] is None}
    assert {fd: table[fd]["owned_bytes"] for fd in truth} == {
        fd: t["owned"] for fd, t in truth.items()
    }


def record_late(trace: Path, command: list[str], duration: str) -> dict[int, dict]:
    """`record -p --memory` for `duration` seconds on a server (workloads/c/*_state.c)
    whose 23 connections sit idle already; its truth per fd (its "connection" lines)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE)
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        listening = read_event(proc.stdout, "listening", 60)
        clients = [
            socket.create_connection(("127.0.0.1", listening["port"])) for _ in range(CONNECTIONS)
        ]
        truth = {}
        for _ in range(CONNECTIONS):
            event = read_event(proc.stdout, "connection", 30)
            truth[event["fd"]] = event
        read_event(proc.stdout, "ground_truth", 30)
        done = idlebuf(
            "record", "-o", str(trace), "-p", str(proc.pid), "--memory", "--duration", duration
        )
        assert done.returncode == 0, done.stderr
    finally:
        for c in clients:
            c.close()
        stop(proc)
    return truth


def test_attached_late_the_walk_at_attach_finds_the_same(tmp_path: Path, server: Path) -> None:
    """`record -p` on a server whose 23 connections sit idle already: the walk at attach
    (before any event) and the one at the end both find every connection's state exactly."""
    trace = tmp_path / "trace"
    events = record_late(trace, [str(server), "0", str(CONNECTIONS), "threads"], "1.5")
    truth = {fd: e["owned"] for fd, e in events.items()}
    rows = read_table(trace, schema.OWNED, read_meta(trace))
    for what in ("attach", "end"):
        walk = rows[(rows["what"] == what) & (rows["fd"] >= 0)]
        assert dict(zip(walk["fd"].tolist(), walk["owned_bytes"].tolist())) == truth, what
        assert set(walk["why"].tolist()) == {""}, what


@pytest.fixture(scope="module")
def uring_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compiled_c(tmp_path_factory.mktemp("c"), "uring_state", "-luring")


def test_io_uring_user_data_roots_each_connection_s_state(
    tmp_path: Path, uring_server: Path
) -> None:
    """`record -p` on an io_uring event loop (workloads/c/uring_state.c) whose 23 idle
    connections each have a RECV posted with user_data = the connection's struct: found at
    attach in the ring's cancel table, each request's user_data roots its connection's state
    (its struct and 3 allocations; its buffer, a RECV's, is the buffer part), exactly as
    glibc counted it - though a global array points at every struct too."""
    trace = tmp_path / "trace"
    truth = record_late(trace, [str(uring_server), "0", str(CONNECTIONS)], "2")
    rows = read_table(trace, schema.OWNED, read_meta(trace))
    end = rows[(rows["what"] == "end") & (rows["fd"] >= 0)]
    found = {r["fd"]: r for r in end.to_dict("records")}
    assert set(found) == set(truth)
    for fd, t in truth.items():
        r = found[fd]
        assert (r["root"], r["how"], r["why"]) == ("uring", "reachable", ""), r
        assert (r["owned_bytes"], r["buffer_bytes"]) == (t["owned"], t["buffer"]), (r, t)
    (proc_row,) = report_json(trace)["processes"]
    cost = proc_row["memory"]["per_idle_connection"]
    assert (cost["owned_how"], cost["owned_connections"]) == ("reachable", CONNECTIONS)
    assert cost["owned_bytes"] == round(sum(t["owned"] for t in truth.values()) / CONNECTIONS, 1)


def test_a_python_thread_per_connection_server_s_whole_cost_is_known(tmp_path: Path) -> None:
    """The demo's threaded server (workloads/threaded_server.py, CPython) attached late with
    23 idle connections, each a thread blocked in recv() into a 16 KiB bytearray: its
    objects live in pymalloc's pools and its frames in the thread's data-stack chunk, both
    walked, so the whole cost is known. The truth is CPython's own count of what it
    allocated (tracemalloc) as the connections were set up, less the buffer (the buffer
    part); the owned state adds each thread's frame chunk, as resident pages (at most 16
    KiB), which tracemalloc does not trace."""
    env = dict(os.environ, PYTHONTRACEMALLOC="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "workloads.threaded_server", "--port", "0"],
        stdout=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    clients: list[socket.socket] = []
    trace = tmp_path / "trace"
    try:
        assert proc.stdout is not None
        port = read_event(proc.stdout, "listening", 30)["port"]

        def traced() -> int:
            proc.send_signal(signal.SIGUSR1)
            assert proc.stdout is not None
            return int(read_event(proc.stdout, "ground_truth", 30)["python_traced_bytes"])

        before = traced()
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(CONNECTIONS)]
        deadline = time.monotonic() + 10
        while threads_in_recv(proc.pid) < CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.05)
        grown = (traced() - before) / CONNECTIONS
        done = idlebuf(
            "record", "-o", str(trace), "-p", str(proc.pid), "--memory", "--duration", "2"
        )
        assert done.returncode == 0, done.stderr
    finally:
        for c in clients:
            c.close()
        stop(proc)
    rows = read_table(trace, schema.OWNED, read_meta(trace))
    end = rows[(rows["what"] == "end") & (rows["fd"] >= 0)]
    (process,) = rows[(rows["what"] == "end") & (rows["fd"] < 0)].to_dict("records")
    assert (process["allocator"], process["why"]) == ("glibc+pymalloc", ""), process
    assert len(end) == CONNECTIONS and set(end["why"]) == {""}
    assert set(end["buffer_bytes"]) == {16384 + 16}  # the bytearray's glibc chunk
    objects = grown - (16384 + 57)  # tracemalloc counts the bytearray's request
    typical = float(end["owned_bytes"].median())
    assert objects <= typical <= objects + 16384, (typical, objects)
    (proc_row,) = report_json(trace)["processes"]
    cost = proc_row["memory"]["per_idle_connection"]
    assert (cost["owned_how"], cost["owned_connections"]) == ("reachable", CONNECTIONS)
    assert cost["total_bytes"] is not None and cost["whole_unknown"] == []


def threads_in_recv(pid: int) -> int:
    """Threads of `pid` blocked in recvfrom (45)."""
    count = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                count += f.read().split(" ", 1)[0] == "45"
        except OSError:
            pass
    return count
