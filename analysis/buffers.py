"""Provided-buffer groups: the memory io_uring takes read buffers from only when data arrives.

Pure functions over the buffer_groups, buffer_rings and buffer_uses tables.
"""

from __future__ import annotations

import pandas as pd

from probes.format.schema import GroupKind

KEYS = ["pid", "ring", "group"]
GROUP_COLUMNS = [*KEYS, "how", "buffers", "bytes", "consumed", "available"]


def buffer_group_summary(
    groups: pd.DataFrame, rings: pd.DataFrame, uses: pd.DataFrame
) -> pd.DataFrame:
    """Per (pid, ring, group): buffers and bytes provided, buffers consumed and available now.

    A registered ring's buffers are those its memory showed (the recorder reads it); available
    is the ring's tail minus the buffers the kernel took (a recv bundle's completion takes as
    many of the ring's equal buffers as its bytes span). PROVIDE_BUFFERS groups are the sum of
    what was provided; each use consumes one buffer.
    """
    taken = uses[uses["bytes"] >= 0]
    consumed = taken.groupby(KEYS).size().rename("consumed").reset_index()

    registered = groups[groups["how"] == GroupKind.RING][KEYS].drop_duplicates()
    last = rings.sort_values("ts_ns").groupby(KEYS)[["tail", "buffers", "bytes"]].last()
    ring_rows = registered.merge(last.reset_index(), on=KEYS, how="left")
    ring_rows = ring_rows.merge(_ring_buffers_taken(taken, last), on=KEYS, how="left").fillna(0)
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


def _ring_buffers_taken(taken: pd.DataFrame, last: pd.DataFrame) -> pd.DataFrame:
    """Per ring group: buffers the kernel took. A completion fills one buffer, or with a recv
    bundle the consecutive ring entries its bytes span (the ring's buffers are of one size,
    the ring's bytes over its buffers; where they are not, each completion counts one)."""
    size = (last["bytes"] // last["buffers"].where(last["buffers"] > 0)).where(
        last["bytes"] % last["buffers"].where(last["buffers"] > 0) == 0
    )
    joined = taken[KEYS + ["bytes"]].merge(size.rename("size").reset_index(), on=KEYS, how="left")
    per_use = (-(-joined["bytes"] // joined["size"])).clip(lower=1).fillna(1)
    joined["consumed"] = per_use.astype("int64")
    return joined.groupby(KEYS)["consumed"].sum().reset_index()
