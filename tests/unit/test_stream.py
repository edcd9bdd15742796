"""The streamed relate step (analysis.stream.relate) gives exactly the figures of the
in-memory one (summarize), on traces cut into many parts: reads posted in one part and
completed in another, parts whose times overlap, windows of a few events."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from analysis.stream import BIG_TABLES, Relation, relate, relation_of, trace_events
from analysis.summary import summarize
from probes.format import schema
from probes.format.errors import TraceError
from probes.format.meta import MemoryOptions, Meta
from probes.format.reader import open_trace
from probes.format.schema import PostFlag, Source
from probes.format.writer import TraceWriter
from tests.synthetic import late_trace, mixed_trace, open_trace_tables, server_trace, walked_trace

SECOND = 1_000_000_000
T0 = 10 * SECOND
EAGAIN = 11
RECVFROM = 45
HEAP = 0x7F00_0000_0000


def busy_trace(path: Path, seed: int, killed: bool = False) -> Path:
    """Three processes reading on 29 connections each for 3 s, every kind of read the
    relate step tells apart: blocking reads that complete, fail, lose their completion (the
    next post supersedes them) or stay posted; EAGAIN returns retried after a readiness wait
    (parked) with the same buffer, or into a buffer another connection uses next (a pool);
    goroutines found parked at attach; io_uring reads on sockets, of files, with provided
    buffers; allocations freed, reused at the same address, freed without being seen made;
    sockets that close. `killed`: meta.json has no end (a recording killed)."""
    rng = np.random.default_rng(seed)
    posts: list[dict] = []
    completions: list[dict] = []
    allocs: list[dict] = []
    frees: list[dict] = []
    waits: list[dict] = []
    wait_ends: list[dict] = []
    sockets: list[dict] = []
    end = T0 + 3 * SECOND
    user_data = 1 << 40
    for pid in (4201, 4203, 4207):
        pool = HEAP + (pid << 24) + 0x100000  # one buffer shared by some connections
        closed_at = {}
        for c in range(29):
            fd, tid = 100 + c, pid * 100 + c
            buf = HEAP + (pid << 24) + c * 8192
            size = int(rng.choice([4096, 4099, 16384]))
            allocs.append(dict(ts_ns=T0 - SECOND // 2 + c, pid=pid, tid=tid, addr=buf, size=size))
            if rng.random() < 0.15:  # closed before the end
                closed_at[fd] = T0 + int(rng.integers(SECOND, 2 * SECOND))
            if c % 7 == 3:  # parked at attach; the next read on the fd ends it
                posts.append(
                    dict(
                        ts_ns=T0 + 1,
                        pid=pid,
                        tid=tid,
                        fd=fd,
                        source=int(Source.PARKED),
                        op=RECVFROM,
                        key=(1 << 50) + tid,
                        addr=buf,
                        len=size,
                    )
                )
            t = T0 + int(rng.integers(0, SECOND // 3))
            # most stop reading with a read posted; c % 5 == 1 after data, idle since (the
            # buffer kept: retained, unless a pool's buffer moved on to another connection)
            quiet = c % 5 == 1 and fd not in closed_at
            stop = closed_at.get(
                fd, end - 3 * SECOND // 2 if quiet else end - SECOND // 4 if c % 5 else end
            )
            while t < stop:
                addr = pool if c % 11 == 5 else buf
                if c % 13 == 6:  # io_uring: sockets, files, provided buffers
                    flags = int(
                        rng.choice([PostFlag.SOCKET, 0, PostFlag.SOCKET | PostFlag.BUFFER_SELECT])
                    )
                    user_data += 1
                    posts.append(
                        dict(
                            ts_ns=t,
                            pid=pid,
                            tid=tid,
                            fd=fd,
                            source=int(Source.URING),
                            op=27,
                            key=user_data,
                            addr=addr,
                            len=0 if flags & PostFlag.BUFFER_SELECT else size,
                            flags=flags,
                        )
                    )
                    t += int(rng.integers(1_000, 200_000_000))
                    if t < stop:
                        completions.append(
                            dict(
                                ts_ns=t,
                                pid=pid,
                                tid=tid,
                                source=int(Source.URING),
                                key=user_data,
                                ret=int(rng.integers(1, 500)),
                            )
                        )
                    t += int(rng.integers(1_000, 50_000_000))
                    continue
                posts.append(
                    dict(
                        ts_ns=t,
                        pid=pid,
                        tid=tid,
                        fd=fd,
                        source=int(Source.SYSCALL),
                        op=RECVFROM,
                        key=tid,
                        addr=addr,
                        len=size,
                    )
                )
                t += int(rng.integers(1_000, 300_000_000))
                if t >= stop:
                    if quiet:
                        completions.append(
                            dict(ts_ns=stop, pid=pid, tid=tid, source=int(Source.SYSCALL),
                                 key=tid, ret=64)
                        )  # fmt: skip
                    break
                roll = rng.random()
                if roll < 0.07:
                    pass  # completion lost: the next post supersedes it
                elif roll < 0.35:
                    completions.append(
                        dict(
                            ts_ns=t,
                            pid=pid,
                            tid=tid,
                            source=int(Source.SYSCALL),
                            key=tid,
                            ret=-EAGAIN,
                        )
                    )
                    if rng.random() < 0.8:  # the netpoller waits meanwhile
                        waits.append(
                            dict(ts_ns=t - int(rng.integers(0, 2_000)), pid=pid, tid=pid * 100 + 99)
                        )
                        wait_ends.append(
                            dict(
                                ts_ns=t + int(rng.integers(1, 90_000_000)),
                                pid=pid,
                                tid=pid * 100 + 99,
                            )
                        )
                else:
                    ret = int(rng.choice([0, -104, 100, 1000, 7]))
                    completions.append(
                        dict(
                            ts_ns=t, pid=pid, tid=tid, source=int(Source.SYSCALL), key=tid, ret=ret
                        )
                    )
                t += int(rng.integers(0, 100_000_000))
        # allocations made and freed, some at the same addresses again; frees of the unseen
        for _ in range(400):
            a = HEAP + (pid << 24) + (1 << 22) + int(rng.integers(0, 60)) * 4096
            made = T0 + int(rng.integers(0, 3 * SECOND))
            allocs.append(
                dict(ts_ns=made, pid=pid, tid=pid, addr=a, size=int(rng.integers(1, 4096)))
            )
            if rng.random() < 0.8:
                frees.append(
                    dict(ts_ns=made + int(rng.integers(0, SECOND)), pid=pid, tid=pid, addr=a)
                )
        for _ in range(20):
            frees.append(
                dict(
                    ts_ns=T0 + int(rng.integers(0, 3 * SECOND)),
                    pid=pid,
                    tid=pid,
                    addr=HEAP + (pid << 24) + (1 << 23) + int(rng.integers(0, 9)) * 64,
                )
            )
        for k in range(1, 7):  # socket samples every half second, a listener in each
            at = T0 + k * SECOND // 2
            sockets.append(
                dict(
                    ts_ns=at,
                    pid=pid,
                    fd=3,
                    inode=pid * 1000,
                    family="tcp",
                    state="LISTEN",
                    rmem_alloc=0,
                )
            )
            for c in range(29):
                if closed_at.get(100 + c, end + 1) > at:
                    sockets.append(
                        dict(
                            ts_ns=at,
                            pid=pid,
                            fd=100 + c,
                            inode=pid * 1000 + c + 1,
                            family="tcp",
                            state="ESTABLISHED",
                            rmem_alloc=int(rng.integers(0, 2000)),
                        )
                    )
    tables = {
        "posts": posts,
        "completions": completions,
        "allocs": allocs,
        "frees": frees,
        "waits": waits,
        "wait_ends": wait_ends,
        "sockets": sockets,
    }
    w = TraceWriter(path)
    w.write_meta(
        Meta(
            complete=not killed,
            tracing_since_ns=T0,
            end_monotonic_ns=None if killed else end,
            memory=MemoryOptions(),
        )
    )
    w.append(
        schema.PROCESSES,
        schema.PROCESSES.filled(3, pid=np.array([4201, 4203, 4207]), comm=["a", "b", "c"]),
    )
    for name, rows in tables.items():
        rows.sort(key=lambda r: r["ts_ns"])
        table = schema.TABLES[name]
        cols = {k: [r.get(k, 0) for r in rows] for k in rows[0]}
        data = {k: (v if isinstance(v[0], str) else np.array(v)) for k, v in cols.items()}
        w.append(table, table.filled(len(rows), **data))
    w.close()
    return path


def cut(src: Path, dst: Path, rows: int, overlapping: bool = False) -> Path:
    """`src` written again with every table in parts of about `rows` rows: consecutive
    stretches of time, or (`overlapping`) rows dealt out in turn so that every part spans
    the whole recording."""
    meta = open_trace(src).meta
    meta.parts = None
    w = TraceWriter(dst)
    w.write_meta(meta)
    for name, table in open_trace_tables(src).items():
        n = table.num_rows
        pieces = max(1, n // rows)
        for i in range(pieces):
            if overlapping:
                take = np.arange(i, n, pieces)
            else:
                take = np.arange(i * n // pieces, (i + 1) * n // pieces)
            w.append(schema.TABLES[name], table.take(pa.array(take)))
    w.close()
    return dst


def in_memory(path: Path, timeline_s: float | None = 0.25) -> Relation:
    return relation_of(summarize(open_trace(path), timeline_s=timeline_s))


def same(streamed: Relation, expected: Relation) -> None:
    got, want = streamed.to_json(connections=True), expected.to_json(connections=True)
    for key in ("events", "windows"):  # how it streamed: the in-memory path says nothing
        got.pop(key), want.pop(key)
    assert got == want


@pytest.mark.parametrize("seed", [3, 7, 11])
@pytest.mark.parametrize("layout", ["consecutive", "overlapping"])
def test_streamed_figures_equal_in_memory_ones(
    tmp_path: Path, seed: int, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = busy_trace(tmp_path / "whole", seed)
    expected = in_memory(whole)
    assert sum(p.posted_reads.now for p in expected.processes) > 0
    assert any("parked" in p.by_source for p in expected.processes)
    assert sum(p.retained.buffers for p in expected.processes if p.retained) > 3
    parts = cut(whole, tmp_path / "parts", 37, overlapping=layout == "overlapping")
    posts = sorted((parts / "posts").glob("part-*.parquet"))
    assert len(posts) > 23  # reads posted in one part and completed in a later one
    monkeypatch.setattr("analysis.stream.STEPS_IN_MEMORY", 101)  # the steps go to disk
    for window in (53, 1009, 10**9):
        streamed = relate(parts, timeline_s=0.25, window_rows=window)
        same(streamed, expected)
        if window == 53:
            assert streamed.windows > 50
    assert relate(parts, timeline_s=0.25).events == sum(
        len(open_trace(whole)[t]) for t in BIG_TABLES
    )


def test_a_killed_recording_ends_at_its_last_event(tmp_path: Path) -> None:
    whole = busy_trace(tmp_path / "whole", 5, killed=True)
    same(
        relate(cut(whole, tmp_path / "parts", 211), timeline_s=0.5, window_rows=400),
        in_memory(whole, 0.5),
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda p: server_trace(p, 4242, 23, 3, 4099, queued=True),
        lambda p: server_trace(p, 4243, 23, 3, 4099, queued=False),
        mixed_trace,
        late_trace,
        walked_trace,
    ],
    ids=["queued", "readiness", "mixed", "late", "walked"],
)
def test_the_report_traces_stream_to_the_same_figures(tmp_path: Path, make) -> None:
    whole = make(tmp_path / "whole")
    same(
        relate(cut(whole, tmp_path / "parts", 5), timeline_s=0.5, window_rows=7),
        in_memory(whole, 0.5),
    )


def _edit_parts(trace: Path, change) -> None:
    meta = json.loads((trace / "meta.json").read_text())
    for parts in meta["parts"].values():
        for part in parts:
            change(part)
    (trace / "meta.json").write_text(json.dumps(meta))


def test_a_trace_whose_meta_json_lists_no_part_times_streams_from_the_footers(
    tmp_path: Path,
) -> None:
    """Traces written before parts carried their first and last timestamp in meta.json."""
    whole = busy_trace(tmp_path / "whole", 13)
    parts = cut(whole, tmp_path / "parts", 41, overlapping=True)
    _edit_parts(parts, lambda p: (p.pop("first_ns", None), p.pop("last_ns", None)))
    same(relate(parts, timeline_s=0.5, window_rows=101), in_memory(whole, 0.5))


def test_a_part_outside_the_times_meta_json_gives_it_is_refused(tmp_path: Path) -> None:
    parts = cut(busy_trace(tmp_path / "whole", 17), tmp_path / "parts", 41)

    def later(part: dict) -> None:
        if part["name"] == "part-000003.parquet" and "first_ns" in part:
            part["first_ns"] += 1

    _edit_parts(parts, later)
    with pytest.raises(TraceError, match="outside the"):
        relate(parts, window_rows=101)


def test_report_streams_by_itself_a_trace_too_big_for_the_memory_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from idlebuf.cli import main
    from idlebuf.commands import report

    trace = mixed_trace(tmp_path / "t")
    events = trace_events(trace)
    monkeypatch.setattr(report, "available_memory", lambda: 2 * events * 215 - 1)
    assert main(["report", "--json", "--connections", "--timeline", "1", str(trace)]) == 0
    out, err = capsys.readouterr()
    assert "streaming it (--in-memory to load it anyway)" in err and err.count("\n") == 1
    got = json.loads(out)
    assert got.pop("streamed") is True
    want = relate(trace, timeline_s=1.0).to_json(connections=True)
    assert got == want and got["processes"][0]["connection_table"]
    assert main(["report", "--json", "--in-memory", str(trace)]) == 0  # loaded after all
    out, err = capsys.readouterr()
    assert "streamed" not in json.loads(out) and not err
    monkeypatch.setattr(report, "available_memory", lambda: 2 * events * 215)
    assert main(["report", "--json", str(trace)]) == 0  # fits: loaded
    assert "streamed" not in json.loads(capsys.readouterr().out)


def test_the_streamed_report_says_what_it_could_not_see(tmp_path: Path) -> None:
    """A server attached to late: the buffers allocated before the attach are unknown, not
    0 bytes, and the reads posted now say they were found at attach."""
    from idlebuf.reporters.stream import render_relation

    text = render_relation(relate(late_trace(tmp_path / "late")), "T")
    assert "0 B + unknown" in text
    assert "posted now: 23 found at attach, 0 seen live" in text
    assert (
        "UNKNOWN IO-buffer heap: 23 connections, 92.1 KiB: buffers allocated before the "
        "attach: not traced" in text
    )
    assert "UNKNOWN posted reads: 7 connections: sockets of a Go binary stripped" in text
