"""Group-by over numpy arrays: dense codes for integer keys, and sums, minima and maxima per
code. A window's reads are hundreds of thousands of rows in a few thousand groups; pandas'
groupby costs a frame, a grouper and a result frame per figure, these cost one pass each.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# keys spread over at most this many values (or 4 per row) are coded by direct addressing
DIRECT_SPAN = 1 << 16


def dense_codes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, uniques): each key's group number 0..n-1, the groups in ascending key order.
    Keys within a narrow span (one process's fds, say) are coded by their offset, no hash."""
    keys = np.asarray(keys)
    if not len(keys):
        return np.zeros(0, np.intp), keys[:0]
    low, high = int(keys.min()), int(keys.max())
    if high - low < max(DIRECT_SPAN, 4 * len(keys)):
        offset = (keys - low).astype(np.intp)
        present = np.zeros(high - low + 1, bool)
        present[offset] = True
        number = np.cumsum(present, dtype=np.intp) - 1
        return number[offset], (np.flatnonzero(present) + low).astype(keys.dtype)
    codes, uniques = pd.factorize(keys, sort=True)
    return codes.astype(np.intp, copy=False), np.asarray(uniques, dtype=keys.dtype)


def first_rows(codes: np.ndarray, n: int) -> np.ndarray:
    """The first row of each code."""
    out = np.full(n, len(codes), np.intp)
    np.minimum.at(out, codes, np.arange(len(codes), dtype=np.intp))
    return out


def sums(codes: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """`values` (floats or integers, exactly) summed per code."""
    if values.dtype.kind in "iub":
        out = np.zeros(n, np.int64)
        np.add.at(out, codes, values.astype(np.int64, copy=False))
        return out
    return np.bincount(codes, values, minlength=n).astype(np.float64)


def minima(codes: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """The least of `values` per code (integers; every code has a row)."""
    out = np.full(n, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(out, codes, values.astype(np.int64, copy=False))
    return out


def nan_maxima(codes: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """The greatest of `values` per code, NaNs left out (NaN: none), as pandas' max."""
    out = np.full(n, np.nan)
    np.fmax.at(out, codes, values)
    return out


def nan_sums(codes: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """`values` summed per code, NaNs left out (NaN: none), as pandas' sum(min_count=1)."""
    known = ~np.isnan(values)
    out = np.bincount(codes[known], values[known], minlength=n).astype(np.float64)
    out[np.bincount(codes[known], minlength=n) == 0] = np.nan
    return out


class KeyIndex:
    """Distinct int64 keys, each at its position in the order added, and where given keys
    are among them: by a table when they span a narrow range (one process's connections),
    by a hash otherwise (a lookup per read of a window, twice a window)."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self._low = 0
        self._table: np.ndarray | None = None  # position of each key - low, -1: none
        self._hashed = pd.Index(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """The position of each of `keys` (-1: not added)."""
        keys = np.asarray(keys, np.int64)
        if self._table is None:
            return self._hashed.get_indexer(pd.Index(keys))
        offset = keys - self._low
        inside = (offset >= 0) & (offset < len(self._table))
        if inside.all():
            return self._table[offset]
        out = np.full(len(keys), -1, np.intp)
        out[inside] = self._table[offset[inside]]
        return out

    def add(self, keys: np.ndarray) -> None:
        """New distinct keys, none added before, after those added."""
        self.keys = np.concatenate([self.keys, np.asarray(keys, np.int64)])
        if not len(self.keys):
            return
        low, high = int(self.keys.min()), int(self.keys.max())
        if high - low < max(DIRECT_SPAN, 4 * len(self.keys)):
            self._low, self._table = low, np.full(high - low + 1, -1, np.intp)
            self._table[self.keys - low] = np.arange(len(self.keys))
        else:
            self._table, self._hashed = None, pd.Index(self.keys)
