"""Memory analysis from synthetic tables: allocation lifetimes, the address join, idleness, RSS."""

from __future__ import annotations

import pandas as pd

from analysis.memory import (
    allocation_intervals,
    buffer_attribution,
    connection_activity,
    idle_reads,
    live_at,
    rss_now_and_peak,
)
from probes.format.schema import RssMember


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
    intervals = pd.DataFrame(
        [
            (1, 5, 100, 200.0, 7.0),
            (1, 5, 200, float("nan"), float("nan")),
            (1, 6, 100, float("nan"), float("nan")),
        ],
        columns=["pid", "fd", "post_ns", "end_ns", "ret"],
    )
    posted = intervals[intervals["end_ns"].isna()]
    idle = idle_reads(posted, connection_activity(intervals), at_ns=1000, idle_threshold_ns=850)
    assert idle.tolist() == [False, True]  # fd 5 had data at 200, fd 6 never since 100


def test_rss_sums_resident_counters_of_the_last_address_space() -> None:
    rss = pd.DataFrame(
        [
            (1, 1, 7, RssMember.ANON, 900),
            (2, 1, 8, RssMember.ANON, 100),
            (3, 1, 8, RssMember.FILE, 50),
            (4, 1, 8, RssMember.ANON, 300),
            (5, 1, 8, RssMember.SWAP, 999),
        ],
        columns=["ts_ns", "pid", "mm_id", "member", "bytes"],
    )
    (row,) = rss_now_and_peak(rss).to_dict("records")
    assert (row["rss_now"], row["rss_peak"]) == (350, 350)  # mm 7 was the pre-exec copy


def test_retained_is_the_last_data_buffer_of_an_idle_connection() -> None:
    from analysis.memory import retained_buffers

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


def test_process_timeline_steps() -> None:
    from analysis.memory import process_timeline

    posted = pd.DataFrame(
        [(1, 150, 1, 64), (1, 250, 2, 128)],
        columns=["pid", "ts_ns", "posted_reads", "pinned_bytes"],
    )
    allocations = pd.DataFrame(
        [(1, 0x10, 1000, 1, 120, 260.0)],
        columns=["pid", "addr", "size", "fn", "alloc_ns", "free_ns"],
    )
    empty_rss = pd.DataFrame(columns=["ts_ns", "pid", "mm_id", "member", "bytes"])
    empty_sockets = pd.DataFrame(
        columns=["ts_ns", "pid", "fd", "family", "state", "rmem_alloc", "wmem_queued", "fwd_alloc"]
    )
    tl = process_timeline(posted, allocations, empty_rss, empty_sockets, 100, 300, 100)
    assert tl["t_s"].tolist() == [1e-7, 2e-7]
    assert tl["posted_reads"].tolist() == [1, 2]
    assert tl["heap_live_bytes"].tolist() == [1000, 0]  # freed at 260


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


def test_buffer_timeline_joins_at_each_instant() -> None:
    import numpy as np

    from analysis.memory import buffer_timeline

    nan = float("nan")
    reads = pd.DataFrame(
        [(1, 5, 0x1000, 64, 10, nan, nan), (1, 6, 0x1040, 64, 10, 150.0, 9.0)],
        columns=["pid", "fd", "addr", "len", "post_ns", "end_ns", "ret"],
    )
    allocations = pd.DataFrame(
        [(1, 0x1000, 128, 1, 0, 5, nan)],
        columns=["pid", "addr", "size", "fn", "stack_id", "alloc_ns", "free_ns"],
    )
    tl = buffer_timeline(reads, allocations, np.array([100, 200, 300]), idle_threshold_ns=120)
    assert tl["io_buffer_heap_bytes"].tolist() == [128, 64, 64]  # fd 6's read ended at 150
    assert tl["idle_connections"].tolist() == [0, 1, 2]  # fd 5 since 10; fd 6 since data at 150


def test_connections_that_all_closed_are_closed() -> None:
    """A last sample with only the listener: every connection had closed by then, in the
    per-connection table and in the time series alike (not "open" from an earlier sample)."""
    from analysis.memory import connection_table, process_timeline

    def row(ts: int, fd: int, state: str) -> dict[str, object]:
        return {"ts_ns": ts, "pid": 1, "fd": fd, "inode": 100 + fd, "family": "tcp",
                "ipv6": False, "state": state, "local": "a:1", "remote": "b:2",
                "rmem_alloc": 0, "wmem_queued": 0, "fwd_alloc": 0}  # fmt: skip

    sockets = pd.DataFrame(
        [row(100, 5, "ESTABLISHED"), row(100, 6, "ESTABLISHED"), row(100, 3, "LISTEN")]
        + [row(200, 3, "LISTEN")]
    )
    reads = pd.DataFrame(columns=["pid", "fd", "addr", "len", "post_ns", "end_ns", "ret"])
    retained = pd.DataFrame(columns=["pid", "fd", "attributed_bytes"])
    table = connection_table(reads, sockets, retained, at_ns=250, idle_threshold_ns=10)
    assert table["closed_ns"].tolist() == [100, 100]
    assert not table["idle"].any()
    empty = pd.DataFrame(columns=["pid", "ts_ns", "posted_reads", "pinned_bytes"])
    allocations = pd.DataFrame(columns=["pid", "addr", "size", "fn", "alloc_ns", "free_ns"])
    rss = pd.DataFrame(columns=["ts_ns", "pid", "mm_id", "member", "bytes"])
    tl = process_timeline(empty, allocations, rss, sockets, 50, 250, 100)
    assert tl["connections_open"].tolist() == [2, 0]
