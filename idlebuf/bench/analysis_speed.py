"""Analysis speed: load a synthetic 10-million-event trace and relate it - read lifetimes,
the address join of buffers to allocations, the per-connection table, the time series - as
`idlebuf report --json --connections --timeline 1` does; and, as a reference point, the same
lifetimes, join and per-connection table in DuckDB over the same Parquet files.

Both sides compute the same figures - posted reads, pinned bytes, the IO-buffer bytes of idle
connections, idle connections - and the benchmark fails (AnswersDiffer) when they differ.
Each side runs in its own process, so its wall time and peak RSS are its own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa

from probes.format import schema
from probes.format.meta import MemoryOptions, Meta
from probes.format.schema import Source
from probes.format.writer import TraceWriter

SECOND = 1_000_000_000
HEAP = 0x7F00_0000_0000
RECVFROM = schema.SYSCALLS["recvfrom"]


def synthetic_trace(path: Path, reads: int, connections: int, other_allocs: int) -> int:
    """A 60-second recording of one server: `reads` reads (a post and a completion each,
    the last read of each connection still posted), a buffer allocation per connection and
    `other_allocs` allocations that are freed. Returns the number of events written."""
    rng = np.random.default_rng(23)
    duration = 60 * SECOND
    w = TraceWriter(path)
    w.write_meta(
        Meta(
            complete=True,
            tracing_since_ns=SECOND,
            end_monotonic_ns=SECOND + duration,
            memory=MemoryOptions(),
        )
    )
    w.append(
        schema.PROCESSES,
        pa.table(
            {"pid": [4242], "comm": ["synthetic"], "cmdline": ["synthetic"], "first_seen_ns": [1]},
            schema=schema.PROCESSES.arrow_schema(),
        ),
    )
    conns = np.arange(connections)
    buf_addr = HEAP + conns.astype(np.uint64) * 32768
    # reads in time order; 5% of connections are active until the end, the rest go idle
    j = np.arange(reads)
    conn = (j * 7919) % connections
    active = conn % 20 == 0
    span = np.where(active, duration, duration // 2)
    post = SECOND + np.sort(rng.integers(0, duration // 2, reads)) * (span // (duration // 2))
    order = np.argsort(post, kind="stable")
    conn, post = conn[order], post[order].astype(np.uint64)
    # every read completes 20 us later, except each connection's last one
    last = np.zeros(reads, dtype=bool)
    _, last_idx = np.unique(conn[::-1], return_index=True)
    last[reads - 1 - last_idx] = True
    done = ~last
    # the buffers, then other allocations made and freed all along
    other = HEAP + np.uint64(1 << 32) + np.arange(other_allocs, dtype=np.uint64) * 4096
    made = SECOND + np.sort(rng.integers(0, duration, other_allocs)).astype(np.uint64)
    alloc_ts = np.concatenate([np.full(connections, SECOND // 2, np.uint64), made])
    alloc_addr = np.concatenate([buf_addr, other])
    alloc_size = np.concatenate([np.full(connections, 16384), np.full(other_allocs, 2048)])
    freed = made + np.uint64(SECOND // 10)
    # written as the recorder writes: a part of each table per flush, here every second
    flush = np.arange(0, duration + 3 * SECOND, SECOND, dtype=np.uint64)
    post_at = np.searchsorted(post, flush)
    end = post + np.uint64(20_000)
    done_idx = np.flatnonzero(done)
    end_at = np.searchsorted(end[done_idx], flush)
    alloc_at = np.searchsorted(alloc_ts, flush)
    free_at = np.searchsorted(freed, flush)
    for f in range(len(flush) - 1):
        a, b = post_at[f], post_at[f + 1]
        c = conn[a:b]
        w.append(
            schema.POSTS,
            schema.POSTS.filled(
                len(c),
                ts_ns=post[a:b],
                pid=4242,
                tid=(100_000 + c).astype(np.uint32),
                fd=(100 + c).astype(np.int32),
                source=int(Source.SYSCALL),
                op=RECVFROM,
                key=(100_000 + c).astype(np.uint64),
                addr=buf_addr[c],
                len=16384,
            ),
        )
        rows = done_idx[end_at[f] : end_at[f + 1]]
        c = conn[rows]
        w.append(
            schema.COMPLETIONS,
            schema.COMPLETIONS.filled(
                len(c),
                ts_ns=end[rows],
                pid=4242,
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
                pid=4242,
                tid=4242,
                addr=alloc_addr[a:b],
                size=alloc_size[a:b],
                fn=1,
            ),
        )
        a, b = free_at[f], free_at[f + 1]
        w.append(
            schema.FREES,
            schema.FREES.filled(b - a, ts_ns=freed[a:b], pid=4242, tid=4242, addr=other[a:b]),
        )
    samples = np.arange(1, 61, dtype=np.uint64) * SECOND
    w.append(
        schema.RSS,
        schema.RSS.filled(
            len(samples),
            ts_ns=samples,
            pid=4242,
            mm_id=1,
            member=int(schema.RssMember.ANON),
            bytes=np.full(len(samples), 200 << 20),
        ),
    )
    sample_ts = np.repeat(np.arange(1, 61, 6, dtype=np.uint64) * SECOND, connections)
    fds = np.tile(100 + conns, len(sample_ts) // connections).astype(np.int32)
    w.append(
        schema.SOCKETS,
        schema.SOCKETS.filled(
            len(fds),
            ts_ns=sample_ts,
            pid=4242,
            fd=fds,
            inode=fds.astype(np.uint64) + 5000,
            family="tcp",
            state="ESTABLISHED",
            rmem_alloc=768,
        ),
    )
    w.close()
    return reads + int(done.sum()) + connections + 2 * other_allocs


# the analysis engine over the trace in windows (what `report` does on a trace too big to
# load), or as one window; every figure of the report either way
IDLEBUF_SIDE = """
import json, sys, time
from analysis.engine import analyze
from analysis.windows import WINDOW_ROWS
t0 = time.perf_counter()
rows = WINDOW_ROWS
s = analyze(sys.argv[1], timeline_s=1.0, window_rows=rows)
(p,) = [p for p in s.processes if p.memory is not None and p.memory.connections.open]
m = p.memory
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"relate_s": time.perf_counter() - t0, "hwm": hwm,
    "posted_reads": p.posted_reads.now, "pinned_bytes": p.pinned_bytes.now,
    "idle_io_buffer_bytes": m.io_buffer_heap.idle_bytes, "idle_connections": m.connections.idle,
    "connections": len(m.connection_rows), "timeline_points": len(s.timeline)}))
"""
IN_MEMORY_SIDE = IDLEBUF_SIDE.replace("rows = WINDOW_ROWS", "rows = None")

DUCKDB_SIDE = """
import json, sys, time
from pathlib import Path
import duckdb
from probes.format.reader import read_meta
t0 = time.perf_counter()
d = sys.argv[1]
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")
for table in ("posts", "completions", "allocs", "frees", "sockets"):
    con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{d}/{table}/*.parquet')")
end_ns = read_meta(Path(d)).end_monotonic_ns
idle_ns = 1_000_000_000  # report's --idle-threshold default
rows = con.execute(f'''
WITH ev AS (
  SELECT pid, source, key, ts_ns, 1 AS is_post, fd, addr, len, NULL::BIGINT AS ret FROM posts
  UNION ALL
  SELECT pid, source, key, ts_ns, 0, NULL, NULL, NULL, ret FROM completions),
seq AS (
  SELECT *, lead(ts_ns) OVER w AS end_ns, lead(is_post) OVER w AS next_post,
         lead(ret) OVER w AS next_ret
  FROM ev WINDOW w AS (PARTITION BY pid, source, key ORDER BY ts_ns, is_post DESC)),
reads AS (
  SELECT pid, fd, addr, len, ts_ns AS post_ns,
         CASE WHEN next_post = 0 THEN end_ns END AS end_ns,
         CASE WHEN next_post = 0 THEN next_ret END AS ret
  FROM seq WHERE is_post = 1),
live AS (
  SELECT a.pid, a.addr, a.size FROM allocs a
  ANTI JOIN frees f ON f.pid = a.pid AND f.addr = a.addr AND f.ts_ns >= a.ts_ns
  WHERE a.ts_ns <= {end_ns}),
activity AS (
  SELECT pid, fd, min(post_ns) AS first_ns, max(CASE WHEN ret > 0 THEN end_ns END) AS last_data
  FROM reads GROUP BY pid, fd),
sampled AS (
  SELECT pid, fd, min(ts_ns) AS opened_ns, max(ts_ns) AS seen_ns FROM sockets
  WHERE state <> 'LISTEN' AND family <> 'unix' GROUP BY pid, fd),
conns AS (
  SELECT {end_ns} - coalesce(a.last_data, least(a.first_ns, s.opened_ns), a.first_ns,
                             s.opened_ns) AS idle_for,
         s.seen_ns IS NULL OR s.seen_ns = (SELECT max(ts_ns) FROM sockets) AS open
  FROM sampled s FULL JOIN activity a ON s.pid = a.pid AND s.fd = a.fd),
posted AS (
  SELECT r.*, {end_ns} - coalesce(a.last_data, a.first_ns) >= {idle_ns} AS idle
  FROM reads r JOIN activity a USING (pid, fd) WHERE r.end_ns IS NULL),
joined AS (
  SELECT p.idle, least(p.addr + p.len, l.addr + l.size) - p.addr AS inside
  FROM posted p ASOF JOIN live l ON p.pid = l.pid AND p.addr >= l.addr
  WHERE p.addr < l.addr + l.size)
SELECT (SELECT count(*) FROM posted), (SELECT sum(len) FROM posted),
       (SELECT sum(inside) FROM joined WHERE idle),
       (SELECT count(*) FROM conns WHERE open AND idle_for >= {idle_ns})
''').fetchone()
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"relate_s": time.perf_counter() - t0, "hwm": hwm, "posted_reads": rows[0],
    "pinned_bytes": int(rows[1] or 0), "idle_io_buffer_bytes": int(rows[2] or 0),
    "idle_connections": rows[3]}))
"""

# what both sides compute, and must agree on
FIGURES = ("posted_reads", "pinned_bytes", "idle_io_buffer_bytes", "idle_connections")


class Figures(TypedDict):
    """What every side computes (FIGURES), as its JSON line says."""

    posted_reads: int
    pinned_bytes: int
    idle_io_buffer_bytes: int
    idle_connections: int


@dataclass(frozen=True)
class SideRun:
    """One run of one side, in a fresh process."""

    figures: Figures
    relate_s: float  # as the side timed itself, interpreter start and imports left out
    wall_s: float
    peak_rss_bytes: int  # the side's own VmHWM


@dataclass
class HugeRun:
    """The big trace, streamed once by each side."""

    events: int
    runs: dict[str, SideRun] = field(default_factory=dict)  # "idlebuf", "duckdb" if installed
    answers: Figures | None = None


@dataclass
class AnalysisSpeed:
    events: int
    connections: int
    trace: str
    sides: dict[str, list[SideRun]] = field(default_factory=dict)  # side -> its runs
    answers: Figures | None = None  # what every run of every side said...
    disagreement: str | None = None  # ...or where two differ: the benchmark then fails
    huge: HugeRun | None = None


class AnswersDiffer(RuntimeError):
    """idlebuf and DuckDB computed different figures from the same trace."""


def _figures(answer: Mapping[str, int]) -> Figures:
    return Figures(
        posted_reads=answer["posted_reads"],
        pinned_bytes=answer["pinned_bytes"],
        idle_io_buffer_bytes=answer["idle_io_buffer_bytes"],
        idle_connections=answer["idle_connections"],
    )


def check_answers(sides: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figures:
    """The figures every run of every side computed; AnswersDiffer, naming the figure and
    the values, when two runs disagree."""
    answers: dict[tuple[str, int], dict[str, int]] = {
        (name, i): {f: r[f] for f in FIGURES}
        for name, runs in sides.items()
        for i, r in enumerate(runs)
    }
    first_key, first = next(iter(answers.items()))
    for key, answer in answers.items():
        for figure in FIGURES:
            if answer[figure] != first[figure]:
                raise AnswersDiffer(
                    f"analysis: {key[0]} run {key[1] + 1} says {figure} = {answer[figure]:,}, "
                    f"{first_key[0]} run {first_key[1] + 1} says {first[figure]:,}"
                )
    return _figures(first)


def _measured(code: str, trace: Path) -> SideRun:
    """Run `code` in a fresh interpreter: its figures and its own time from its JSON line,
    with the wall time and peak RSS (the code reports its own VmHWM as "hwm")."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(trace)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out = proc.stdout.read() if proc.stdout else b""
    err = proc.stderr.read() if proc.stderr else b""
    if proc.wait():
        raise RuntimeError(err.decode().strip().splitlines()[-1])
    answer = json.loads(out.decode().strip().splitlines()[-1])  # DuckDB may print progress
    # the side's own high-water RSS (VmHWM, this address space only): wait4's ru_maxrss would
    # also count the pre-exec copy of this process
    return SideRun(
        _figures(answer), answer["relate_s"], time.perf_counter() - started, answer["hwm"]
    )


def _synthetic(workdir: Path, events: int, log: Callable[[str], None]) -> tuple[Path, int, int]:
    """(the trace, events, connections): written once, kept in `workdir` for later runs."""
    trace = workdir / f"synthetic-{events // 1_000_000}M"
    connections, other = 10_007, events // 10
    reads = (events - connections - 2 * other) // 2 + connections // 2
    done = trace / "written"
    if not done.exists():
        log(f"analysis: writing a synthetic trace of ~{events:,} events to {trace}")
        if trace.exists():
            shutil.rmtree(trace)
        written = synthetic_trace(trace, reads, connections, other)
        done.write_text(str(written))
    return trace, int(done.read_text()), connections


def run(
    workdir: Path,
    events: int,
    repeats: int,
    log: Callable[[str], None],
    huge_events: int = 0,
    in_memory: bool = True,
) -> AnalysisSpeed:
    trace, written, connections = _synthetic(workdir, events, log)
    codes = {"idlebuf": IDLEBUF_SIDE, "duckdb": DUCKDB_SIDE}
    if in_memory:
        codes["idlebuf in memory"] = IN_MEMORY_SIDE
    out = AnalysisSpeed(written, connections, str(trace), {name: [] for name in codes})
    sides = out.sides
    try:
        import duckdb  # noqa: F401
    except ImportError:
        sides.pop("duckdb")
        log("analysis: duckdb is not installed; the reference side is skipped")
    for r in range(repeats):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            result = _measured(codes[name], trace)
            sides[name].append(result)
            log(
                f"analysis {name} {r + 1}/{repeats}: {result.wall_s:.1f} s, "
                f"{result.peak_rss_bytes / 2**20:,.0f} MiB"
            )
    if huge_events:  # once each: the streamed relate step, and DuckDB as a check
        huge, huge_written, _ = _synthetic(workdir, huge_events, log)
        out.huge = HugeRun(huge_written)
        for name in [n for n in ("idlebuf", "duckdb") if n in sides]:
            result = out.huge.runs[name] = _measured(codes[name], huge)
            log(
                f"analysis {name} on {huge_written:,} events: {result.wall_s:.1f} s, "
                f"{result.peak_rss_bytes / 2**20:,.0f} MiB"
            )
    try:
        out.answers = check_answers({k: [r.figures for r in v] for k, v in sides.items() if v})
        if out.huge:
            out.huge.answers = check_answers(
                {f"{k} ({out.huge.events:,} events)": [r.figures] for k, r in out.huge.runs.items()}
            )
        log(
            "analysis: every side agrees: "
            + ", ".join(f"{k} {v:,}" for k, v in out.answers.items())
        )
    except AnswersDiffer as exc:  # kept with the timings; the benchmark then fails
        out.disagreement = str(exc)
        log(f"ANALYSIS ANSWERS DIFFER: {exc}")
    return out
