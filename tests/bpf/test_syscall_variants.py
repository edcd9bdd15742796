"""Each blocking read syscall, on a server launched through a shell (so it is a followed child).

23 connections, each thread blocked in the syscall under test with its own 4,099-byte buffer
(split into 2 iovecs for readv/recvmsg); 3 connections send 2 messages of 1,009 bytes.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from analysis.reads import read_intervals
from probes.format.reader import open_trace
from probes.format.schema import PostFlag
from tests.helpers import (
    Recording,
    python_module,
    read_event,
    report_json,
    start_loadgen,
    stop,
    threads_in_socket_reads,
    wait_until,
)

pytestmark = pytest.mark.bpf

CONNECTIONS, ACTIVE, MESSAGES, SIZE, BUFFER = 23, 3, 2, 1009, 4099
SYSCALL_OF = {"recv": "recvfrom", "read": "read", "readv": "readv", "recvmsg": "recvmsg"}


@pytest.mark.parametrize("read_with", sorted(SYSCALL_OF))
def test_each_syscall_in_a_followed_child(tmp_path: Path, read_with: str) -> None:
    trace = tmp_path / "trace"
    server = shlex.join(
        python_module(
            "workloads.threaded_server", "--buffer-size", str(BUFFER), "--read-with", read_with
        )
    )
    # "; true" keeps the shell from exec'ing: the server is its child, not the shell itself
    with Recording(trace, ["sh", "-c", f"{server}; true"]) as rec:
        server_pid = rec.pid
        load = start_loadgen(rec.port, CONNECTIONS, ACTIVE, MESSAGES, SIZE, "--hold", "60")
        try:
            done = read_event(load.stdout, "done", 60)  # type: ignore[arg-type]
            wait_until(
                lambda: threads_in_socket_reads(server_pid) == CONNECTIONS,
                30,
                "server threads blocked",
            )
            truth = rec.truth()
            rec.finish()
        finally:
            stop(load)
    # the recorder stopped the shell and the server it started
    assert (
        not Path(f"/proc/{server_pid}/status").exists()
        or "Z" in Path(f"/proc/{server_pid}/stat").read_text().split(")")[1].split()[0]
    )

    report = report_json(trace)
    (proc,) = [p for p in report["processes"] if p["pid"] == server_pid]
    assert proc["posted_reads"]["now"] == CONNECTIONS == truth["connections_open"]
    assert proc["pinned_bytes"]["now"] == CONNECTIONS * BUFFER
    assert proc["reads_completed"] == ACTIVE * MESSAGES == done["requests"]
    assert proc["bytes_received"] == ACTIVE * MESSAGES * SIZE
    assert list(proc["by_source"]["syscall"]["by_op"]) == [SYSCALL_OF[read_with]]

    t = open_trace(trace)
    posted = read_intervals(t["posts"], t["completions"])
    posted = posted[(posted["pid"] == server_pid) & posted["end_ns"].isna()]
    assert sorted(zip(posted["fd"], posted["addr"], posted["len"])) == sorted(
        (b["fd"], b["addr"], b["len"]) for b in truth["buffers"]
    )
    vectored = read_with in ("readv", "recvmsg")
    assert set(posted["nvec"]) == {2 if vectored else 0}
    assert set(posted["flags"] & PostFlag.VECTORED) == {PostFlag.VECTORED if vectored else 0}
