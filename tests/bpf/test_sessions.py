"""How recordings start and stop: doctor, the target's exit, SIGTERM, several PIDs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from probes.format.reader import open_trace, read_meta, switches
from tests.helpers import (
    Recording,
    idlebuf,
    python_module,
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


def test_doctor_finds_everything_required() -> None:
    done = idlebuf("doctor", "--json")
    assert done.returncode == 0, done.stdout
    checks = {c["name"]: c for c in json.loads(done.stdout)}
    assert checks["BTF"]["ok"] and checks["tracefs mounted"]["ok"]
    assert checks["tracepoint syscalls:sys_enter_recvfrom"]["ok"]


def test_target_exit_ends_the_recording(tmp_path: Path) -> None:
    trace = tmp_path / "t"
    done = idlebuf("record", "-o", str(trace), "--", sys.executable, "-c", "pass")
    assert done.returncode == 0, done.stderr
    meta = read_meta(trace)
    assert meta.complete is True and meta.stop_reason == "all targets exited"
    assert meta.features["BTF"] is True


def test_sigterm_finalizes_and_several_pids(tmp_path: Path) -> None:
    """Two servers; the second one's connections (and so its threads) appear after attaching."""
    trace = tmp_path / "t"
    servers = [
        spawn_workload("workloads.threaded_server", "--buffer-size", str(n)) for n in (1031, 2053)
    ]
    ports = [read_event(s.stdout, "listening", 30)["port"] for s in servers]  # type: ignore[arg-type]
    loads = []
    recorder = None

    def connect(i: int, conns: int) -> None:
        load = start_loadgen(ports[i], conns, 0, 1, 1, "--hold", "60")
        loads.append(load)
        read_event(load.stdout, "done", 30)  # type: ignore[arg-type]
        wait_until(lambda: threads_in_socket_reads(servers[i].pid) == conns, 30, "blocked")

    try:
        connect(0, 5)
        recorder = spawn_idlebuf(
            "record",
            "-o",
            str(trace),
            "-p",
            str(servers[0].pid),
            "-p",
            str(servers[1].pid),
            "--duration",
            "120",
        )
        wait_for_trace_started(trace)
        connect(1, 7)  # threads created while tracing
        recorder.send_signal(signal.SIGTERM)
        assert recorder.wait(60) == 0
    finally:
        for p in [*loads, *servers] + ([recorder] if recorder else []):
            stop(p)
    report = report_json(trace)
    assert report["complete"] is True
    got = {
        p["pid"]: (p["posted_reads"]["now"], p["pinned_bytes"]["now"]) for p in report["processes"]
    }
    assert got == {servers[0].pid: (5, 5 * 1031), servers[1].pid: (7, 7 * 2053)}


def test_alternate_switches_tracing_off_and_on(tmp_path: Path) -> None:
    """`record --alternate 0.3`: while switched off nothing is recorded; meta.json says when
    each switch began and ended; the report says the trace covers half the time."""
    trace = tmp_path / "t"
    server = python_module("workloads.threaded_server")
    with Recording(trace, server, ("--alternate", "0.3")) as rec:
        # 2 connections, one exchanging 100-byte messages at 200/s until told to stop, once
        # tracing was switched off and on again three times (switching off the default
        # probes takes seconds: each tracepoint waits for an RCU grace period)
        load = start_loadgen(
            rec.port, 2, 1, 10**6, 100, "--rate", "200", "--until-stdin", stdin=subprocess.PIPE
        )
        try:
            wait_until(lambda: len(switches(trace)) >= 7, 120, "7 switches")
            load.stdin.write(b"stop\n")  # type: ignore[union-attr]
            load.stdin.flush()  # type: ignore[union-attr]
            done = read_event(load.stdout, "done", 60)  # type: ignore[arg-type]
            rec.finish()
        finally:
            stop(load)
    assert done["requests"] > 0
    meta = read_meta(trace)
    alts = meta.alternations or []
    assert meta.alternate_s == 0.3 and len(alts) >= 7
    assert [s.tracing for s in alts] == [i % 2 == 0 for i in range(len(alts))]
    assert all(s.from_ns <= s.to_ns for s in alts)
    assert all(a.to_ns < b.from_ns for a, b in zip(alts, alts[1:]))
    posts = open_trace(trace)["posts"]
    ts = posts[posts["pid"] == rec.pid]["ts_ns"].to_numpy()
    traced = 0
    for i, s in enumerate(alts):
        end = alts[i + 1].from_ns if i + 1 < len(alts) else 2**63 - 1
        inside = int(((ts > s.to_ns) & (ts < end)).sum())
        if s.tracing:
            traced += inside > 0
        else:
            assert inside == 0, f"{inside} reads recorded while switched off"
    assert traced >= 3  # reads were recorded in several traced stretches
    report = idlebuf("report", str(trace))
    assert report.returncode == 0 and "--alternate 0.3" in report.stdout


def test_a_target_that_execs_is_named_after_what_it_became(tmp_path: Path) -> None:
    """`record -p` on a shell that then execs a program: the report names the program."""
    shell = subprocess.Popen(
        ["sh", "-c", "read line; exec sleep 30"], stdin=subprocess.PIPE, start_new_session=True
    )
    trace = tmp_path / "t"
    try:
        rec = spawn_idlebuf("record", "-o", str(trace), "-p", str(shell.pid), "--duration", "3")
        wait_for_trace_started(trace)
        assert shell.stdin is not None
        shell.stdin.write(b"go\n")
        shell.stdin.flush()
        _, err = rec.communicate(timeout=60)
        assert rec.returncode == 0, err.decode()
    finally:
        shell.kill()
        shell.wait()
    names = open_trace(trace)["processes"]
    assert names[names["pid"] == shell.pid]["comm"].tolist() == ["sh", "sleep"]
    report = idlebuf("report", "--json", str(trace))
    assert [p["comm"] for p in json.loads(report.stdout)["processes"]] == ["sleep"]


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_sighup_finalizes_the_trace(tmp_path: Path) -> None:
    """A closed terminal (SIGHUP) ends the recording like Ctrl-C: the trace is complete and
    the launched command is stopped with it."""
    trace = tmp_path / "t"
    rec = spawn_idlebuf("record", "-o", str(trace), "--", "sleep", "61")
    try:
        wait_for_trace_started(trace)
        (child,) = _children(rec.pid)
        rec.send_signal(signal.SIGHUP)
        _, err = rec.communicate(timeout=60)
    finally:
        stop(rec)
    assert rec.returncode == 0, err.decode()
    meta = read_meta(trace)
    assert meta.complete is True and meta.stop_reason == "SIGHUP"
    assert _gone(child)


def test_a_killed_recorder_leaves_no_orphan_and_a_readable_trace(tmp_path: Path) -> None:
    """SIGKILL cannot be caught: the launched command dies with the recorder
    (PR_SET_PDEATHSIG), and what was flushed reads as an unfinished trace."""
    trace = tmp_path / "t"
    rec = spawn_idlebuf("record", "-o", str(trace), "--", "sleep", "61")
    try:
        wait_for_trace_started(trace)
        (child,) = _children(rec.pid)
        rec.kill()
        rec.wait(10)
        wait_until(lambda: _gone(child), 10, "the launched command to die with the recorder")
    finally:
        stop(rec)
    report = idlebuf("report", str(trace))
    assert report.returncode == 0, report.stderr
    assert "did not finish" in report.stdout


@pytest.mark.parametrize(
    ("command", "code", "message"),
    [(["/nonexistent/srv"], 5, "no such executable"), ([""], 2, "command to run is empty")],
)
def test_a_command_that_cannot_run_leaves_nothing(
    tmp_path: Path, command: list[str], code: int, message: str
) -> None:
    trace = tmp_path / "t"
    done = idlebuf("record", "-o", str(trace), "--", *command)
    assert done.returncode == code, done.stderr
    assert message in done.stderr and done.stderr.count("\n") == 1
    assert not trace.exists()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 384 KiB tmpfs: a recording fills it within seconds."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_full_disk_ends_the_recording_and_keeps_what_was_written(small_disk: Path) -> None:
    """ENOSPC while flushing: one line, exit 4 (output), the target untouched, and the parts
    already written still read, listed in a meta.json that says why the trace ends early."""
    trace = small_disk / "t"
    server = spawn_workload("workloads.threaded_server")
    port = read_event(server.stdout, "listening", 30)["port"]  # type: ignore[arg-type]
    load = start_loadgen(port, 3, 3, 2 * 10**6, 1, "--rate", "0")
    try:
        done = idlebuf(
            "record", "-o", str(trace), "-p", str(server.pid), "--duration", "60", timeout=120
        )
        assert server.poll() is None  # the target goes on
    finally:
        stop(load)
        stop(server)
    assert done.returncode == 4, done.stderr
    assert "No space left" in done.stderr and done.stderr.count("\n") == 1
    meta = json.loads((trace / "meta.json").read_text())
    assert meta["complete"] is False and "No space left" in meta["error"]
    assert sum(len(p) for p in meta["parts"].values()) > 0
    report = idlebuf("report", "--json", str(trace))
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["processes"][0]["pid"] == server.pid
    assert not list(trace.glob("*/*.tmp"))
