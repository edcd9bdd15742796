"""analysis.owned and the owned part of the whole cost: the walk's figure per idle connection
(reachable), the fit beside it as a cross-check, what the walk did not cover as unknown,
and never a confident fit on a heap that is not the program's (a Go program's glibc heap).

tests.synthetic.sessions_trace: 23 idle connections, each a 4,099-byte buffer (a 4,112-byte
chunk) and a 2,053-byte session (a 2,064-byte chunk); the heap fit gives exactly the two."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.owned import latest_walks, owned_columns, owning_of
from probes.format import schema
from probes.format.writer import TraceWriter
from tests.helpers import idlebuf
from tests.synthetic import SECOND, T0, sessions_trace

CONNECTIONS, SESSION_CHUNK, BUFFER_CHUNK = 23, 2064, 4112


def walked(
    path: Path, owned: list[tuple[int, str]], method: str = "walk:glibc", allocator: str = "glibc"
) -> Path:
    """sessions_trace with the walk at the end: each connection's (owned bytes, why), in fd
    order, and the process's row (its allocator)."""

    def owned_rows(w: TraceWriter, fds: list[int]) -> None:
        rows = [{"fd": -1, "root": "", "owned_bytes": 0, "how": "", "why": ""}] + [
            {"fd": fd, "root": "stack", "owned_bytes": b, "how": "reachable", "why": why}
            for fd, (b, why) in zip(fds, owned)
        ]
        columns = ("fd", "root", "owned_bytes", "how", "why")
        w.append(
            schema.OWNED,
            schema.OWNED.filled(
                len(rows),
                ts_ns=T0 + 3 * SECOND - 3,
                pid=4246,
                **{k: [r[k] for r in rows] for k in columns},
                allocations=[0] + [1] * len(owned),
                allocator=allocator,
                what="end",
            ),
        )

    return sessions_trace(path, method=method, more=owned_rows)


def report(trace: Path, *flags: str) -> dict[str, Any]:
    done = idlebuf("report", "--json", *flags, str(trace))
    assert done.returncode == 0, done.stderr
    (process,) = json.loads(done.stdout)["processes"]
    return dict(process["memory"])


def test_the_walk_gives_the_owned_state_and_the_fit_agrees(tmp_path: Path) -> None:
    owned = [(SESSION_CHUNK, "")] * CONNECTIONS
    memory = report(walked(tmp_path / "t", owned), "--connections")
    cost = memory["per_idle_connection"]
    assert (cost["owned_how"], cost["owned_bytes"]) == ("reachable", SESSION_CHUNK)
    assert cost["owned_connections"] == CONNECTIONS
    assert cost["other_user_bytes"] == SESSION_CHUNK  # the fit, kept beside it
    assert cost["owned_check"] == f"the fit agrees: {SESSION_CHUNK:,} B"
    assert cost["total_bytes"] is not None and cost["whole_unknown"] == []
    assert cost["total_bytes"] == round(BUFFER_CHUNK + SESSION_CHUNK + cost["kernel_bytes"], 1)
    rows = [r for r in memory["connection_table"] if r["closed_ns"] is None]
    assert {(r["owned_bytes"], r["owned_allocations"], r["owned_how"]) for r in rows} == {
        (SESSION_CHUNK, 1, "reachable")
    }


def test_a_disagreement_with_the_fit_is_flagged(tmp_path: Path) -> None:
    owned = [(3001, "")] * CONNECTIONS
    cost = report(walked(tmp_path / "t", owned))["per_idle_connection"]
    assert (cost["owned_how"], cost["owned_bytes"]) == ("reachable", 3001)
    assert cost["owned_check"].startswith("the walk and the fit disagree: 3,001 B reachable")


def test_connections_the_walk_did_not_cover_are_unknown_with_why(tmp_path: Path) -> None:
    """19 walked (2,000 .. 2,018 B), 4 cut short by the time budget: the figure is the mean
    over the 19, the 4 are unknown with why, the total unknown (its lower bound known)."""
    cut = "time budget: 10 s ran out 7 levels down the walk (what it found is a lower bound)"
    owned = [(2000 + i, "") for i in range(19)] + [(100, cut)] * 4
    cost = report(walked(tmp_path / "t", owned))["per_idle_connection"]
    assert (cost["owned_bytes"], cost["owned_connections"]) == (2009.0, 19)
    assert {"connections": 4, "why": f"owned state: {cut}", "bytes": None} in cost["whole_unknown"]
    assert cost["total_bytes"] is None and cost["total_at_least_bytes"] > 0


def test_a_go_program_s_glibc_heap_is_never_fitted_with_confidence(tmp_path: Path) -> None:
    """The walkers found a Go program (its allocations are the Go runtime's): the heap fit,
    however exact a line glibc's heap draws, is not the program's, so it is not used."""
    for i, (method, allocator) in enumerate(
        [("walk:go+glibc", "glibc"), ("walk:glibc", "go")]  # the walkers said, or the walk did
    ):
        trace = walked(tmp_path / f"t{i}", [], method, allocator)
        cost = report(trace)["per_idle_connection"]
        assert cost["fit"] is not None and cost["fit"]["confident"] is False
        assert "a Go program's heap is Go's" in cost["reason"]
        assert (cost["owned_bytes"], cost["other_user_bytes"], cost["total_bytes"]) == (
            None,
            None,
            None,
        )
        assert any(u["why"].startswith("other user memory: not used: a Go program") for u in (
            cost["whole_unknown"]
        ))  # fmt: skip


def test_a_recording_without_the_walk_keeps_the_fit(tmp_path: Path) -> None:
    cost = report(sessions_trace(tmp_path / "t"))["per_idle_connection"]
    assert (cost["owned_how"], cost["owned_bytes"]) == ("fitted", SESSION_CHUNK)
    assert cost["owned_connections"] is None and cost["owned_check"] is None


def test_the_latest_walk_stands_and_rootless_connections_say_why() -> None:
    def row(ts: int, fd: int, what: str, owned: int = 0, why: str = "") -> dict[str, Any]:
        return {
            "ts_ns": ts, "pid": 7, "fd": fd, "tid": 0, "root": "epoll", "owned_bytes": owned,
            "allocations": 1, "buffer_bytes": 0, "how": "reachable" if fd >= 0 else "",
            "why": why, "allocator": "glibc", "heap_bytes": 0, "chunks": 0,
            "shared_bytes": 96 if fd < 0 else 0, "global_bytes": 0, "unreached_bytes": 0,
            "raced": 0, "took_ms": 1, "cpu_ms": 1, "what": what,
        }  # fmt: skip

    rows = pd.DataFrame(
        [row(1, -1, "attach"), row(1, 10, "attach", 50), row(1, 11, "attach", 60)]
        + [row(9, -1, "end"), row(9, 10, "end", 500)]
    )
    walks = latest_walks(rows)
    assert sorted(walks["ts_ns"].unique().tolist()) == [9]
    idle = pd.DataFrame({"pid": [7, 7], "fd": [10, 11]})
    (owning,) = owning_of(walks, idle).values()
    assert (owning.covered, owning.owned_bytes, owning.shared_bytes) == (1, 500, 96)
    ((unknown),) = owning.unknown
    assert unknown.connections == 1 and "no roots of its own" in unknown.why
    table = pd.DataFrame({"pid": [7, 7], "fd": [10, 11], "closed_ns": [float("nan")] * 2})
    table = owned_columns(table, walks)
    assert table["owned_bytes"].iloc[0] == 500 and pd.isna(table["owned_bytes"].iloc[1])
