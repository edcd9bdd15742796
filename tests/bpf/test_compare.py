"""The comparison demo at small scale: 53 connections, 3 active, every IO model.

Queued models hold all 53 buffers; the readiness models hold what a pool or the 3 active
connections need; the provided-buffer ring holds its 8 buffers and no request pins one.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import idlebuf

pytestmark = pytest.mark.bpf

CONNECTIONS, ACTIVE, BUFFER, RING = 53, 3, 16384, 8


def test_every_model_side_by_side() -> None:
    done = idlebuf(
        "demo",
        "--compare",
        "--json",
        "--connections",
        str(CONNECTIONS),
        "--active",
        str(ACTIVE / CONNECTIONS),
        "--duration",
        "2",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = {r["model"]: r for r in json.loads(done.stdout)["rows"]}
    assert list(rows) == [
        "readiness-pool",
        "readiness-retain",
        "queued-threads",
        "queued-green",
        "queued-uring",
        "uring-buffer-ring",
    ]
    for name in ("queued-threads", "queued-green", "queued-uring"):
        row = rows[name]
        assert (row["posted_reads"], row["pinned_bytes"]) == (CONNECTIONS, CONNECTIONS * BUFFER)
        assert row["io_buffer_heap"] == CONNECTIONS * BUFFER
        assert row["ratio_to_readiness"] >= 10
    pool, retain, ring = rows["readiness-pool"], rows["readiness-retain"], rows["uring-buffer-ring"]
    assert pool["pinned_bytes"] == 0 and 0 < pool["io_buffer_heap"] <= 4 * BUFFER
    assert retain["pinned_bytes"] == 0 and retain["io_buffer_heap"] == ACTIVE * BUFFER
    assert ring["posted_reads"] == CONNECTIONS and ring["pinned_bytes"] == 0
    assert ring["io_buffer_heap"] == RING * BUFFER
