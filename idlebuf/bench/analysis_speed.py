"""Analysis speed: the whole report of a synthetic 10-million-event trace with every table
a `--memory` recording has (idlebuf.bench.synthetic) - every figure, as `idlebuf report
--json --connections --timeline 1` computes it, in windows (the default) and as one window;
and, as a reference point, DuckDB computing what SQL can of it over the same Parquet files:
read lifetimes, the address join of buffers to allocations, the per-connection table, the
writes, the heap and resident memory at the end.

Every side computes the same figures (FIGURES) and the benchmark fails (AnswersDiffer)
when two differ. Each side runs in its own process, so its wall time and peak RSS are its
own. A 100-million-event trace is then analysed once by each side: its time, peak memory
and cost per event against the 10-million one.
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

from idlebuf.bench.synthetic import synthetic_trace

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
    "pending_writes": p.writes.pending_writes, "bytes_sent": p.writes.bytes_sent,
    "heap_live_bytes": m.heap_live.bytes, "rss_now_bytes": m.rss.now,
    "whole_per_idle_connection": m.per_idle_connection.total_bytes,
    "timeline_points": len(s.timeline)}))
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
for table in ("posts", "completions", "allocs", "frees", "sockets", "writes",
              "write_completions", "rss", "proc_status"):
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
  WHERE p.addr < l.addr + l.size),
wev AS (
  SELECT pid, source, key, ts_ns, 1 AS is_post, len, NULL::BIGINT AS ret FROM writes
  UNION ALL
  SELECT pid, source, key, ts_ns, 0, NULL, ret FROM write_completions),
wseq AS (
  SELECT *, lead(is_post) OVER w AS next_post, lead(ret) OVER w AS next_ret
  FROM wev WINDOW w AS (PARTITION BY pid, source, key ORDER BY ts_ns, is_post DESC)),
resident AS (
  SELECT ts_ns, member, bytes FROM rss WHERE member IN (0, 1, 3)
  UNION ALL SELECT ts_ns, 1, rss_anon FROM proc_status
  UNION ALL SELECT ts_ns, 0, rss_file FROM proc_status
  UNION ALL SELECT ts_ns, 3, rss_shmem FROM proc_status)
SELECT (SELECT count(*) FROM posted), (SELECT sum(len) FROM posted),
       (SELECT sum(inside) FROM joined WHERE idle),
       (SELECT count(*) FROM conns WHERE open AND idle_for >= {idle_ns}),
       (SELECT count(*) FROM wseq WHERE is_post = 1 AND next_post IS NULL),
       (SELECT sum(next_ret) FROM wseq WHERE is_post = 1 AND next_post = 0 AND next_ret > 0),
       (SELECT sum(size) FROM live),
       (SELECT sum(b) FROM (SELECT arg_max(bytes, ts_ns) AS b FROM resident GROUP BY member))
''').fetchone()
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"relate_s": time.perf_counter() - t0, "hwm": hwm, "posted_reads": rows[0],
    "pinned_bytes": int(rows[1] or 0), "idle_io_buffer_bytes": int(rows[2] or 0),
    "idle_connections": rows[3], "pending_writes": rows[4], "bytes_sent": int(rows[5] or 0),
    "heap_live_bytes": int(rows[6] or 0), "rss_now_bytes": int(rows[7] or 0)}))
"""

# what both sides compute, and must agree on
FIGURES = (
    "posted_reads",
    "pinned_bytes",
    "idle_io_buffer_bytes",
    "idle_connections",
    "pending_writes",
    "bytes_sent",
    "heap_live_bytes",
    "rss_now_bytes",
)


class Figures(TypedDict):
    """What every side computes (FIGURES), as its JSON line says."""

    posted_reads: int
    pinned_bytes: int
    idle_io_buffer_bytes: int
    idle_connections: int
    pending_writes: int
    bytes_sent: int
    heap_live_bytes: int
    rss_now_bytes: int


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
    return Figures(**{f: answer[f] for f in FIGURES})  # type: ignore[typeddict-item]


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
