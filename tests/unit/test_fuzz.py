"""Damaged, hostile and foreign traces: every read path either refuses in one line or gives
exactly the figures of the intact trace (with a warning where a killed recording's extra
parts were left out) - never a wrong figure, never a hang, never a traceback.

Variants of a small synthetic trace, made with a fixed seed: tables and parts missing,
truncated, replaced by links, FIFOs or other traces' parts, single-byte flips, meta.json
fields of the wrong type or out of range, meta.json that is not a regular file, and parts a
hostile author made consistent with meta.json but with columns of the wrong type, nulls or
absurd timestamps. The test prints how many were tried, refused, warned and identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.stream import relate
from analysis.summary import summarize
from idlebuf.experiments.comparison import traces_compared
from idlebuf.reporters.text import render_comparison, render_report
from probes.format.errors import IdlebufError
from probes.format.reader import open_trace
from tests.helpers import idlebuf
from tests.synthetic import mixed_trace

SEED, FLIPS = 23, 113
SECONDS_PER_VARIANT = 20


def figures(trace: Path) -> dict[str, Any]:
    """What every read path shows: report, report --json, --json --connections --timeline 1,
    compare, report --stream --timeline 1."""
    t = open_trace(trace)
    plain = summarize(t)
    timed = summarize(t, timeline_s=1.0)
    compared = traces_compared([trace], 0.5)
    return {
        "text": render_report(plain, "T"),
        "json": plain.to_json(),
        "full": timed.to_json(connections=True),
        "compare": render_comparison(compared.rows),
        "stream": relate(trace, timeline_s=1.0, window_rows=7).to_json(),
        "warnings": list(t.warnings),
    }


Variant = tuple[str, Callable[[Path, Path], None]]
KILLED = "the last part unlisted, recording killed"


def _killed(meta: dict[str, Any]) -> None:
    meta["complete"] = False


def _meta(trace: Path) -> dict[str, Any]:
    return json.loads((trace / "meta.json").read_text())


def _set_meta(trace: Path, change: Callable[[dict[str, Any]], None]) -> None:
    meta = _meta(trace)
    change(meta)
    (trace / "meta.json").write_text(json.dumps(meta))


def _parts(trace: Path) -> list[Path]:
    return sorted(trace.glob("*/part-*.parquet"))


def _rewrite_part(trace: Path, part: Path, table: pa.Table) -> None:
    """Replace a part and make meta.json agree with it (a hostile author would)."""
    pq.write_table(table, part)
    data = part.read_bytes()

    def agree(meta: dict[str, Any]) -> None:
        for entry in meta["parts"][part.parent.name]:
            if entry["name"] == part.name:
                entry["sha256"] = hashlib.sha256(data).hexdigest()
                entry["rows"] = table.num_rows

    _set_meta(trace, agree)


def variants(other: Path) -> Iterator[Variant]:
    rng = random.Random(SEED)
    tables = ["posts", "completions", "allocs", "sockets", "writes", "buffer_groups"]
    for name in tables:
        yield f"table {name} missing", lambda t, o, n=name: shutil.rmtree(t / n)
        yield (
            f"table {name} a file",
            lambda t, o, n=name: (
                shutil.rmtree(t / n),
                (t / n).write_text("x"),
            ),
        )
        yield (
            f"table {name} a link",
            lambda t, o, n=name: (
                shutil.rmtree(t / n),
                (t / n).symlink_to(o / n),
            ),
        )
    yield "a part deleted", lambda t, o: (t / "posts" / "part-000001.parquet").unlink()
    yield (
        "a part linked to another trace's",
        lambda t, o: (
            (t / "posts" / "part-000000.parquet").unlink(),
            (t / "posts" / "part-000000.parquet").symlink_to(o / "posts" / "part-000000.parquet"),
        ),
    )
    yield (
        "a part another trace's copy",
        lambda t, o: shutil.copy(
            o / "completions" / "part-000000.parquet", t / "completions" / "part-000000.parquet"
        ),
    )
    yield (
        "a part a FIFO",
        lambda t, o: (
            (t / "posts" / "part-000000.parquet").unlink(),
            os.mkfifo(t / "posts" / "part-000000.parquet"),
        ),
    )
    yield (
        "a part truncated",
        lambda t, o: (t / "posts" / "part-000000.parquet").write_bytes(
            (t / "posts" / "part-000000.parquet").read_bytes()[:300]
        ),
    )
    yield "a part emptied", lambda t, o: (t / "sockets" / "part-000000.parquet").write_bytes(b"")
    yield (
        "an extra part",
        lambda t, o: shutil.copy(
            t / "posts" / "part-000000.parquet", t / "posts" / "part-000099.parquet"
        ),
    )
    yield KILLED, lambda t, o: _set_meta(t, lambda m: (_killed(m), m["parts"]["posts"].pop()))
    yield (
        "an unlisted part before listed ones, recording killed",
        lambda t, o: (
            shutil.copy(t / "posts" / "part-000000.parquet", t / "posts" / "part-0000005.parquet"),
            _set_meta(t, _killed),
        ),
    )
    yield "meta.json missing", lambda t, o: (t / "meta.json").unlink()
    yield "meta.json empty", lambda t, o: (t / "meta.json").write_text("")
    yield "meta.json a FIFO", lambda t, o: ((t / "meta.json").unlink(), os.mkfifo(t / "meta.json"))
    yield (
        "meta.json /dev/zero",
        lambda t, o: (
            (t / "meta.json").unlink(),
            (t / "meta.json").symlink_to("/dev/zero"),
        ),
    )
    yield (
        "meta.json a directory",
        lambda t, o: ((t / "meta.json").unlink(), (t / "meta.json").mkdir()),
    )
    yield "meta.json huge", lambda t, o: (t / "meta.json").write_bytes(b" " * (65 << 20))
    yield (
        "meta.json deeply nested",
        lambda t, o: (t / "meta.json").write_text(
            '{"format": "idlebuf-trace", "format_version": 1, "x": '
            + "[" * 100_000
            + "]" * 100_000
            + "}"
        ),
    )
    hostile: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("complete as a string", lambda m: m.update(complete="false")),
        ("drops as a string", lambda m: m.update(drops="3")),
        ("a drop count a string", lambda m: m["drops"].update(ringbuf_full="3")),
        ("a negative drop count", lambda m: m["drops"].update(ringbuf_full=-4)),
        ("an absurd drop count", lambda m: m["drops"].update(ringbuf_full=10**30)),
        ("a timestamp as a string", lambda m: m.update(end_monotonic_ns="123")),
        ("a timestamp NaN", lambda m: m.update(elapsed_s=float("nan"))),
        ("a timestamp 1e400", lambda m: m.update(elapsed_s=float("inf"))),
        ("a negative timestamp", lambda m: m.update(tracing_since_ns=-5)),
        ("memory as a string", lambda m: m.update(memory="lots")),
        ("sample_every 0", lambda m: m["memory"].update(sample_every=0)),
        ("sample_every -3", lambda m: m["memory"].update(sample_every=-3)),
        ("format_version true", lambda m: m.update(format_version=True)),
        ("format_version 99", lambda m: m.update(format_version=99)),
        ("another format", lambda m: m.update(format="something")),
        ("rows negative", lambda m: m["rows"].update(posts=-1)),
        ("a part outside its table", lambda m: m["parts"]["posts"][0].update(name="../meta.json")),
        ("a part's rows wrong", lambda m: m["parts"]["posts"][0].update(rows=7)),
        ("a part's digest wrong", lambda m: m["parts"]["posts"][0].update(sha256="0" * 64)),
        ("a listed part unlisted", lambda m: m["parts"]["posts"].pop()),
        (
            "parts of a missing table listed",
            lambda m: m["parts"].update(frees=m["parts"]["allocs"]),
        ),
        ("alternations not a list", lambda m: m.update(alternations={"a": 1})),
        ("targets' pids strings", lambda m: m["targets"].update(pids=["1"])),
        ("at_attach garbage", lambda m: m.update(at_attach=[{"pid": "x"}])),
    ]
    for label, change in hostile:
        yield f"meta.json: {label}", lambda t, o, c=change: _set_meta(t, c)

    def retype(t: Path, o: Path) -> None:
        part = t / "posts" / "part-000000.parquet"
        table = pq.read_table(part)
        _rewrite_part(t, part, table.set_column(1, "pid", table["pid"].cast(pa.int64())))

    def with_nulls(t: Path, o: Path) -> None:
        part = t / "completions" / "part-000000.parquet"
        table = pq.read_table(part)
        ret = pa.array([None] * table.num_rows, pa.int64())
        _rewrite_part(t, part, table.set_column(table.schema.get_field_index("ret"), "ret", ret))

    def absurd_times(t: Path, o: Path) -> None:
        part = t / "posts" / "part-000000.parquet"
        table = pq.read_table(part)
        ts = pa.array([(1 << 62) + i for i in range(table.num_rows)], pa.uint64())
        _rewrite_part(t, part, table.set_column(0, "ts_ns", ts))
        _set_meta(t, lambda m: m.update(end_monotonic_ns=(1 << 62) + 10**6))

    yield "a consistent part with a retyped column", retype
    yield "a consistent part with nulls", with_nulls
    yield "consistent parts with absurd timestamps", absurd_times

    def flip(t: Path, o: Path, where: int = 0, seed: int = 0) -> None:
        parts = _parts(t)
        part = parts[seed % len(parts)]
        data = bytearray(part.read_bytes())
        data[where % len(data)] ^= 1 << (seed % 8)
        part.write_bytes(bytes(data))

    for i in range(FLIPS):
        seed, where = rng.randrange(1 << 30), rng.randrange(1 << 30)
        yield f"byte flip {i}", lambda t, o, w=where, s=seed: flip(t, o, w, s)


def _as_warned(figs: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """The figures as they read with the reader's warnings added (and nothing else)."""
    title, _, rest = figs["text"].partition("\n")
    text = "\n".join([title, *(f"WARNING: {w}" for w in warnings), rest])
    json_ = {**figs["json"], "warnings": warnings + figs["json"]["warnings"]}
    full = {**figs["full"], "warnings": warnings + figs["full"]["warnings"]}
    return {
        "text": text,
        "json": json_,
        "full": full,
        "compare": figs["compare"],
        "stream": figs["stream"],  # the streamed figures carry no warnings
    }


class _Timeout(Exception):
    pass


def _alarm(*_: object) -> None:
    raise _Timeout


def test_damaged_traces_are_refused_or_read_exactly(tmp_path: Path) -> None:
    intact = mixed_trace(tmp_path / "intact")
    other = mixed_trace(tmp_path / "other", pid=5151)
    expected = figures(intact)
    counts = {"tried": 0, "refused": 0, "warned": 0, "identical": 0}
    wrong, slow = [], []
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for label, damage in variants(other):
            trace = tmp_path / "variant"
            if trace.exists():
                shutil.rmtree(trace)
            shutil.copytree(intact, trace, symlinks=True)
            damage(trace, other)
            counts["tried"] += 1
            began = time.monotonic()
            signal.alarm(SECONDS_PER_VARIANT)
            try:
                got = figures(trace)
            except IdlebufError as exc:
                assert "\n" not in str(exc), (label, str(exc))
                counts["refused"] += 1
                continue
            except _Timeout:
                slow.append(label)
                continue
            finally:
                signal.alarm(0)
                if time.monotonic() - began > SECONDS_PER_VARIANT / 2:
                    slow.append(label)
            warnings = got.pop("warnings")
            want = expected
            if label in KILLED:  # the intact trace, as a killed recording leaves it
                baseline = tmp_path / "baseline" / "variant"  # same name: compare shows it
                shutil.rmtree(baseline, ignore_errors=True)
                shutil.copytree(intact, baseline)
                _set_meta(baseline, _killed)
                want = figures(baseline)
            if got != _as_warned(want, warnings):
                wrong.append(label)
            counts["warned" if warnings else "identical"] += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"\nfuzz: {counts}")  # shown with -s; the README quotes a run
    assert not wrong, f"figures changed silently by: {wrong}"
    assert not slow, f"too slow: {slow}"
    assert counts["tried"] == counts["refused"] + counts["warned"] + counts["identical"]
    assert counts["refused"] > counts["tried"] * 0.8  # nearly every damage is noticed
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak < 2 << 30, f"peak RSS {peak / 2**30:.1f} GiB"


@pytest.mark.parametrize("damage", ["a FIFO", "a flip"])
def test_the_cli_refuses_in_one_line(tmp_path: Path, damage: str) -> None:
    trace = mixed_trace(tmp_path / "t")
    if damage == "a FIFO":
        (trace / "meta.json").unlink()
        os.mkfifo(trace / "meta.json")
    else:
        part = trace / "posts" / "part-000000.parquet"
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0x10
        part.write_bytes(bytes(data))
    for args in (["report"], ["report", "--json"], ["report", "--stream"], ["compare"]):
        done = idlebuf(*args, str(trace), timeout=30)
        assert done.returncode == 3, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
