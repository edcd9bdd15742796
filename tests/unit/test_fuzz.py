"""Damaged, hostile and foreign traces: every read path either refuses in one line or gives
the figures the trace holds - never a wrong figure, never a hang, never a traceback.

Variants of a small synthetic trace, made with a fixed seed: tables and parts missing,
truncated, replaced by links, FIFOs or other traces' parts, single-byte flips, meta.json
fields of the wrong type, out of range or at times that cannot be, meta.json that is not a
regular file. Damage a digest would catch is also made consistently, as a hostile author
would (a part rewritten or flipped, its SHA-256 and rows recomputed in meta.json), so that
it reaches what lies behind the digest: the Parquet decoder, the columns' types, nulls,
times and values.

Each variant's outcome is pinned in EXPECTED: refused (with a fragment of the one-line
message, which says which check refused it), read with a warning and otherwise the intact
figures, read identical to the intact trace, or read as another trace (consistent damage
that changed a value: the trace now says something else, and its figures are its own). A
change in behaviour shows as a difference from the table. The test prints the counts.
"""

# mypy: disable-error-code="func-returns-value"
# (the damage lambdas run several steps as one tuple of their results, None included)
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
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from analysis.engine import analyze
from idlebuf.experiments.comparison import traces_compared
from idlebuf.reporters.text import render_comparison, render_report
from probes.format.errors import IdlebufError
from tests.helpers import idlebuf
from tests.synthetic import mixed_trace


def both_windows(path: Path) -> tuple[Any, Any]:
    """The report of `path` through the analysis engine with the whole trace as one window,
    and in windows of 7 rows: the one place this test names the engine."""
    whole = analyze(path, timeline_s=1.0)
    return whole, analyze(path, timeline_s=1.0, window_rows=7)


SEED = 23
FLIPS = 113  # bit flips in a part's bytes, meta.json left as it was (the digest's to catch)
CONSISTENT_FLIPS = 23  # bit flips in a part's bytes, its digest recomputed
VALUE_FLIPS = 23  # bit flips in one value of a part's rows, the part rewritten consistently
SECONDS_PER_VARIANT = 20  # at least; see `limit`
END = 13_000_000_000  # mixed_trace's end_monotonic_ns (it begins at 10 s)


def figures(trace: Path) -> dict[str, Any]:
    """What every read path shows: report (text), report --json --connections --timeline 1,
    the same in windows of 7 rows, and compare."""
    whole, windowed = both_windows(trace)
    return {
        "text": render_report(whole, "T"),
        "json": whole.to_json(connections=True),
        "windowed": windowed.to_json(connections=True),
        "compare": render_comparison(traces_compared([trace], 0.5).rows),
    }


def _without_new_warnings(got: dict[str, Any], want: dict[str, Any]) -> dict[str, Any]:
    """`got` less the warnings `want` does not have (a warning line of the text, an entry of
    a JSON's warnings)."""
    new = {
        w
        for key in ("json", "windowed")
        for w in got[key].get("warnings", [])
        if w not in want[key].get("warnings", [])
    }
    out = dict(got)
    out["text"] = "\n".join(
        line for line in got["text"].split("\n") if not any(w in line for w in new)
    )
    for key in ("json", "windowed"):
        if "warnings" in got[key]:
            kept = [w for w in got[key]["warnings"] if w not in new]
            out[key] = {**got[key], "warnings": kept}
    return out


def outcome(got: dict[str, Any], want: dict[str, Any]) -> str:
    if got == want:
        return "identical"
    if _without_new_warnings(got, want) == want:
        return "warned"
    return "changed"


# --- the damage ------------------------------------------------------------------------------

# a damage: (trace, another trace) -> anything (a lambda runs its steps as a tuple)
Variant = tuple[str, Callable[[Path, Path], object]]
KILLED = "the last part unlisted, recording killed"


def _killed(meta: dict[str, Any]) -> None:
    meta["complete"] = False


def _meta(trace: Path) -> dict[str, Any]:
    return json.loads((trace / "meta.json").read_text())


def _set_meta(trace: Path, change: Callable[[dict[str, Any]], object]) -> None:
    meta = _meta(trace)
    change(meta)
    (trace / "meta.json").write_text(json.dumps(meta))


def _parts(trace: Path) -> list[Path]:
    return sorted(trace.glob("*/part-*.parquet"))


def _agree(trace: Path, part: Path, rows: int, times: tuple[int, int] | None = None) -> None:
    """meta.json made to list `part` as it now is: its digest and rows (and with `times`,
    its first and last ts_ns), as a hostile author would."""
    digest = hashlib.sha256(part.read_bytes()).hexdigest()

    def agree(meta: dict[str, Any]) -> None:
        for entry in meta["parts"][part.parent.name]:
            if entry["name"] == part.name:
                entry.update(sha256=digest, rows=rows)
                if times is not None:
                    entry.update(first_ns=times[0], last_ns=times[1])

    _set_meta(trace, agree)


def _rewrite_part(trace: Path, part: Path, table: pa.Table, relist: bool = False) -> None:
    """Replace a part and make meta.json agree with it; with `relist`, its times too."""
    pq.write_table(table, part, compression="zstd")
    times = None
    if relist:
        bounds = pc.min_max(table["ts_ns"])
        times = (bounds["min"].as_py(), bounds["max"].as_py())
    _agree(trace, part, table.num_rows, times)


def _with_ts(trace: Path, part: Path, ts: Callable[[int, int], int], relist: bool) -> None:
    """A part rewritten with its ts_ns[i] made ts(i, old)."""
    table = pq.read_table(part)
    old = table["ts_ns"].to_pylist()
    new = pa.array([ts(i, t) for i, t in enumerate(old)], pa.uint64())
    _rewrite_part(trace, part, table.set_column(0, "ts_ns", new), relist)


def _flip_bit(value: Any, type_: pa.DataType, bit: int) -> Any:
    if pa.types.is_boolean(type_):
        return not value
    if pa.types.is_string(type_):
        text = value or "x"
        i = bit % len(text)
        return text[:i] + chr(ord(text[i]) ^ (1 << (bit % 7))) + text[i + 1 :]
    if pa.types.is_floating(type_):
        return value + 1.0
    width = type_.bit_width
    flipped = value ^ (1 << (bit % width))
    if pa.types.is_signed_integer(type_) and flipped >= 1 << (width - 1):
        flipped -= 1 << width
    return flipped


def variants(other: Path) -> Iterator[Variant]:
    rng = random.Random(SEED)
    tables = ["posts", "completions", "allocs", "sockets", "writes", "buffer_groups"]

    def missing(t: Path, o: Path, name: str) -> None:
        shutil.rmtree(t / name)

    def a_file(t: Path, o: Path, name: str) -> None:
        shutil.rmtree(t / name)
        (t / name).write_text("x")

    def a_link(t: Path, o: Path, name: str) -> None:
        shutil.rmtree(t / name)
        (t / name).symlink_to(o / name)

    for name in tables:
        yield f"table {name} missing", partial(missing, name=name)
        yield f"table {name} a file", partial(a_file, name=name)
        yield f"table {name} a link", partial(a_link, name=name)
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
        lambda t, o: ((t / "meta.json").unlink(), (t / "meta.json").symlink_to("/dev/zero")),
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
    # harmless to the figures: read exactly as the intact trace
    yield (
        "meta.json indented, its keys in another order",
        lambda t, o: (t / "meta.json").write_text(json.dumps(_meta(t), indent=3, sort_keys=True)),
    )
    yield (
        "meta.json with a key of a newer idlebuf",
        lambda t, o: _set_meta(t, lambda m: m.update(future_key={"x": 1})),
    )
    yield "a stray file beside the parts", lambda t, o: (t / "posts" / "notes.txt").write_text("x")
    yield (
        "an older trace: meta.json lists no parts",
        lambda t, o: _set_meta(t, lambda m: m.pop("parts")),
    )

    def reencoded(t: Path, o: Path) -> None:
        part = t / "posts" / "part-000000.parquet"
        table = pq.read_table(part)
        pq.write_table(table, part, compression="none")
        _agree(t, part, table.num_rows)

    yield "a part re-encoded (no compression), listed so", reencoded
    hostile: list[tuple[str, Callable[[dict[str, Any]], object]]] = [
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
        # times that cannot be
        ("an end 10^18 ns away", lambda m: m.update(end_monotonic_ns=10**18)),
        ("a start after the end", lambda m: m.update(tracing_since_ns=END + 1)),
        ("a clock base after the start", lambda m: m["clock"].update(monotonic_ns=END - 1)),
        ("a part listed after the end", lambda m: m["parts"]["posts"][0].update(last_ns=END + 1)),
        (
            "a part listed before the clock base",
            lambda m: (
                m["clock"].update(monotonic_ns=m["tracing_since_ns"]),
                m["parts"]["allocs"][0].update(first_ns=m["tracing_since_ns"] - 1),
            ),
        ),
        (
            "a part's first time after its last",
            lambda m: m["parts"]["posts"][1].update(first_ns=END),
        ),
        (
            "a killed recording's part listed 10^18 ns on",
            lambda m: (
                _killed(m),
                m.pop("end_monotonic_ns"),
                m["parts"]["posts"][0].update(last_ns=10**18),
            ),
        ),
        (
            "a part listed with narrower times than its events",
            lambda m: m["parts"]["posts"][0].update(last_ns=m["parts"]["posts"][0]["last_ns"] - 1),
        ),
    ]

    def meta_changed(t: Path, o: Path, change: Callable[[dict[str, Any]], object]) -> None:
        _set_meta(t, change)

    for label, change in hostile:
        yield f"meta.json: {label}", partial(meta_changed, change=change)

    def retype(t: Path, o: Path) -> None:
        part = t / "posts" / "part-000000.parquet"
        table = pq.read_table(part)
        _rewrite_part(t, part, table.set_column(1, "pid", table["pid"].cast(pa.int64())))

    def with_nulls(t: Path, o: Path) -> None:
        part = t / "completions" / "part-000000.parquet"
        table = pq.read_table(part)
        ret = pa.array([None] * table.num_rows, pa.int64())
        _rewrite_part(t, part, table.set_column(table.schema.get_field_index("ret"), "ret", ret))

    def without_column(t: Path, o: Path) -> None:
        part = t / "completions" / "part-000000.parquet"
        table = pq.read_table(part)
        _rewrite_part(t, part, table.remove_column(table.schema.get_field_index("ret")))

    def absurd_times(t: Path, o: Path) -> None:
        part = t / "posts" / "part-000000.parquet"
        _with_ts(t, part, lambda i, ts: (1 << 62) + i, relist=True)
        _set_meta(t, lambda m: m.update(end_monotonic_ns=(1 << 62) + 10**6))

    def shuffled(t: Path, o: Path) -> None:
        part = t / "posts" / "part-000000.parquet"
        table = pq.read_table(part)
        order = list(range(table.num_rows))
        random.Random(SEED).shuffle(order)
        _rewrite_part(t, part, table.take(order))

    def older_far(t: Path, o: Path) -> None:
        _with_ts(t, t / "allocs" / "part-000001.parquet", lambda i, ts: 10**18, relist=False)
        _set_meta(t, lambda m: (m.pop("parts"), m.pop("end_monotonic_ns")))

    yield "a consistent part with a retyped column", retype
    yield "a consistent part with nulls", with_nulls
    yield "a consistent part without a column", without_column
    yield "consistent parts with absurd timestamps", absurd_times
    yield (
        "a consistent part with events after the end, listed so",
        lambda t, o: _with_ts(
            t, t / "posts" / "part-000001.parquet", lambda i, ts: ts + 10**9, relist=True
        ),
    )
    yield (
        "a consistent part with events outside its listed times",
        lambda t, o: _with_ts(t, t / "posts" / "part-000001.parquet", lambda i, ts: ts + 1, False),
    )
    yield (
        "an older trace with an event 10^18 ns on",
        older_far,
    )
    yield "a consistent part with its rows shuffled", shuffled

    def flip(t: Path, o: Path, where: int, seed: int, consistent: bool) -> None:
        parts = _parts(t)
        part = parts[seed % len(parts)]
        data = bytearray(part.read_bytes())
        data[where % len(data)] ^= 1 << (seed % 8)
        part.write_bytes(bytes(data))
        if consistent:
            listed = next(p for p in _meta(t)["parts"][part.parent.name] if p["name"] == part.name)
            _agree(t, part, listed["rows"])

    for i in range(FLIPS):
        seed, where = rng.randrange(1 << 30), rng.randrange(1 << 30)
        yield f"byte flip {i}", partial(flip, where=where, seed=seed, consistent=False)
    for i in range(CONSISTENT_FLIPS):
        seed, where = rng.randrange(1 << 30), rng.randrange(1 << 30)
        yield (
            f"consistent byte flip {i}",
            partial(flip, where=where, seed=seed, consistent=True),
        )

    def flip_value(t: Path, o: Path, seed: int) -> None:
        pick = random.Random(seed)
        part = pick.choice(_parts(t))
        table = pq.read_table(part)
        column = pick.choice(
            [i for i, f in enumerate(table.schema) if not pa.types.is_nested(f.type)]
        )
        values = table.column(column).to_pylist()
        row = pick.randrange(len(values))
        type_ = table.schema.field(column).type
        values[row] = _flip_bit(values[row], type_, pick.randrange(64))
        name = table.schema.field(column).name
        _rewrite_part(t, part, table.set_column(column, name, pa.array(values, type_)))

    for i in range(VALUE_FLIPS):
        seed = rng.randrange(1 << 30)
        yield f"value flip {i}", partial(flip_value, seed=seed)


# --- what each variant gives -----------------------------------------------------------------

DIGEST = "refused: its SHA-256 differs"
EXPECTED: dict[str, str] = {
    **{f"table {n} missing": "refused: is missing" for n in ("posts", "completions", "allocs")},
    "table sockets missing": "refused: is missing",
    "table writes missing": "refused: is missing",
    "table buffer_groups missing": "refused: is missing",
    **{
        f"table {n} a file": "refused: is not a directory"
        for n in ("posts", "completions", "allocs", "sockets", "writes", "buffer_groups")
    },
    **{
        f"table {n} a link": "refused: is a symbolic link"
        for n in ("posts", "completions", "allocs", "sockets", "writes", "buffer_groups")
    },
    "a part deleted": "refused: is missing: meta.json lists it",
    "a part linked to another trace's": "refused: is a symbolic link",
    "a part another trace's copy": DIGEST,
    "a part a FIFO": "refused: is not a regular file",
    "a part truncated": DIGEST,
    "a part emptied": DIGEST,
    "an extra part": "refused: is not a part this recording wrote",
    KILLED: "warned",
    "an unlisted part before listed ones, recording killed": (
        "refused: is not a part this recording wrote"
    ),
    "meta.json missing": "refused: it has no meta.json",
    "meta.json empty": "refused: meta.json is damaged",
    "meta.json a FIFO": "refused: is not a regular file",
    "meta.json /dev/zero": "refused: is a symbolic link",
    "meta.json a directory": "refused: is not a regular file",
    "meta.json huge": "refused: more than",
    "meta.json deeply nested": "refused: meta.json is damaged",
    "meta.json indented, its keys in another order": "identical",
    "meta.json with a key of a newer idlebuf": "identical",
    "a stray file beside the parts": "identical",
    "an older trace: meta.json lists no parts": "identical",
    "a part re-encoded (no compression), listed so": "identical",
    "meta.json: complete as a string": "refused: complete should be true or false",
    "meta.json: drops as a string": "refused: drops should be an object",
    "meta.json: a drop count a string": "refused: drops.ringbuf_full should be an integer",
    "meta.json: a negative drop count": "refused: drops.ringbuf_full should be a count",
    "meta.json: an absurd drop count": "refused: drops.ringbuf_full is out of range",
    "meta.json: a timestamp as a string": "refused: end_monotonic_ns should be an integer",
    "meta.json: a timestamp NaN": "refused: elapsed_s should be a finite number",
    "meta.json: a timestamp 1e400": "refused: elapsed_s should be a finite number",
    "meta.json: a negative timestamp": "refused: tracing_since_ns should be a count",
    "meta.json: memory as a string": "refused: memory should be an object",
    "meta.json: sample_every 0": "refused: memory.sample_every should be 1 or more",
    "meta.json: sample_every -3": "refused: memory.sample_every should be 1 or more",
    "meta.json: format_version true": "refused: invalid format_version",
    "meta.json: format_version 99": "refused: newer than this idlebuf reads",
    "meta.json: another format": "refused: not an idlebuf trace",
    "meta.json: rows negative": "refused: rows.posts should be a count",
    "meta.json: a part outside its table": "refused: parts.posts lists '../meta.json'",
    "meta.json: a part's rows wrong": "refused: declares 29 rows, meta.json 7",
    "meta.json: a part's digest wrong": DIGEST,
    "meta.json: a listed part unlisted": "refused: is not a part this recording wrote",
    "meta.json: parts of a missing table listed": "refused: frees is missing",
    "meta.json: alternations not a list": "refused: alternations should be a list",
    "meta.json: targets' pids strings": "refused: targets.pids[0] should be an integer",
    "meta.json: at_attach garbage": "refused: at_attach[0].pid should be an integer",
    "meta.json: an end 10^18 ns away": (
        "refused: end_monotonic_ns (1000000000000000000) is 11,574 days after tracing_since_ns"
    ),
    "meta.json: a start after the end": (
        "refused: tracing_since_ns (13000000001) is after end_monotonic_ns (13000000000)"
    ),
    "meta.json: a clock base after the start": (
        "refused: clock.monotonic_ns (12999999999) is after tracing_since_ns (10000000000)"
    ),
    "meta.json: a part listed after the end": (
        "refused: parts.posts part-000000.parquet: last_ns (13000000001) is outside the recording"
    ),
    "meta.json: a part listed before the clock base": (
        "refused: parts.allocs part-000000.parquet: first_ns (9999999999) is outside the recording"
    ),
    "meta.json: a part's first time after its last": (
        "refused: parts.posts part-000001.parquet: first_ns (13000000000) is after last_ns"
    ),
    "meta.json: a killed recording's part listed 10^18 ns on": (
        "refused: parts.posts part-000000.parquet: last_ns (1000000000000000000) is 11,574 days"
    ),
    "meta.json: a part listed with narrower times than its events": (
        "refused: outside the 10000000500 to 12500002009 meta.json lists for it"
    ),
    "a consistent part with a retyped column": "refused: column pid is int64, not uint32",
    "a consistent part with nulls": "refused: column ret has missing values",
    "a consistent part without a column": "refused: lacks columns ['ret']",
    "consistent parts with absurd timestamps": "refused: days after tracing_since_ns",
    "a consistent part with events after the end, listed so": (
        "refused: parts.posts part-000001.parquet: last_ns (13005000000) is outside the recording"
    ),
    "a consistent part with events outside its listed times": (
        "refused: posts/part-000001.parquet holds events from 12000000001 to 12005000001 ns, "
        "outside the 12000000000 to 12005000000 meta.json lists for it"
    ),
    "an older trace with an event 10^18 ns on": (
        "refused: allocs/part-000001.parquet holds events from 1000000000000000000 to "
        "1000000000000000000 ns, outside the times the recording can have (0 to "
        "2592010000000000 ns, from meta.json)"
    ),
    "a consistent part with its rows shuffled": "identical",
    **{f"byte flip {i}": DIGEST for i in range(FLIPS)},
    # Where a flip lands decides what notices it: the Parquet decoder, the times, or nothing
    # (a byte the figures do not depend on). Pinned from a run with pyarrow 26: another
    # version writes other bytes, and this part of the table is then made again.
    "consistent byte flip 0": "refused: writes/part-000000.parquet is damaged",
    "consistent byte flip 1": "identical",
    "consistent byte flip 2": "refused: allocs/part-000000.parquet is damaged",
    "consistent byte flip 3": "refused: stacks/part-000000.parquet is damaged",
    "consistent byte flip 4": "refused: writes/part-000000.parquet is damaged",
    "consistent byte flip 5": "refused: sockets/part-000000.parquet is damaged",
    "consistent byte flip 6": "refused: buffer_uses/part-000000.parquet is damaged",
    "consistent byte flip 7": "refused: allocs/part-000000.parquet is damaged",
    "consistent byte flip 8": "refused: completions/part-000001.parquet is damaged",
    "consistent byte flip 9": "refused: completions/part-000000.parquet is damaged",
    "consistent byte flip 10": "identical",
    "consistent byte flip 11": "identical",
    "consistent byte flip 12": "identical",
    "consistent byte flip 13": "refused: wait_ends/part-000000.parquet is damaged",
    "consistent byte flip 14": "refused: residency/part-000000.parquet is damaged",
    "consistent byte flip 15": "identical",
    "consistent byte flip 16": (
        "refused: allocs/part-000000.parquet holds events from 10000000000 to "
        "6056240647472418552 ns, outside the 10000000000 to 10000022000 meta.json lists"
    ),
    "consistent byte flip 17": "refused: allocs/part-000000.parquet is damaged",
    "consistent byte flip 18": "refused: wait_ends/part-000000.parquet is damaged",
    "consistent byte flip 19": "refused: posts/part-000000.parquet is damaged",
    "consistent byte flip 20": "identical",
    "consistent byte flip 21": "refused: writes/part-000000.parquet is damaged",
    "consistent byte flip 22": "refused: waits/part-000000.parquet is damaged",
    # A value flipped and the part rewritten as the writer would: a time outside those listed
    # or a code the probes never write is refused; any other value is the trace's word.
    "value flip 0": "changed",  # rss member 1 -> 513: a kernel counter not known (not RSS)
    "value flip 1": "changed",  # buffer_uses group 3 -> 7
    "value flip 2": "changed",  # allocs pid 4242 -> 2147487890: another process's allocation
    "value flip 3": "identical",  # rss ts_ns + 16 ns, within its listed times
    "value flip 4": "changed",  # wait_ends pid 4242 -> 2101394
    "value flip 5": "identical",  # buffer_uses request: a key the figures do not use
    "value flip 6": "changed",  # buffer_groups pid 4242 -> 20626
    "value flip 7": (  # waits ts_ns 10003000000 -> 10539870912
        "refused: waits/part-000000.parquet holds events from 10001000000 to 10539870912 ns, "
        "outside the 10001000000 to 10003000000 meta.json lists for it"
    ),
    "value flip 8": "identical",  # stacks stack_id 5 -> 1: a stack no row names
    "value flip 9": "identical",  # rss ts_ns + 2 ns
    "value flip 10": "changed",  # sockets local '' -> 'X'
    "value flip 11": "changed",  # writes len 8191 -> 7935
    "value flip 12": "changed",  # rss member 1 -> 9
    "value flip 13": "changed",  # allocs pid 4242 -> 4754
    "value flip 14": (  # completions ts_ns 12021000000 -> 149459953472
        "refused: completions/part-000001.parquet holds events from 12020000000 to "
        "149459953472 ns, outside the 12020000000 to 12021000000 meta.json lists for it"
    ),
    "value flip 15": (  # buffer_groups how 2 -> 2050
        "refused: buffer_groups/part-000000.parquet: column how holds 2050, not a GroupKind code"
    ),
    "value flip 16": "changed",  # allocs stack_id 0 -> 2**31: a site not in stacks
    "value flip 17": "changed",  # completions key 2 -> 2**50 + 2: the read stays posted
    "value flip 18": "changed",  # allocs addr: the buffer's allocation is elsewhere
    "value flip 19": "changed",  # rss member 1 -> 513
    "value flip 20": "identical",  # wait_ends tid 4242 -> 1073746066
    "value flip 21": "changed",  # buffer_uses pid 4242 -> 4306
    "value flip 22": "changed",  # processes comm 'srv' -> 'srV'
}


class _Timeout(Exception):
    pass


def _alarm(*_: object) -> None:
    raise _Timeout


def test_damaged_traces_are_refused_or_read_exactly(tmp_path: Path) -> None:
    intact = mixed_trace(tmp_path / "intact")
    other = mixed_trace(tmp_path / "other", pid=5151)
    # the figures to expect, from copies named as the variants are (compare shows the name)
    for baseline in ("as intact", "as killed"):
        (tmp_path / baseline).mkdir()
        shutil.copytree(intact, tmp_path / baseline / "variant")
    _set_meta(tmp_path / "as killed" / "variant", _killed)
    began = time.monotonic()
    want = figures(tmp_path / "as intact" / "variant")
    # a variant may take ten times the intact trace (on a loaded machine too), not more
    limit = max(SECONDS_PER_VARIANT, round(10 * (time.monotonic() - began)))
    want_killed = figures(tmp_path / "as killed" / "variant")
    assert want["json"] == want["windowed"] and want_killed["json"] == want_killed["windowed"]
    got: dict[str, str] = {}
    slow, windows_differ = [], []
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for label, damage in variants(other):
            trace = tmp_path / "variant"
            if trace.exists():
                shutil.rmtree(trace)
            shutil.copytree(intact, trace, symlinks=True)
            damage(trace, other)
            began = time.monotonic()
            signal.alarm(limit)
            try:
                read = figures(trace)
            except IdlebufError as exc:
                got[label] = f"refused: {exc}"
                continue
            except _Timeout:
                got[label] = f"slower than {limit} s"
                continue
            except Exception as exc:  # the engine raises nothing but its one error type
                got[label] = f"crashed: {exc!r}"
                continue
            finally:
                signal.alarm(0)
                if time.monotonic() - began > limit / 2:
                    slow.append(label)
            got[label] = outcome(read, want_killed if label == KILLED else want)
            if read["json"] != read["windowed"]:  # one engine: any window size, one answer
                windows_differ.append(label)
    finally:
        signal.signal(signal.SIGALRM, old)
    kinds = [g.split(":")[0] for g in got.values()]
    print(f"\nfuzz: {len(got)} tried", {k: kinds.count(k) for k in sorted(set(kinds))})
    assert not slow, f"too slow: {slow}"
    assert not windows_differ, f"the figures depend on the window size: {windows_differ}"
    assert not [g for g in got.values() if "\n" in g], "a refusal of more than one line"
    assert set(got) == set(EXPECTED)
    differ = {
        label: (EXPECTED[label], got[label])
        for label in EXPECTED
        if not (
            got[label] == EXPECTED[label]
            or EXPECTED[label].startswith("refused: ")
            and got[label].startswith("refused: ")
            and EXPECTED[label][len("refused: ") :] in got[label]
        )
    }
    assert not differ, "outcomes differ from EXPECTED (expected, got):\n" + "\n".join(
        f"{label!r}: {pair}" for label, pair in differ.items()
    )
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
