"""A synthetic recording of one thread-per-connection server, for the analysis and fleet
benchmarks: every table a real `record --memory --alloc-probes --min-alloc 0` recording of
such a server has, at any size.

60 seconds, written as the recorder writes it (a part of each table per flush, every
second): `reads` reads (a post and a completion each, every connection's last read still
posted), a buffer allocation per connection and `other_allocs` allocations freed 100 ms
later, writes (a connection's last one blocked at the end), the user stacks that posted and
allocated, resident memory (kmem:rss_stat events, /proc status at attach and end), socket
samples, memory points, the walkers' blocks, the buffers' residency and a few mappings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from probes.format import schema
from probes.format.meta import MemoryOptions, Meta, SlabCache
from probes.format.schema import MapFn, RssMember, Source
from probes.format.writer import TraceWriter

SECOND = 1_000_000_000
HEAP = 0x7F00_0000_0000
RECVFROM = schema.SYSCALLS["recvfrom"]
SENDTO = schema.SYSCALLS.get("sendto", 44)
PID = 4242
DURATION = 60 * SECOND
START = SECOND
END = START + DURATION + SECOND // 5  # every event is within (frees come 0.1 s late)
BUFFER = 16384
POST_STACK, BUFFER_STACK, OTHER_STACK = 1, 2, 3


def synthetic_trace(path: Path, reads: int, connections: int, other_allocs: int) -> int:
    """The recording (see the module's docstring); the number of events of its event
    tables written."""
    rng = np.random.default_rng(23)
    w = TraceWriter(path)
    w.write_meta(
        Meta(
            complete=True,
            tracing_since_ns=START,
            end_monotonic_ns=END,
            memory=MemoryOptions(min_alloc=0),
            kernel_objects={  # the slab caches of a connection, as on the reference kernel
                "TCP": SlabCache(2304, 2368, 13, 32768),
                "sock_inode_cache": SlabCache(768, 832, 19, 16384),
                "filp": SlabCache(184, 192, 21, 4096),
                "dentry": SlabCache(192, 192, 21, 4096),
            },
        )
    )
    w.append(
        schema.PROCESSES,
        pa.table(
            {"pid": [PID], "comm": ["synthetic"], "cmdline": ["synthetic"], "first_seen_ns": [1]},
            schema=schema.PROCESSES.arrow_schema(),
        ),
    )
    conns = np.arange(connections)
    buf_addr = HEAP + conns.astype(np.uint64) * 32768
    # reads in time order; 5% of connections are active until the end, the rest go idle
    j = np.arange(reads)
    conn = (j * 7919) % connections
    active = conn % 20 == 0
    span = np.where(active, DURATION, DURATION // 2)
    post = START + np.sort(rng.integers(0, DURATION // 2, reads)) * (span // (DURATION // 2))
    order = np.argsort(post, kind="stable")
    conn, post = conn[order], post[order].astype(np.uint64)
    # every read completes 20 us later, except each connection's last one
    last = np.zeros(reads, dtype=bool)
    _, last_idx = np.unique(conn[::-1], return_index=True)
    last[reads - 1 - last_idx] = True
    done = ~last
    # the buffers, then other allocations made and freed all along
    other = HEAP + np.uint64(1 << 32) + np.arange(other_allocs, dtype=np.uint64) * 4096
    made = START + np.sort(rng.integers(0, DURATION, other_allocs)).astype(np.uint64)
    # connection c arrives (its buffer allocated) in step c * 13 // connections, a second
    # each, as the memory points' socket counts say
    arrived = START + (conns * 13 // connections).astype(np.uint64) * np.uint64(SECOND) + 1
    order_a = np.argsort(np.concatenate([arrived, made]), kind="stable")
    alloc_ts = np.concatenate([arrived, made])[order_a]
    alloc_addr = np.concatenate([buf_addr, other])[order_a]
    alloc_size = np.concatenate([np.full(connections, BUFFER), np.full(other_allocs, 2048)])[
        order_a
    ]
    alloc_stack = np.concatenate(
        [np.full(connections, BUFFER_STACK), np.full(other_allocs, OTHER_STACK)]
    ).astype(np.uint64)[order_a]
    freed = made + np.uint64(SECOND // 10)
    # a write after every 8th read of an active connection, sent 50 us later; each active
    # connection's last write is still blocked at the end
    wrote = np.flatnonzero(active[order] & (j % 8 == 0))
    write_ts = post[wrote] + np.uint64(30_000)
    write_conn = conn[wrote]
    write_last = np.zeros(len(wrote), dtype=bool)
    _, write_last_idx = np.unique(write_conn[::-1], return_index=True)
    write_last[len(wrote) - 1 - write_last_idx] = True
    write_end = write_ts + np.uint64(50_000)
    write_done = np.flatnonzero(~write_last)
    flush = np.arange(0, DURATION + 3 * SECOND, SECOND, dtype=np.uint64)
    post_at = np.searchsorted(post, flush)
    end = post + np.uint64(20_000)
    done_idx = np.flatnonzero(done)
    end_at = np.searchsorted(end[done_idx], flush)
    alloc_at = np.searchsorted(alloc_ts, flush)
    free_at = np.searchsorted(freed, flush)
    write_at = np.searchsorted(write_ts, flush)
    write_end_at = np.searchsorted(write_end[write_done], flush)
    for f in range(len(flush) - 1):
        a, b = post_at[f], post_at[f + 1]
        c = conn[a:b]
        w.append(
            schema.POSTS,
            schema.POSTS.filled(
                len(c),
                ts_ns=post[a:b],
                pid=PID,
                tid=(100_000 + c).astype(np.uint32),
                fd=(100 + c).astype(np.int32),
                source=int(Source.SYSCALL),
                op=RECVFROM,
                key=(100_000 + c).astype(np.uint64),
                addr=buf_addr[c],
                len=BUFFER,
                stack_id=POST_STACK,
            ),
        )
        rows = done_idx[end_at[f] : end_at[f + 1]]
        c = conn[rows]
        w.append(
            schema.COMPLETIONS,
            schema.COMPLETIONS.filled(
                len(c),
                ts_ns=end[rows],
                pid=PID,
                tid=(100_000 + c).astype(np.uint32),
                source=int(Source.SYSCALL),
                key=(100_000 + c).astype(np.uint64),
                ret=np.full(len(c), 100, dtype=np.int64),
            ),
        )
        a, b = alloc_at[f], alloc_at[f + 1]
        w.append(
            schema.ALLOCS,
            schema.ALLOCS.filled(
                b - a,
                ts_ns=alloc_ts[a:b],
                pid=PID,
                tid=PID,
                addr=alloc_addr[a:b],
                size=alloc_size[a:b],
                fn=1,
                stack_id=alloc_stack[a:b],
            ),
        )
        a, b = free_at[f], free_at[f + 1]
        w.append(
            schema.FREES,
            schema.FREES.filled(b - a, ts_ns=freed[a:b], pid=PID, tid=PID, addr=other[a:b]),
        )
        a, b = write_at[f], write_at[f + 1]
        c = write_conn[a:b]
        w.append(
            schema.WRITES,
            schema.WRITES.filled(
                len(c),
                ts_ns=write_ts[a:b],
                pid=PID,
                tid=(100_000 + c).astype(np.uint32),
                fd=(100 + c).astype(np.int32),
                source=int(Source.SYSCALL),
                op=SENDTO,
                key=(100_000 + c).astype(np.uint64),
                addr=buf_addr[c] + np.uint64(BUFFER),
                len=900,
            ),
        )
        rows = write_done[write_end_at[f] : write_end_at[f + 1]]
        c = write_conn[rows]
        w.append(
            schema.WRITE_COMPLETIONS,
            schema.WRITE_COMPLETIONS.filled(
                len(c),
                ts_ns=write_end[rows],
                pid=PID,
                tid=(100_000 + c).astype(np.uint32),
                source=int(Source.SYSCALL),
                key=(100_000 + c).astype(np.uint64),
                ret=np.full(len(c), 900, dtype=np.int64),
            ),
        )
    _state_tables(w, rng, connections, buf_addr, conn[last])
    w.close()
    return (
        reads
        + int(done.sum())
        + connections
        + 2 * other_allocs
        + len(wrote)
        + len(write_done)
        + _RSS_EVENTS
    )


_RSS_EVENTS = 600  # every 100 ms


def _state_tables(
    w: TraceWriter,
    rng: np.random.Generator,
    connections: int,
    buf_addr: np.ndarray,
    still_posted: np.ndarray,
) -> None:
    """Resident memory, stacks, sockets, memory points, the walkers' blocks, residency and
    mappings."""
    rss_ts = START + np.arange(_RSS_EVENTS, dtype=np.uint64) * np.uint64(SECOND // 10)
    w.append(
        schema.RSS,
        schema.RSS.filled(
            _RSS_EVENTS,
            ts_ns=rss_ts,
            pid=PID,
            mm_id=1,
            member=np.where(np.arange(_RSS_EVENTS) % 3 == 0, RssMember.FILE, RssMember.ANON),
            bytes=(200 << 20) + rng.integers(0, 1 << 20, _RSS_EVENTS),
        ),
    )
    status = pa.table(
        {
            "ts_ns": [START, END],
            "pid": [PID, PID],
            "mm_id": [1, 1],
            "what": ["attach", "end"],
            "vm_rss": [230 << 20, 240 << 20],
            "rss_anon": [200 << 20, 210 << 20],
            "rss_file": [30 << 20, 30 << 20],
            "rss_shmem": [0, 0],
        },
        schema=schema.PROC_STATUS.arrow_schema(),
    )
    w.append(schema.PROC_STATUS, status)
    stacks = pa.table(
        {
            "pid": [PID] * 3,
            "stack_id": [POST_STACK, BUFFER_STACK, OTHER_STACK],
            "frames": [[0x401000, 0x402000], [0x403000], [0x404000]],
            "symbols": [["recv", "serve"], ["malloc", "accept_loop"], ["malloc", "log"]],
            "kind": ["post", "alloc", "alloc"],
        },
        schema=schema.STACKS.arrow_schema(),
    )
    w.append(schema.STACKS, stacks)
    conns = np.arange(connections)
    sample_ts = np.repeat(np.arange(1, 61, 6, dtype=np.uint64) * SECOND, connections)
    fds = np.tile(100 + conns, len(sample_ts) // connections).astype(np.int32)
    w.append(
        schema.SOCKETS,
        schema.SOCKETS.filled(
            len(fds),
            ts_ns=sample_ts,
            pid=PID,
            fd=fds,
            inode=fds.astype(np.uint64) + 5000,
            family="tcp",
            state="ESTABLISHED",
            rmem_alloc=768,
        ),
    )
    # a memory point a second (just after it), the connections held climbing over 13 s
    points = START + np.arange(0, 60, dtype=np.uint64) * SECOND + np.uint64(SECOND // 2)
    steps = np.arange(connections) * 13 // connections
    held = np.array([(steps <= k).sum() for k in range(60)])
    w.append(
        schema.MEMORY_POINTS,
        schema.MEMORY_POINTS.filled(
            len(points),
            ts_ns=points,
            pid=PID,
            sockets=held.astype(np.uint32),
            heap_bytes=(held * (BUFFER + 16)).astype(np.uint64),
            heap_blocks=held.astype(np.uint64),
            vm_rss=((230 << 20) + held * 40_000).astype(np.uint64),
            rss_anon=((200 << 20) + held * 40_000).astype(np.uint64),
        ),
    )
    # the walkers looked the buffers up at the first flush (a cross-check, with probes)
    w.append(
        schema.HEAP_BLOCKS,
        schema.HEAP_BLOCKS.filled(
            connections,
            ts_ns=np.full(connections, START + SECOND, np.uint64),
            pid=PID,
            buffer=buf_addr,
            addr=buf_addr - np.uint64(16),
            size=BUFFER + 32,
            allocator="glibc",
            what="flush",
        ),
    )
    w.append(
        schema.RESIDENCY,
        schema.RESIDENCY.filled(
            len(still_posted),
            pid=PID,
            fd=(100 + still_posted).astype(np.int32),
            addr=buf_addr[still_posted],
            len=BUFFER,
            what="posted",
            resident_bytes=4096,
        ),
    )
    w.append(
        schema.MAPS,
        schema.MAPS.filled(
            3,
            ts_ns=np.array([START + 5, START + 7, START + 9], np.uint64),
            pid=PID,
            addr=np.array([0x6000_0000, 0x6100_0000, 0x6200_0000], np.uint64),
            len=1 << 20,
            fn=int(MapFn.MMAP),
            flags=0x22,
            fd=-1,
        ),
    )
    w.append(
        schema.UNMAPS,
        schema.UNMAPS.filled(
            1, ts_ns=np.array([START + SECOND], np.uint64), pid=PID, addr=0x6100_0000, len=1 << 20
        ),
    )
