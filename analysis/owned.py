"""The state each idle connection keeps alive, as the recorder walked it (probes.attach.owned,
the `owned` table): the owned part of the whole cost, known without waiting for connections
to come and go.

A connection's row says what its roots alone reach (its waiter's stack, its epoll data),
less its buffers' allocations (the buffer part); a process's row (fd -1) says its allocator
and, when the walk could not be made, why. The walk at the end stands for the process where
there is one, else the one at attach. An idle connection with no row of its own has no
roots the walk could follow (an event loop that registers only the fd): unknown, with why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from analysis.results import Unknown


@dataclass
class Owning:
    """What the walk found for one process's idle connections."""

    allocator: str | None = None  # "glibc", "go", or the library not walked (None: no row)
    covered: int = 0  # idle connections with a known figure
    owned_bytes: int = 0  # theirs, summed
    median_bytes: float = 0.0  # one connection's: the median, and the most
    max_bytes: int = 0
    allocations: int = 0
    shared_bytes: int = 0  # what connections reach first together (the process's)
    raced: int = 0  # reads of the walk that raced with the process
    provenance: str = "at_end"
    unknown: list[Unknown] = field(default_factory=list)  # idle connections not covered


def latest_walks(rows: pd.DataFrame) -> pd.DataFrame:
    """Each process's latest walk: the one at the end where there is one, else the latest
    at attach (a walk's rows share their time)."""
    if rows.empty:
        return rows
    ended = rows["what"] == "end"
    pids_ended = set(rows.loc[ended, "pid"].tolist())
    rows = rows[ended | ~rows["pid"].isin(pids_ended)]
    latest = rows.groupby("pid")["ts_ns"].transform("max")
    return rows[rows["ts_ns"] == latest]


def owning_of(rows: pd.DataFrame, idle: pd.DataFrame) -> dict[int, Owning]:
    """Per pid, what latest_walks() `rows` say of its idle connections (`idle`: their pid
    and fd)."""
    out: dict[int, Owning] = {}
    if rows.empty:
        return out
    for pid in sorted(set(rows["pid"].tolist())):
        mine = rows[rows["pid"] == pid]
        process = mine[mine["fd"] < 0]
        fds = set(idle.loc[idle["pid"] == pid, "fd"].astype(int).tolist())
        conns = mine[(mine["fd"] >= 0) & mine["fd"].isin(fds)]
        known = conns[conns["why"] == ""]
        process_why = str(process["why"].iloc[0]) if not process.empty else ""
        owning = Owning(
            allocator=str(process["allocator"].iloc[0]) if not process.empty else None,
            covered=len(known),
            owned_bytes=int(known["owned_bytes"].sum()),
            median_bytes=float(known["owned_bytes"].median()) if len(known) else 0.0,
            max_bytes=int(known["owned_bytes"].max()) if len(known) else 0,
            allocations=int(known["allocations"].sum()),
            shared_bytes=int(process["shared_bytes"].sum()),
            raced=int(process["raced"].sum()),
            provenance="at_end" if (mine["what"] == "end").all() else "at_attach",
        )
        for why, group in conns[conns["why"] != ""].groupby("why"):
            owning.unknown.append(Unknown(len(group), f"owned state: {why}"))
        rootless = len(fds - set(conns["fd"].astype(int).tolist()))
        if rootless:
            why = process_why or (
                "no roots of its own the walk could follow (no waiter thread, and its "
                "epoll data or io_uring user_data, if any, is not a pointer): its wait is "
                "the process's"
            )
            owning.unknown.append(Unknown(rootless, f"owned state: {why}"))
        out[int(pid)] = owning
    return out


def owned_columns(connections: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """The per-connection table (analysis.memory.connection_table() rows) with each open
    connection's owned state as latest_walks() `rows` have it: `owned_bytes`,
    `owned_allocations`, `owned_how` ("reachable"), `owned_why` (null where not walked)."""
    table = connections.copy()
    names = ["owned_bytes", "owned_allocations", "owned_how", "owned_why"]
    conns = rows[rows["fd"] >= 0] if not rows.empty else rows
    if conns.empty or table.empty:
        for name in names:
            table[name] = None
        return table
    walked = conns[["pid", "fd", "owned_bytes", "allocations", "how", "why"]].rename(
        columns={"allocations": "owned_allocations", "how": "owned_how", "why": "owned_why"}
    )
    walked = walked.astype({"pid": "float64", "fd": "float64"}).drop_duplicates(["pid", "fd"])
    keys = table[["pid", "fd"]].astype("float64")
    merged = keys.merge(walked, on=["pid", "fd"], how="left")
    open_now = table["closed_ns"].isna().to_numpy()
    for name in names:
        column = merged[name].where(open_now)
        if name in ("owned_bytes", "owned_allocations"):
            table[name] = column.astype("Int64").to_numpy()
        else:
            table[name] = column.astype(object).where(column.notna(), None).to_numpy()
    return table
