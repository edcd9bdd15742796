"""Opens a trace directory: checks its format and version, reads its typed metadata, loads
its tables as DataFrames.

No root and no bcc needed. Traces are files people send each other, so everything is checked
before it is believed: meta.json is read from a regular file of bounded size and every field
typed and ranged (probes.format.meta); parts are read only as regular files inside the
trace's own table directories (no symlink is followed, no FIFO or device opened), their
schemas must be the format's, and each part must be the one meta.json lists (rows and
SHA-256), its events within the times meta.json lists for it and within the recording's
span. A trace that fails is refused in one line naming the file and the problem. A
recording killed between writing parts and meta.json leaves parts meta.json does not list,
numbered after those it does: they are read (their columns checked, their digests unknown),
and the trace carries a warning saying so.
"""

from __future__ import annotations

import errno
import grp
import hashlib
import json
import os
import pwd
import stat
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from probes.format import schema
from probes.format.errors import TraceError
from probes.format.meta import MAX_SPAN_NS, Meta, Part, Switch

META = "meta.json"
MAX_META_BYTES = 64 << 20
MAX_PART_BYTES = 4 << 30
MAX_PART_ROWS = 20_000_000  # far more than one flush writes
# Columns holding codes our own probes write: any other value is damage. 0 is "not said"
# (what a trace made by a program leaves in a column it does not fill). An rss member is the
# kernel's own, and a newer kernel may add one: it is not checked.
CODES: dict[tuple[str, str], type[IntEnum]] = {
    ("posts", "source"): schema.Source,
    ("completions", "source"): schema.Source,
    ("writes", "source"): schema.Source,
    ("write_completions", "source"): schema.Source,
    ("allocs", "fn"): schema.AllocFn,
    ("maps", "fn"): schema.MapFn,
    ("waits", "call"): schema.WaitCall,
    ("buffer_groups", "how"): schema.GroupKind,
}
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass
class Trace:
    path: Path
    meta: Meta
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what was left out, and why

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]


def unreadable(what: str | Path, exc: OSError) -> TraceError:
    """The refusal of a file or directory that cannot be opened: its name and why, and for
    a permission refused, whose it is and who asked (a trace recorded as root is owner-only,
    and read as another user)."""
    message = f"{what} cannot be opened: {exc.strerror or exc}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        try:
            st = os.lstat(what)
            message += (
                f" (mode {stat.S_IMODE(st.st_mode):04o}, owner {_user(st.st_uid)}:"
                f"{_group(st.st_gid)}; idlebuf runs as {_user(os.geteuid())})"
            )
        except OSError:  # its directory is the one closed: the name and the reason suffice
            pass
    return TraceError(message)


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _open(name: str | Path, dir_fd: int | None, flags: int, what: str) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP or exc.errno == errno.ENOTDIR and _is_link(name, dir_fd):
            raise TraceError(f"{what} is a symbolic link: refused") from None
        if exc.errno == errno.ENOTDIR:
            raise TraceError(f"{what} is not a directory") from None
        raise unreadable(what, exc) from None


def _is_link(name: str | Path, dir_fd: int | None) -> bool:
    """Whether `name` is a symbolic link (O_DIRECTORY with O_NOFOLLOW says ENOTDIR for one)."""
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _read_regular(name: str | Path, dir_fd: int | None, limit: int, what: str) -> bytes:
    """The bytes of a regular file (not a link, FIFO or device) of at most `limit` bytes."""
    fd = _open(name, dir_fd, _FILE, what)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TraceError(f"{what} is not a regular file")
        if st.st_size > limit:
            raise TraceError(f"{what} is {st.st_size:,} bytes: more than {limit:,}")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise TraceError(f"{what} grows past {limit:,} bytes while read")
        return data
    except OSError as exc:
        raise TraceError(f"{what} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_meta(path: Path) -> Meta:
    meta_path = path / META
    try:
        dir_fd = os.open(path, _DIR)
    except FileNotFoundError:
        raise TraceError(f"{path} is not a trace directory") from None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise TraceError(f"{path} is not a trace directory") from None
        raise unreadable(path, exc) from None
    try:
        if not os.path.lexists(meta_path):
            raise TraceError(f"{path} is not an idlebuf trace: it has no meta.json")
        raw = _read_regular(META, dir_fd, MAX_META_BYTES, str(meta_path))
    finally:
        os.close(dir_fd)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise TraceError(f"{meta_path} is damaged: {str(exc)[:200]}") from None
    if not isinstance(meta, dict) or meta.get("format") != schema.FORMAT_NAME:
        raise TraceError(f"{path} is not an idlebuf trace (meta.json has another format)")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TraceError(f"{meta_path} has an invalid format_version {version!r}")
    if version > schema.FORMAT_VERSION:
        raise TraceError(
            f"{path} uses trace format {version}, newer than this idlebuf reads "
            f"({schema.FORMAT_VERSION}); upgrade idlebuf"
        )
    return Meta.from_json(meta, str(meta_path))


def meta_so_far(path: Path) -> Meta | None:
    """meta.json of a trace a recorder may still be writing: None until it has written one
    (it is replaced atomically, so it is never seen half written)."""
    try:
        return read_meta(path)
    except TraceError:
        return None


def recording_started(path: Path) -> bool:
    """Whether a recorder writing `path` is tracing yet: it rewrites meta.json with attached
    probes once it is (and a trace not started yet may have no meta.json at all)."""
    meta = meta_so_far(path)
    return meta is not None and meta.probes.reads.attached


def switches(path: Path) -> list[Switch]:
    """`record --alternate`: when tracing was switched off and on so far (meta.json)."""
    meta = meta_so_far(path)
    return list(meta.alternations or []) if meta else []


def _checked(dir_fd: int, name: str, what: str, expect: Part | None) -> pq.ParquetFile:
    """A part's file, opened once it is a regular file of bounded size and the one
    meta.json lists (its digest and rows, when it lists them)."""
    data = _read_regular(name, dir_fd, MAX_PART_BYTES, what)
    if expect is not None and hashlib.sha256(data).hexdigest() != expect.sha256:
        raise TraceError(f"{what} is damaged: not the part meta.json lists (its SHA-256 differs)")
    try:
        reader = pq.ParquetFile(pa.BufferReader(data))
        rows = reader.metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise TraceError(f"{what} is damaged: {_one_line(exc)}") from None
    if rows > MAX_PART_ROWS or (expect is not None and rows != expect.rows):
        raise TraceError(
            f"{what} declares {rows:,} rows" + (f", meta.json {expect.rows:,}" if expect else "")
        )
    return reader


def _part(
    dir_fd: int,
    name: str,
    table: schema.Table,
    where: str,
    expect: Part | None,
    columns: list[str] | None = None,
    threads: bool = True,
    bounds: tuple[int, int] | None = None,
) -> pa.Table:
    """One part, checked: a regular file, its digest and rows those meta.json lists (when it
    lists them), its columns the format's with no nulls, its events' times within those
    meta.json lists for it and within `bounds` (Meta.time_bounds). With `columns`, only
    those (the digest is still of the whole file); without `threads`, decoded on the
    calling thread only, not Arrow's pool."""
    what = f"{where}/{name}"
    reader = _checked(dir_fd, name, what, expect)
    try:
        wanted = None
        if columns is not None:
            names = set(reader.schema_arrow.names)  # a property worked out on each use
            wanted = [c for c in columns if c in names]
        piece = reader.read(columns=wanted, use_threads=threads)
    except (OSError, pa.ArrowException) as exc:
        raise TraceError(f"{what} is damaged: {_one_line(exc)}") from None
    missing = table.missing(piece)
    if columns is not None:
        missing = [c for c in missing if c in columns]
    if missing:
        raise TraceError(f"{what} lacks columns {sorted(missing)}")
    for column in table.columns:
        if column.name not in piece.schema.names:
            continue
        got = piece.schema.field(column.name).type
        if got != column.arrow_type:
            raise TraceError(f"{what}: column {column.name} is {got}, not {column.arrow_type}")
        if piece[column.name].null_count:
            raise TraceError(f"{what}: column {column.name} has missing values")
    for name in piece.schema.names:
        codes = CODES.get((table.name, name))
        if codes is not None and piece.num_rows:
            allowed = {0, *codes}
            span = pc.min_max(piece[name])
            low, high = span["min"].as_py(), span["max"].as_py()
            if high - low < len(allowed) and all(v in allowed for v in range(low, high + 1)):
                continue  # every value from the least to the greatest is a code: no search
            known = pa.array([0, *codes], piece.schema.field(name).type)
            strange = pc.filter(piece[name], pc.invert(pc.is_in(piece[name], value_set=known)))
            if len(strange):
                raise TraceError(
                    f"{what}: column {name} holds {strange[0].as_py()}, not a {codes.__name__} code"
                )
    if "ts_ns" in piece.schema.names and piece.num_rows:
        _check_times(what, piece["ts_ns"], expect, bounds)
    if columns is not None:
        return table.subset(columns).conform(piece)
    return table.conform(piece)


def _check_times(
    what: str, ts: pa.ChunkedArray, expect: Part | None, bounds: tuple[int, int] | None
) -> None:
    """A part's events' times: within those meta.json lists for the part (the streamed
    path plans its windows by them) and, 0s aside (state found at attach, its time unknown),
    within the recording's span."""
    bounds_of = pc.min_max(ts)
    low, high = int(bounds_of["min"].as_py()), int(bounds_of["max"].as_py())
    first, last = (expect.first_ns, expect.last_ns) if expect is not None else (None, None)
    if first is not None and last is not None and not first <= low <= high <= last:
        raise TraceError(
            f"{what} holds events from {low} to {high} ns, outside the {first} to {last} "
            "meta.json lists for it"
        )
    if low == 0:
        nonzero = pc.min_max(pc.filter(ts, pc.not_equal(ts, 0)))["min"].as_py()
        if nonzero is None:
            return
        low = int(nonzero)
    _check_span(what, low, high, bounds)


def _check_span(what: str, low: int, high: int, bounds: tuple[int, int] | None) -> None:
    if bounds is not None and not (bounds[0] <= low and high <= bounds[1]):
        raise TraceError(
            f"{what} holds events from {low} to {high} ns, outside the times the recording "
            f"can have ({bounds[0]} to {bounds[1]} ns, from meta.json)"
        )
    if high - low > MAX_SPAN_NS:
        raise TraceError(
            f"{what} holds events {(high - low) / 86_400e9:,.0f} days apart: no recording "
            f"lasts more than {MAX_SPAN_NS // 86_400_000_000_000} days"
        )


@dataclass
class PartRef:
    """One part of one table as meta.json lists it (`expect`; None: written after the last
    meta.json of a killed recording, or an old trace that lists none)."""

    table: schema.Table
    path: Path  # the table's directory
    name: str
    expect: Part | None
    bounds: tuple[int, int] | None = None  # the recording's span (Meta.time_bounds)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The part, checked (see _part), decoded on the calling thread: a reader that runs
        threads of its own (analysis.stream) keeps Arrow's pool out of it - Arrow's pool
        threads, left running, can abort the interpreter at exit (apache/arrow#34314)."""
        dir_fd = _open(self.path, None, _DIR, str(self.path))
        try:
            return _part(
                dir_fd,
                self.name,
                self.table,
                str(self.path),
                self.expect,
                columns,
                False,
                self.bounds,
            )
        finally:
            os.close(dir_fd)

    def time_range(self) -> tuple[int, int, int]:
        """(rows, first ts_ns, last ts_ns): as meta.json lists them, or from the part's
        footer (row-group statistics) without decoding its rows - once its digest is the one
        meta.json lists; the rows' own bounds when the footer has no statistics. Empty
        parts give (0, 0, -1). Times outside the recording's span are refused."""
        expect = self.expect
        if expect is not None and expect.first_ns is not None and expect.last_ns is not None:
            return expect.rows, expect.first_ns, expect.last_ns  # as meta.json lists it
        what = f"{self.path}/{self.name}"
        dir_fd = _open(self.path, None, _DIR, str(self.path))
        try:
            meta = _checked(dir_fd, self.name, what, expect).metadata
        finally:
            os.close(dir_fd)
        rows = meta.num_rows
        try:
            if rows == 0:
                return 0, 0, -1
            col = meta.schema.to_arrow_schema().get_field_index("ts_ns")
            lows, highs = [], []
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(col).statistics if col >= 0 else None
                if stats is None or not stats.has_min_max:
                    break
                if meta.row_group(g).num_rows:
                    lows.append(int(stats.min))
                    highs.append(int(stats.max))
            else:
                low, high = min(lows), max(highs)
                if low:  # with 0s (state found at attach), the rows below say the rest
                    _check_span(what, low, high, self.bounds)
                    return rows, low, high
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise TraceError(f"{what} is damaged: {_one_line(exc)}") from None
        ts = self.read(["ts_ns"])["ts_ns"]  # its times checked as it is read
        return rows, int(pc.min(ts).as_py()), int(pc.max(ts).as_py())


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def table_parts(
    path: Path, table: schema.Table, meta: Meta | None = None, warnings: list[str] | None = None
) -> list[PartRef]:
    """The parts of one table, in order, checked against meta.json's list (when `meta` is
    given and lists them); none for an absent table."""
    listed = None if meta is None or meta.parts is None else meta.parts.get(table.name, [])
    where = path / table.name
    if not os.path.lexists(where):
        if listed:
            raise TraceError(f"{where} is missing: meta.json lists {len(listed)} parts of it")
        return []
    dir_fd = _open(where, None, _DIR, str(where))
    try:
        on_disk = sorted(
            n for n in os.listdir(dir_fd) if n.startswith("part-") and n.endswith(".parquet")
        )
    finally:
        os.close(dir_fd)
    expected: list[Part | None]
    if listed is None:
        names, expected = on_disk, [None] * len(on_disk)
    else:
        names = [p.name for p in listed]
        absent = [n for n in names if n not in on_disk]
        if absent:
            raise TraceError(f"{where}/{absent[0]} is missing: meta.json lists it")
        extra = [n for n in on_disk if n not in names]
        expected = list(listed)
        if extra:
            # a killed recorder's last parts (each whole: written, then renamed) come
            # after every part its last meta.json lists; anything else is not its own
            later = not names or extra[0] > names[-1]
            if meta is None or meta.complete or not later:
                raise TraceError(f"{where}/{extra[0]} is not a part this recording wrote")
            if warnings is not None:
                warnings.append(
                    f"{table.name}: {len(extra)} parts written after the last meta.json "
                    "(the recording was killed) are read without their check"
                )
            names += extra
            expected += [None] * len(extra)
    bounds = meta.time_bounds() if meta is not None else None
    return [PartRef(table, where, n, e, bounds) for n, e in zip(names, expected)]


def read_table(
    path: Path, table: schema.Table, meta: Meta | None = None, warnings: list[str] | None = None
) -> pd.DataFrame:
    """All parts of one table, in order; an absent table is empty. With `meta`, the parts
    are those it lists, each checked against it."""
    parts = table_parts(path, table, meta, warnings)
    if not parts:
        return table.arrow_schema().empty_table().to_pandas()
    where = path / table.name
    dir_fd = _open(where, None, _DIR, str(where))
    try:
        pieces = [
            _part(dir_fd, p.name, table, str(where), p.expect, bounds=p.bounds) for p in parts
        ]
    finally:
        os.close(dir_fd)
    return pa.concat_tables(pieces).to_pandas()


def open_trace(path: str | Path) -> Trace:
    path = Path(path)
    meta = read_meta(path)
    warnings: list[str] = []
    tables = {name: read_table(path, t, meta, warnings) for name, t in schema.TABLES.items()}
    if meta.parts is None and meta.rows:  # older traces: at least the counts must agree
        for name, df in tables.items():
            declared = meta.rows.get(name)
            if declared is not None and len(df) < declared:
                raise TraceError(
                    f"{path / name}: meta.json says {declared:,} rows, the parts hold {len(df):,}"
                )
    return Trace(path, meta, tables, warnings)
