"""Wire records to table rows: a drained batch split by kind, each kind appended to its table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from probes.format import schema
from probes.format.writer import TraceWriter


def split_by_kind(records: np.ndarray) -> dict[int, np.ndarray]:
    """The records of each kind, in their original order: one stable sort of the batch as
    raw bytes (moving structured records field by field is several times slower), then a
    contiguous slice per kind."""
    kinds = records["kind"]
    order = np.argsort(kinds, kind="stable")
    raw = records.view(np.dtype((np.void, records.dtype.itemsize)))
    ordered = raw[order].view(records.dtype)
    sorted_kinds = kinds[order]
    present = np.unique(sorted_kinds)
    starts = np.searchsorted(sorted_kinds, present, side="left")
    ends = np.searchsorted(sorted_kinds, present, side="right")
    return {int(k): ordered[a:b] for k, a, b in zip(present.tolist(), starts, ends)}


def write_records(writer: TraceWriter, by_kind: dict[int, np.ndarray]) -> None:
    """Each kind's wire records as rows of its table (split_by_kind's output)."""
    for kind, records in by_kind.items():
        table = schema.TABLE_OF_KIND[schema.Kind(kind)]
        writer.append(table, pa.table({c.name: records[c.wire] for c in table.columns if c.wire}))


def write_rows(writer: TraceWriter, table: schema.Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows the recorder made itself (samples, scans), as one part of `table`."""
    if rows:
        writer.append(table, pa.Table.from_pylist(rows, schema=table.arrow_schema()))
