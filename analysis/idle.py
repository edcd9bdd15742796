"""Idle connections over time, a window at a time.

A connection (pid, fd) is idle at an instant when it is open then (seen reading, or in a
socket sample, at or before it; not closed: the last sample that showed it is not before
it) and no data arrived on it for the idle threshold. So each connection is idle over the
intervals [ref + threshold, next arrival), where ref is when it was first seen or when
data last arrived, and after its last arrival until it closed. Those intervals are known as
the arrivals pass, window by window, and each is added to the edges it covers
(analysis.series.EdgeSeries): no connection x edge matrix is ever held.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.series import EdgeSeries

FIGURE = "idle_connections"
OPEN = "connections_open"  # open then: seen by then (reading or sampled), not closed


def connection_keys(pid: np.ndarray, fd: np.ndarray) -> np.ndarray:
    """One int64 per connection (pid, fd)."""
    return (pid.astype(np.int64) << 32) | (fd.astype(np.int64) & 0xFFFFFFFF)


def socket_spans(sockets: pd.DataFrame) -> pd.DataFrame:
    """Per connection key: the first and last sample that showed it (`closed` inf when it
    was in the last sample of all: a listener still open shows one in which every
    connection had closed)."""
    conns = sockets[(sockets["family"] != "unix") & (sockets["state"] != "LISTEN")]
    if conns.empty:
        return pd.DataFrame({"opened": [], "closed": []}, index=pd.Index([], dtype=np.int64))
    keys = connection_keys(conns["pid"].to_numpy(), conns["fd"].to_numpy())
    ts = conns["ts_ns"].to_numpy(np.float64)
    g = pd.Series(ts).groupby(keys)
    span = pd.DataFrame({"opened": g.min(), "closed": g.max()})
    span.loc[span["closed"] == float(sockets["ts_ns"].max()), "closed"] = np.inf
    return span


class IdleSeries:
    """Idle connections per pid at each edge of `series`."""

    def __init__(self, series: EdgeSeries, sockets: pd.DataFrame, threshold_ns: int) -> None:
        self.series = series
        self.threshold = float(threshold_ns)
        self.spans = socket_spans(sockets if series.wanted else sockets.iloc[0:0])
        # per connection seen reading: its key, when it was first seen or data last
        # arrived (`ref`), and its last socket sample (`closed`: inf while open)
        self.keys = pd.Index(np.zeros(0, np.int64))
        self.ref = np.zeros(0)
        self.closed = np.zeros(0)

    def window(
        self,
        pid: np.ndarray,
        fd: np.ndarray,
        post_ns: np.ndarray,
        arrived: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> None:
        """One window: the network reads posted in it (pid, fd, post_ns: in time order)
        and the data that arrived in it (pid, fd, end_ns of the reads that received
        bytes)."""
        if not self.series.wanted:
            return
        if len(pid):
            self._seen(connection_keys(pid, fd), post_ns.astype(np.float64))
        a_pid, a_fd, a_ts = arrived
        if not len(a_pid):
            return
        at = self.keys.get_indexer(pd.Index(connection_keys(a_pid, a_fd)))
        ts = a_ts.astype(np.float64)
        known = at >= 0  # posted in this window or before: always
        at, ts = at[known], ts[known]
        if len(ts) > 1 and (ts[1:] >= ts[:-1]).all():  # ends mostly come in time order
            small = at.astype(np.uint16) if len(self.keys) < 2**16 else at
            order = np.argsort(small, kind="stable")  # by radix, for 16 bits
        else:
            order = np.lexsort((ts, at))
        at, ts = at[order], ts[order]
        first_of_key = np.r_[True, at[1:] != at[:-1]]
        prev = np.empty_like(ts)
        prev[1:] = ts[:-1]
        prev[first_of_key] = self.ref[at[first_of_key]]
        self._idle(at, prev, ts)
        last_of_key = np.r_[at[1:] != at[:-1], True]
        self.ref[at[last_of_key]] = ts[last_of_key]

    def _seen(self, keys: np.ndarray, post_ns: np.ndarray) -> None:
        """Connections first seen reading in this window: idle from when they were first
        seen (reading, or in an earlier socket sample)."""
        fresh = self.keys.get_indexer(pd.Index(keys)) < 0
        if not fresh.any():
            return
        codes, uniques = pd.factorize(keys[fresh])
        # codes come in order of first appearance, and the posts in time order: a code's
        # first row is its connection's earliest post
        firsts = np.flatnonzero(np.r_[True, codes[1:] > np.maximum.accumulate(codes)[:-1]])
        new_keys = np.asarray(uniques)
        sampled = self.spans.reindex(new_keys)
        first = np.fmin(post_ns[fresh][firsts], sampled["opened"].to_numpy())
        closed = sampled["closed"].fillna(np.inf).to_numpy()
        self.keys = self.keys.append(pd.Index(new_keys))
        self.ref = np.concatenate([self.ref, first])
        self.closed = np.concatenate([self.closed, closed])
        self.series.spans(OPEN, new_keys >> 32, first, closed + 1)

    def finish(self) -> None:
        """Each connection after its last arrival (or since it was first seen), and those
        only the socket samples showed."""
        if not self.series.wanted:
            return
        self._idle(np.arange(len(self.keys)), self.ref, np.full(len(self.keys), np.inf))
        only = self.spans[~self.spans.index.isin(self.keys)]
        if len(only):
            ends = only["closed"].to_numpy() + 1
            opened = only["opened"].to_numpy()
            pids = only.index.to_numpy(np.int64) >> 32
            self.series.spans(FIGURE, pids, opened + self.threshold, ends)
            self.series.spans(OPEN, pids, opened, ends)

    def _idle(self, at: np.ndarray, since: np.ndarray, until: np.ndarray) -> None:
        """Connections `at` (positions in self.keys) idle from `since` + the threshold to
        `until` (an arrival), within the time each was open."""
        start = since + self.threshold
        end = np.fmin(until, self.closed[at] + 1)  # open at an edge up to its last sample
        some = start < end  # most arrivals come sooner than the threshold: nothing idle
        if some.any():
            keys = self.keys.to_numpy(np.int64)[at[some]]
            self.series.spans(FIGURE, keys >> 32, start[some], end[some])
