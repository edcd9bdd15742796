"""Provided-buffer groups: the memory io_uring takes read buffers from only when data arrives.

Pure functions over the buffer_groups, buffer_rings and buffer_uses tables. The uses are
an event table, tallied a window at a time (`uses_tally`, `merge_tallies`).
"""

from __future__ import annotations

import pandas as pd

from probes.format.schema import GroupKind

KEYS = ["pid", "ring", "group"]
GROUP_COLUMNS = [*KEYS, "how", "buffers", "bytes", "consumed", "available"]
TALLY_COLUMNS = ["consumed", "ring_consumed"]


def ring_state(rings: pd.DataFrame) -> pd.DataFrame:
    """Per registered ring group, the last state the recorder read: tail, buffers, bytes."""
    return rings.sort_values("ts_ns").groupby(KEYS)[["tail", "buffers", "bytes"]].last()


def uses_tally(uses: pd.DataFrame, rings: pd.DataFrame) -> pd.DataFrame:
    """Per (pid, ring, group): buffers consumed (one per use), and buffers a registered
    ring's uses took (a recv bundle's completion takes as many of the ring's equal buffers
    as its bytes span; where they are not equal, one per use). Sums: the tallies of a
    trace's pieces add up to the whole's (merge_tallies)."""
    taken = uses[uses["bytes"] >= 0]
    if taken.empty:
        return pd.DataFrame(columns=TALLY_COLUMNS, index=pd.MultiIndex.from_tuples([], names=KEYS))
    last = ring_state(rings)
    size = (last["bytes"] // last["buffers"].where(last["buffers"] > 0)).where(
        last["bytes"] % last["buffers"].where(last["buffers"] > 0) == 0
    )
    joined = taken[[*KEYS, "bytes"]].merge(size.rename("size").reset_index(), on=KEYS, how="left")
    per_use = (-(-joined["bytes"] // joined["size"])).clip(lower=1).fillna(1)
    joined["ring_consumed"] = per_use.astype("int64")
    joined["consumed"] = 1
    return joined.groupby(KEYS)[TALLY_COLUMNS].sum()


def merge_tallies(pieces: list[pd.DataFrame]) -> pd.DataFrame:
    full = [p for p in pieces if not p.empty]
    if not full:
        return uses_tally(
            pd.DataFrame(columns=[*KEYS, "bytes"]),
            pd.DataFrame(columns=["ts_ns", *KEYS, "tail", "buffers", "bytes"]),
        )
    return pd.concat(full).groupby(level=KEYS).sum()


def intermediate_tally(uses: pd.DataFrame) -> pd.DataFrame:
    """Per pid, data delivered by multishot completions other than the final one (they
    carry no request pointer and are not in the completions table): reads, bytes."""
    mid = uses[(uses["request"] == 0) & (uses["bytes"] > 0)]
    g = mid.groupby("pid")["bytes"]
    return pd.DataFrame({"reads": g.size(), "bytes": g.sum()}).astype("int64")


def buffer_group_summary(
    groups: pd.DataFrame, rings: pd.DataFrame, tally: pd.DataFrame
) -> pd.DataFrame:
    """Per (pid, ring, group): buffers and bytes provided, buffers consumed and available now.

    A registered ring's buffers are those its memory showed (the recorder reads it); available
    is the ring's tail minus the buffers the kernel took (`tally`: uses_tally()).
    PROVIDE_BUFFERS groups are the sum of what was provided; each use consumes one buffer.
    """
    consumed = tally["consumed"].rename("consumed").reset_index()
    registered = groups[groups["how"] == GroupKind.RING][KEYS].drop_duplicates()
    last = ring_state(rings)
    ring_rows = registered.merge(last.reset_index(), on=KEYS, how="left")
    taken = tally["ring_consumed"].rename("consumed").reset_index()
    ring_rows = ring_rows.merge(taken, on=KEYS, how="left").fillna(0)
    ring_rows["available"] = (ring_rows["tail"] - ring_rows["consumed"]) % 65536
    ring_rows["how"] = "ring"

    # PROVIDE_BUFFERS: a group's buffers are the distinct ids ever provided (a server gives a
    # used buffer back by providing its id again); each provide adds, each use takes one.
    provided = groups[groups["how"] == GroupKind.PROVIDE]
    prov = []
    for key, part in provided.groupby(KEYS):
        sizes: dict[int, int] = {}
        for first, count, size in zip(part["first_id"], part["buffers"], part["entries_or_size"]):
            sizes.update(dict.fromkeys(range(int(first), int(first) + int(count)), int(size)))
        prov.append((*key, len(sizes), sum(sizes.values()), int(part["buffers"].sum())))
    prov_rows = pd.DataFrame(prov, columns=[*KEYS, "buffers", "bytes", "provided"])
    prov_rows = prov_rows.merge(consumed, on=KEYS, how="left").fillna(0)
    prov_rows["available"] = (prov_rows["provided"] - prov_rows["consumed"]).clip(lower=0)
    prov_rows["how"] = "provide"

    out = pd.concat([ring_rows, prov_rows], ignore_index=True)
    if out.empty:
        return pd.DataFrame(columns=GROUP_COLUMNS)
    for c in ("buffers", "bytes", "consumed", "available"):
        out[c] = out[c].astype("int64")
    return out[GROUP_COLUMNS]
