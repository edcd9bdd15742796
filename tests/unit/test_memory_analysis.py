"""Memory analysis from synthetic tables: allocation lifetimes, the address join, idleness,
RSS, the time series (tiny traces through the engine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.engine import analyze
from analysis.memory import (
    SOCKET_KERNEL_FIELDS,
    allocation_intervals,
    buffer_attribution,
    idle_reads,
    live_at,
)
from probes.format import schema
from probes.format.meta import MemoryOptions, Meta, SlabCache
from probes.format.schema import PostFlag, RssMember, Source
from probes.format.writer import TraceWriter


def allocs(rows: list[tuple[int, int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(
        [(ts, pid, 0, addr, size, 1) for ts, pid, addr, size in rows],
        columns=["ts_ns", "pid", "tid", "addr", "size", "fn"],
    )


def frees(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(
        [(ts, pid, 0, addr) for ts, pid, addr in rows], columns=["ts_ns", "pid", "tid", "addr"]
    )


def test_a_free_ends_the_allocation_before_it_and_addresses_are_reused() -> None:
    iv = allocation_intervals(
        allocs([(10, 1, 0x1000, 64), (30, 1, 0x1000, 128), (12, 1, 0x5000, 32)]),
        frees([(20, 1, 0x1000)]),
    )
    assert iv[["addr", "size", "alloc_ns", "free_ns"]].fillna(-1).values.tolist() == [
        [0x1000, 64, 10, 20],
        [0x1000, 128, 30, -1],
        [0x5000, 32, 12, -1],
    ]
    assert len(live_at(iv, 25, "alloc_ns", "free_ns")) == 1  # only 0x5000 at t=25


def reads(rows: list[tuple[int, int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["pid", "fd", "addr", "len"])


def test_buffers_join_the_allocation_containing_them_by_byte_ranges() -> None:
    heap = pd.DataFrame(
        [(1, 0x1000, 0x400), (1, 0x2000, 0x100), (2, 0x1000, 0x10)],
        columns=["pid", "addr", "size"],
    )
    out = buffer_attribution(
        reads(
            [
                (1, 5, 0x1100, 0x80),
                (1, 6, 0x13C0, 0x80),
                (1, 7, 0x1800, 0x10),
                (2, 5, 0x1000, 0x10),
                (3, 5, 0x1000, 0x10),
            ]
        ),
        heap,
    )
    assert out["alloc_addr"].tolist() == [0x1000, 0x1000, 0, 0x1000, 0]
    # the second buffer runs past its allocation's end: only its inside bytes count
    assert out["attributed_bytes"].tolist() == [0x80, 0x40, 0, 0x10, 0]


def test_idle_means_no_data_for_the_threshold() -> None:
    from analysis.memory import connection_table

    nan = float("nan")
    intervals = pd.DataFrame(
        [
            (1, 5, 0x1000, 64, 100, 200.0, 7.0),
            (1, 5, 0x1000, 64, 200, nan, nan),
            (1, 6, 0x2000, 64, 100, nan, nan),
            (1, 7, 0x3000, 64, 900, nan, nan),  # first read at 900, its socket seen at 50
        ],
        columns=["pid", "fd", "addr", "len", "post_ns", "end_ns", "ret"],
    )
    sockets = pd.DataFrame(
        [(50, 1, 7, 7007, "tcp", "ESTABLISHED", "a", "b")],
        columns=["ts_ns", "pid", "fd", "inode", "family", "state", "local", "remote"],
    ).assign(**{c: 0 for c in SOCKET_KERNEL_FIELDS})
    retained = pd.DataFrame(columns=["pid", "fd", "attributed_bytes"])
    table = connection_table(intervals, sockets, retained, 1000, 850)
    posted = intervals[intervals["end_ns"].isna()]
    # fd 5 had data at 200; fd 6 none since its first read at 100; fd 7 none since its
    # socket was first seen at 50 (found before its read was: attached late)
    assert idle_reads(posted, table).tolist() == [False, True, True]


def test_retained_is_the_last_data_buffer_of_an_idle_connection() -> None:
    from analysis.retained import retained_buffers

    nan = float("nan")
    cols = ["pid", "fd", "addr", "len", "post_ns", "end_ns", "ret"]
    intervals = pd.DataFrame(
        [
            (1, 5, 0x1000, 64, 10, 20.0, 30.0),  # fd 5 keeps 0x1000: retained
            (1, 6, 0x2000, 64, 10, 20.0, 30.0),  # fd 6 read into a pool buffer...
            (1, 7, 0x2000, 64, 30, 40.0, 30.0),  # ...which fd 7 used next: fd 6 holds none
            (1, 8, 0x3000, 64, 10, 20.0, 30.0),  # fd 8 has a read posted now: not retained
            (1, 8, 0x3000, 64, 50, nan, nan),
            (1, 9, 0x4000, 64, 10, 95.0, 30.0),  # fd 9 had data recently: not idle
        ],
        columns=cols,
    )
    heap = pd.DataFrame(
        [(1, a, 64) for a in (0x1000, 0x2000, 0x3000, 0x4000)], columns=["pid", "addr", "size"]
    )
    held = retained_buffers(intervals, heap, at_ns=100, idle_threshold_ns=50)
    assert held[["fd", "alloc_addr"]].values.tolist() == [[5, 0x1000], [7, 0x2000]]


def test_connection_table_and_idle_cost() -> None:
    from analysis.memory import connection_table, idle_connection_cost

    nan = float("nan")
    intervals = pd.DataFrame(
        [
            (1, 5, 0x1000, 64, 10, 20.0, 30.0),  # fd 5: data at 20, then a posted read
            (1, 5, 0x1000, 64, 21, nan, nan),
            (1, 6, 0x2000, 64, 10, 90.0, 7.0),  # fd 6: data at 90: not idle
        ],
        columns=["pid", "fd", "addr", "len", "post_ns", "end_ns", "ret"],
    )
    base = {
        "rcvbuf": 0,
        "wmem_alloc": 0,
        "sndbuf": 0,
        "optmem": 0,
        "backlog": 0,
        "drops": 0,
        "rqueue": 0,
        "wqueue": 0,
        "ipv6": False,
        "inode": 0,
    }
    sockets = pd.DataFrame(
        [
            {
                **base,
                "ts_ns": 50,
                "pid": 1,
                "fd": 5,
                "family": "tcp",
                "state": "ESTABLISHED",
                "local": "a:1",
                "remote": "b:2",
                "rmem_alloc": 100,
                "wmem_queued": 20,
                "fwd_alloc": 3,
            },
            {
                **base,
                "ts_ns": 50,
                "pid": 1,
                "fd": 6,
                "family": "tcp",
                "state": "ESTABLISHED",
                "local": "a:1",
                "remote": "b:3",
                "rmem_alloc": 0,
                "wmem_queued": 0,
                "fwd_alloc": 0,
            },
            {
                **base,
                "ts_ns": 50,
                "pid": 1,
                "fd": 3,
                "family": "tcp",
                "state": "LISTEN",
                "local": "a:1",
                "remote": "*:0",
                "rmem_alloc": 0,
                "wmem_queued": 0,
                "fwd_alloc": 0,
            },
        ]
    )
    retained = pd.DataFrame(columns=["pid", "fd", "attributed_bytes"])
    table = connection_table(intervals, sockets, retained, at_ns=100, idle_threshold_ns=50)
    assert table["fd"].tolist() == [5, 6]  # the listener is not a connection
    assert table["idle"].tolist() == [True, False]
    assert table["posted_bytes"].tolist() == [64, 0]
    assert table["socket_kernel_bytes"].tolist() == [123, 0]
    assert table["bytes_received"].tolist() == [30, 7]
    (cost,) = idle_connection_cost(table).to_dict("records")
    assert (cost["idle_connections"], cost["per_idle_connection_bytes"]) == (1, 64 + 123)


def test_mappings_end_at_munmap_or_mremap_and_brk_is_a_size() -> None:
    from analysis.memory import mapping_intervals, program_break
    from probes.format.schema import MapFn

    cols = ["ts_ns", "pid", "addr", "len", "fn", "flags", "fd", "old_addr"]
    maps = pd.DataFrame(
        [
            (10, 1, 0x10000, 8192, MapFn.MMAP, 0x22, -1, 0),
            (11, 1, 0x20000, 4096, MapFn.MMAP, 0x22, -1, 0),
            (30, 1, 0x40000, 16384, MapFn.MREMAP, 0, -1, 0x20000),  # moved: 0x20000 is gone
            (5, 1, 0x500000, 0, MapFn.BRK, 0, -1, 0),
            (40, 1, 0x521000, 0, MapFn.BRK, 0, -1, 0),
        ],
        columns=cols,
    )
    unmaps = pd.DataFrame([(20, 1, 0x10000, 8192)], columns=["ts_ns", "pid", "addr", "len"])
    iv = mapping_intervals(maps, unmaps)
    assert iv[["addr", "unmap_ns"]].fillna(-1).values.tolist() == [
        [0x10000, 20],
        [0x20000, 30],
        [0x40000, -1],
    ]
    assert program_break(maps)["brk_heap_bytes"].tolist() == [0x21000]


def tiny_trace(
    path: Path,
    caches: dict[str, SlabCache] | None = None,
    traced_until: int | None = None,
    **tables: list[dict[str, object]],
) -> Path:
    """A trace from T to T + 300 ns (recorded with --memory) holding these rows; `caches`:
    the slab caches it read; `traced_until`: when its events stopped being taken."""
    w = TraceWriter(path)
    w.write_meta(Meta(complete=True, tracing_since_ns=T, end_monotonic_ns=T + 300,
                      traced_until_ns=traced_until,
                      memory=MemoryOptions(min_alloc=0), kernel_objects=caches or {}))  # fmt: skip
    w.append(schema.PROCESSES, schema.PROCESSES.filled(1, pid=1, comm="srv"))
    for name, rows in tables.items():
        table = schema.TABLES[name]
        columns = {k: [r[k] for r in rows] for k in rows[0]}
        w.append(table, table.filled(len(rows), **{
            k: v if isinstance(v[0], (str, bool)) else np.array(v) for k, v in columns.items()
        }))  # fmt: skip
    w.close()
    return path


def series(path: Path, figure: str) -> list[int | None]:
    """`figure` at each edge, every 100 ns from T: T + 100, T + 200, T + 300."""
    summary = analyze(path, timeline_s=100e-9)
    return [getattr(t, figure) for t in summary.timeline_of(1)]


T = 1_000  # the tiny traces' start (monotonic ns)


def test_rss_sums_resident_counters_of_the_last_address_space(tmp_path: Path) -> None:
    rss = [
        (1, 7, RssMember.ANON, 900),
        (2, 8, RssMember.ANON, 100),
        (3, 8, RssMember.FILE, 50),
        (4, 8, RssMember.ANON, 300),
        (5, 8, RssMember.SWAP, 999),
        (150, 8, RssMember.ANON, 200),
    ]
    trace = tiny_trace(tmp_path / "t", rss=[
        {"ts_ns": T + t, "pid": 1, "mm_id": mm, "member": int(m), "bytes": b}
        for t, mm, m, b in rss
    ])  # fmt: skip
    memory = analyze(trace).process(1).memory
    assert memory is not None
    # mm 7 was the pre-exec copy; swap is not resident
    assert (memory.rss.first, memory.rss.now, memory.rss.peak) == (100, 250, 350)
    assert series(trace, "rss_bytes") == [350, 250, 250]


def test_the_time_series_counts_reads_posted_and_the_heap_at_each_edge(tmp_path: Path) -> None:
    trace = tiny_trace(
        tmp_path / "t",
        posts=[
            {
                "ts_ns": T + 50,
                "pid": 1,
                "tid": 2,
                "fd": 5,
                "source": int(Source.SYSCALL),
                "op": 45,
                "key": 2,
                "addr": 0x1000,
                "len": 64,
            },
            {
                "ts_ns": T + 150,
                "pid": 1,
                "tid": 3,
                "fd": 6,
                "source": int(Source.SYSCALL),
                "op": 45,
                "key": 3,
                "addr": 0x1040,
                "len": 64,
            },
        ],  # fmt: skip
        completions=[
            {
                "ts_ns": T + 250,
                "pid": 1,
                "tid": 3,
                "source": int(Source.SYSCALL),
                "key": 3,
                "ret": 9,
            },
        ],  # fmt: skip
        allocs=[{"ts_ns": T + 5, "pid": 1, "tid": 2, "addr": 0x1000, "size": 128}],
        frees=[{"ts_ns": T + 280, "pid": 1, "tid": 2, "addr": 0x1000}],
    )
    assert series(trace, "posted_reads") == [1, 2, 1]  # fd 6's read ended at 250
    assert series(trace, "pinned_bytes") == [64, 128, 64]
    # each buffer in the 128-byte allocation; freed at 280, its read still posted
    assert series(trace, "io_buffer_heap_bytes") == [64, 128, 64]
    assert series(trace, "heap_live_bytes") == [128, 128, 0]
    # fd 5 idle from 50 + 1 s: never within 300 ns; the threshold is a second
    assert series(trace, "idle_connections") == [0, 0, 0]
    summary = analyze(trace, idle_threshold_s=100e-9, timeline_s=100e-9)
    # idle from 150 (fd 5, first seen at 50), fd 6 busy until its data at 250
    assert [t.idle_connections for t in summary.timeline_of(1)] == [0, 1, 1]
    # no RSS event: not measured (None), never 0; the connections seen reading are open
    assert series(trace, "rss_bytes") == [None, None, None]
    assert series(trace, "socket_kernel_bytes") == [None, None, None]
    assert series(trace, "connections_open") == [1, 2, 2]


def test_a_connection_is_idle_as_of_when_events_stopped_being_taken(tmp_path: Path) -> None:
    """The walks at a recording's end take time after its last drain (seconds, on a big
    heap): a read posted 150 ns before the drain is not idle at a 200 ns threshold, though
    the recording ends 250 ns after it."""
    post = {"ts_ns": T + 50, "pid": 1, "tid": 2, "fd": 5, "source": int(Source.SYSCALL),
            "op": 45, "key": 2, "addr": 0x1000, "len": 64}  # fmt: skip
    idle = []
    for until in (None, T + 200):
        trace = tiny_trace(tmp_path / f"t{until}", traced_until=until, posts=[post])
        memory = analyze(trace, idle_threshold_s=200e-9).process(1).memory
        assert memory is not None
        idle.append(memory.idle_posted_reads)
    assert idle == [1, 0]


def test_connections_that_all_closed_are_closed(tmp_path: Path) -> None:
    """A last sample with only the listener: every connection had closed by then, in the
    per-connection table and in the time series alike (not "open" from an earlier sample).
    A connection counts as open from when it was first seen to the last sample showing it."""

    def row(ts: int, fd: int, state: str) -> dict[str, object]:
        return {"ts_ns": T + ts, "pid": 1, "fd": fd, "inode": 100 + fd, "family": "tcp",
                "state": state, "local": "a:1", "remote": "b:2"}  # fmt: skip

    shown = [row(at, fd, "ESTABLISHED") for at in (120, 210) for fd in (5, 6)]
    trace = tiny_trace(
        tmp_path / "t",
        sockets=shown + [row(120, 3, "LISTEN"), row(210, 3, "LISTEN"), row(250, 3, "LISTEN")],
    )
    memory = analyze(trace, idle_threshold_s=10e-9).process(1).memory
    assert memory is not None
    table = memory.connection_rows
    assert table["closed_ns"].tolist() == [T + 210, T + 210]
    assert not table["idle"].any()
    # seen from 120 to 210: open at the edge at 200, not at 100 nor at 300
    assert series(trace, "connections_open") == [0, 2, 0]


def test_an_fd_reused_after_the_end_of_a_stream_is_another_connection(tmp_path: Path) -> None:
    """fd 7 reads 26 bytes into a 507-byte buffer, then 0 (the peer closed): its connection
    is over, closed at that read. The next accept gets fd 7 again; it never sends a byte, so
    only the socket samples show it: a connection of its own, open and idle, holding no
    buffer, with nothing of the first one's bytes."""

    def read(ts: int, key: int, ret: int) -> tuple[dict[str, object], dict[str, object]]:
        post = {"ts_ns": T + ts, "pid": 1, "tid": 2, "fd": 7, "source": int(Source.SYSCALL),
                "op": 45, "key": key, "addr": 0x1000, "len": 507}  # fmt: skip
        done = {"ts_ns": T + ts + 5, "pid": 1, "tid": 2, "source": int(Source.SYSCALL),
                "key": key, "ret": ret}  # fmt: skip
        return post, done

    first, eof = read(10, 1, 26), read(20, 2, 0)
    sample = {"ts_ns": T + 150, "pid": 1, "fd": 7, "inode": 99, "family": "tcp",
              "state": "ESTABLISHED", "local": "a:1", "remote": "b:3"}  # fmt: skip
    trace = tiny_trace(
        tmp_path / "t",
        posts=[first[0], eof[0]],
        completions=[first[1], eof[1]],
        allocs=[{"ts_ns": T + 1, "pid": 1, "tid": 2, "addr": 0x1000, "size": 507}],
        sockets=[sample],
    )
    memory = analyze(trace, idle_threshold_s=100e-9, timeline_s=100e-9).process(1).memory
    assert memory is not None
    table = memory.connection_rows.sort_values("opened_ns")
    assert table["fd"].tolist() == [7, 7]
    assert table["bytes_received"].tolist() == [26, 0]
    assert table["closed_ns"].tolist()[0] == T + 25  # the end of its stream
    assert pd.isna(table["closed_ns"].tolist()[1])
    assert table["idle"].tolist() == [False, True]
    assert table["retained_bytes"].tolist() == [0, 0]
    assert (memory.connections.open, memory.connections.idle) == (1, 1)
    assert memory.retained.buffers == 0
    # over time: the first from 10 to 25, the second from its sample at 150
    assert series(trace, "connections_open") == [0, 1, 1]


def test_an_io_uring_poll_armed_on_an_idle_connection_is_its_waiter(tmp_path: Path) -> None:
    """A POLL_ADD on a socket reads nothing: it is no posted read and pins no byte, and its
    completion's result (an event mask) is not bytes received; armed at the end on an idle
    connection, its request is one io_kiocb in that connection's kernel cost."""

    def poll(ts: int, key: int, fd: int) -> dict[str, object]:
        return {"ts_ns": T + ts, "pid": 1, "tid": 2, "fd": fd, "source": int(Source.URING),
                "op": 6, "key": key, "len": 0, "flags": int(PostFlag.SOCKET)}  # fmt: skip

    def sample(fd: int) -> dict[str, object]:
        return {"ts_ns": T + 250, "pid": 1, "fd": fd, "inode": 100 + fd, "family": "tcp",
                "state": "ESTABLISHED", "sock_type": 1}  # fmt: skip

    fired = {"ts_ns": T + 40, "pid": 1, "tid": 2, "source": int(Source.URING), "key": 1,
             "ret": 1}  # fmt: skip
    trace = tiny_trace(
        tmp_path / "t",
        caches={"TCP": SlabCache(2304, 2368, 13, 32768), "io_kiocb": SlabCache(248, 256, 16, 4096)},
        posts=[poll(10, 1, 5), poll(20, 2, 5), poll(30, 3, 6)],
        completions=[fired],
        sockets=[sample(5), sample(6)],
    )
    summary = analyze(trace, idle_threshold_s=10e-9)
    p = summary.process(1)
    assert (p.posted_reads.now, p.pinned_bytes.now, p.bytes_received) == (0, 0, 0)
    assert p.by_source["uring poll"].posted_reads == 2  # armed at the end, on fds 5 and 6
    assert p.memory is not None
    cost = p.memory.per_idle_connection
    # each idle connection: one request armed, its waiter (not in the kernel part: once)
    assert "io_kiocb" not in {k.cache for k in cost.kernel_parts}
    (waiter,) = cost.waiter_parts
    assert (waiter.waiter, waiter.part, waiter.bytes) == ("uring_request", "io_kiocb", 256.0)


def test_a_parked_read_whose_thread_or_process_waits_on_it_has_a_waiter() -> None:
    """MariaDB's threads read with MSG_DONTWAIT and then poll() their own socket; a
    PostgreSQL backend epoll_waits on its own: their EAGAIN-then-wait reads are parked, and
    the thread or process found waiting on that connection alone carries them - not a
    runtime. Only a parked read no such waiter holds is a runtime's (a goroutine's)."""
    from analysis.figures import parked_without_waiter

    reads = pd.DataFrame(
        {"pid": [1, 1, 1, 2], "fd": [5, 6, 7, 5], "source": [int(Source.PARKED)] * 3 + [1]}
    )
    waiters = pd.DataFrame(
        {"pid": [1, 1, 2], "fd": [5, 7, 5], "kind": ["thread", "goroutine", "process"]}
    )
    # fd 5: a thread polls it; fd 6: nothing found; fd 7: a goroutine (counted as such)
    assert parked_without_waiter(reads, waiters) == 2
    assert parked_without_waiter(reads, waiters.iloc[0:0]) == 3
    assert parked_without_waiter(reads[reads["fd"] == 5], waiters) == 0


def test_a_process_that_exited_holds_no_connection() -> None:
    """A PostgreSQL backend reads its client's Terminate message (or a startup it refuses)
    and exits: no read returned 0 and no sample showed its socket. It is closed at its last
    sign of life, not an idle connection open at the end; a target alive at the end (a
    status read then) keeps its own."""
    from analysis.figures import closed_by_exit, exited_while_recorded

    status = pd.DataFrame({"pid": [1, 1, 2], "what": ["attach", "end", "attach"]})
    processes = pd.DataFrame({"pid": [1, 2, 3]})
    exited = exited_while_recorded({"proc_status": status, "processes": processes})
    assert exited == {2, 3}
    # an older trace, or one cut short: no status read at the end, nothing is known to exit
    assert exited_while_recorded({"proc_status": status.iloc[:1], "processes": processes}) == set()
    table = pd.DataFrame(
        {"pid": [1, 2, 3], "fd": [7, 7, 7], "opened_ns": [10.0, 10.0, 10.0],
         "last_data_ns": [20.0, 30.0, np.nan], "closed_ns": [np.nan, np.nan, 15.0],
         "idle": [True, True, False], "retained_bytes": [0, 99, 0]}
    )  # fmt: skip
    out = closed_by_exit(table, exited)
    assert out["closed_ns"].tolist() == [pytest.approx(np.nan, nan_ok=True), 30.0, 15.0]
    assert out["idle"].tolist() == [True, False, False]
    assert out["retained_bytes"].tolist() == [0, 0, 0]


def test_the_server_s_unknowns_are_one_line_per_reason() -> None:
    """The targets as one server (PostgreSQL's backends): a reason several processes give
    is said once, for all the connections it concerns."""
    from analysis.figures import merged_unknowns
    from analysis.results import Unknown

    merged = merged_unknowns(
        [Unknown(1, "a", 10), Unknown(1, "b"), Unknown(2, "a", 5), Unknown(3, "b", 7)]
    )
    assert [(u.connections, u.why, u.bytes) for u in merged] == [(3, "a", 15), (4, "b", None)]
