"""`idlebuf fleet`: 53 synthetic traces of 5 hosts, built with known parameters, summarised
on a local Dask cluster of 2 worker processes and one by one: each process's digest and
every group's sums and spreads (per host, program and IO model; p50, p90, max) are the
figures worked out here from how the traces were built; traces that cannot be read are
listed with their reason and the others still count."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from analysis.fleet import aggregate, digest, find_traces
from tests.helpers import idlebuf
from tests.synthetic import (
    SOCKET_RMEM,
    glibc_chunk_of,
    late_trace,
    mixed_trace,
    server_trace,
    sessions_trace,
)

TRACES, HOSTS = 53, 5
KINDS = 5  # trace i is of kind i % 5 (see `built`), on host (i // 3) % 5: kinds and hosts mix
BLOCKING = "queued: blocking reads (threads)"
# sessions_trace's kernel part per idle connection: a TCP socket, its inode, file and dentry
# at their share of a slab (its caches: 32,768 B slabs of 13, 16,384 of 19, 4,096 of 21),
# plus the 768 bytes each socket's queues hold
KERNEL = round(
    round(32768 / 13, 1) + round(16384 / 19, 1) + 2 * round(4096 / 21, 1) + SOCKET_RMEM, 1
)


def host_of(i: int) -> str:
    return f"host{(i // 3) % HOSTS}"


def built(i: int, path: Path) -> dict[str, Any]:
    """Trace i, written at `path`, and its process's digest as its construction gives it
    (tests/synthetic.py), every figure worked out from the parameters."""
    kind, pid = i % KINDS, 5000 + i
    if kind == 0:  # a thread per connection, each with a read posted; 2 had data 0.5 s ago
        n, buffer = 11 + i, 4096 + i
        server_trace(path, pid, n, 2, buffer, queued=True)
        figures = dict(
            program="srv", model=BLOCKING, posted_reads=n, pinned_bytes=n * buffer,
            connections=n, idle_connections=n - 2, io_buffer_memory=n * buffer,
            idle_buffer_bytes=(n - 2) * buffer, per_idle_connection_bytes=buffer + SOCKET_RMEM,
            whole_per_idle_connection_bytes=None,  # no memory points, no slab caches
        )  # fmt: skip
    elif kind == 1:  # readiness: one pooled buffer, held after its last data; no wait traced
        n, buffer = 13 + i, 8192
        server_trace(path, pid, n, 3, buffer, queued=False)
        figures = dict(
            program="srv", model="unknown", posted_reads=0, pinned_bytes=0,
            connections=n, idle_connections=n - 3, io_buffer_memory=buffer,
            idle_buffer_bytes=0, per_idle_connection_bytes=SOCKET_RMEM,
            whole_per_idle_connection_bytes=None,
        )  # fmt: skip
    elif kind == 2:
        # 23 threads in recvfrom on 4,099-byte buffers (3 had data) + 5 io_uring RECVs on
        # sockets, 2 completed, one of the 3 left a buffer select (2 x 2,048 pinned, in a
        # mapping); a provided-buffer group of 7 x 512; the 20 idle hold their buffers
        mixed_trace(path, pid)
        figures = dict(
            program="srv", model="queued: io_uring provided buffers", posted_reads=23 + 3,
            pinned_bytes=23 * 4099 + 2 * 2048, connections=23 + 5, idle_connections=20,
            io_buffer_memory=23 * 4099 + 2 * 2048 + 7 * 512, idle_buffer_bytes=20 * 4099,
            per_idle_connection_bytes=4099 + SOCKET_RMEM, whole_per_idle_connection_bytes=None,
        )  # fmt: skip
    elif kind == 3:  # attached late: n threads found blocked on 4,099-byte buffers
        n = 7 + i
        late_trace(path, pid, connections=n)
        figures = dict(
            program="late", model=BLOCKING, posted_reads=n, pinned_bytes=n * 4099,
            connections=n, idle_connections=n, io_buffer_memory=n * 4099,
            idle_buffer_bytes=n * 4099, per_idle_connection_bytes=4099 + SOCKET_RMEM,
            whole_per_idle_connection_bytes=None,
        )  # fmt: skip
    else:  # walked, 23 idle threads; the heap per connection its buffer's and session's chunks
        buffer = 4000 + i
        sessions_trace(path, pid, connections=23, buffer=buffer, session=2053)
        whole = glibc_chunk_of(buffer) + glibc_chunk_of(2053) + KERNEL
        figures = dict(
            program="sessions", model=BLOCKING, posted_reads=23, pinned_bytes=23 * buffer,
            connections=23, idle_connections=23, io_buffer_memory=23 * buffer,
            idle_buffer_bytes=23 * buffer, per_idle_connection_bytes=buffer + SOCKET_RMEM,
            whole_per_idle_connection_bytes=round(whole, 1),
        )  # fmt: skip
    per_idle = figures["per_idle_connection_bytes"]
    assert isinstance(per_idle, int)
    figures["per_idle_connection_bytes"] = float(per_idle)
    return {"trace": str(path), "host": host_of(i), "pid": pid, **figures}


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile, interpolated linearly between the closest ranks (Hyndman and Fan's
    type 7, numpy's default), to the tenth; None of nothing."""
    if not values:
        return None
    v = sorted(values)
    h = (len(v) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(v) - 1)
    return round(v[lo] + (h - lo) * (v[hi] - v[lo]), 1)


def expected_groups(processes: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """The groups `by` host, program or model, as the fleet's summary must give them: sums,
    and the cost per idle connection's spread over the processes that have idle ones."""
    out = []
    for key in sorted({p[by] for p in processes}):
        mine = [p for p in processes if p[by] == key]
        per_idle = [p["per_idle_connection_bytes"] for p in mine if p["idle_connections"]]
        whole = [
            p["whole_per_idle_connection_bytes"]
            for p in mine
            if p["whole_per_idle_connection_bytes"] is not None
        ]

        def total(figure: str, mine: list[dict[str, Any]] = mine) -> int:
            return sum(p[figure] for p in mine)

        out.append(
            {
                "key": key,
                "processes": len(mine),
                "traces": len({p["trace"] for p in mine}),
                "without_memory": 0,
                "connections": total("connections"),
                "idle_connections": total("idle_connections"),
                "posted_reads": total("posted_reads"),
                "pinned_bytes": total("pinned_bytes"),
                "io_buffer_memory": total("io_buffer_memory"),
                "idle_buffer_bytes": total("idle_buffer_bytes"),
                "per_idle_p50": quantile(per_idle, 0.5),
                "per_idle_p90": quantile(per_idle, 0.9),
                "per_idle_max": quantile(per_idle, 1.0),
                "whole_p50": quantile(whole, 0.5),
                "whole_p90": quantile(whole, 0.9),
                "whole_max": quantile(whole, 1.0),
                "whole_known": len(whole),
            }
        )
    # the most idle-buffer memory first
    return sorted(out, key=lambda g: (-g["idle_buffer_bytes"], g["key"]))


def _set_host(trace: Path, host: str) -> None:
    meta = json.loads((trace / "meta.json").read_text())
    meta.setdefault("host", {})["hostname"] = host
    (trace / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def fleet_built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The fleet's root directory and each process's digest as built."""
    root = tmp_path_factory.mktemp("fleet")
    expected = []
    for i in range(TRACES):
        host = host_of(i)
        path = root / f"host={host}" / f"run-{i:02d}"
        path.parent.mkdir(exist_ok=True)
        expected.append(built(i, path))
        _set_host(path, host)
    damaged = root / "host=host0" / "damaged"
    damaged.mkdir()
    (damaged / "meta.json").write_text("{")
    newer = root / "host=host1" / "newer"
    server_trace(newer, 9999, 5, 1, 4096, queued=True)
    meta = json.loads((newer / "meta.json").read_text())
    meta["format_version"] = 99
    (newer / "meta.json").write_text(json.dumps(meta))
    return root, expected


@pytest.fixture(scope="module")
def fleet(fleet_built: tuple[Path, list[dict[str, Any]]]) -> Path:
    return fleet_built[0]


def _fleet_json(*args: str) -> dict[str, Any]:
    done = idlebuf("fleet", "--json", *args, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_each_process_digest_is_what_its_trace_was_built_with(
    fleet_built: tuple[Path, list[dict[str, Any]]],
) -> None:
    root, expected = fleet_built
    found = {
        (p.trace, p.pid): p.to_json() for t in find_traces([root])[0] for p in digest(t).processes
    }
    assert len(found) == TRACES  # one process a trace: the damaged and the newer give none
    wrong = {
        (Path(key[0]).name, field): (found[key][field], want)
        for want_row in expected
        for key in [(want_row["trace"], want_row["pid"])]
        for field, want in want_row.items()
        if found.get(key, {}).get(field) != want
    }
    assert wrong == {}, "(trace, figure): (digest, as built)"


def test_dask_and_serial_give_the_fleet_as_built(
    fleet_built: tuple[Path, list[dict[str, Any]]],
) -> None:
    """The groups, the top and the failures on a Dask cluster and one by one (`--serial`),
    against the figures worked out from the construction: not one path against the other."""
    fleet, expected = fleet_built
    on_dask = _fleet_json(str(fleet), "--workers", "2")
    assert _fleet_json(str(fleet), "--serial") == on_dask
    assert on_dask["traces"] == TRACES + 2 and on_dask["read"] == TRACES
    reasons = {Path(f["trace"]).name: f["reason"] for f in on_dask["failures"]}
    assert set(reasons) == {"damaged", "newer"}
    assert "meta.json is damaged" in reasons["damaged"]
    assert "format 99, newer than this idlebuf reads" in reasons["newer"]
    for grouping, by in (("by_host", "host"), ("by_program", "program"), ("by_model", "model")):
        assert on_dask[grouping] == expected_groups(expected, by), grouping
    # the model groups, spelled out: the blocking-read servers (kinds 0, 3 and 4: 11 + 10 +
    # 10 traces), the mixed server with its buffer group (11), the readiness ones (11)
    models = {g["key"]: g for g in on_dask["by_model"]}
    assert {k: g["processes"] for k, g in models.items()} == {
        BLOCKING: 31,
        "queued: io_uring provided buffers": 11,
        "unknown": 11,
    }
    # only the walked traces (kind 4: buffers 4,004 ... 4,049) have a whole cost
    wholes = sorted(
        round(glibc_chunk_of(4000 + i) + glibc_chunk_of(2053) + KERNEL, 1)
        for i in range(4, TRACES, KINDS)
    )
    assert models[BLOCKING]["whole_known"] == len(wholes) == 10
    assert models[BLOCKING]["whole_max"] == wholes[-1]
    assert models[BLOCKING]["whole_p50"] == round((wholes[4] + wholes[5]) / 2, 1)
    assert models[BLOCKING]["whole_p90"] == round(wholes[8] + 0.1 * (wholes[9] - wholes[8]), 1)
    assert models["unknown"]["per_idle_p50"] == models["unknown"]["per_idle_p90"] == SOCKET_RMEM
    assert sum(g["traces"] for g in on_dask["by_host"]) == TRACES
    # the top: the 10 processes holding most IO-buffer memory for idle connections
    ranked = sorted(expected, key=lambda p: (-p["idle_buffer_bytes"], p["trace"], p["pid"]))
    assert on_dask["top"] == ranked[:10]


def test_text_and_page_list_what_could_not_be_read(fleet: Path, tmp_path: Path) -> None:
    page = tmp_path / "fleet.html"
    done = idlebuf("fleet", "--serial", str(fleet), str(tmp_path / "absent"), "--html", str(page))
    assert done.returncode == 0, done.stderr
    assert f"{TRACES} of {TRACES + 3} traces summarised" in done.stdout
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 3 and any("absent: no such trace" in line for line in failed)
    html = page.read_text()
    assert "By host" in html and "damaged" in html and "host4" in html


def test_an_unreachable_scheduler_fails_in_one_line_before_any_work(fleet: Path) -> None:
    done = idlebuf("fleet", str(fleet), "--scheduler", "tcp://127.0.0.1:9", timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "cannot reach the Dask scheduler" in done.stderr
    assert done.stdout == ""


def test_nothing_to_summarise_is_a_usage_error(tmp_path: Path) -> None:
    done = idlebuf("fleet", str(tmp_path))
    assert done.returncode == 2 and "holds no trace" in done.stderr


def test_a_trace_without_the_memory_side_is_unknown_there_not_zero(tmp_path: Path) -> None:
    with_memory = server_trace(tmp_path / "a", 7001, 11, 2, 4096, queued=True)
    without = server_trace(tmp_path / "b", 7002, 13, 2, 4096, queued=True)
    meta = json.loads((without / "meta.json").read_text())
    del meta["memory"]
    (without / "meta.json").write_text(json.dumps(meta))
    digests = [digest(str(with_memory)), digest(str(without))]
    (bare,) = digests[1].processes
    assert bare.posted_reads == 13  # what the reads say is still known
    assert (bare.connections, bare.idle_connections, bare.io_buffer_memory) == (None,) * 3
    assert bare.idle_buffer_bytes is None and bare.per_idle_connection_bytes is None
    (group,) = aggregate(digests).by_host
    assert group.without_memory == 1 and group.processes == 2
    (known,) = digests[0].processes
    assert group.idle_connections == known.idle_connections  # only the known one counts
    (only_bare,) = aggregate(digests[1:]).by_host
    assert only_bare.idle_connections is None and only_bare.idle_buffer_bytes is None


def test_traces_streamed_on_the_workers_give_the_same_digests(
    fleet_built: tuple[Path, list[dict[str, Any]]],
) -> None:
    """`--stream-above 0`: every trace read in windows (as a trace too big to load would
    be): one engine, so each process's figures are those of the in-memory digest, the
    whole cost included, and the fleet's groups those worked out from the construction."""
    fleet, expected = fleet_built
    traces = find_traces([fleet])[0]
    loaded = {(p.trace, p.pid): p.to_json() for t in traces for p in digest(t).processes}
    streamed = {
        (p.trace, p.pid): p.to_json() for t in traces for p in digest(t, stream_above=0).processes
    }
    assert streamed == loaded
    on_dask = _fleet_json(str(fleet), "--workers", "2", "--stream-above", "0")
    assert on_dask["traces"] == TRACES + 2 and on_dask["read"] == TRACES
    assert on_dask["by_model"] == expected_groups(expected, "model")
