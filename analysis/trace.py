"""Opens a trace directory: checks its format and version, loads its tables as DataFrames.

No root and no bcc needed. A foreign, newer or damaged trace is refused with a one-line reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from probes import layout


class TraceError(Exception):
    """The trace cannot be read; the message says why in one line."""


@dataclass
class Trace:
    path: Path
    meta: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def drops(self) -> dict[str, int]:
        return dict(self.meta.get("drops", {}))

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / "meta.json"
    if not path.is_dir():
        raise TraceError(f"{path} is not a trace directory")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TraceError(f"{path} is not an idlebuf trace: it has no meta.json") from None
    except (OSError, ValueError) as exc:
        raise TraceError(f"{meta_path} is damaged: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != layout.FORMAT_NAME:
        raise TraceError(f"{path} is not an idlebuf trace (meta.json has another format)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise TraceError(f"{meta_path} has an invalid format_version {version!r}")
    if version > layout.FORMAT_VERSION:
        raise TraceError(
            f"{path} uses trace format {version}, newer than this idlebuf reads "
            f"({layout.FORMAT_VERSION}); upgrade idlebuf"
        )
    return meta


def meta_so_far(path: Path) -> dict[str, Any]:
    """meta.json of a trace a recorder may still be writing: {} until it has written one."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def recording_started(path: Path) -> bool:
    """Whether a recorder writing `path` is tracing yet: it rewrites meta.json with attached
    probes once it is (and a trace not started yet may have no meta.json at all)."""
    return bool(meta_so_far(path).get("probes", {}).get("reads", {}).get("attached"))


def switches(path: Path) -> list[dict[str, Any]]:
    """`record --alternate`: when tracing was switched off and on so far (meta.json)."""
    return list(meta_so_far(path).get("alternations", []))


def read_table(path: Path, table: layout.Table) -> pd.DataFrame:
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
        missing = set(schema.names) - set(piece.schema.names)
        if missing:
            raise TraceError(f"{part} lacks columns {sorted(missing)}")
        pieces.append(piece.select(schema.names).cast(schema))
    combined = pa.concat_tables(pieces) if pieces else schema.empty_table()
    return combined.to_pandas()


def open_trace(path: str | Path) -> Trace:
    path = Path(path)
    meta = read_meta(path)
    return Trace(path, meta, {name: read_table(path, t) for name, t in layout.TABLES.items()})
