"""Opens a trace directory: checks its format and version, reads its typed metadata, loads
its tables as DataFrames.

No root and no bcc needed. A foreign, newer or damaged trace is refused with a one-line reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from probes.format import schema
from probes.format.errors import TraceError
from probes.format.meta import Meta, Switch

META = "meta.json"


@dataclass
class Trace:
    path: Path
    meta: Meta
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]


def read_meta(path: Path) -> Meta:
    meta_path = path / META
    if not path.is_dir():
        raise TraceError(f"{path} is not a trace directory")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TraceError(f"{path} is not an idlebuf trace: it has no meta.json") from None
    except (OSError, ValueError) as exc:
        raise TraceError(f"{meta_path} is damaged: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != schema.FORMAT_NAME:
        raise TraceError(f"{path} is not an idlebuf trace (meta.json has another format)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
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


def read_table(path: Path, table: schema.Table) -> pd.DataFrame:
    """All parts of one table, in order; an absent table is empty."""
    schema = table.arrow_schema()
    folder = path / table.name
    parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    pieces = []
    for part in parts:
        try:
            piece = pq.read_table(part)
        except (OSError, pa.ArrowException) as exc:
            raise TraceError(f"{part} is damaged: {exc}") from None
        missing = table.missing(piece)
        if missing:
            raise TraceError(f"{part} lacks columns {sorted(missing)}")
        pieces.append(table.conform(piece))
    combined = pa.concat_tables(pieces) if pieces else schema.empty_table()
    return combined.to_pandas()


def open_trace(path: str | Path) -> Trace:
    path = Path(path)
    meta = read_meta(path)
    return Trace(path, meta, {name: read_table(path, t) for name, t in schema.TABLES.items()})
