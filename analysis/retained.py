"""Buffers a program keeps after reading into them: each connection's last read that received
data, kept as the windows pass (LastData), and those still held by idle connections at the
end (retained_buffers).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.groups import dense_codes
from analysis.idle import connection_keys
from analysis.memory import CONNECTION_KEYS, buffer_attribution, generations_of
from analysis.reads import columns_of


def retained_buffers(
    intervals: pd.DataFrame, allocations: pd.DataFrame, at_ns: int, idle_threshold_ns: int
) -> pd.DataFrame:
    """Buffers a program keeps after reading into them, while their connection is idle.

    Per connection, the buffer of the last read that received data, when the connection has
    no read posted (or parked) now, has been idle for `idle_threshold_ns`, and the buffer is
    still inside a live allocation and was not read into for another connection since (a
    pool's buffer moves on; a pool buffer whose last use was this connection still counts,
    so a pool can add at most its own size here). The readiness model's way to waste memory.
    """
    last = LastData()
    last.add(intervals)
    posted = intervals[intervals["end_ns"].isna()]
    return last.buffers(posted, allocations, at_ns, idle_threshold_ns)


LAST_COLUMNS = ["pid", "fd", "gen", "addr", "len", "post_ns", "end_ns", "ret"]


class LastData:
    """What retained_buffers needs of a trace's reads, kept as they pass: each connection's
    last read that received data (the latest end; at one end, the latest post), and whether
    another read has received data into its buffer since - posted after that end, so in its
    window or a later one: a pool's buffer that moved on to another connection."""

    def __init__(self) -> None:
        self.last = pd.DataFrame()

    def add(self, reads: pd.DataFrame, where: np.ndarray | None = None) -> None:
        """The reads (the rows `where` says) of one window, or those that came late."""
        ret = reads["ret"].to_numpy(np.float64)
        end = reads["end_ns"].to_numpy(np.float64)
        received = (ret > 0) & ~np.isnan(end)
        if where is not None:
            received &= where
        if not received.any():
            return
        # the connections' last data read found over every row (the others' ends -inf), the
        # frame built of those rows alone
        keys = {c: reads[c].to_numpy() for c in ("pid", "fd", "post_ns")}
        keys["gen"] = generations_of(reads)
        keys["end_ns"] = np.where(received, end, -np.inf)
        kept = _last_rows(keys, received)
        column = columns_of(reads, kept)
        gen = keys["gen"][kept]
        latest = pd.DataFrame(
            {c: gen if c == "gen" else column(c, reads[c].dtype) for c in LAST_COLUMNS}
        ).assign(moved=False)
        if not self.last.empty:
            both = pd.concat([self.last, latest], ignore_index=True)
            kept = _last_rows({c: both[c].to_numpy() for c in _LAST_KEYS}, None)
            latest = both.iloc[kept].reset_index(drop=True)
        # reads of this window into a buffer after a connection's last data went into it
        addr = reads["addr"].to_numpy()
        mine, theirs = _buffer_keys(
            latest["pid"].to_numpy(), latest["addr"].to_numpy(), keys["pid"], addr
        )
        buffers, which = np.unique(mine, return_inverse=True)
        at = pd.Index(buffers).get_indexer(theirs)  # a hash of the few buffers: fast
        hit = (at >= 0) & received
        since = np.full(len(buffers), -np.inf)
        np.maximum.at(since, at[hit], keys["post_ns"][hit].astype(np.float64))
        moved = since[which] > latest["end_ns"].to_numpy(np.float64)
        latest["moved"] = latest["moved"].to_numpy() | moved
        self.last = latest

    def buffers(
        self, posted: pd.DataFrame, live: pd.DataFrame, at_ns: int, idle_threshold_ns: int
    ) -> pd.DataFrame:
        """retained_buffers(reads, live, at_ns, idle_threshold_ns) of the reads seen, with
        `posted` the reads posted at the end."""
        if self.last.empty:
            columns = [*LAST_COLUMNS, "alloc_addr", "alloc_size", "attributed_bytes"]
            return pd.DataFrame(columns=columns)
        now = posted.assign(gen=generations_of(posted))[CONNECTION_KEYS].drop_duplicates()
        last = self.last.merge(now, on=CONNECTION_KEYS, how="left", indicator=True)
        last = last[(last["_merge"] == "left_only") & (at_ns - last["end_ns"] >= idle_threshold_ns)]
        last = last[~last["moved"].to_numpy(bool)].drop(columns=["_merge", "moved"])
        held = buffer_attribution(last, live)
        return held[held["attributed_bytes"] > 0].reset_index(drop=True)


def _buffer_keys(
    pid: np.ndarray, addr: np.ndarray, their_pid: np.ndarray, their_addr: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One key per buffer (pid, address) for the connections' last data reads (`pid`,
    `addr`) and for other reads (-1: none of the first's): the address where one process
    read."""
    pids = np.concatenate([pid, their_pid])
    if pids.min() == pids.max():
        return addr.astype(np.uint64), their_addr.astype(np.uint64)
    index = pd.MultiIndex.from_arrays([pid, addr]).unique()
    theirs = index.get_indexer(pd.MultiIndex.from_arrays([their_pid, their_addr]))
    mine = index.get_indexer(pd.MultiIndex.from_arrays([pid, addr]))
    return mine.astype(np.int64), np.where(theirs < 0, -1, theirs).astype(np.int64)


_LAST_KEYS = ("pid", "fd", "gen", "end_ns", "post_ns")


def _last_rows(data: dict[str, np.ndarray], where: np.ndarray | None) -> np.ndarray:
    """Per connection (pid, fd, gen) with a row `where` says (all without it), the row with
    the latest end_ns; at one end, the latest post_ns; then the last row (what a stable sort
    by end_ns of reads in post order leaves last): their positions, in order."""
    pid = data["pid"].astype(np.int64, copy=False)
    fd = data["fd"].astype(np.int64, copy=False)
    gen = data["gen"].astype(np.int64, copy=False)
    if pid.min() == pid.max() and not gen.any() and fd.max() - fd.min() < 2**22:
        codes, n = fd - fd.min(), int(fd.max() - fd.min()) + 1
    else:
        codes, uniques = dense_codes(connection_keys(pid, fd, gen))
        n = len(uniques)
    end = data["end_ns"].astype(np.float64, copy=False)
    best = np.full(n, -np.inf)
    np.maximum.at(best, codes, end)
    top = end == best[codes]
    rows = np.flatnonzero(top if where is None else top & where)
    post = data["post_ns"].astype(np.int64, copy=False)[rows]
    latest_post = np.full(n, np.iinfo(np.int64).min)
    np.maximum.at(latest_post, codes[rows], post)
    rows = rows[post == latest_post[codes[rows]]]
    last_row = np.full(n, -1)
    np.maximum.at(last_row, codes[rows], rows)
    return np.sort(last_row[last_row >= 0])
