"""The trace directory: written safely, read back, and refused when foreign, newer or damaged."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.summary import summarize
from probes.format import schema
from probes.format.meta import MAX_SPAN_NS, Clock, Meta
from probes.format.reader import TraceError, open_trace
from probes.format.writer import OutputError, TraceWriter
from tests.helpers import idlebuf
from tests.synthetic import server_trace

BUF = 16411


def write_trace(path: Path, complete: bool = True, version: int = 1) -> Path:
    w = TraceWriter(path)
    w.write_meta(Meta(format_version=version, complete=complete, drops={"ringbuf_full": 0}))
    w.append(
        schema.PROCESSES,
        pa.table({"pid": [42], "comm": ["srv"], "cmdline": ["srv"], "first_seen_ns": [1]}),
    )
    n = 13
    w.append(
        schema.POSTS,
        pa.table(
            {
                "ts_ns": list(range(1, n + 1)),
                "pid": [42] * n,
                "tid": list(range(100, 100 + n)),
                "fd": [7] * n,
                "source": [1] * n,
                "op": [45] * n,
                "key": list(range(100, 100 + n)),
                "addr": [0x1000] * n,
                "len": [BUF] * n,
                "nvec": [0] * n,
                "flags": [0] * n,
                "ring": [0] * n,
                "user_data": [0] * n,
                "group": [0] * n,
            }
        ),
    )
    w.append(
        schema.COMPLETIONS,
        pa.table(
            {
                "ts_ns": [50, 51],
                "pid": [42, 42],
                "tid": [100, 101],
                "source": [1, 1],
                "key": [100, 101],
                "ret": [1000, -104],
                "ring": [0, 0],
                "cqe_flags": [0, 0],
            }
        ),
    )
    w.close()
    return path


def test_round_trip_and_summary(tmp_path: Path) -> None:
    s = summarize(open_trace(write_trace(tmp_path / "t"))).to_json()
    (proc,) = s["processes"]
    assert proc["posted_reads"] == {"now": 11, "peak": 13}
    assert proc["pinned_bytes"] == {"now": 11 * BUF, "peak": 13 * BUF}
    assert (proc["reads_completed"], proc["reads_failed"], proc["bytes_received"]) == (1, 1, 1000)
    assert proc["comm"] == "srv" and s["complete"] is True


def test_files_are_owner_only(tmp_path: Path) -> None:
    t = write_trace(tmp_path / "t")
    for p in [t, *t.rglob("*")]:
        assert p.stat().st_mode & 0o777 == (0o700 if p.is_dir() else 0o600), p


def test_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "out").symlink_to(victim)
    with pytest.raises(OutputError, match="exists"):
        TraceWriter(tmp_path / "out")
    with pytest.raises(OutputError, match="not an idlebuf trace"):
        TraceWriter(tmp_path / "out", force=True)
    assert list(victim.iterdir()) == []


def test_existing_output_needs_force_and_force_spares_other_dirs(tmp_path: Path) -> None:
    t = write_trace(tmp_path / "t")
    with pytest.raises(OutputError, match="--force"):
        TraceWriter(t)
    TraceWriter(t, force=True).close()  # an idlebuf trace may be replaced
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"x")
    with pytest.raises(OutputError, match="not an idlebuf trace"):
        TraceWriter(other, force=True)
    assert (other / "keep.jpg").exists()


def one_line_error(args: list[str], match: str) -> None:
    done = idlebuf(*args)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert match in done.stderr, done.stderr
    assert done.stderr.startswith(f"idlebuf {args[0]}: error: "), done.stderr


def test_report_refuses_a_newer_format(tmp_path: Path) -> None:
    t = write_trace(tmp_path / "t", version=schema.FORMAT_VERSION + 1)
    one_line_error(["report", str(t)], "newer than this idlebuf reads")


def test_report_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text(json.dumps({"format": "something-else"}))
    one_line_error(["report", str(tmp_path)], "not an idlebuf trace")
    one_line_error(["report", str(tmp_path / "missing")], "not a trace directory")


def test_report_refuses_a_truncated_parquet_file(tmp_path: Path) -> None:
    t = write_trace(tmp_path / "t")
    part = t / "posts" / "part-000000.parquet"
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="damaged"):
        open_trace(t)
    one_line_error(["report", str(t)], "is damaged")


def test_report_json_shape_and_incomplete_warning(tmp_path: Path) -> None:
    t = write_trace(tmp_path / "t", complete=False)
    done = idlebuf("report", "--json", str(t))
    body = json.loads(done.stdout)
    assert set(body) >= {"processes", "drops", "complete"} and body["complete"] is False
    proc = body["processes"][0]
    assert set(proc) >= {
        "pid",
        "comm",
        "posted_reads",
        "pinned_bytes",
        "by_source",
        "reads_completed",
        "bytes_received",
    }
    assert proc["by_source"]["syscall"]["by_op"]["recvfrom"]["posted_reads"] == 11
    text = idlebuf("report", str(t)).stdout
    assert "did not finish" in text


def test_record_refuses_bad_input(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        one_line_error(["record", "-o", str(tmp_path / "t"), "-p", "1"], "needs root")
        return
    one_line_error(["record", "-o", str(tmp_path / "t"), "-p", "999999999"], "no process")
    write_trace(tmp_path / "exists")
    one_line_error(["record", "-o", str(tmp_path / "exists"), "-p", str(os.getpid())], "--force")
    one_line_error(["record", "-o", str(tmp_path / "t")], "either -p PID or -- COMMAND")
    assert not (tmp_path / "t").exists()  # refused before any work


def test_record_refuses_without_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("covered by test_record_refuses_bad_input")
    tmp_path.chmod(0o777)
    done = idlebuf(
        "record", "-o", str(tmp_path / "t"), "-p", "1", preexec_fn=lambda: os.setuid(65534)
    )
    assert done.returncode != 0 and "needs root" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# --- times that cannot be -------------------------------------------------------------------

SINCE, END = 10_000_000_000, 13_000_000_000


def meta_json(**fields: Any) -> dict[str, Any]:
    """A meta.json object recorded from SINCE to END (the clock base just before), with a
    table of two parts inside that span; `fields` replace its own."""
    parts = [
        {"name": "part-000000.parquet", "rows": 3, "sha256": "0" * 64, "first_ns": SINCE},
        {"name": "part-000001.parquet", "rows": 2, "sha256": "0" * 64, "first_ns": 0},
    ]
    parts[0]["last_ns"], parts[1]["last_ns"] = SINCE + 5, END  # 0: found at attach
    return {
        **Meta(clock=Clock(SINCE - 7, 1)).to_json(),
        "tracing_since_ns": SINCE,
        "end_monotonic_ns": END,
        "complete": True,
        "parts": {"posts": parts},
        **fields,
    }


def changed(change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    meta = meta_json()
    change(meta)
    return meta


@pytest.mark.parametrize(
    "meta",
    [
        meta_json(),
        meta_json(clock={"monotonic_ns": 0, "realtime_ns": 0}),  # a trace a program made
        meta_json(end_monotonic_ns=SINCE - 7 + MAX_SPAN_NS),  # as long as a recording can be
        changed(lambda m: (m.pop("end_monotonic_ns"), m.update(complete=False))),  # killed
        changed(lambda m: m.pop("parts")),  # older traces list no parts
        changed(lambda m: m["parts"]["posts"][0].update(first_ns=None, last_ns=None)),
    ],
)
def test_times_a_recording_can_have_are_accepted(meta: dict[str, Any]) -> None:
    Meta.from_json(meta)


@pytest.mark.parametrize(
    "meta, message",
    [
        (
            meta_json(end_monotonic_ns=10**18),
            "meta.json: end_monotonic_ns (1000000000000000000) is 11,574 days after "
            "clock.monotonic_ns (9999999993): no recording lasts more than 30 days",
        ),
        (
            meta_json(end_monotonic_ns=SINCE - 7 + MAX_SPAN_NS + 1),
            "end_monotonic_ns (2592009999999994) is 30 days after clock.monotonic_ns",
        ),
        (
            meta_json(tracing_since_ns=END + 1),
            "meta.json: tracing_since_ns (13000000001) is after end_monotonic_ns (13000000000)",
        ),
        (
            meta_json(clock={"monotonic_ns": SINCE + 1, "realtime_ns": 1}),
            "meta.json: clock.monotonic_ns (10000000001) is after tracing_since_ns (10000000000)",
        ),
        (
            changed(lambda m: m["parts"]["posts"][1].update(last_ns=END + 1)),
            "meta.json: parts.posts part-000001.parquet: last_ns (13000000001) is outside the "
            "recording (clock.monotonic_ns 9999999993 to end_monotonic_ns 13000000000)",
        ),
        (
            changed(lambda m: m["parts"]["posts"][0].update(first_ns=SINCE - 8)),
            "meta.json: parts.posts part-000000.parquet: first_ns (9999999992) is outside the "
            "recording",
        ),
        (
            changed(lambda m: m["parts"]["posts"][0].update(first_ns=SINCE + 6)),
            "meta.json: parts.posts part-000000.parquet: first_ns (10000000006) is after "
            "last_ns (10000000005)",
        ),
        (
            changed(
                lambda m: (
                    m.pop("end_monotonic_ns"),
                    m["parts"]["posts"][1].update(last_ns=10**18),
                )
            ),
            "meta.json: parts.posts part-000001.parquet: last_ns (1000000000000000000) is 11,574 "
            "days after clock.monotonic_ns (9999999993)",
        ),
    ],
)
def test_times_that_cannot_be_are_refused_naming_the_field(
    meta: dict[str, Any], message: str
) -> None:
    with pytest.raises(TraceError) as refused:
        Meta.from_json(meta)
    assert message in str(refused.value)


def test_a_nested_field_is_named_with_dots() -> None:
    with pytest.raises(TraceError, match=r"^meta.json: at_attach\[0\].rings\[1\].fd should"):
        Meta.from_json(meta_json(at_attach=[{"rings": [{}, {"fd": "3"}]}]))


def part_times(trace: Path, table: str) -> list[tuple[int, int]]:
    parts = json.loads((trace / "meta.json").read_text())["parts"][table]
    return [(p["first_ns"], p["last_ns"]) for p in parts]


def test_state_found_at_attach_at_time_0_is_read(tmp_path: Path) -> None:
    """A recording's buffer groups found at attach have ts_ns 0, long before the clock base."""
    w = TraceWriter(tmp_path / "t")
    w.write_meta(Meta(clock=Clock(SINCE - 7, 1), tracing_since_ns=SINCE, end_monotonic_ns=END))
    w.append(schema.BUFFER_GROUPS, schema.BUFFER_GROUPS.filled(2, ts_ns=[0, SINCE + 3], how=2))
    w.write_meta(Meta(clock=Clock(SINCE - 7, 1), tracing_since_ns=SINCE, end_monotonic_ns=END))
    w.close()
    trace = open_trace(tmp_path / "t")
    assert trace["buffer_groups"]["ts_ns"].tolist() == [0, SINCE + 3]
    assert part_times(tmp_path / "t", "buffer_groups") == [(0, SINCE + 3)]


def test_an_older_trace_with_an_event_far_away_is_refused(tmp_path: Path) -> None:
    """A trace whose meta.json gives no times and lists no parts (made by a program): its
    clock base is 0, and its events within MAX_SPAN_NS of it."""
    t = write_trace(tmp_path / "t")
    posts = pq.read_table(t / "posts" / "part-000000.parquet")
    far = pa.array([10**18] * posts.num_rows, pa.uint64())
    pq.write_table(posts.set_column(0, "ts_ns", far), t / "posts" / "part-000001.parquet")
    meta = json.loads((t / "meta.json").read_text())
    del meta["parts"]
    (t / "meta.json").write_text(json.dumps(meta))
    message = (
        f"{t}/posts/part-000001.parquet holds events from 1000000000000000000 to "
        "1000000000000000000 ns, outside the times the recording can have (0 to "
        "2592000000000000 ns, from meta.json)"
    )
    with pytest.raises(TraceError) as refused:
        open_trace(t)
    assert str(refused.value) == message
    for args in (["report"], ["report", "--stream"]):
        one_line_error([*args, str(t)], message)


# --- a trace the invoking user may not read ---------------------------------------------------


@pytest.fixture
def closed_trace() -> Iterator[Path]:
    """A trace recorded as root (owner-only, as the recorder leaves it) in a directory
    anyone may enter."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to read the trace as another user")
    place = Path(tempfile.mkdtemp(prefix="idlebuf-closed-"))
    try:
        place.chmod(0o755)
        yield server_trace(place / "trace", 4243, 23, 3, 4099, queued=False)
    finally:
        shutil.rmtree(place)


def as_nobody() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


@pytest.mark.parametrize(
    "args",
    [["report"], ["report", "--json"], ["report", "--stream"], ["compare"], ["fleet"]],
)
def test_a_trace_the_user_may_not_read_is_named_with_why(
    closed_trace: Path, args: list[str]
) -> None:
    assert closed_trace.stat().st_mode & 0o777 == 0o700
    done = idlebuf(*args, str(closed_trace), preexec_fn=as_nobody)
    assert (done.returncode, done.stderr) == (
        3,
        f"idlebuf {args[0]}: error: {closed_trace} cannot be opened: Permission denied "
        "(mode 0700, owner root:root; idlebuf runs as nobody)\n",
    )


def test_a_part_the_user_may_not_read_is_named_with_why(closed_trace: Path) -> None:
    for path in [closed_trace, *closed_trace.rglob("*")]:  # all open but the posts
        path.chmod(0o755 if path.is_dir() else 0o644)
    (closed_trace / "posts").chmod(0o700)
    done = idlebuf("report", str(closed_trace), preexec_fn=as_nobody)
    assert (done.returncode, done.stderr) == (
        3,
        f"idlebuf report: error: {closed_trace}/posts cannot be opened: Permission denied "
        "(mode 0700, owner root:root; idlebuf runs as nobody)\n",
    )
