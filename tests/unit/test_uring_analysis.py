"""io_uring analysis from synthetic tables: labels, provided-buffer groups."""

from __future__ import annotations

import pandas as pd

from analysis.buffers import buffer_group_summary, uses_tally
from analysis.reads import label_reads, network_reads
from probes.format.schema import GroupKind, PostFlag, Source

RECV, READ = 27, 22


def intervals(rows: list[tuple[int, int]]) -> pd.DataFrame:
    return pd.DataFrame(
        [(Source.URING, op, flags) for op, flags in rows], columns=["source", "op", "flags"]
    )


def test_labels_tell_sockets_files_and_fixed_files_apart() -> None:
    iv = intervals([(RECV, PostFlag.SOCKET), (READ, 0), (RECV, PostFlag.FIXED_FILE)])
    labelled = label_reads(iv)
    assert labelled["source_name"].tolist() == ["uring", "file", "uring"]
    assert labelled["label"].tolist() == ["RECV", "uring READ", "RECV (fixed file)"]
    assert len(network_reads(iv)) == 2


def groups(rows: list[tuple]) -> pd.DataFrame:
    cols = [
        "ts_ns",
        "pid",
        "ring",
        "group",
        "how",
        "addr",
        "entries_or_size",
        "buffers",
        "first_id",
    ]
    return pd.DataFrame(rows, columns=cols)


def uses(rows: list[tuple]) -> pd.DataFrame:
    cols = ["ts_ns", "pid", "ring", "group", "buffer_id", "bytes", "user_data", "request"]
    return pd.DataFrame(rows, columns=cols)


def test_registered_ring_counts_what_its_memory_showed() -> None:
    g = groups([(1, 9, 0xA, 7, GroupKind.RING, 0x1000, 128, 0, 0)])
    rings = pd.DataFrame(
        [(2, 9, 0xA, 7, 128, 67, 67, 67 * 4099), (5, 9, 0xA, 7, 128, 70, 67, 67 * 4099)],
        columns=["ts_ns", "pid", "ring", "group", "entries", "tail", "buffers", "bytes"],
    )
    u = uses([(3, 9, 0xA, 7, b, 100, 1, 0) for b in range(3)] + [(4, 9, 0xA, 7, 0, -105, 1, 0)])
    (row,) = buffer_group_summary(g, rings, uses_tally(u, rings)).to_dict("records")
    assert (row["how"], row["buffers"], row["bytes"]) == ("ring", 67, 67 * 4099)
    assert (row["consumed"], row["available"]) == (3, 67)  # tail 70 - 3 used


def test_provided_buffers_count_distinct_ids() -> None:
    g = groups(
        [
            (1, 9, 0xA, 3, GroupKind.PROVIDE, 0x1000, 512, 13, 0),
            (2, 9, 0xA, 3, GroupKind.PROVIDE, 0x1200, 512, 1, 4),  # buffer 4 given back
        ]
    )
    u = uses([(1, 9, 0xA, 3, 4, 10, 1, 0xF00), (3, 9, 0xA, 3, 5, 10, 1, 0xF00)])
    empty_rings = pd.DataFrame(
        columns=["ts_ns", "pid", "ring", "group", "entries", "tail", "buffers", "bytes"]
    )
    (row,) = buffer_group_summary(g, empty_rings, uses_tally(u, empty_rings)).to_dict("records")
    assert (row["how"], row["buffers"], row["bytes"]) == ("provide", 13, 13 * 512)
    assert (row["consumed"], row["available"]) == (2, 12)
