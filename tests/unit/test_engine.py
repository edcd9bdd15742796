"""The analysis engine (analysis.engine.analyze) gives exactly the same report, every figure
of it, whatever the windows it works through: one window (in memory) or windows of a few
events, on traces cut into many parts - reads posted in one part and completed in another,
parts whose times overlap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from analysis.engine import analyze
from analysis.windows import EVENT_COLUMNS, trace_events
from probes.format import schema
from probes.format.errors import TraceError
from probes.format.meta import MemoryOptions, Meta
from probes.format.reader import open_trace
from probes.format.schema import GroupKind, PostFlag, Source
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
                            dict(
                                ts_ns=stop,
                                pid=pid,
                                tid=tid,
                                source=int(Source.SYSCALL),
                                key=tid,
                                ret=64,
                            )
                        )
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
                    dict(
                        ts_ns=min(made + int(rng.integers(0, SECOND)), end - 1),
                        pid=pid,
                        tid=pid,
                        addr=a,
                    )
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
        **other_tables(rng, end),
    }
    w = TraceWriter(path)
    w.write_meta(
        Meta(
            complete=not killed,
            tracing_since_ns=T0,
            end_monotonic_ns=None if killed else end,
            memory=MemoryOptions(min_alloc=0),  # the heap fit from every allocation traced
        )
    )
    w.append(
        schema.PROCESSES,
        schema.PROCESSES.filled(3, pid=np.array([4201, 4203, 4207]), comm=["a", "b", "c"]),
    )
    for name, rows in tables.items():
        rows = sorted((r for r in rows if r["ts_ns"] <= end), key=lambda r: r["ts_ns"])
        table = schema.TABLES[name]
        cols = {k: [r.get(k, 0) for r in rows] for k in rows[0]}
        data = {k: (v if isinstance(v[0], (str, bool)) else np.array(v)) for k, v in cols.items()}
        w.append(table, table.filled(len(rows), **data))
    w.close()
    return path


def other_tables(rng: np.random.Generator, end: int) -> dict[str, list[dict]]:
    """busy_trace's other tables: writes (some still pending at the end), resident memory
    (two address spaces: the exec'd command's is the last), /proc status samples, io_uring
    buffer uses (multishot completions among them), the walkers' heap blocks, and memory
    points over which the heap is fitted against the connections held."""
    out: dict[str, list[dict]] = {
        k: []
        for k in (
            "writes",
            "write_completions",
            "rss",
            "proc_status",
            "buffer_uses",
            "buffer_groups",
            "buffer_rings",
            "heap_blocks",
            "memory_points",
        )
    }
    for pid in (4201, 4203, 4207):
        for c in range(17):
            t = T0 + int(rng.integers(0, SECOND))
            while t < end:
                out["writes"].append(
                    dict(
                        ts_ns=t,
                        pid=pid,
                        tid=pid * 100 + c,
                        fd=100 + c,
                        source=int(Source.SYSCALL),
                        op=44,
                        key=pid * 100 + c,
                        addr=HEAP + (pid << 24) + (1 << 21) + c * 64,
                        len=int(rng.integers(1, 9000)),
                    )
                )
                t += int(rng.integers(1_000, 400_000_000))
                if t < end and rng.random() < 0.9:
                    out["write_completions"].append(
                        dict(
                            ts_ns=t,
                            pid=pid,
                            tid=pid * 100 + c,
                            source=int(Source.SYSCALL),
                            key=pid * 100 + c,
                            ret=int(rng.choice([-11, 10, 4000])),
                        )
                    )
                t += int(rng.integers(1_000, 100_000_000))
        for i in range(300):
            mm = 7 if i < 20 else 9  # the pre-exec copy first, then the command's own
            out["rss"].append(
                dict(
                    ts_ns=T0 + i * 9_000_000 + pid,
                    pid=pid,
                    mm_id=mm,
                    member=int(rng.choice([0, 1, 3, 2])),
                    bytes=int(rng.integers(1, 1 << 24)),
                )
            )
        for what, at in (("attach", T0), ("end", end)):
            out["proc_status"].append(
                dict(
                    ts_ns=at,
                    pid=pid,
                    mm_id=0 if what == "end" else 9,
                    what=what,
                    vm_rss=5 << 20,
                    rss_anon=3 << 20,
                    rss_file=2 << 20,
                    rss_shmem=4096,
                )
            )
        ring = 0xABC000 + pid
        out["buffer_groups"].append(
            dict(
                ts_ns=T0,
                pid=pid,
                ring=ring,
                group=1,
                how=int(GroupKind.RING),
                addr=HEAP,
                entries_or_size=64,
                buffers=0,
                first_id=0,
            )
        )
        out["buffer_rings"].append(
            dict(
                ts_ns=T0 + 1,
                pid=pid,
                ring=ring,
                group=1,
                entries=64,
                tail=64,
                buffers=64,
                bytes=64 * 512,
            )
        )
        for i in range(97):
            out["buffer_uses"].append(
                dict(
                    ts_ns=T0 + int(rng.integers(0, 3 * SECOND)),
                    pid=pid,
                    ring=ring,
                    group=1,
                    buffer_id=i % 64,
                    bytes=int(rng.choice([-105, 100, 1500])),
                    user_data=1,
                    request=int(rng.choice([0, 0xF00 + i])),
                )
            )
        for c in range(0, 29, 4):
            buf = HEAP + (pid << 24) + c * 8192
            out["heap_blocks"].append(
                dict(
                    ts_ns=T0 + SECOND,
                    pid=pid,
                    buffer=buf,
                    addr=buf - 16,
                    size=20000,
                    allocator="glibc",
                    what="flush",
                    why="",
                )
            )
        for k in range(13):
            out["memory_points"].append(
                dict(
                    ts_ns=T0 + k * 200_000_000 + 7,
                    pid=pid,
                    sockets=10 + 2 * (k % 7),
                    heap_bytes=0,
                    heap_blocks=0,
                    why="not walked",
                    vm_rss=(5 << 20) + k * 4096,
                    rss_anon=3 << 20,
                    moving=bool(k == 5),
                )
            )
    return out


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


def report(path: Path, window_rows: int | None = None, timeline_s: float | None = 0.25) -> dict:
    return analyze(path, timeline_s=timeline_s, window_rows=window_rows).to_json(connections=True)


@pytest.mark.parametrize("seed", [3, 7, 11])
@pytest.mark.parametrize("layout", ["consecutive", "overlapping"])
def test_every_window_size_gives_the_same_report(
    tmp_path: Path, seed: int, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = busy_trace(tmp_path / "whole", seed)
    expected = report(whole)
    processes = expected["processes"]
    # the trace holds what windows could get wrong
    assert sum(p["posted_reads"]["now"] for p in processes) > 0
    assert all("parked" in p["by_source"] for p in processes)
    assert sum(p["memory"]["retained"]["buffers"] for p in processes) > 3
    assert all(p["writes"]["pending_writes"] and p["writes"]["bytes_sent"] for p in processes)
    assert all(p["buffer_groups"][0]["consumed"] for p in processes)
    assert all(p["memory"]["per_idle_connection"]["fit"] for p in processes)
    assert all(p["memory"]["rss"]["peak"] for p in processes)
    for figure in ("idle_connections", "io_buffer_heap_bytes", "pending_writes", "rss_bytes"):
        assert any(t[figure] for t in expected["timeline"]), figure
    parts = cut(whole, tmp_path / "parts", 37, overlapping=layout == "overlapping")
    posts = sorted((parts / "posts").glob("part-*.parquet"))
    assert len(posts) > 23  # reads posted in one part and completed in a later one
    monkeypatch.setattr("analysis.series.STEPS_IN_MEMORY", 101)  # the steps go to disk
    # windows of a few events (slow: each window costs ~0.2 s here) once
    for window in (53, 1009) if (seed, layout) == (3, "consecutive") else (1009,):
        said: list[str] = []
        got = analyze(parts, timeline_s=0.25, window_rows=window, progress=said.append)
        assert got.to_json(connections=True) == expected, window
        assert len(said) > (50 if window == 53 else 3)
    assert trace_events(parts) == sum(len(open_trace(whole)[t]) for t in EVENT_COLUMNS)


def test_a_killed_recording_ends_at_its_last_event(tmp_path: Path) -> None:
    whole = busy_trace(tmp_path / "whole", 5, killed=True)
    parts = cut(whole, tmp_path / "parts", 211)
    assert report(parts, 400, 0.5) == report(whole, None, 0.5)


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
def test_the_report_traces_give_the_same_report_in_windows(tmp_path: Path, make) -> None:
    whole = make(tmp_path / "whole")
    assert report(cut(whole, tmp_path / "parts", 5), 7, 0.5) == report(whole, None, 0.5)


def _edit_parts(trace: Path, change) -> None:
    meta = json.loads((trace / "meta.json").read_text())
    for parts in meta["parts"].values():
        for part in parts:
            change(part)
    (trace / "meta.json").write_text(json.dumps(meta))


def test_a_trace_whose_meta_json_lists_no_part_times_is_read_from_the_footers(
    tmp_path: Path,
) -> None:
    """Traces written before parts carried their first and last timestamp in meta.json."""
    whole = busy_trace(tmp_path / "whole", 13)
    parts = cut(whole, tmp_path / "parts", 41, overlapping=True)
    _edit_parts(parts, lambda p: (p.pop("first_ns", None), p.pop("last_ns", None)))
    assert report(parts, 101, 0.5) == report(whole, None, 0.5)


def test_a_part_outside_the_times_meta_json_gives_it_is_refused(tmp_path: Path) -> None:
    parts = cut(busy_trace(tmp_path / "whole", 17), tmp_path / "parts", 41)

    def later(part: dict) -> None:
        listed = part.get("first_ns"), part.get("last_ns")
        if part["name"] == "part-000003.parquet" and None not in listed and listed[0] < listed[1]:
            part["first_ns"] += 1

    _edit_parts(parts, later)
    for window in (101, None):
        with pytest.raises(TraceError, match="outside the"):
            analyze(parts, window_rows=window)


def test_report_reads_in_windows_and_in_memory_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from idlebuf.cli import main

    trace = busy_trace(tmp_path / "t", 19)
    args = ["report", "--json", "--connections", "--timeline", "1", str(trace)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    windowed = json.loads(out)
    assert any(p.get("memory", {}).get("connection_table") for p in windowed["processes"])
    assert main([*args, "--in-memory"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == windowed and not err


def test_a_report_in_windows_says_what_it_could_not_see(tmp_path: Path) -> None:
    """A server attached to late: the buffers allocated before the attach are unknown, not
    0 bytes, and the reads posted now say they were found at attach."""
    from idlebuf.reporters.text import render_report

    text = render_report(analyze(late_trace(tmp_path / "late"), window_rows=3), "T")
    assert "+ unknown" in text
    assert "23 found at attach, 0 seen live" in text
    assert "buffers allocated before the attach: not traced" in text
    assert "sockets of a Go binary stripped" in text
