"""Posted reads from blocking syscalls, on real probes, against a workload with exact numbers.

101 connections, each served by a thread blocked in recv() into its own 16,411-byte buffer;
7 of them exchange exactly 3 messages of 1,000 bytes, one at a time. At the end: 101 posted
reads, 101 x 16,411 pinned bytes, 21 reads completed, 21,000 bytes received, no drops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from probes.format.reader import open_trace, read_meta
from probes.format.schema import PostFlag
from tests.helpers import (
    read_event,
    report_json,
    spawn_idlebuf,
    spawn_workload,
    start_loadgen,
    stop,
    threads_in_socket_reads,
    wait_for_trace_started,
    wait_until,
)

pytestmark = pytest.mark.bpf

CONNECTIONS, ACTIVE, MESSAGES, SIZE, BUFFER = 101, 7, 3, 1000, 16411
SERVER_ARGS = ("--buffer-size", str(BUFFER), "--noise")
PAYLOAD_MARK = "Q7PAYLOADZ"


def start_load(port: int, wait_start: bool = False) -> subprocess.Popen[bytes]:
    load = start_loadgen(
        port,
        CONNECTIONS,
        ACTIVE,
        MESSAGES,
        SIZE,
        "--hold-stdin",
        "--hold",
        "120",
        *(["--wait-start"] if wait_start else []),
        stdin=subprocess.PIPE,
    )
    read_event(load.stdout, "connected", 60)  # type: ignore[arg-type]
    return load


def run_load(port: int) -> tuple[subprocess.Popen[bytes], dict]:
    load = start_load(port)
    return load, read_event(load.stdout, "done", 60)  # type: ignore[arg-type]


def finish(server_pid: int, recorder: subprocess.Popen[bytes], settle: float = 0.0) -> None:
    """SIGINT once every server thread is blocked in recv, and `settle` seconds later."""
    wait_until(
        lambda: threads_in_socket_reads(server_pid) == CONNECTIONS,
        30,
        f"{CONNECTIONS} server threads blocked in recv",
    )
    time.sleep(settle)
    recorder.send_signal(signal.SIGINT)


def wait_ok(recorder: subprocess.Popen[bytes]) -> None:
    _, err = recorder.communicate(timeout=60)
    assert recorder.returncode == 0, err.decode()


def assert_posted(report: dict, server_pid: int, truth: dict) -> dict:
    """The reads posted at the end, exactly; only socket reads. Returns the process."""
    (proc,) = [p for p in report["processes"] if p["pid"] == server_pid]
    assert report["complete"] is True
    assert all(v == 0 for v in report["drops"].values()), report["drops"]
    assert proc["posted_reads"]["now"] == CONNECTIONS == truth["connections_open"]
    assert proc["pinned_bytes"]["now"] == CONNECTIONS * BUFFER == truth["pinned_bytes"]
    # only recvfrom on sockets: the pipe reader and the file reads are not there
    assert list(proc["by_source"]) == ["syscall"]
    assert list(proc["by_source"]["syscall"]["by_op"]) == ["recvfrom"]
    return proc


def assert_exact(report: dict, server_pid: int, truth: dict, load_done: dict) -> None:
    proc = assert_posted(report, server_pid, truth)
    assert proc["reads_completed"] == ACTIVE * MESSAGES == load_done["requests"]
    assert proc["bytes_received"] == ACTIVE * MESSAGES * SIZE == load_done["bytes_sent"]


def assert_buffers_match(trace: Path, truth: dict) -> None:
    """Each still-posted read carries the exact buffer the server handed over."""
    t = open_trace(trace)
    from analysis.reads import read_intervals

    posted = read_intervals(t["posts"], t["completions"])
    posted = posted[posted["end_ns"].isna()]
    assert sorted(zip(posted["fd"], posted["addr"], posted["len"])) == sorted(
        (b["fd"], b["addr"], b["len"]) for b in truth["buffers"]
    )


def test_attached_from_the_start(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    recorder = spawn_idlebuf(
        "record",
        "-o",
        str(trace),
        "--",
        os.sys.executable,
        "-m",
        "workloads.threaded_server",
        *SERVER_ARGS,
    )
    try:
        listening = read_event(recorder.stdout, "listening", 60)  # type: ignore[arg-type]
        load, done = run_load(listening["port"])
        finish(listening["pid"], recorder)
        # the recorder terminated the server, which printed its ground truth on the way out
        truth = read_event(recorder.stdout, "ground_truth", 10)  # type: ignore[arg-type]
        wait_ok(recorder)
        stop(load)
    finally:
        stop(recorder)
    assert truth["reads_completed"] == ACTIVE * MESSAGES
    report = report_json(trace)
    assert_exact(report, listening["pid"], truth, done)
    assert_buffers_match(trace, truth)


@pytest.mark.parametrize("record_args", [(), ("--min-wait", "50")], ids=["every-call", "min-wait"])
def test_attached_late_sees_the_same(tmp_path: Path, record_args: tuple[str, ...]) -> None:
    """Connections open and threads blocked before the recorder attaches; then the exchange.

    With --min-wait (the scheduler hooks here) the reads found blocked are seeded into each
    thread's own storage, where the return hook finds them; the server's pipe reader, blocked
    in read() all along, is seen waiting too and must not pass for a socket read.
    """
    trace = tmp_path / "trace"
    server = spawn_workload("workloads.threaded_server", *SERVER_ARGS)
    try:
        listening = read_event(server.stdout, "listening", 30)  # type: ignore[arg-type]
        load = start_load(listening["port"], wait_start=True)
        wait_until(
            lambda: threads_in_socket_reads(server.pid) == CONNECTIONS, 30, "server threads blocked"
        )
        recorder = spawn_idlebuf("record", "-o", str(trace), "-p", str(server.pid), *record_args)
        try:
            wait_for_trace_started(trace)
            load.stdin.write(b"go\n")  # type: ignore[union-attr]
            load.stdin.flush()  # type: ignore[union-attr]
            done = read_event(load.stdout, "done", 60)  # type: ignore[arg-type]
            # with --min-wait a read is recorded once it has waited 50 ms
            finish(server.pid, recorder, settle=0.3 if record_args else 0.0)
            wait_ok(recorder)
        finally:
            stop(recorder)
        server.send_signal(signal.SIGUSR1)
        truth = read_event(server.stdout, "ground_truth", 10)  # type: ignore[arg-type]
        stop(load)
    finally:
        stop(server)
    report = report_json(trace)
    if record_args:
        assert_posted(report, server.pid, truth)
        assert read_meta(trace).probes.reads.wait_hooks == "scheduler"
    else:
        assert_exact(report, server.pid, truth, done)
    assert_buffers_match(trace, truth)
    t = open_trace(trace)
    # every connection's first read was found blocked by the /proc scan...
    scanned = t["posts"][(t["posts"]["flags"] & PostFlag.SCANNED) != 0]
    assert len(scanned) == CONNECTIONS
    # ...and the active ones' were seen returning, with the first message
    later = t["completions"][t["completions"]["tid"].isin(scanned["tid"])]
    first = later.sort_values("ts_ns").drop_duplicates("tid")
    assert len(first) == ACTIVE and set(first["ret"]) == {SIZE}


def test_killed_recording_stays_readable(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    server = spawn_workload("workloads.threaded_server", *SERVER_ARGS)
    try:
        listening = read_event(server.stdout, "listening", 30)  # type: ignore[arg-type]
        load, _ = run_load(listening["port"])
        wait_until(
            lambda: threads_in_socket_reads(server.pid) == CONNECTIONS, 30, "server threads blocked"
        )
        recorder = spawn_idlebuf("record", "-o", str(trace), "-p", str(server.pid))
        wait_for_trace_started(trace)
        wait_until(lambda: any((trace / "posts").glob("part-*.parquet")), 30, "a flush")
        recorder.kill()
        recorder.wait()
        stop(load)
    finally:
        stop(server)
    report = report_json(trace)
    assert report["complete"] is False
    (proc,) = report["processes"]
    assert proc["posted_reads"]["now"] == CONNECTIONS


def test_trace_is_private_and_holds_no_payload(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    server = spawn_workload("workloads.threaded_server", "--buffer-size", str(BUFFER))
    try:
        listening = read_event(server.stdout, "listening", 30)  # type: ignore[arg-type]
        recorder = spawn_idlebuf("record", "-o", str(trace), "-p", str(server.pid))
        wait_for_trace_started(trace)
        import socket

        with socket.create_connection(("127.0.0.1", listening["port"])) as s:
            for _ in range(3):
                s.sendall(PAYLOAD_MARK.encode() * 50)
                s.recv(4096)
        finish_count = lambda: len(list((trace / "posts").glob("part-*")))  # noqa: E731
        wait_until(lambda: finish_count() > 0, 30, "a flush")
        recorder.send_signal(signal.SIGINT)
        recorder.communicate(timeout=60)
    finally:
        stop(server)
    for path in [trace, *trace.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    t = open_trace(trace)
    assert t["completions"]["ret"].tolist().count(len(PAYLOAD_MARK) * 50) >= 1
    for name, df in t.tables.items():
        for column in df.columns:
            assert not df[column].astype(str).str.contains(PAYLOAD_MARK).any(), (name, column)
    meta = json.loads((trace / "meta.json").read_text())
    assert PAYLOAD_MARK not in json.dumps(meta)
