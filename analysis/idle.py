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


def connection_keys(pid: np.ndarray, fd: np.ndarray) -> np.ndarray:
    """One int64 per connection (pid, fd)."""
    return (pid.astype(np.int64) << 32) | (fd.astype(np.int64) & 0xFFFFFFFF)


def _pids(keys: np.ndarray) -> np.ndarray:
    return keys >> 32


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
        self.spans = socket_spans(sockets) if series.wanted else socket_spans(sockets.iloc[0:0])
        self.ref = pd.Series(dtype=np.float64)  # key -> first seen, or the last arrival

    def window(
        self,
        pid: np.ndarray,
        fd: np.ndarray,
        post_ns: np.ndarray,
        arrived: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> None:
        """One window: the network reads posted in it (pid, fd, post_ns) and the data that
        arrived in it (pid, fd, end_ns of the reads that received bytes)."""
        if not self.series.wanted:
            return
        if len(pid):
            keys = connection_keys(pid, fd)
            first = pd.Series(post_ns.astype(np.float64)).groupby(keys).min()
            fresh = first[~first.index.isin(self.ref.index)]
            if len(fresh):
                opened = self.spans["opened"].reindex(fresh.index).to_numpy()
                fresh = pd.Series(np.fmin(fresh.to_numpy(), opened), index=fresh.index)
                self.ref = fresh if self.ref.empty else pd.concat([self.ref, fresh])
        a_pid, a_fd, a_ts = arrived
        if not len(a_pid):
            return
        keys = connection_keys(a_pid, a_fd)
        ts = a_ts.astype(np.float64)
        order = np.lexsort((ts, keys))
        keys, ts = keys[order], ts[order]
        first_of_key = np.r_[True, keys[1:] != keys[:-1]]
        prev = np.empty_like(ts)
        prev[1:] = ts[:-1]
        prev[first_of_key] = self.ref.reindex(keys[first_of_key]).to_numpy()
        self._idle(keys, prev, ts)
        last_of_key = np.r_[keys[1:] != keys[:-1], True]
        self.ref.loc[keys[last_of_key]] = ts[last_of_key]

    def finish(self) -> None:
        """Each connection after its last arrival (or since it was first seen), and those
        only the socket samples showed."""
        if not self.series.wanted:
            return
        only_sampled = self.spans.index[~self.spans.index.isin(self.ref.index)]
        keys = np.concatenate([self.ref.index.to_numpy(np.int64), only_sampled.to_numpy()])
        since = np.concatenate(
            [self.ref.to_numpy(np.float64), self.spans.loc[only_sampled, "opened"].to_numpy()]
        )
        self._idle(keys, since, np.full(len(keys), np.inf))

    def _idle(self, keys: np.ndarray, since: np.ndarray, until: np.ndarray) -> None:
        """Idle from `since` + the threshold to `until` (an arrival), within the time each
        connection was open."""
        closed = self.spans["closed"].reindex(keys).fillna(np.inf).to_numpy()
        end = np.fmin(until, closed + 1)  # open at an edge up to its last sample
        self.series.spans(FIGURE, _pids(keys), since + self.threshold, end)
