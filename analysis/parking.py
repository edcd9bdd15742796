"""Reads whose end is known only windows later: reads parked after EAGAIN, and reads found
parked at attach.

- `Parking`: EAGAIN returns that may be parked reads (analysis.reads.parked_reads), decided
  as the windows pass rather than at the end, so that a Go server's millions of them are
  never all held. One is parked when the next read on its fd (`at`, its end) and the next
  read into its buffer (`next_fd`: the same fd, or none) are known, and a readiness wait was
  in progress at some moment in between (`covered`). The waits are streamed alongside:
  those of a window, and those begun earlier not seen to end, are checked against the
  EAGAIN returns not covered yet; a wait that ended is not needed by any later EAGAIN.
- `NextPost`: for reads found parked at attach, the next syscall read the process posted on
  the same fd (their end), found as later windows pass.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from analysis.reads import _next_post, parked_of, wait_spans, waiting_between

# attribution of reads to the allocations holding their buffers at their first edge:
# (pid, addr, len, start, end) -> bytes, NaN for reads whose first edge is not in this window
Attribute = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _stacked(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    if a.empty:
        return b
    return a if b.empty else pd.concat([a, b], ignore_index=True)


class Parking:
    """EAGAIN returns not decided yet (see the module's docstring)."""

    def __init__(self) -> None:
        self.pending = pd.DataFrame()
        self.open_waits = pd.DataFrame(columns=["pid", "tid", "ts_ns"])

    def add(self, eagain: pd.DataFrame) -> None:
        rows = eagain.assign(at=np.nan, next_fd=np.nan, covered=False)
        if "attr" not in rows:
            rows["attr"] = np.nan
        self.pending = _stacked(self.pending, rows.reset_index(drop=True))

    def attribute(self, attribute: Attribute) -> None:
        """The buffers' allocations, for the time series, of the returns not attributed
        yet whose first edge is in this window (a parked read starts at its EAGAIN)."""
        if self.pending.empty:
            return
        todo = np.flatnonzero(np.isnan(self.pending["attr"].to_numpy(np.float64)))
        if len(todo):
            rows = self.pending.iloc[todo]
            found = attribute(
                rows["pid"].to_numpy(np.int64),
                rows["addr"].to_numpy(np.uint64),
                rows["len"].to_numpy(np.int64),
                rows["end_ns"].to_numpy(np.float64),
                rows["at"].to_numpy(np.float64),
            )
            attr = self.pending["attr"].to_numpy(np.float64).copy()
            attr[todo] = found
            self.pending["attr"] = attr

    def window(
        self, posts_of: Callable[[], pd.DataFrame], waits: pd.DataFrame, wait_ends: pd.DataFrame
    ) -> pd.DataFrame:
        """One window: `posts_of()` its syscall reads (posted in it: asked for only when an
        EAGAIN return waits for them), `waits` and `wait_ends` its readiness waits. The
        parked reads decided now, as parked_reads() makes them."""
        # pids as the reads carry them (int64), for the joins by pid
        if not waits.empty:
            waits = waits[["pid", "tid", "ts_ns"]].astype({"pid": np.int64})
        if not wait_ends.empty:
            wait_ends = wait_ends.astype({"pid": np.int64})
        begun = _stacked(self.open_waits, waits)
        spans = wait_spans(begun, wait_ends) if not begun.empty else None
        if spans is not None:
            self.open_waits = (
                spans.loc[np.isinf(spans["end"]), ["pid", "tid", "begin"]]
                .rename(columns={"begin": "ts_ns"})
                .reset_index(drop=True)
            )
        if self.pending.empty:
            return self.pending
        p = self.pending.reset_index(drop=True)
        posts = posts_of()
        if not posts.empty:
            for by, value, column in (("fd", "at", "at"), ("addr", "next_fd", "next_fd")):
                todo = np.flatnonzero(p[column].isna().to_numpy())
                if len(todo):
                    found = _next_post(p.iloc[todo], "end_ns", posts, ["pid", by], value)
                    p.loc[todo, column] = found.to_numpy()
        if spans is not None:
            todo = np.flatnonzero(~p["covered"].to_numpy(bool))
            if len(todo):
                rows = p.iloc[todo].assign(retry=p["at"].iloc[todo])
                p.loc[todo, "covered"] = waiting_between(rows, spans).to_numpy(bool)
        decided = p["at"].notna().to_numpy() & p["next_fd"].notna().to_numpy()
        self.pending = p[~decided].reset_index(drop=True)
        return self._parked(p[decided])

    def finish(self) -> pd.DataFrame:
        """Those still undecided at the end: no next read (still parked), or their buffer
        never read into again."""
        rows, self.pending = self.pending, pd.DataFrame()
        if rows.empty:
            return rows
        return self._parked(rows.assign(next_fd=rows["next_fd"].fillna(-1.0)))

    @staticmethod
    def _parked(rows: pd.DataFrame) -> pd.DataFrame:
        """The decided `rows` that are parked reads, as parked_reads() makes them (with
        their attribution kept)."""
        if rows.empty:
            return rows.iloc[0:0]
        next_fd = rows["next_fd"].to_numpy()
        kept = rows[rows["covered"].to_numpy(bool) & ((next_fd == -1) | (next_fd == rows["fd"]))]
        candidates = kept.drop(columns=["at", "next_fd", "covered"])
        return parked_of(candidates, kept["at"], kept["next_fd"], None, None)


class NextPost:
    """For rows seen so far: when the process next posted a syscall read on the same fd,
    strictly after a time - found as later windows pass, as analysis.reads._next_post finds
    it over the whole trace (the end of a read parked at attach)."""

    def __init__(self) -> None:
        self.pending = pd.DataFrame(columns=["seq", "pid", "fd", "_t"])
        self.found: dict[int, float] = {}

    def ask(self, rows: pd.DataFrame, time_col: str) -> None:
        if rows.empty:
            return
        asked = pd.DataFrame(
            {
                "seq": rows["seq"].to_numpy(np.int64),
                "pid": rows["pid"].to_numpy(),
                "fd": rows["fd"].to_numpy(),
                "_t": rows[time_col].to_numpy(np.float64),
            }
        )
        self.pending = _stacked(self.pending, asked)

    def waiting(self) -> bool:
        return not self.pending.empty

    def answer(self, posts: pd.DataFrame) -> None:
        """`posts`: syscall reads posted in one window, after every earlier window's."""
        if self.pending.empty or posts.empty:
            return
        pending = self.pending.reset_index(drop=True)
        got = _next_post(pending, "_t", posts, ["pid", "fd"], "at").to_numpy()
        done = ~np.isnan(got)
        self.found.update(zip(pending["seq"].to_numpy()[done].tolist(), got[done].tolist()))
        self.pending = pending[~done]

    def values(self, seqs: pd.Series) -> np.ndarray:
        """The next post of each of these rows (NaN: none)."""
        return np.array([self.found.get(int(s), np.nan) for s in seqs], dtype=np.float64)
