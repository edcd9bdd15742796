"""Small traces built in the test, as the recorder would write them, with known figures.

`server_trace` writes a 3-second recording (made with --memory) of one server with
`connections` connections on fds 100.., `active` of which receive 100 bytes at 1 s and
at 2.5 s (at the end those are active, the others idle):
- queued: every connection keeps a read posted on its own malloc'd buffer;
- readiness: only a readable connection reads, into one pooled malloc'd buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from probes.format import schema
from probes.format.meta import (
    Allocator,
    GoAtAttach,
    MemoryOptions,
    Meta,
    Probes,
    ProbeState,
    ProcessAtAttach,
    RingAtAttach,
    SlabCache,
    Targets,
)
from probes.format.schema import GroupKind, MapFn, PostFlag, Source
from probes.format.writer import TraceWriter

SECOND = 1_000_000_000
T0 = 10 * SECOND  # the recording starts here (monotonic ns) and lasts 3 s
HEAP = 0x7F00_0000_0000
RECVFROM = 45
SOCKET_RMEM = 768  # rmem_alloc + fwd_alloc of each socket in the last sample
KERNEL_STACK = 16384  # a thread's kernel stack (THREAD_SIZE) on the recording's kernel
WAITER_STACK = 5 * 4096  # resident bytes of a blocked thread's user stack


def server_trace(
    path: Path, pid: int, connections: int, active: int, buffer: int, queued: bool
) -> Path:
    w = TraceWriter(path)
    w.write_meta(
        Meta(
            complete=True,
            tracing_since_ns=T0,
            end_monotonic_ns=T0 + 3 * SECOND,
            memory=MemoryOptions(),
        )
    )
    server_tables(w, pid, connections, active, buffer, queued)
    w.close()
    return path


def server_tables(
    w: TraceWriter, pid: int, connections: int, active: int, buffer: int, queued: bool
) -> None:
    """server_trace's tables, written through `w`."""
    fds = list(range(100, 100 + connections))
    w.append(schema.PROCESSES, schema.PROCESSES.filled(1, pid=pid, comm="srv", first_seen_ns=T0))
    posts: list[tuple[int, int, int, int]] = []  # (ts, fd, key, addr)
    completions: list[tuple[int, int, int]] = []  # (ts, key, ret)
    key = 1
    if queued:  # one buffer per connection, a read posted on it at once
        addrs = [HEAP + i * 2 * buffer for i in range(connections)]
        allocs = [(T0 + i * 1000, a) for i, a in enumerate(addrs)]
        for i, fd in enumerate(fds):
            posts.append((T0 + 1000 * i + 500, fd, key, addrs[i]))
            key += 1
    else:
        allocs = [(T0, HEAP)]
    for second in (1, 2.5):  # the active connections receive 100 bytes, twice
        for i, fd in enumerate(fds[:active]):
            ts = T0 + int(second * SECOND) + i * 1000
            if queued:
                prior = next(p for p in reversed(posts) if p[1] == fd)
                completions.append((ts, prior[2], 100))
                posts.append((ts + 10, fd, key, prior[3]))
            else:
                posts.append((ts, fd, key, HEAP))
                completions.append((ts + 10, key, 100))
            key += 1
    w.append(
        schema.POSTS,
        schema.POSTS.filled(
            len(posts),
            ts_ns=[p[0] for p in posts],
            pid=pid,
            tid=pid,
            fd=[p[1] for p in posts],
            source=int(Source.SYSCALL),
            op=RECVFROM,
            key=[p[2] for p in posts],
            addr=[p[3] for p in posts],
            len=buffer,
        ),
    )
    w.append(
        schema.COMPLETIONS,
        schema.COMPLETIONS.filled(
            len(completions),
            ts_ns=[c[0] for c in completions],
            pid=pid,
            tid=pid,
            source=int(Source.SYSCALL),
            key=[c[1] for c in completions],
            ret=[c[2] for c in completions],
        ),
    )
    w.append(
        schema.ALLOCS,
        schema.ALLOCS.filled(
            len(allocs),
            ts_ns=[a[0] for a in allocs],
            pid=pid,
            tid=pid,
            addr=[a[1] for a in allocs],
            size=buffer,
        ),
    )
    base_rss = 8 << 20
    grown = base_rss + len(allocs) * buffer
    w.append(
        schema.RSS,
        schema.RSS.filled(
            2,
            ts_ns=[T0, T0 + SECOND // 2],
            pid=pid,
            mm_id=1,
            member=int(schema.RssMember.ANON),
            bytes=[base_rss, grown],
        ),
    )
    w.append(
        schema.SOCKETS,
        schema.SOCKETS.filled(  # sampled twice: half a second in, and at the end
            2 * connections,
            ts_ns=[T0 + SECOND // 2] * connections + [T0 + 3 * SECOND - 1] * connections,
            pid=pid,
            fd=fds * 2,
            inode=[5000 + fd for fd in fds] * 2,
            family="tcp",
            state="ESTABLISHED",
            rmem_alloc=SOCKET_RMEM // 2,
            fwd_alloc=SOCKET_RMEM // 2,
        ),
    )


def mixed_trace(path: Path, pid: int = 4242) -> Path:
    """server_trace's queued server (23 connections, 3 active, 4,099-byte buffers) plus what
    the other tables carry: writes (4 pending, 2 returned), readiness waits (3 begun, 2
    ended), io_uring RECVs (5 posted on sockets, one buffer-select; 2 completed; a READ of a
    file), a PROVIDE_BUFFERS group of 7 buffers of 512 bytes with 2 used, a mapping holding
    one posted buffer, brk growth, an allocation stack, and residency of the posted buffers.
    Pins every section of `report --json` (the golden files)."""
    w = TraceWriter(path)
    w.write_meta(
        Meta(
            complete=True,
            drops={"ringbuf_full": 0, "inflight_full": 2},
            tracing_since_ns=T0,
            end_monotonic_ns=T0 + 3 * SECOND,
            elapsed_s=3.0,
            stop_reason="duration",
            probes=Probes(ProbeState(uring="traced")),
            memory=MemoryOptions(),
        )
    )
    server_tables(w, pid, 23, 3, 4099, queued=True)
    ms = SECOND // 1000
    w.append(
        schema.WRITES,
        schema.WRITES.filled(
            6,
            ts_ns=[T0 + k * ms for k in range(1, 7)],
            pid=pid,
            tid=[pid + k for k in range(6)],
            fd=[200 + k for k in range(6)],
            source=int(Source.SYSCALL),
            op=44,
            key=[pid + k for k in range(6)],
            addr=[HEAP + 0x100_0000 + k * 8192 for k in range(6)],
            len=8191,
        ),
    )
    w.append(
        schema.WRITE_COMPLETIONS,
        schema.WRITE_COMPLETIONS.filled(
            2,
            ts_ns=[T0 + 10 * ms, T0 + 11 * ms],
            pid=pid,
            tid=[pid, pid + 1],
            source=int(Source.SYSCALL),
            key=[pid, pid + 1],
            ret=[8191, 100],
        ),
    )
    w.append(
        schema.WAITS,
        schema.WAITS.filled(
            3, ts_ns=[T0 + k * ms for k in (1, 2, 3)], pid=pid, tid=pid, call=1, fd=9, watched=64
        ),
    )
    w.append(
        schema.WAIT_ENDS,
        schema.WAIT_ENDS.filled(2, ts_ns=[T0 + 4 * ms, T0 + 5 * ms], pid=pid, tid=pid, ret=1),
    )
    ring = 0xFFFF_8880_0000_0000
    flags = [int(PostFlag.SOCKET)] * 4 + [int(PostFlag.SOCKET | PostFlag.BUFFER_SELECT), 0]
    uring_addr = [HEAP + 0x200_0000 + k * 2048 for k in range(5)] + [HEAP + 0x300_0000]
    w.append(
        schema.POSTS,
        schema.POSTS.filled(
            6,
            ts_ns=[T0 + 2 * SECOND + k * ms for k in range(6)],
            pid=pid,
            tid=pid,
            fd=[300 + k for k in range(6)],
            source=int(Source.URING),
            op=[27] * 5 + [22],
            key=[ring + 0x100 * (k + 1) for k in range(6)],
            addr=[a if f != flags[4] else 0 for a, f in zip(uring_addr, flags)],
            len=[2048] * 4 + [0, 4096],
            flags=flags,
            ring=ring,
            user_data=list(range(1, 7)),
            group=[0, 0, 0, 0, 3, 0],
        ),
    )
    w.append(
        schema.COMPLETIONS,
        schema.COMPLETIONS.filled(
            2,
            ts_ns=[T0 + 2 * SECOND + 20 * ms, T0 + 2 * SECOND + 21 * ms],
            pid=pid,
            tid=pid,
            source=int(Source.URING),
            key=[ring + 0x100, ring + 0x200],
            ret=[300, -104],
            ring=ring,
        ),
    )
    w.append(
        schema.BUFFER_GROUPS,
        schema.BUFFER_GROUPS.filled(
            1,
            ts_ns=T0 + ms,
            pid=pid,
            ring=ring,
            group=3,
            how=int(GroupKind.PROVIDE),
            addr=HEAP + 0x400_0000,
            entries_or_size=512,
            buffers=7,
        ),
    )
    w.append(
        schema.BUFFER_USES,
        schema.BUFFER_USES.filled(
            2,
            ts_ns=[T0 + 2 * SECOND, T0 + 2 * SECOND + ms],
            pid=pid,
            ring=ring,
            group=3,
            buffer_id=[0, 1],
            bytes=[40, 50],
            user_data=5,
            request=[0, ring + 0x500],
        ),
    )
    w.append(
        schema.MAPS,
        schema.MAPS.filled(
            3,
            ts_ns=[T0 + ms, T0 + 2 * ms, T0 + 3 * ms],
            pid=pid,
            addr=[HEAP + 0x200_0000, 0x55_0000_0000, 0x55_0002_1000],
            len=[1 << 20, 0, 0],
            fn=[int(MapFn.MMAP), int(MapFn.BRK), int(MapFn.BRK)],
            flags=0x22,
            fd=-1,
        ),
    )
    w.append(
        schema.STACKS,
        pa.Table.from_pylist(
            [{"pid": pid, "stack_id": 5, "frames": [1, 2], "symbols": ["malloc", "handle"]}],
            schema=schema.STACKS.arrow_schema(),
        ),
    )
    w.append(
        schema.ALLOCS,
        schema.ALLOCS.filled(
            1, ts_ns=T0 + ms, pid=pid, tid=pid, addr=HEAP + 0x100_0000, size=8192, stack_id=5
        ),
    )
    w.append(
        schema.RESIDENCY,
        pa.Table.from_pylist(
            [
                {
                    "pid": pid,
                    "fd": 100 + k,
                    "addr": HEAP + k * 2 * 4099,
                    "len": 4099,
                    "what": "posted",
                    "resident_bytes": 4096 * (k % 2),
                }
                for k in range(23)
            ],
            schema=schema.RESIDENCY.arrow_schema(),
        ),
    )
    w.close()
    return path


def late_trace(path: Path, pid: int = 4244, connections: int = 23, buffer: int = 4099) -> Path:
    """A server attached to late with --memory: `connections` threads found blocked in
    recvfrom by the /proc scan (no allocation seen: they were made before), resident memory
    from /proc at attach and at the end only, an io_uring ring only counted (5 RECVs, from
    fdinfo) and a stripped Go runtime (7 sockets whose readers are unknown)."""
    w = TraceWriter(path)
    w.write_meta(
        Meta(
            complete=True,
            tracing_since_ns=T0,
            end_monotonic_ns=T0 + 3 * SECOND,
            targets=Targets(pids=[pid]),
            memory=MemoryOptions(),
            kernel_stack_bytes=KERNEL_STACK,
            at_attach=[
                ProcessAtAttach(
                    pid=pid,
                    blocked_syscalls=connections,
                    rings=[
                        RingAtAttach(
                            fd=3, how="fdinfo", requests=5, by_op={"RECV": 5}, why="no BTF layout"
                        )
                    ],
                    go=GoAtAttach(why="a Go binary stripped of DWARF", sockets=7),
                    walk_ms=12.5,
                )
            ],
        )
    )
    fds = list(range(100, 100 + connections))
    w.append(schema.PROCESSES, schema.PROCESSES.filled(1, pid=pid, comm="late", first_seen_ns=T0))
    # the same threads, blocked in recvfrom at the end too: each connection's waiter, with
    # 5 pages of its stack resident
    w.append(
        schema.WAITERS,
        schema.WAITERS.filled(
            connections,
            ts_ns=T0 + 3 * SECOND - 20,
            pid=pid,
            tid=[pid + i for i in range(connections)],
            fd=fds,
            kind="thread",
            call=RECVFROM,
            stack_bytes=WAITER_STACK,
            stack_size=8 << 20,
            what="end",
        ),
    )
    w.append(
        schema.POSTS,
        schema.POSTS.filled(
            connections,
            ts_ns=T0 + 1000,
            pid=pid,
            tid=[pid + i for i in range(connections)],
            fd=fds,
            source=int(Source.SYSCALL),
            op=RECVFROM,
            key=[pid + i for i in range(connections)],
            addr=[HEAP + i * 2 * buffer for i in range(connections)],
            len=buffer,
            flags=int(PostFlag.SCANNED),
        ),
    )
    w.append(
        schema.PROC_STATUS,
        schema.PROC_STATUS.filled(
            2,
            ts_ns=[T0 + 2000, T0 + 3 * SECOND - 10],
            pid=pid,
            mm_id=77,
            what=["attach", "end"],
            vm_rss=[9 << 20, 10 << 20],
            rss_anon=[5 << 20, 6 << 20],
            rss_file=4 << 20,
        ),
    )
    w.append(
        schema.SOCKETS,
        schema.SOCKETS.filled(
            connections,
            ts_ns=T0 + 3 * SECOND - 1,
            pid=pid,
            fd=fds,
            inode=[5000 + fd for fd in fds],
            family="tcp",
            state="ESTABLISHED",
            rmem_alloc=SOCKET_RMEM,
        ),
    )
    w.close()
    return path


def walked_trace(path: Path, pid: int = 4245, connections: int = 23, buffer: int = 4099) -> Path:
    """late_trace's server recorded with the allocator walkers (record --memory): the walk at
    the end found 20 buffers in glibc chunks of buffer + 13 bytes, 2 in a mapping the program
    made itself, and could not read the heap for the last one. Its memory points: the
    connections opened in 7 steps, the heap growing by a 2,064-byte chunk per connection
    besides the buffers (one point taken while connections arrived); the kernel's slab
    caches as this project's test machine has them."""
    late_trace(path, pid, connections, buffer)
    # late_trace wrote its tables; this writer starts over with the same ones and the walk
    late_tables = open_trace_tables(path)
    w = TraceWriter(path, force=True)
    w.write_meta(
        Meta(
            complete=True,
            tracing_since_ns=T0,
            end_monotonic_ns=T0 + 3 * SECOND,
            targets=Targets(pids=[pid]),
            memory=MemoryOptions(
                alloc_probes=False, allocators=[Allocator(pid=pid, method="walk:glibc")]
            ),
            kernel_objects={
                "TCP": SlabCache(2304, 2368, 13, 32768),
                "sock_inode_cache": SlabCache(768, 832, 19, 16384),
                "filp": SlabCache(184, 192, 21, 4096),
                "dentry": SlabCache(192, 192, 21, 4096),
                "task_struct": SlabCache(5888, 6016, 5, 32768),
                "pid": SlabCache(128, 128, 32, 4096),
            },
            kernel_stack_bytes=KERNEL_STACK,
        )
    )
    for table, rows in late_tables.items():
        w.append(schema.TABLES[table], rows)
    counts = [1, 5, 9, 11, 13, 17, 21, connections + 1]
    per_connection = buffer + 13 + 2064  # its buffer's chunk and a session's
    w.append(
        schema.MEMORY_POINTS,
        schema.MEMORY_POINTS.filled(
            len(counts) + 1,
            ts_ns=[T0 + i * SECOND // 4 for i in range(len(counts) + 1)],
            pid=pid,
            sockets=[*counts[:3], 10, *counts[3:]],
            heap_bytes=[5_000_000 + per_connection * n for n in counts[:3]]
            + [9_999_999]  # taken while connections arrived: not a settled point
            + [5_000_000 + per_connection * n for n in counts[3:]],
            vm_rss=[20_000_000 + 8192 * n for n in [*counts[:3], 10, *counts[3:]]],
            moving=[False, False, False, True, False, False, False, False, False],
        ),
    )
    addrs = [HEAP + i * 2 * buffer for i in range(connections)]
    found = [
        {"addr": a, "size": buffer + 13, "allocator": "glibc thread arena", "why": ""}
        for a in addrs[:20]
    ] + [
        {"addr": addrs[20], "size": 4 * buffer, "allocator": "mapping", "why": ""},
        {"addr": addrs[20], "size": 4 * buffer, "allocator": "mapping", "why": ""},
        {"addr": 0, "size": 0, "allocator": "", "why": "glibc's heap could not be read: test"},
    ]
    w.append(
        schema.HEAP_BLOCKS,
        pa.Table.from_pylist(
            [
                {"ts_ns": T0 + 3 * SECOND - 5, "pid": pid, "buffer": a, "what": "end", **f}
                for a, f in zip(addrs, found)
            ],
            schema=schema.HEAP_BLOCKS.arrow_schema(),
        ),
    )
    w.close()
    return path


def open_trace_tables(path: Path) -> dict[str, pa.Table]:
    """A trace's tables as Arrow tables (to write them again)."""
    import pyarrow.parquet as pq

    out = {}
    for name in schema.TABLES:
        parts = sorted((path / name).glob("part-*.parquet"))
        if parts:
            out[name] = pa.concat_tables([pq.read_table(p) for p in parts])
    return out


def glibc_chunk_of(request: int) -> int:
    """The chunk glibc's malloc(request) takes from the heap: the request and its 8-byte
    header, rounded up to 16 (32 at least). Written out here, apart from the code under test
    (analysis.cost.glibc_chunk), for the figures the synthetic traces are built from."""
    return max(32, (request + 8 + 15) // 16 * 16)


SESSION_STEPS = (1, 5, 9, 11, 13, 17, 21)  # sessions_trace: connections open at each point


def sessions_trace(
    path: Path,
    pid: int = 4246,
    connections: int = 23,
    buffer: int = 4099,
    session: int = 2053,
    method: str = "walk:glibc",
    more: Callable[[TraceWriter, list[int]], None] | None = None,
) -> Path:
    """A server attached to late with the allocator walkers (record --memory), consistent
    from end to end: `connections` threads found blocked in recvfrom, each on a buffer of
    `buffer` bytes in its own glibc chunk (the walk at the end finds every one, reporting
    its usable size, the chunk less its header, as glibc's walker does), and a session of
    `session` bytes in a chunk of its own per connection. Its memory points: connections
    opened in steps (SESSION_STEPS, then all of them), the heap in use growing by exactly
    the two chunks per connection (4,112 + 2,064 = 6,176 bytes for the defaults); the
    kernel's slab caches as walked_trace has them. Every connection is idle at the end.
    `method`: how the allocations were found (meta.json); `more(writer, fds)` writes more
    tables before the trace is closed."""
    w = TraceWriter(path)
    w.write_meta(
        Meta(
            complete=True,
            tracing_since_ns=T0,
            end_monotonic_ns=T0 + 3 * SECOND,
            targets=Targets(pids=[pid]),
            memory=MemoryOptions(
                alloc_probes=False, allocators=[Allocator(pid=pid, method=method)]
            ),
            kernel_objects={
                "TCP": SlabCache(2304, 2368, 13, 32768),
                "sock_inode_cache": SlabCache(768, 832, 19, 16384),
                "filp": SlabCache(184, 192, 21, 4096),
                "dentry": SlabCache(192, 192, 21, 4096),
            },
        )
    )
    fds = list(range(100, 100 + connections))
    addrs = [HEAP + i * 2 * glibc_chunk_of(buffer) for i in range(connections)]
    w.append(
        schema.PROCESSES, schema.PROCESSES.filled(1, pid=pid, comm="sessions", first_seen_ns=T0)
    )
    w.append(
        schema.POSTS,
        schema.POSTS.filled(
            connections,
            ts_ns=T0 + 1000,
            pid=pid,
            tid=[pid + i for i in range(connections)],
            fd=fds,
            source=int(Source.SYSCALL),
            op=RECVFROM,
            key=[pid + i for i in range(connections)],
            addr=addrs,
            len=buffer,
            flags=int(PostFlag.SCANNED),
        ),
    )
    w.append(
        schema.SOCKETS,
        schema.SOCKETS.filled(
            connections,
            ts_ns=T0 + 3 * SECOND - 1,
            pid=pid,
            fd=fds,
            inode=[5000 + fd for fd in fds],
            family="tcp",
            state="ESTABLISHED",
            rmem_alloc=SOCKET_RMEM,
        ),
    )
    per_connection = glibc_chunk_of(buffer) + glibc_chunk_of(session)
    counts = [*SESSION_STEPS, connections]
    w.append(
        schema.MEMORY_POINTS,
        schema.MEMORY_POINTS.filled(
            len(counts),
            ts_ns=[T0 + i * SECOND // 4 for i in range(len(counts))],
            pid=pid,
            sockets=[n + 1 for n in counts],  # and the listener
            heap_bytes=[5_000_000 + per_connection * n for n in counts],
            vm_rss=[20_000_000 + 8192 * n for n in counts],
            moving=False,
        ),
    )
    w.append(
        schema.HEAP_BLOCKS,
        pa.Table.from_pylist(
            [
                {
                    "ts_ns": T0 + 3 * SECOND - 5,
                    "pid": pid,
                    "buffer": a,
                    "what": "end",
                    "addr": a,
                    "size": glibc_chunk_of(buffer) - 8,
                    "allocator": "glibc thread arena",
                    "why": "",
                }
                for a in addrs
            ],
            schema=schema.HEAP_BLOCKS.arrow_schema(),
        ),
    )
    if more is not None:
        more(w, fds)
    w.close()
    return path
