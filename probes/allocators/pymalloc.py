"""CPython's small-object allocator (pymalloc), read from the outside: the blocks in use in
its pools, and the chunks that hold its threads' frames.

pymalloc keeps objects of up to 512 bytes in pools of 16 KiB (CPython 3.10 and later on 64-bit;
4 KiB before), carved from arenas it maps itself. A pool starts with its header
(Objects/obmalloc.c, struct pool_header):

    ref.count (uint, in an 8-byte union)  blocks in use
    freeblock                             the first free block (a chain through their first word)
    nextpool, prevpool
    arenaindex, szidx                     uint: its arena, its size class (block = (szidx+1)*16)
    nextoffset, maxnextoffset             uint: the next block never handed out; the last one

The header is its own signature: maxnextoffset is exactly POOL_SIZE less the block size, and
count equals the blocks handed out (those below nextoffset) less the free chain. A pool is
found wherever a pool-aligned page of the process's anonymous memory carries it; no symbol
is needed (Debian's python3 exports none of obmalloc's statics).

A thread's Python frames live in its data stack: chunks of 16 KiB and up that CPython maps
itself (_PyStackChunk: previous, size, top - the chunk's own size is its second word). They
are what a thread's Python locals hang from, so they are allocations of the graph too.

Pure numpy over words already read (probes.attach.owned reads the process).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

POOL_SIZES = (16 << 10, 4 << 10)  # CPython >= 3.10 on 64-bit; before
HEADER = 48  # POOL_OVERHEAD: sizeof(struct pool_header), rounded to 16
ALIGNMENT = 16
SIZE_CLASSES = 512 // ALIGNMENT
MAX_FREE_CHAIN = 1 << 12  # blocks on one pool's free chain at most (16 KiB / 16 B: 1,021)
STACK_CHUNK = 16 << 10  # DATA_STACK_CHUNK_SIZE; chunks double from it
MAX_STACK_CHUNK = 64 << 20
PAGE = 4096


@dataclass
class Blocks:
    """What pymalloc holds in the memory read: its blocks in use and its threads' frame
    chunks as allocations (lo, hi, bytes), and the ranges it owns (its pools, whatever their
    state, and the chunks), whose words are the heap's, not the program's roots."""

    lo: list[np.ndarray] = field(default_factory=list)
    hi: list[np.ndarray] = field(default_factory=list)
    bytes: list[np.ndarray] = field(default_factory=list)
    extents: list[tuple[int, int]] = field(default_factory=list)
    pools: int = 0
    stack_chunks: int = 0
    chunks: list[tuple[int, int]] = field(default_factory=list)  # frame chunks: (lo, length)
    raced: int = 0  # pools whose count disagrees with their free chain (changed as read)

    def add(self, lo: np.ndarray, size: int | np.ndarray, length: int | None = None) -> None:
        """Allocations at `lo` of `size` bytes each (spanning `length` when they cost
        less than they span: a frame chunk's touched pages)."""
        lo = np.asarray(lo, np.uint64)
        sizes = np.broadcast_to(np.asarray(size, np.int64), lo.shape)
        spans = sizes if length is None else np.full(lo.shape, length, np.int64)
        self.lo.append(lo)
        self.hi.append(lo + spans.astype(np.uint64))
        self.bytes.append(sizes.astype(np.int64))


def pool_size(words_at: np.ndarray) -> int | None:
    """The pool size whose headers the pages (words of pool-aligned pages, one row each)
    carry, trying the current one first; None if none does."""
    for size in POOL_SIZES:
        if np.any(_headers(words_at, size)):
            return size
    return None


def _headers(head: np.ndarray, pool: int) -> np.ndarray:
    """Which rows of `head` (the first 6 words of candidate pages) are pool headers."""
    if not len(head):
        return np.zeros(0, bool)
    tail = head[:, 4:6].copy().view(np.uint32)  # arenaindex, szidx, nextoffset, maxnextoffset
    szidx, nextoffset, maxnext = tail[:, 1], tail[:, 2], tail[:, 3]
    size = (szidx.astype(np.int64) + 1) * ALIGNMENT
    count = head[:, 0] & np.uint64(0xFFFFFFFF)
    return (
        (szidx < SIZE_CLASSES)
        & (maxnext.astype(np.int64) == pool - size)
        & (nextoffset.astype(np.int64) >= HEADER)
        & (nextoffset.astype(np.int64) <= pool + size)
        & (count.astype(np.int64) <= (pool - HEADER) // size)
    )


def find(segments: list[tuple[int, np.ndarray]], pool: int | None = None) -> Blocks:
    """pymalloc's pools and frame chunks in `segments` ((address, words) runs of anonymous
    memory, in address order), and their blocks in use. `pool`: the pool size (found from
    the headers when None)."""
    out = Blocks()
    candidates = []
    for base, words in segments:
        first = -(-base // POOL_SIZES[-1]) * POOL_SIZES[-1]
        offsets = np.arange(first - base, len(words) * 8 - HEADER + 1, POOL_SIZES[-1]) // 8
        if len(offsets):
            candidates.append((base, words, offsets))
    if pool is None:
        heads = [w[o[:, None] + np.arange(6)] for _, w, o in candidates]
        pool = pool_size(np.concatenate(heads)) if heads else None
    for base, words, offsets in candidates:
        if pool is not None:
            offsets = offsets[(base + offsets * 8) % pool == 0]
            head = words[offsets[:, None] + np.arange(6)]
            for at in offsets[_headers(head, pool)].tolist():
                # a pool's last pages are untouched (zeros) until blocks are carved there
                mine = words[at : at + pool // 8]
                if len(mine) < pool // 8:
                    mine = np.concatenate([mine, np.zeros(pool // 8 - len(mine), np.uint64)])
                _pool(out, base + at * 8, mine, pool)
        _stack_chunks(out, base, words)
    for lo, length in out.chunks:  # a chunk costs its pages touched, as a stack does
        held = sum(
            max(0, min(lo + length, base + 8 * len(words)) - max(lo, base))
            for base, words in segments
        )
        out.add(np.array([lo], np.uint64), np.array([held], np.int64), length)
    return out


def _pool(out: Blocks, addr: int, words: np.ndarray, pool: int) -> None:
    """The blocks in use of the pool at `addr` (its words)."""
    out.pools += 1
    out.extents.append((addr, addr + pool))
    count = int(words[0]) & 0xFFFFFFFF
    szidx, nextoffset = (int(v) for v in words[4:6].view(np.uint32)[1:3])
    size = (szidx + 1) * ALIGNMENT
    if not count:
        return
    carved = np.arange(HEADER, min(nextoffset, pool - size + 1), size)
    free: set[int] = set()
    at = int(words[1])
    while at and addr <= at < addr + pool and len(free) < MAX_FREE_CHAIN:
        offset = at - addr
        if offset in free or (offset - HEADER) % size:
            break  # a chain that loops or strays: the pool changed as it was read
        free.add(offset)
        at = int(words[offset // 8])
    used = carved[~np.isin(carved, np.fromiter(free, np.int64, len(free)))]
    if len(used) != count:
        out.raced += 1
    out.add(np.uint64(addr) + used.astype(np.uint64), size)


def _stack_chunks(out: Blocks, base: int, words: np.ndarray) -> None:
    """The frame chunks whose header starts a page of [base, ...): a page-aligned chunk
    whose second word is its size (16 KiB doubled), whose third (top) lies inside it, whose
    first is none or another chunk."""
    first = -(-base // PAGE) * PAGE
    at = np.arange((first - base) // 8, len(words) - 2, PAGE // 8)
    if not len(at):
        return
    size = words[at + 1].astype(np.int64)
    sized = (size >= STACK_CHUNK) & (size <= MAX_STACK_CHUNK) & ((size & (size - 1)) == 0)
    top = words[at + 2].astype(np.int64)
    previous = words[at]
    ok = sized & (top >= 0) & (top < size // 8) & (previous % np.uint64(PAGE) == 0)
    taken = sorted(out.extents)
    starts = [a for a, _ in taken]
    for offset, length in zip(at[ok].tolist(), size[ok].tolist()):
        lo = base + offset * 8
        i = bisect.bisect_right(starts, lo + length - 1) - 1
        if i >= 0 and taken[i][1] > lo:
            continue  # overlaps a pool, or a chunk already found (a frame that looks like one)
        out.stack_chunks += 1
        bisect.insort(taken, (lo, lo + length))
        starts = [a for a, _ in taken]
        out.extents.append((lo, lo + length))
        out.chunks.append((lo, length))
