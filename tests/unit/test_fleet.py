"""`idlebuf fleet`: 53 synthetic traces of 5 hosts summarised on a local Dask cluster of 2
worker processes give exactly the figures of the same traces summarised one by one; traces
that cannot be read are listed with their reason and the others still count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from analysis.fleet import aggregate, digest, find_traces
from tests.helpers import idlebuf
from tests.synthetic import late_trace, mixed_trace, server_trace, walked_trace

TRACES, HOSTS = 53, 5


def _set_host(trace: Path, host: str) -> None:
    meta = json.loads((trace / "meta.json").read_text())
    meta.setdefault("host", {})["hostname"] = host
    (trace / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet")
    for i in range(TRACES):
        host = f"host{i % HOSTS}"
        path = root / f"host={host}" / f"run-{i:02d}"
        path.parent.mkdir(exist_ok=True)
        kind = i % 5
        pid = 5000 + i
        if kind == 0:
            server_trace(path, pid, 11 + i, 2, 4096 + i, queued=True)
        elif kind == 1:
            server_trace(path, pid, 13 + i, 3, 8192, queued=False)
        elif kind == 2:
            mixed_trace(path, pid)
        elif kind == 3:
            late_trace(path, pid, connections=7 + i)
        else:
            walked_trace(path, pid, connections=23)
        _set_host(path, host)
    damaged = root / "host=host0" / "damaged"
    damaged.mkdir()
    (damaged / "meta.json").write_text("{")
    newer = root / "host=host1" / "newer"
    server_trace(newer, 9999, 5, 1, 4096, queued=True)
    meta = json.loads((newer / "meta.json").read_text())
    meta["format_version"] = 99
    (newer / "meta.json").write_text(json.dumps(meta))
    return root


def _fleet_json(*args: str) -> dict[str, Any]:
    done = idlebuf("fleet", "--json", *args, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_dask_gives_exactly_the_figures_of_one_by_one(fleet: Path) -> None:
    on_dask = _fleet_json(str(fleet), "--workers", "2")
    reports = [digest(t) for t in find_traces([fleet])[0]]
    one_by_one = aggregate(reports).to_json()
    assert on_dask == one_by_one
    assert on_dask == _fleet_json(str(fleet), "--serial")
    assert on_dask["traces"] == TRACES + 2 and on_dask["read"] == TRACES
    reasons = {Path(f["trace"]).name: f["reason"] for f in on_dask["failures"]}
    assert set(reasons) == {"damaged", "newer"}
    assert (
        "meta.json" in reasons["damaged"]
        and "newer" in reasons["newer"]
        or "99" in reasons["newer"]
    )
    assert [g["key"] for g in sorted(on_dask["by_host"], key=lambda g: g["key"])] == [
        f"host{h}" for h in range(HOSTS)
    ]
    # every grouping covers every process once: the sums agree with the traces one by one
    idle = sum(p.idle_connections for d in reports for p in d.processes)
    pinned = sum(p.pinned_bytes for d in reports for p in d.processes)
    for grouping in ("by_host", "by_program", "by_model"):
        assert sum(g["idle_connections"] for g in on_dask[grouping]) == idle, grouping
        assert sum(g["pinned_bytes"] for g in on_dask[grouping]) == pinned, grouping
    assert sum(g["traces"] for g in on_dask["by_host"]) == TRACES
    top = on_dask["top"]
    assert len(top) == 10
    assert [p["idle_buffer_bytes"] for p in top] == sorted(
        (p.idle_buffer_bytes for d in reports for p in d.processes), reverse=True
    )[:10]


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


def test_traces_streamed_on_the_workers_give_the_same_digests_but_the_whole_cost(
    fleet: Path,
) -> None:
    """`--stream-above 0`: every trace streamed (as a trace too big to load would be): each
    process's figures are those of the in-memory digest, but the whole cost per idle
    connection, which is unknown (None), not 0."""
    traces = find_traces([fleet])[0]
    loaded = {(p.trace, p.pid): p.to_json() for t in traces for p in digest(t).processes}
    streamed = {
        (p.trace, p.pid): p.to_json() for t in traces for p in digest(t, stream_above=0).processes
    }
    assert streamed.keys() == loaded.keys()
    for key, figures in loaded.items():
        assert streamed[key]["whole_per_idle_connection_bytes"] is None
        assert {**streamed[key], "whole_per_idle_connection_bytes": None} == {
            **figures,
            "whole_per_idle_connection_bytes": None,
        }, key
    on_dask = _fleet_json(str(fleet), "--workers", "2", "--stream-above", "0")
    assert on_dask["traces"] == TRACES + 2 and on_dask["read"] == TRACES
    assert all(g["whole_known"] == 0 for g in on_dask["by_model"])
