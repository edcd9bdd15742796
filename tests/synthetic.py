"""Small traces built in the test, as the recorder would write them, with known figures.

`server_trace` writes a 3-second recording (made with --memory) of one server with
`connections` connections on fds 100.., `active` of which receive 100 bytes at 1 s and
at 2.5 s (at the end those are active, the others idle):
- queued: every connection keeps a read posted on its own malloc'd buffer;
- readiness: only a readable connection reads, into one pooled malloc'd buffer.
"""

from __future__ import annotations

from pathlib import Path

from probes import layout
from probes.layout import Source
from probes.trace_writer import TraceWriter

SECOND = 1_000_000_000
T0 = 10 * SECOND  # the recording starts here (monotonic ns) and lasts 3 s
HEAP = 0x7F00_0000_0000
RECVFROM = 45
SOCKET_RMEM = 768  # rmem_alloc + fwd_alloc of each socket in the last sample


def server_trace(
    path: Path, pid: int, connections: int, active: int, buffer: int, queued: bool
) -> Path:
    fds = list(range(100, 100 + connections))
    w = TraceWriter(path)
    w.write_meta(
        {
            "format": layout.FORMAT_NAME,
            "format_version": layout.FORMAT_VERSION,
            "complete": True,
            "drops": {},
            "tracing_since_ns": T0,
            "end_monotonic_ns": T0 + 3 * SECOND,
            "memory": {"sample_every": 1},
        }
    )
    w.append(layout.PROCESSES, layout.PROCESSES.filled(1, pid=pid, comm="srv", first_seen_ns=T0))
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
        layout.POSTS,
        layout.POSTS.filled(
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
        layout.COMPLETIONS,
        layout.COMPLETIONS.filled(
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
        layout.ALLOCS,
        layout.ALLOCS.filled(
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
        layout.RSS,
        layout.RSS.filled(
            2,
            ts_ns=[T0, T0 + SECOND // 2],
            pid=pid,
            mm_id=1,
            member=int(layout.RssMember.ANON),
            bytes=[base_rss, grown],
        ),
    )
    w.append(
        layout.SOCKETS,
        layout.SOCKETS.filled(  # sampled twice: half a second in, and at the end
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
    w.close()
    return path
