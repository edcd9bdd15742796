"""The readiness model on real probes: no posted reads; buffers only where the program keeps them.

113 connections to an epoll server, 7 of which exchange 2 messages; then all are idle for longer
than the idle threshold. With a shared pool nothing is held per connection; a server that keeps
each connection's buffer after its first data retains exactly 7 x 12,347 bytes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.helpers import Recording, idlebuf, python_module, read_event, start_loadgen, stop

pytestmark = pytest.mark.bpf

CONNECTIONS, ACTIVE, MESSAGES, SIZE, BUFFER, POOL = 113, 7, 2, 1000, 12347, 3
IDLE_THRESHOLD = 1.0


@pytest.mark.parametrize("mode", ["pool", "retain"])
def test_readiness_server(tmp_path: Path, mode: str) -> None:
    trace = tmp_path / "trace"
    with Recording(
        trace,
        python_module(
            "workloads.epoll_server",
            "--buffers",
            mode,
            "--pool-size",
            str(POOL),
            "--buffer-size",
            str(BUFFER),
        ),
        record_args=("--memory",),
    ) as rec:
        pid = rec.pid
        load = start_loadgen(rec.port, CONNECTIONS, ACTIVE, MESSAGES, SIZE, "--hold", "60")
        try:
            done = read_event(load.stdout, "done", 60)  # type: ignore[arg-type]
            time.sleep(IDLE_THRESHOLD * 1.3)
            truth = rec.truth()
            rec.finish()
        finally:
            stop(load)

    out = idlebuf("report", "--json", "--idle-threshold", str(IDLE_THRESHOLD), str(trace))
    assert out.returncode == 0, out.stderr
    (proc,) = [p for p in json.loads(out.stdout)["processes"] if p["pid"] == pid]
    assert proc["posted_reads"]["now"] == 0 and proc["pinned_bytes"]["now"] == 0
    assert proc["reads_completed"] == ACTIVE * MESSAGES == done["requests"]
    retained = proc["memory"]["retained"]
    if mode == "retain":
        assert (retained["buffers"], retained["bytes"]) == (ACTIVE, ACTIVE * BUFFER)
        # each received 1,000 bytes: at least the first page of each is resident
        assert ACTIVE * 1000 <= retained["resident_bytes"] <= retained["bytes"]
        assert truth["held_bytes"] == ACTIVE * BUFFER
    else:  # a pool buffer last used by an idle connection is counted: at most the pool
        assert retained["buffers"] <= POOL
        assert truth["held_bytes"] == 0
