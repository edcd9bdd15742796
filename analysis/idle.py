"""Connections over time, a window at a time: open, and idle.

A connection is an fd's stream: (pid, fd) and its generation (analysis.reading.Generations:
a read that returns 0 ends the stream, and the fd's next reads are the next connection's).
It is open from when it was first seen (reading, or in a socket sample) until the end of
its stream, or the last sample that showed it; it is idle at an instant when it is open
then and no data arrived on it for the idle threshold. So each connection is idle over
the intervals [ref + threshold, next arrival), where ref is when it was first seen or when
data last arrived, and after its last arrival until it closed. Those intervals are known as
the arrivals pass, window by window, and each is added to the edges it covers
(analysis.series.EdgeSeries): no connection x edge matrix is ever held.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.groups import KeyIndex
from analysis.reads import columns_of
from analysis.series import EdgeSeries

FIGURE = "idle_connections"
OPEN = "connections_open"  # open then: seen by then (reading or sampled), not closed
FD_BITS, GEN_BITS = 20, 22  # an fd is below 2^20 (nr_open), a pid below 2^22 (pid_max)


def connection_keys(pid: np.ndarray, fd: np.ndarray, gen: np.ndarray) -> np.ndarray:
    """One int64 per connection (pid, fd, generation)."""
    key = np.asarray(pid).astype(np.int64) << (FD_BITS + GEN_BITS)
    key |= np.asarray(gen).astype(np.int64) << FD_BITS
    key |= np.asarray(fd).astype(np.int64) & ((1 << FD_BITS) - 1)
    return key


def pids_of(keys: np.ndarray) -> np.ndarray:
    return np.asarray(keys, dtype=np.int64) >> (FD_BITS + GEN_BITS)


def first_generation(keys: np.ndarray) -> np.ndarray:
    """The keys of the same fds' first connections (generation 0)."""
    mask = ~(((1 << GEN_BITS) - 1) << FD_BITS)
    return np.asarray(keys, dtype=np.int64) & mask


def socket_spans(sockets: pd.DataFrame, gens: np.ndarray | None = None) -> pd.DataFrame:
    """Per connection key: the first and last sample that showed it (`closed` inf when it
    was in the last sample of all: a listener still open shows one in which every
    connection had closed). `gens`: each sample's generation (0 for all without)."""
    conn = ((sockets["family"] != "unix") & (sockets["state"] != "LISTEN")).to_numpy()
    if not conn.any():
        return pd.DataFrame({"opened": [], "closed": []}, index=pd.Index([], dtype=np.int64))
    gen = np.zeros(len(sockets), np.int64) if gens is None else gens
    keys = connection_keys(
        sockets["pid"].to_numpy()[conn], sockets["fd"].to_numpy()[conn], gen[conn]
    )
    ts = sockets["ts_ns"].to_numpy(np.float64)[conn]
    g = pd.Series(ts).groupby(keys)
    span = pd.DataFrame({"opened": g.min(), "closed": g.max()})
    span.loc[span["closed"] == float(sockets["ts_ns"].max()), "closed"] = np.inf
    return span


class Generations:
    """Which connection on its fd each read belongs to: a read that returns 0 ends its
    connection's stream (the peer closed), so the fd's next reads are another connection's
    (the fd reused by the next accept). A read's generation is the number of ends of stream
    on its fd (pid, fd) before its post; set once, when it is first seen."""

    def __init__(self) -> None:
        self.counts = pd.Series(dtype=np.int64)  # connection key (gen 0) -> ends so far
        self.seen: list[pd.DataFrame] = []

    def window(self, iv: pd.DataFrame, is_open: np.ndarray, network: np.ndarray) -> None:
        gen = iv["gen"].to_numpy(np.float64).copy()
        todo = np.isnan(gen)
        column = columns_of(iv, None)
        eof = ~is_open & network & (column("ret", np.float64) == 0)
        if self.counts.empty and not eof.any():  # no stream has ended yet: all first ones
            gen[todo] = 0
            iv["gen"] = gen.astype(np.int64)  # known for every read from now on
            return
        pid, fd = column("pid", np.int64), column("fd", np.int64)
        key = connection_keys(pid, fd, np.zeros(len(pid), np.int64))
        if todo.any():
            before = self.counts.reindex(key[todo]).fillna(0).to_numpy(np.int64)
            if eof.any():  # ends of stream in this window, before each new post
                ends = pd.DataFrame(
                    {"key": key[eof], "t": column("end_ns", np.float64)[eof]}
                ).sort_values("t", kind="stable")
                ends["n"] = ends.groupby("key").cumcount() + 1
                posts = pd.DataFrame({"key": key[todo], "t": column("post_ns", np.float64)[todo]})
                order = np.argsort(posts["t"].to_numpy(), kind="stable")
                found = pd.merge_asof(
                    posts.iloc[order], ends, on="t", by="key", direction="backward"
                )["n"].to_numpy()
                within = np.empty(len(order))
                within[order] = found
                before = before + np.nan_to_num(within).astype(np.int64)
            gen[todo] = before
        iv["gen"] = gen.astype(np.int64)
        if eof.any():
            counts = pd.Series(1, index=key[eof]).groupby(level=0).sum()
            self.counts = counts if self.counts.empty else self.counts.add(counts, fill_value=0)
            self.seen.append(
                pd.DataFrame(
                    {"pid": pid[eof], "fd": fd[eof], "end_ns": column("end_ns", np.float64)[eof]}
                )
            )

    def ends(self) -> pd.DataFrame:
        if not self.seen:
            return pd.DataFrame({"pid": [], "fd": [], "end_ns": []})
        return pd.concat(self.seen, ignore_index=True)


def socket_generations(sockets: pd.DataFrame, ends: pd.DataFrame) -> np.ndarray:
    """Each socket sample's generation on its fd: the ends of stream read on the fd at or
    before it (Generations)."""
    if ends.empty or sockets.empty:
        return np.zeros(len(sockets), np.int64)
    zero = np.zeros(len(sockets), np.int64)
    samples = pd.DataFrame(
        {
            "key": connection_keys(sockets["pid"].to_numpy(), sockets["fd"].to_numpy(), zero),
            "t": sockets["ts_ns"].to_numpy(np.float64),
            "row": np.arange(len(sockets)),
        }
    ).sort_values("t", kind="stable")
    e_zero = np.zeros(len(ends), np.int64)
    marks = pd.DataFrame(
        {
            "key": connection_keys(ends["pid"].to_numpy(), ends["fd"].to_numpy(), e_zero),
            "t": ends["end_ns"].to_numpy(np.float64),
        }
    ).sort_values("t", kind="stable")
    marks["n"] = marks.groupby("key").cumcount() + 1
    found = pd.merge_asof(samples, marks, on="t", by="key", direction="backward")
    out = np.zeros(len(sockets), np.int64)
    out[found["row"].to_numpy()] = found["n"].fillna(0).to_numpy(np.int64)
    return out


class IdleSeries:
    """Connections open and idle, per pid, at each edge of `series`."""

    def __init__(self, series: EdgeSeries, sockets: pd.DataFrame, threshold_ns: int) -> None:
        self.series = series
        self.sockets = sockets
        self.threshold = float(threshold_ns)
        # what the samples show of each fd, before the ends of stream are known
        self.spans = socket_spans(sockets if series.wanted else sockets.iloc[0:0])
        # per connection seen reading: its key, when it was first seen, when it was first
        # seen or data last arrived (`ref`), its close (inf while open), whether its
        # stream ended
        self.keys = KeyIndex()
        self.opened = np.zeros(0)
        self.ref = np.zeros(0)
        self.closed = np.zeros(0)
        self.ended = np.zeros(0, dtype=bool)

    def window(
        self,
        keys: np.ndarray,
        post_ns: np.ndarray,
        arrived: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> None:
        """One window: the connections (connection_keys) of the network reads posted in
        it and their posts (in time order), and the reads that received data or the end
        of their stream in it: (keys, end_ns, ended the stream)."""
        if not self.series.wanted:
            return
        if len(keys):
            self._seen(keys, post_ns.astype(np.float64))
        a_keys, a_ts, eof = arrived
        if not len(a_keys):
            return
        at = self.keys.positions(a_keys)
        ts = a_ts.astype(np.float64)
        known = at >= 0  # posted in this window or before: always
        at, ts, eof = at[known], ts[known], eof[known]
        if len(ts) > 1 and (ts[1:] >= ts[:-1]).all():  # ends mostly come in time order
            small = at.astype(np.uint16) if len(self.keys) < 2**16 else at
            order = np.argsort(small, kind="stable")  # by radix, for 16 bits
        else:
            order = np.lexsort((ts, at))
        at, ts, eof = at[order], ts[order], eof[order]
        first_of_key = np.r_[True, at[1:] != at[:-1]]
        prev = np.empty_like(ts)
        prev[1:] = ts[:-1]
        prev[first_of_key] = self.ref[at[first_of_key]]
        self._idle(at, prev, ts)
        last_of_key = np.r_[at[1:] != at[:-1], True]
        self.ref[at[last_of_key]] = ts[last_of_key]
        if eof.any():  # the end of a stream closes its connection
            done = at[eof]
            self.closed[done] = np.fmin(self.closed[done], ts[eof])
            self.ref[done] = self.closed[done]
            self._open(done)
            self.ended[done] = True

    def _seen(self, keys: np.ndarray, post_ns: np.ndarray) -> None:
        """Connections first seen reading in this window: idle from when they were first
        seen (reading, or in an earlier socket sample of a first connection on its fd)."""
        fresh = self.keys.positions(keys) < 0
        if not fresh.any():
            return
        codes, uniques = pd.factorize(keys[fresh])
        # codes come in order of first appearance, and the posts in time order: a code's
        # first row is its connection's earliest post
        firsts = np.flatnonzero(np.r_[True, codes[1:] > np.maximum.accumulate(codes)[:-1]])
        new_keys = np.asarray(uniques, dtype=np.int64)
        sampled = self.spans.reindex(first_generation(new_keys))
        opened = sampled["opened"].to_numpy(np.float64).copy()
        opened[first_generation(new_keys) != new_keys] = np.nan  # earlier samples: not its
        first = np.fmin(post_ns[fresh][firsts], opened)
        self.keys.add(new_keys)
        self.opened = np.concatenate([self.opened, first])
        self.ref = np.concatenate([self.ref, first])
        self.closed = np.concatenate([self.closed, sampled["closed"].fillna(np.inf).to_numpy()])
        self.ended = np.concatenate([self.ended, np.zeros(len(new_keys), dtype=bool)])

    def finish(self, ends: pd.DataFrame) -> None:
        """Each connection after its last arrival (or since it was first seen), and those
        only the socket samples showed (`ends`: the ends of stream, which tell a sample's
        connection on its fd)."""
        if not self.series.wanted:
            return
        going = np.flatnonzero(~self.ended)
        self._idle(going, self.ref[going], np.full(len(going), np.inf))
        self._open(going)
        spans = socket_spans(self.sockets, socket_generations(self.sockets, ends))
        only = spans[~spans.index.isin(self.keys.keys)]
        if len(only):
            ends_at = only["closed"].to_numpy() + 1
            opened = only["opened"].to_numpy()
            pids = pids_of(only.index.to_numpy(np.int64))
            self.series.spans(FIGURE, pids, opened + self.threshold, ends_at)
            self.series.spans(OPEN, pids, opened, ends_at)

    def _open(self, at: np.ndarray) -> None:
        """Connections `at` (positions in self.keys), closed: open from when first seen."""
        keys = self.keys.keys[at]
        self.series.spans(OPEN, pids_of(keys), self.opened[at], self.closed[at] + 1)

    def _idle(self, at: np.ndarray, since: np.ndarray, until: np.ndarray) -> None:
        """Connections `at` (positions in self.keys) idle from `since` + the threshold to
        `until` (an arrival), within the time each was open."""
        start = since + self.threshold
        end = np.fmin(until, self.closed[at] + 1)  # open at an edge up to its last sample
        some = start < end  # most arrivals come sooner than the threshold: nothing idle
        if some.any():
            keys = self.keys.keys[at[some]]
            self.series.spans(FIGURE, pids_of(keys), start[some], end[some])
