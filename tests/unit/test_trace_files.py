"""The trace directory: written safely, read back, and refused when foreign, newer or damaged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from analysis.summary import summarize
from probes.format import schema
from probes.format.meta import Meta
from probes.format.reader import TraceError, open_trace
from probes.format.writer import OutputError, TraceWriter
from tests.helpers import idlebuf

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
    t = write_trace(tmp_path / "t", version=2)
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
