"""How much of a buffer is resident: /proc/PID/pagemap, read when the recording ends.

A buffer that was allocated but never written costs address space, not RAM: the kernel maps a
page only when it is first touched (a read into it, or the program clearing it). The recorder
asks pagemap about the buffers that matter at the end (posted reads', each connection's last
data buffer and its last EAGAIN buffer, which a parked thread holds) and stores the resident
bytes of each range.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

_EAGAIN = 11
_PRESENT = 1 << 63
_SWAPPED = 1 << 62


def resident_bytes(pagemap_fd: int, addr: int, length: int) -> int:
    """Bytes of [addr, addr + length) on pages that are in RAM (or swap, which was RAM)."""
    if length <= 0:
        return 0
    page = mmap.PAGESIZE
    first, last = addr // page, (addr + length - 1) // page
    raw = os.pread(pagemap_fd, 8 * (last - first + 1), first * 8)
    total = 0
    for i, (entry,) in enumerate(struct.iter_unpack("<Q", raw)):
        if entry & (_PRESENT | _SWAPPED):
            start = max(addr, (first + i) * page)
            end = min(addr + length, (first + i + 1) * page)
            total += end - start
    return total


def measure(ranges: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add `resident_bytes` to each {"pid", "addr", "len", ...}; ranges of gone processes are
    left out."""
    out = []
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for r in ranges:
        by_pid.setdefault(r["pid"], []).append(r)
    for pid, rows in by_pid.items():
        try:
            fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            for r in rows:
                try:
                    out.append({**r, "resident_bytes": resident_bytes(fd, r["addr"], r["len"])})
                except OSError:
                    continue
        finally:
            os.close(fd)
    return out


class BufferTracker:
    """Follows, flush by flush, which buffers are posted and which received each connection's
    last data, so their residency can be measured when the recording ends. Vectorised per
    batch (pandas), since it runs on every read record."""

    _KEYS = ["pid", "source", "key"]

    def __init__(self) -> None:
        import pandas as pd  # noqa: PLC0415 - only the memory side needs it

        self._pd = pd

        def empty(columns: list[str]) -> pd.DataFrame:
            return pd.DataFrame({c: pd.Series(dtype="int64") for c in columns})

        self.open = empty([*self._KEYS, "fd", "addr", "len"])
        self.last_data = empty(["pid", "fd", "addr", "len"])
        self.last_wait = empty(["pid", "fd", "addr", "len"])  # its last EAGAIN: parked?

    def note(self, posts: Any, completions: Any) -> None:
        """Structured arrays of POST and COMPLETE wire records, in time order each."""
        pd = self._pd
        # int64 throughout: merges need equal key types (user addresses are below 2**63)
        p = pd.DataFrame(
            {
                k: posts[k].astype("int64")
                for k in ("ts_ns", "pid", "source", "key", "fd", "addr", "value")
            }
        ).rename(columns={"value": "len"})
        c = pd.DataFrame(
            {k: completions[k].astype("int64") for k in ("ts_ns", "pid", "source", "key", "value")}
        ).rename(columns={"value": "ret"})
        if p.empty and c.empty:
            return
        # what each completion completed: a post of this batch or one still open before it
        known = pd.concat([self.open.assign(ts_ns=-1), p], ignore_index=True)
        known = known.sort_values("ts_ns", kind="stable")
        ended = c[(c["ret"] > 0) | (c["ret"] == -_EAGAIN)].sort_values("ts_ns", kind="stable")
        if not ended.empty:
            filled = pd.merge_asof(
                ended,
                known[[*self._KEYS, "ts_ns", "fd", "addr", "len"]],
                on="ts_ns",
                by=self._KEYS,
                direction="backward",
            ).dropna(subset=["fd"])
            for attr, rows in (
                ("last_data", filled[filled["ret"] > 0]),
                ("last_wait", filled[filled["ret"] < 0]),
            ):
                latest = rows.groupby(["pid", "fd"]).tail(1)[["pid", "fd", "addr", "len"]]
                merged = pd.concat([getattr(self, attr), latest.astype("int64")])
                setattr(self, attr, merged.drop_duplicates(["pid", "fd"], keep="last"))
        # a key's last event says whether its read is still posted
        events = pd.concat([p.assign(posted=True), c.assign(posted=False)], ignore_index=True)
        last = events.sort_values("ts_ns", kind="stable").groupby(self._KEYS).tail(1)
        still = last[last["posted"]][[*self._KEYS, "fd", "addr", "len"]]
        closed = last[~last["posted"]][self._KEYS]
        merged = pd.concat([self.open, still]).drop_duplicates(self._KEYS, keep="last")
        merged = merged.merge(closed, on=self._KEYS, how="left", indicator=True)
        self.open = merged[merged["_merge"] == "left_only"].drop(columns="_merge")

    def ranges(self) -> list[dict[str, Any]]:
        """The buffers to measure: {"pid", "fd", "addr", "len", "what"}."""
        rows: list[dict[str, Any]] = []
        frames = (("posted", self.open), ("last_data", self.last_data), ("parked", self.last_wait))
        for what, frame in frames:
            for r in frame.to_dict("records"):
                if int(r["len"]) > 0:
                    rows.append(
                        {k: int(r[k]) for k in ("pid", "fd", "addr", "len")} | {"what": what}
                    )
        return rows
