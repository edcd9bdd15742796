"""Kernel socket memory from sock_diag, checked against `ss -tmne` for the same sockets.

17 connections to a server that never reads them; connection i has 1,009 + 13 i bytes waiting
in its receive queue. The trace's last sample equals what ss reports for each socket inode.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from probes.format.reader import open_trace
from probes.format.schema import SKMEM_FIELDS
from tests.helpers import read_event, spawn_idlebuf, spawn_workload, stop, wait_for_trace_started

pytestmark = pytest.mark.bpf

CONNECTIONS = 17
SKMEM = re.compile(
    r"ino:(\d+).*?skmem:\(r(\d+),rb(\d+),t(\d+),tb(\d+),f(\d+),w(\d+),o(\d+),bl(\d+),d(\d+)\)",
    re.S,
)
FIELDS = list(SKMEM_FIELDS)


def ss_skmem(port: int) -> dict[int, list[int]]:
    out = subprocess.run(
        ["ss", "-tmneH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(m[0]): [int(v) for v in m[1:]] for m in SKMEM.findall(out)}


def test_socket_memory_matches_ss(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    server = spawn_workload("workloads.threaded_server", "--no-read")
    clients: list[socket.socket] = []
    try:
        port = read_event(server.stdout, "listening", 30)["port"]  # type: ignore[arg-type]
        for i in range(CONNECTIONS):
            c = socket.create_connection(("127.0.0.1", port))
            c.sendall(b"q" * (1009 + 13 * i))
            clients.append(c)
        recorder = spawn_idlebuf("record", "-o", str(trace), "--memory", "-p", str(server.pid))
        wait_for_trace_started(trace)
        expected = ss_skmem(port)
        assert len(expected) == CONNECTIONS
        recorder.send_signal(signal.SIGINT)  # the final sample is taken as it stops
        _, err = recorder.communicate(timeout=60)
        assert recorder.returncode == 0, err.decode()
    finally:
        for c in clients:
            c.close()
        stop(server)

    sockets = open_trace(trace)["sockets"]
    last = sockets[sockets["ts_ns"] == sockets["ts_ns"].max()].set_index("inode")
    assert set(expected) <= set(last.index)
    for inode, values in expected.items():
        assert last.loc[inode, FIELDS].tolist() == values, inode
    conns = last.loc[list(expected)]
    assert (conns["family"] == "tcp").all() and (conns["state"] == "ESTABLISHED").all()
    assert sorted(conns["rqueue"]) == [1009 + 13 * i for i in range(CONNECTIONS)]
    assert isinstance(last, pd.DataFrame)
