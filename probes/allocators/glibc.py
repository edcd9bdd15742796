"""glibc malloc, read from the outside: the allocation that holds an address, from the chunk
headers in the process's memory (/proc/PID/mem), with no probe on malloc or free.

Where chunks are (glibc 2.26+, x86-64, MALLOC_ALIGNMENT 16):
- the main arena's heap is the `[heap]` mapping (the brk heap): chunks follow each other from
  its start, each header {prev_size, size | flags}, up to the top chunk;
- a thread arena's heaps are anonymous mappings aligned to HEAP_MAX_SIZE (64 MiB), each
  beginning with a `heap_info` {ar_ptr, prev, size, mprotect_size[, pagesize]}; in an arena's
  first heap its `malloc_state` follows, and the chunks after it;
- a block above the mmap threshold is a chunk of its own mapping (size | IS_MMAPPED; its
  prev_size is the offset from the mapping's start), several such mappings may be merged by
  the kernel into one.
glibc's libraries carry no DWARF here, so these layouts are the stable ones of its source,
and every header read is validated (aligned sizes, inside the heap, the chain reaching the
heap's end): a heap that does not read as expected gives "unknown" with the reason, never a
guessed allocation.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

from probes.allocators.base import Allocation, Mapping, NotFound
from probes.process_memory import MemoryReadError, ProcessMemory

SIZE_BITS = 0x7  # PREV_INUSE | IS_MMAPPED | NON_MAIN_ARENA
PREV_INUSE = 0x1
IS_MMAPPED = 0x2
MIN_CHUNK = 32
ALIGN = 16
HEAP_MAX = 64 << 20  # HEAP_MAX_SIZE on 64-bit (2 x DEFAULT_MMAP_THRESHOLD_MAX)
MALLOC_STATE = 2200  # sizeof(struct malloc_state), glibc 2.26+ on 64-bit
HEAP_INFO_SIZES = (48, 32)  # sizeof(heap_info): with pagesize (2.35+), before
WINDOW = 4 << 20  # bytes read at once while walking a heap
MAX_CHUNKS = 50_000_000
SUM_CHUNKS = 2_000_000  # a heap summed for a memory point: ~1.3 s of walking at most


class CorruptHeap(Exception):
    """A heap's chunk chain does not read as glibc lays it out."""


class HeapTooBig(CorruptHeap):
    """More chunks than a caller wanted walked (summing a heap must not stall a recording)."""


@dataclass
class _Chunks:
    """The chunks of one heap, as its last walk found them."""

    starts: list[int]
    sizes: list[int]
    # chunks in use (their successor's PREV_INUSE bit set; the top chunk is free): malloc's
    # fast and tcache bins keep that bit, so chunks cached there count as in use
    used_bytes: int = 0
    used_blocks: int = 0

    def holding(self, addr: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0 or addr >= self.starts[i] + self.sizes[i]:
            return None
        return self.starts[i], self.sizes[i]


def walk_chunks(mem: ProcessMemory, first: int, end: int, limit: int = MAX_CHUNKS) -> _Chunks:
    """Every chunk from `first` to `end` (exclusive), following the size chain; HeapTooBig
    past `limit` chunks."""
    starts: list[int] = []
    sizes: list[int] = []
    used_bytes = used_blocks = 0
    p = first
    window_at, window = -1, b""
    while p + 16 <= end:
        if not window_at <= p + 8 < window_at + len(window) - 8:
            window_at = p
            window = mem.read(p, min(WINDOW, end - p))
        raw = struct.unpack_from("<Q", window, p + 8 - window_at)[0]
        size = raw & ~SIZE_BITS
        if size < MIN_CHUNK or size % ALIGN or p + size > end:
            raise CorruptHeap(f"a chunk at {p:#x} reads as {size} bytes")
        if sizes and raw & PREV_INUSE:
            used_bytes += sizes[-1]
            used_blocks += 1
        starts.append(p)
        sizes.append(size)
        if len(starts) > limit:
            raise HeapTooBig(f"more than {limit:,} chunks")
        p += size
    if p != end and end - p >= MIN_CHUNK:
        raise CorruptHeap(f"the chunk chain ends at {p:#x}, not at the heap's end {end:#x}")
    return _Chunks(starts, sizes, used_bytes, used_blocks)


class GlibcHeap:
    """Lookups of one process's glibc heap; chunk chains are cached between lookups and
    walked again where a chunk no longer reads as cached (it was freed, split or merged)."""

    def __init__(self, mem: ProcessMemory) -> None:
        self.mem = mem
        self._heaps: dict[int, _Chunks] = {}  # heap start -> its chunks
        self._arenas: dict[int, tuple[int, int, int]] = {}  # heap -> (info size, first, end)

    def find(self, addr: int, mapping: Mapping) -> Allocation | NotFound | None:
        """The malloc'ed block holding `addr` (in `mapping`); NotFound with why when the
        heap cannot be read as glibc's; None when `mapping` is not glibc's memory."""
        try:
            if mapping.name == "[heap]":
                return self._in_heap(addr, mapping.start, self._main_end(mapping), "glibc")
            if not mapping.anonymous:
                return None
            arena = self._arena_heap(addr, mapping)
            if arena is not None:
                first, end = arena
                return self._in_heap(addr, first, end, "glibc thread arena")
            return self._mmapped(addr, mapping)
        except (CorruptHeap, MemoryReadError) as exc:
            return NotFound(f"glibc's heap could not be read: {exc}")

    def in_use(self, mappings: list[Mapping], limit: int = SUM_CHUNKS) -> tuple[int, int]:
        """(bytes, blocks) of every chunk in use in the process's glibc heaps: the brk heap,
        the thread arenas' heaps, blocks of their own mappings. A chunk's bytes are its
        size: the request plus 8, rounded up to 16 (32 at least). CorruptHeap or
        MemoryReadError when a heap does not read as glibc's (or changed under the walk);
        HeapTooBig past `limit` chunks in all (~0.65 us each)."""
        used = blocks = walked = 0
        for m in mappings:
            left = limit - walked
            if m.name == "[heap]":
                chunks = walk_chunks(self.mem, m.start, self._main_end(m), left)
                self._heaps[m.start] = chunks
            elif m.anonymous and "r" in m.perms:
                arena = self._arena_heap(m.start, m) if m.start % HEAP_MAX == 0 else None
                if arena is None:
                    for _chunk, length in self._mmapped_chunks(m):
                        used, blocks = used + length, blocks + 1
                    continue
                chunks = self._heaps[arena[0]] = walk_chunks(self.mem, *arena, left)
            else:
                continue
            used, blocks = used + chunks.used_bytes, blocks + chunks.used_blocks
            walked += len(chunks.starts)
        return used, blocks

    def _mmapped_chunks(self, mapping: Mapping) -> list[tuple[int, int]]:
        """(chunk, length) of the blocks of their own mapping at the start of `mapping` (the
        kernel may have merged several): [] when it holds none (it is not malloc's)."""
        found = []
        p = mapping.start
        while p + 16 <= mapping.end:
            try:
                prev_size, size = struct.unpack("<QQ", self.mem.read(p, 16))
            except MemoryReadError:
                break
            length = size & ~SIZE_BITS
            chunk = p + prev_size  # prev_size: the alignment offset from the mapping's start
            if (
                not size & IS_MMAPPED
                or length < MIN_CHUNK
                or length % 4096
                or chunk + length > mapping.end
            ):
                break
            found.append((chunk, length))
            p = chunk + length
        return found

    def _main_end(self, heap: Mapping) -> int:
        return heap.end  # the top chunk runs to the end of the brk heap

    def _in_heap(self, addr: int, first: int, end: int, how: str) -> Allocation | NotFound:
        cached = self._heaps.get(first)
        found = cached.holding(addr) if cached else None
        if found is None or not self._still(found):
            cached = self._heaps[first] = walk_chunks(self.mem, first, end)
            found = cached.holding(addr)
        if found is None:
            return NotFound("inside glibc's heap but in no chunk")
        start, size = found
        # an in-use chunk's block runs from after its header over the next chunk's prev_size
        return Allocation(start + 16, size - 8, how)

    def _still(self, chunk: tuple[int, int]) -> bool:
        start, size = chunk
        header = self.mem.read(start + 8, 8)
        return struct.unpack("<Q", header)[0] & ~SIZE_BITS == size

    def _arena_heap(self, addr: int, mapping: Mapping) -> tuple[int, int] | None:
        """(first chunk, end) of the thread-arena heap holding `addr`, or None."""
        h = addr & ~(HEAP_MAX - 1)
        if mapping.start != h:
            return None
        raw = self.mem.read(h, 48)
        ar_ptr, _prev, size, mprotect = struct.unpack_from("<QQQQ", raw)
        if not (0 < size <= HEAP_MAX and size <= mprotect <= HEAP_MAX and addr < h + size):
            return None
        known = self._arenas.get(h)
        if known is not None and known[2] == h + size:  # the same heap, not grown: no re-walk
            return known[1], known[2]
        for info in HEAP_INFO_SIZES:
            if ar_ptr == h + info:  # the arena's first heap: its malloc_state comes first
                first = (ar_ptr + MALLOC_STATE + ALIGN - 1) & ~(ALIGN - 1)
            else:
                first = h + info
            try:
                self._heaps[first] = walk_chunks(self.mem, first, h + size)
            except CorruptHeap:
                continue
            self._arenas[h] = (info, first, h + size)
            return first, h + size
        return None

    def _mmapped(self, addr: int, mapping: Mapping) -> Allocation | None:
        """A block of its own mapping (several may share one after the kernel merged them)."""
        for chunk, length in self._mmapped_chunks(mapping):
            if chunk <= addr < chunk + length:
                return Allocation(chunk + 16, length - 16, "glibc mmap")
        return None
