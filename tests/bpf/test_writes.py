"""The write side on real probes: a push server streaming to 23 slow readers, 3 of which read.

Queued: every connection's thread ends blocked in send() with the rest of its 65,537-byte
chunk pending - exactly the writes (fd, buffer, length) the server lists. Readiness: nothing
pending at the end; every write returned at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from analysis.reads import read_intervals
from probes.format.reader import open_trace
from tests.helpers import Recording, python_module, read_event, report_json, spawn_workload, stop

pytestmark = pytest.mark.bpf

CONNECTIONS, ACTIVE, CHUNK = 23, 3, 65537


def record_push(tmp_path: Path, model: str, settled: Any) -> tuple[Path, int, dict[str, Any]]:
    trace = tmp_path / "trace"
    server = python_module("workloads.push_server", "--model", model, "--chunk", str(CHUNK))
    with Recording(trace, server) as rec:
        client = spawn_workload(
            "workloads.push_client",
            *("--port", str(rec.port), "--connections", str(CONNECTIONS)),
            *("--active", str(ACTIVE), "--rate", "262144", "--duration", "2", "--hold", "60"),
        )
        try:
            read_event(client.stdout, "connected", 30)  # type: ignore[arg-type]
            done = read_event(client.stdout, "done", 30)  # type: ignore[arg-type]
            assert done["bytes_read"] > 0
            truth = rec.wait_for(settled)
            rec.finish()
        finally:
            stop(client)
    return trace, rec.pid, truth


def test_queued_writers_hold_their_chunks_pending(tmp_path: Path) -> None:
    trace, pid, truth = record_push(
        tmp_path, "queued", lambda t: t["pending_writes"] == CONNECTIONS
    )
    (proc,) = [p for p in report_json(trace)["processes"] if p["pid"] == pid]
    writes = proc["writes"]
    assert writes["pending_writes"] == CONNECTIONS
    assert writes["pending_write_bytes"] == truth["pending_write_bytes"]
    assert CONNECTIONS * 1000 < truth["pending_write_bytes"] <= CONNECTIONS * CHUNK
    assert writes["writes_completed"] > 0 and writes["bytes_sent"] == truth["bytes_sent"]
    t = open_trace(trace)
    iv = read_intervals(t["writes"], t["write_completions"])
    pending = iv[(iv["pid"] == pid) & iv["end_ns"].isna()]
    assert sorted(zip(pending["fd"], pending["addr"], pending["len"])) == sorted(
        (w["fd"], w["addr"], w["len"]) for w in truth["writes"]
    )
    assert proc["posted_reads"]["now"] == 0  # writes are not counted as reads


def test_readiness_writer_holds_nothing_pending(tmp_path: Path) -> None:
    trace, pid, truth = record_push(tmp_path, "readiness", lambda t: t["bytes_sent"] > 0)
    (proc,) = [p for p in report_json(trace)["processes"] if p["pid"] == pid]
    writes = proc["writes"]
    assert truth["pending_writes"] == writes["pending_writes"] == 0
    assert writes["pending_peak"] == 1  # one thread: one send() at a time
    assert writes["bytes_sent"] == truth["bytes_sent"] > 0
