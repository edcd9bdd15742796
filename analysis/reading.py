"""Posted reads across windows: their lifetimes, what finished ones leave, and what is still
posted at the end.

A window's posts and completions are paired by `read_intervals`, with the reads still open
(carried from the windows before) put in front of its posts: a carried post is older than
any event of the window, so the pairing is the one over the whole trace. What a finished
read leaves is additive or extreme, per process and per connection (`read_summary`,
`read_activity`), plus each connection's last data buffer (`LastData`: the retained
buffers), its +1 / -1 steps of the posted count (the peaks) and its span on the time
series' edges. Reads parked after EAGAIN and reads found parked at attach end only windows
later (analysis.parking); they are "late": counted, stepped and spanned when decided.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.idle import Generations, IdleSeries, connection_keys
from analysis.memory import merge_activity, read_activity
from analysis.parking import Attribute, NextPost, Parking
from analysis.reads import (
    EAGAIN,
    KindCounts,
    columns_of,
    is_network,
    is_poll,
    kind_counts,
    network_reads,
    read_intervals,
)
from analysis.reads import read_summary as count_reads
from analysis.retained import LastData
from analysis.series import Chunk, EdgeSeries, Peaks, steps_of
from analysis.windows import EVENT_COLUMNS, empty
from probes.format.schema import Source

CARRIED = [*EVENT_COLUMNS["posts"], "seq", "attr", "gen"]
WIDE = ("pid", "fd", "source", "op", "flags", "len")


def _stacked(*frames: pd.DataFrame) -> pd.DataFrame:
    full = [f for f in frames if not f.empty]
    if not full:
        return frames[0]
    return full[0] if len(full) == 1 else pd.concat(full, ignore_index=True)


def no_reads() -> pd.DataFrame:
    """read_intervals() of nothing, with its columns."""
    return read_intervals(empty("posts").assign(seq=0, attr=0.0, gen=0.0), empty("completions"))


def merge_counts(pieces: list[pd.DataFrame]) -> pd.DataFrame:
    """read_summary() of several pieces of a trace's reads, as of all of them."""
    full = [p for p in pieces if not p.empty]
    if len(full) <= 1:
        return full[0] if full else pieces[0]
    out = pd.concat(full).groupby(["pid", "source", "label"], sort=True).sum().reset_index()
    return out.astype({c: "int64" for c in out.columns if c not in ("source", "label")})


@dataclass
class ReadsAtEnd:
    """What the reads of a whole trace come to."""

    counts: pd.DataFrame  # read_summary() of every read
    activity: pd.DataFrame  # read_activity() of the network reads, per (pid, fd)
    posted: pd.DataFrame  # the network reads posted (or parked) at the end
    peaks: dict[int, tuple[int, int]]  # pid -> highest (posted reads, pinned bytes)
    data: LastData  # each connection's last data buffer
    waits_begun: pd.Series  # readiness waits per pid
    waits_ended: pd.Series
    ends_of_stream: pd.DataFrame  # pid, fd, end_ns of each read that returned 0
    polls: pd.DataFrame  # io_uring POLL_ADDs armed at the end (each connection's waiter)


class ReadPass:
    """The reads of a trace, a window at a time (see the module's docstring)."""

    def __init__(self, series: EdgeSeries, idle: IdleSeries, memory: bool) -> None:
        self.series = series
        self.idle = idle
        self.memory = memory  # attribute buffers to allocations on the time series
        self.carry = empty("posts").assign(seq=0, attr=0.0, gen=0.0).iloc[0:0]
        self.carry = self.carry.astype({c: np.int64 for c in WIDE})[CARRIED]
        self.parking = Parking()
        self.retry = NextPost()  # for the reads parked at attach
        self.held: list[pd.DataFrame] = []  # reads parked at attach, waiting for the next read
        self.seq = 0
        self.digests = _Digests(Peaks())
        self.waits_begun: list[pd.Series] = []
        self.waits_ended: list[pd.Series] = []
        self.generations = Generations()

    def window(self, low: float, ev: dict[str, pd.DataFrame], attribute: Attribute | None) -> None:
        posts = ev.get("posts", empty("posts"))
        completions = ev.get("completions", empty("completions"))
        waits, wait_ends = ev.get("waits", empty("waits")), ev.get("wait_ends", empty("waits"))
        if len(waits):
            self.waits_begun.append(waits.groupby("pid").size())
        if len(wait_ends):
            self.waits_ended.append(wait_ends.groupby("pid").size())
        made = {
            "seq": np.arange(self.seq, self.seq + len(posts), dtype=np.int64),
            "attr": np.full(len(posts), np.nan),
            "gen": np.full(len(posts), np.nan),
        }
        self.seq += len(posts)

        # the reads still open, then the window's posts: column by column (a frame concat
        # costs several times more)
        def joined(c: str) -> np.ndarray:
            kept = self.carry[c].to_numpy()
            if c in made:
                return np.concatenate([kept, made[c]])
            # converted as astype would: the carried columns are the wider
            return np.concatenate([kept, posts[c].to_numpy()], dtype=kept.dtype, casting="unsafe")

        both = pd.DataFrame({c: joined(c) for c in CARRIED}, copy=False)
        iv = read_intervals(both, completions)
        # the columns every step reads as int64, converted once (the carried ones are)
        narrow = {c: np.int64 for c in WIDE if c in iv and iv[c].dtype != np.int64}
        if narrow:  # astype copies every column, even given none to convert
            iv = iv.astype(narrow)
        if iv.empty:
            self._late(self.parking.window(lambda: iv, waits, wait_ends))
            return
        new = iv["post_ns"].to_numpy(np.float64) >= low
        source = iv["source"].to_numpy()
        seeded = source == Source.PARKED
        is_open = iv["end_ns"].isna().to_numpy()
        network = is_network(iv)
        self.generations.window(iv, is_open, network)
        if attribute is not None:
            attr = iv["attr"].to_numpy(np.float64).copy()
            todo = network & np.isnan(attr)
            if todo.any():
                column = columns_of(iv, todo)
                attr[todo] = attribute(
                    column("pid", np.int64),
                    column("addr", np.uint64),
                    column("len", np.int64),
                    column("post_ns", np.float64),
                    column("end_ns", np.float64),
                )
                iv["attr"] = attr
        if seeded.any():  # parked at attach: ended by the next read on the fd
            self.digests.hold()
            self.retry.ask(iv[new & seeded], "post_ns")
            self.held.append(iv[~is_open & seeded])
        syscall = source == Source.SYSCALL
        eagain = ~is_open & syscall & (iv["ret"].to_numpy() == -EAGAIN)
        if eagain.any():  # parked after EAGAIN? known when the next reads come
            self.digests.hold()
            self.parking.add(iv[eagain].assign(attr=np.nan))
        if self.retry.waiting():
            self.retry.answer(iv[new & syscall])
        if self.series.wanted:
            ended = network & ~is_open & ~seeded
            column = columns_of(iv, None)
            ret = column("ret", np.float64)
            arrived = ended & (ret >= 0)  # data, or the end of the stream (0)
            fresh = new & network
            key = connection_keys(
                column("pid", np.int64), column("fd", np.int64), column("gen", np.int64)
            )
            self.idle.window(
                key[fresh],
                column("post_ns", np.int64)[fresh],
                (key[arrived], column("end_ns", np.float64)[arrived], ret[arrived] == 0),
            )
            self._spans(iv, ended)
        self.digests.add(iv, new, is_open, seeded)
        if attribute is not None:
            self.parking.attribute(attribute)
        self._late(self.parking.window(lambda: iv[new & syscall], waits, wait_ends))
        # the columns carried alone, not the whole frame picked then narrowed
        self.carry = pd.DataFrame(
            {c: iv["post_ns" if c == "ts_ns" else c].to_numpy()[is_open] for c in CARRIED}
        )

    def finish(self) -> ReadsAtEnd:
        """The reads still posted at the end, and those that waited for lookups."""
        still = read_intervals(self.carry, empty("completions")) if len(self.carry) else no_reads()
        seeded_open = still["source"].to_numpy() == Source.PARKED
        if seeded_open.any():
            self.held.append(still[seeded_open])
            still = still[~seeded_open]
        late = _stacked(self._at_attach(), self.parking.finish())
        self._late(late)
        counts, activity, late_steps = self.digests.finish()
        counts.append(count_reads(still))
        polls = still[is_poll(still)] if len(still) else still
        still, late = network_reads(still), network_reads(late)
        activity.append(read_activity(still))
        self._spans(still, None)
        return ReadsAtEnd(
            counts=merge_counts(counts),
            activity=merge_activity(activity),
            posted=_stacked(still, late[late["end_ns"].isna()]),
            peaks=self.digests.peaks.peaks(late_steps),
            data=self.digests.data,
            waits_begun=_summed(self.waits_begun),
            waits_ended=_summed(self.waits_ended),
            ends_of_stream=self.generations.ends(),
            polls=polls,
        )

    def close(self) -> None:
        self.digests.close()

    def _at_attach(self) -> pd.DataFrame:
        """The reads parked at attach, ended by the next read the process made on the same
        fd, now that every read is known."""
        if not self.held:
            return no_reads().iloc[0:0]
        rows = pd.concat(self.held, ignore_index=True)
        rows["end_ns"] = self.retry.values(rows["seq"])
        return rows

    def _late(self, reads: pd.DataFrame) -> None:
        """Reads decided after their window (parked ones): counted, stepped, spanned."""
        if reads.empty:
            return
        self.digests.late(reads)
        self._spans(network_reads(reads), None)

    def _spans(self, reads: pd.DataFrame, where: np.ndarray | None) -> None:
        """Finished reads (the rows `where` says; or those still posted at the end) on the
        time series' edges."""
        if not self.series.wanted or reads.empty:
            return
        column = columns_of(reads, where)
        weights = {"posted_reads": None, "pinned_bytes": column("len", np.int64)}
        if self.memory:
            held = np.nan_to_num(column("attr", np.float64)).astype(np.int64)
            weights["io_buffer_heap_bytes"] = held
        self.series.spans_of(
            column("pid", np.int64),
            column("post_ns", np.int64),
            column("end_ns", np.float64),
            weights,
        )


def _summed(pieces: list[pd.Series]) -> pd.Series:
    full = [p for p in pieces if len(p)]
    if not full:
        return pd.Series(dtype=np.int64)
    return pd.concat(full).groupby(level=0).sum()


class _Digests:
    """What each window's finished reads leave - read_summary's counts of all (added up per
    kind of read, labelled at the end), read_activity of the network ones, their steps -
    worked out on a thread of its own in window order, and merged every few windows so that
    a long trace keeps a few frames, not one per window."""

    MERGE_EVERY = 16

    def __init__(self, peaks: Peaks) -> None:
        self.peaks = peaks
        self.pool = ThreadPoolExecutor(1)
        self.pending: deque[Future[tuple[KindCounts, pd.DataFrame]]] = deque()
        self.counts = KindCounts.none()
        self.activity: list[pd.DataFrame] = []
        self.data = LastData()
        self.late_steps: list[Chunk] = []

    def hold(self) -> None:
        self.pool.submit(self.peaks.hold)  # in order: after the windows before it

    def add(
        self, iv: pd.DataFrame, new: np.ndarray, is_open: np.ndarray, seeded: np.ndarray
    ) -> None:
        self.pending.append(self.pool.submit(self._digest, iv, new, is_open, seeded))
        while len(self.pending) > 1:  # at most one window in flight
            self._collect(self.pending.popleft().result())

    def _digest(
        self, iv: pd.DataFrame, new: np.ndarray, is_open: np.ndarray, seeded: np.ndarray
    ) -> tuple[KindCounts, pd.DataFrame]:
        network = ~seeded & is_network(iv)
        self.peaks.add(_steps(iv, new, network))
        ended = network & ~is_open
        self.data.add(iv, ended)
        return kind_counts(iv, ~is_open & ~seeded), read_activity(iv, ended)

    def _collect(self, done: tuple[KindCounts, pd.DataFrame]) -> None:
        self.counts += done[0]
        self.activity.append(done[1])
        if len(self.activity) >= self.MERGE_EVERY:
            self.activity = [merge_activity(self.activity)]

    def late(self, reads: pd.DataFrame) -> None:
        self.pending.append(self.pool.submit(self._digest_late, reads))

    def _digest_late(self, reads: pd.DataFrame) -> tuple[KindCounts, pd.DataFrame]:
        network = network_reads(reads)
        self.late_steps.append(_steps(network, np.ones(len(network), bool), None))
        self.data.add(network)
        return kind_counts(reads), read_activity(network)

    def finish(self) -> tuple[list[pd.DataFrame], list[pd.DataFrame], list[Chunk]]:
        """(the counts, the activity, the late steps)."""
        try:
            while self.pending:
                self._collect(self.pending.popleft().result())
        finally:
            self.pool.shutdown(cancel_futures=True)
        return [self.counts.frame()], self.activity, self.late_steps

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        self.peaks.close()


def _steps(reads: pd.DataFrame, new: np.ndarray, where: np.ndarray | None) -> Chunk:
    """The steps of `reads` (the rows `where` says): +1 at the post of those `new`, -1 at
    the end of those that ended."""
    column = columns_of(reads, where)
    return steps_of(
        column("pid", np.int64),
        column("post_ns", np.int64),
        column("end_ns", np.float64),
        column("len", np.int64),
        new if where is None else new[where],
    )
