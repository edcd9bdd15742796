"""glibc malloc, read from the outside: the allocation that holds an address, from the chunk
headers in the process's memory (/proc/PID/mem), with no probe on malloc or free.

Where chunks are (glibc 2.26+, x86-64, MALLOC_ALIGNMENT 16):
- the main arena's heap is the brk heap, `[heap]` in /proc/PID/maps: chunks follow each other
  from its start, each header {prev_size, size | flags}, up to the top chunk. The kernel may
  keep it as several adjacent mappings (a forked child that grows it by brk gets a second
  one), so the chain is followed across them;
- a thread arena's heaps are anonymous mappings aligned to HEAP_MAX_SIZE (64 MiB), each
  beginning with a `heap_info` {ar_ptr, prev, size, mprotect_size[, pagesize]}; in an arena's
  first heap its `malloc_state` follows, and the chunks after it. The kernel may merge a
  heap behind other memory too, so every 64 MiB boundary that holds memory is looked at;
- a block above the mmap threshold is a chunk of its own mapping: it starts at a page, its
  header {0, length | IS_MMAPPED} with a length of whole pages (sysmalloc_mmap). The kernel
  merges that mapping with any adjacent anonymous one of the same flags: a line of
  /proc/PID/maps may hold other memory (a thread's stack, an arena's heap, another library's
  mapping), then blocks, then other memory again. Any page may begin a block, so every page
  that holds memory (/proc/PID/pagemap) is read, except those inside a block already found.
glibc's libraries carry no DWARF here, so these layouts are the stable ones of its source,
and every header read is validated (aligned sizes, inside the heap, the chain reaching the
heap's end): a heap that does not read as expected gives "unknown" with the reason, never a
guessed allocation.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from probes.allocators.base import Allocation, Mapping, NotFound
from probes.process_memory import PAGE, MemoryReader, MemoryReadError

SIZE_BITS = 0x7  # PREV_INUSE | IS_MMAPPED | NON_MAIN_ARENA
PREV_INUSE = 0x1
IS_MMAPPED = 0x2
HEADER = 16  # CHUNK_HDR_SZ: prev_size and size
MIN_CHUNK = 32
ALIGN = 16
HEAP_MAX = 64 << 20  # HEAP_MAX_SIZE on 64-bit (2 x DEFAULT_MMAP_THRESHOLD_MAX)
MALLOC_STATE = 2200  # sizeof(struct malloc_state), glibc 2.26+ on 64-bit
HEAP_INFO_SIZES = (48, 32)  # sizeof(heap_info): with pagesize (2.35+), before
WINDOW = 4 << 20  # bytes read at once while walking a heap
MAX_CHUNKS = 50_000_000
SUM_CHUNKS = 2_000_000  # a heap summed for a memory point: ~1.3 s of walking at most
# pages read while looking for blocks of their own mapping (~2 us each; 64 pages of the
# page map cost about one): a quarter of a million is ~0.5 s, 1 GiB of resident memory
SCAN_PAGES = 1 << 18
PAGEMAP_PAGES_PER_READ = 64


class CorruptHeap(Exception):
    """A heap's chunk chain does not read as glibc lays it out."""


class HeapTooBig(CorruptHeap):
    """More chunks than a caller wanted walked (summing a heap must not stall a recording)."""


class _Changed(Exception):
    """A block found before no longer reads as it did (freed, split, merged)."""


@dataclass
class _Chunks:
    """The chunks of one heap, as its last walk found them."""

    starts: list[int]
    sizes: list[int]
    # chunks in use (their successor's PREV_INUSE bit set; the top chunk is free): malloc's
    # fast and tcache bins keep that bit, so chunks cached there count as in use
    used_bytes: int = 0
    used_blocks: int = 0
    end: int = 0  # where the chain ended

    def holding(self, addr: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0 or addr >= self.starts[i] + self.sizes[i]:
            return None
        return self.starts[i], self.sizes[i]


def walk_chunks(
    mem: MemoryReader,
    first: int,
    end: int,
    limit: int = MAX_CHUNKS,
    stops: Sequence[int] = (),
) -> _Chunks:
    """Every chunk from `first` to `end` (exclusive), following the size chain; HeapTooBig
    past `limit` chunks. `stops` (the brk heap's): where else the chain may end - the
    boundaries of the mappings past the brk heap's, and a page where a block of its own
    mapping begins (the kernel merged it behind the heap); no chunk of the brk heap has
    IS_MMAPPED set. A heap whose top chunk was replaced ends in glibc's fenceposts (a
    16-byte chunk, then 16 bytes): they end the chain and are not blocks."""
    starts: list[int] = []
    sizes: list[int] = []
    used_bytes = used_blocks = 0
    ends = sorted({*(s for s in stops if first < s < end), end})
    p = first
    window_at, window = -1, b""
    words: memoryview | None = None
    stopped = False
    while p + HEADER <= end:
        at = bisect.bisect_left(ends, p)
        if ends[at] == p:
            stopped = True  # the chain ended at a mapping's end (a stop)
            break
        if not window_at <= p + 8 < window_at + len(window) - 8:
            # never past the next stop: what lies beyond may not be the heap's (pages
            # read there would be mapped into the process)
            window_at = p
            window = mem.read(p, min(WINDOW, ends[at] - p))
            words = memoryview(window).cast("Q") if len(window) % 8 == 0 else None
        if words is not None:
            # ordinary chunks, as fast as Python goes (a heap of a million chunks is
            # walked in ~0.3 s, not 1.3 s); anything else is the loop's below
            last = min(ends[at], window_at + len(window)) - HEADER
            moved = p
            while p <= last:
                raw = words[((p - window_at) >> 3) + 1]
                size = raw & ~SIZE_BITS
                if raw & IS_MMAPPED or size < MIN_CHUNK or size % ALIGN or p + size > end:
                    break
                if raw & PREV_INUSE and sizes:
                    used_bytes += sizes[-1]
                    used_blocks += 1
                starts.append(p)
                sizes.append(size)
                p += size
            if p != moved:
                if len(starts) > limit:
                    raise HeapTooBig(f"more than {limit:,} chunks")
                continue
        raw = struct.unpack_from("<Q", window, p + 8 - window_at)[0]
        size = raw & ~SIZE_BITS
        if stops and p % PAGE == 0 and raw & SIZE_BITS == IS_MMAPPED and size % PAGE == 0:
            stopped = True  # a block of its own mapping, merged behind the brk heap
            break
        if size == HEADER and p + 2 * HEADER == ends[at]:
            if sizes and raw & PREV_INUSE:
                used_bytes += sizes[-1]
                used_blocks += 1
            p += 2 * HEADER
            stopped = True
            break
        if size < MIN_CHUNK or size % ALIGN or p + size > end:
            raise CorruptHeap(f"a chunk at {p:#x} reads as {size:,} bytes")
        if sizes and raw & PREV_INUSE:
            used_bytes += sizes[-1]
            used_blocks += 1
        starts.append(p)
        sizes.append(size)
        if len(starts) > limit:
            raise HeapTooBig(f"more than {limit:,} chunks")
        p += size
    if not stopped and p != end and end - p >= MIN_CHUNK:
        raise CorruptHeap(f"the chunk chain ends at {p:#x}, not at the heap's end {end:#x}")
    return _Chunks(starts, sizes, used_bytes, used_blocks, p)


@dataclass(frozen=True)
class Region:
    """Adjacent mappings of private anonymous memory, with the brk heap's among them: one
    piece of address space where chunks may run from one mapping into the next."""

    start: int
    end: int
    ends: tuple[int, ...]  # where each of its mappings ends, in order
    heap: tuple[int, int] | None = None  # the brk heap's mappings in it: (start, end)


def regions(mappings: Iterable[Mapping]) -> list[Region]:
    """The regions of a process's mappings (in address order): readable, private, anonymous
    or the brk heap, runs of them that touch."""
    out: list[Region] = []
    run: list[Mapping] = []

    def close_run() -> None:
        if run:
            heap = [m for m in run if m.name == "[heap]"]
            brk = (heap[0].start, heap[-1].end) if heap else None
            out.append(Region(run[0].start, run[-1].end, tuple(m.end for m in run), brk))
            run.clear()

    for m in mappings:
        if not (m.perms[:1] == "r" and m.perms[3:4] == "p" and (m.anonymous or m.name == "[heap]")):
            close_run()
            continue
        if run and run[-1].end != m.start:
            close_run()
        run.append(m)
    close_run()
    return out


@dataclass
class _Budget:
    """What a walk may still do before it gives up (HeapTooBig)."""

    chunks: int
    pages: int = field(default_factory=lambda: SCAN_PAGES)

    def walked(self, chunks: _Chunks) -> None:
        self.chunks -= len(chunks.starts)

    def read(self, pages: int) -> None:
        self.pages -= pages
        if self.pages < 0:
            raise HeapTooBig(f"more than {SCAN_PAGES:,} pages of anonymous memory to search")


@dataclass
class _Layout:
    """What one region holds, as its last walk found it."""

    heaps: list[tuple[int, int, str]] = field(default_factory=list)  # (heap start, first, how)
    mmapped: list[tuple[int, int]] = field(default_factory=list)  # (chunk, length), in order
    snapshot: object = None  # the mappings it was found in


class GlibcHeap:
    """Lookups of one process's glibc heap. What each region of memory holds is kept between
    lookups of one snapshot of the mappings, and found again where a chunk no longer reads
    as it did (freed, split or merged) or a lookup misses in an older snapshot's."""

    def __init__(self, mem: MemoryReader) -> None:
        self.mem = mem
        self._heaps: dict[int, _Chunks] = {}  # first chunk -> the chunks of its heap
        self._arenas: dict[int, tuple[int, int, int]] = {}  # heap -> (info size, first, end)
        self._layouts: dict[Region, _Layout] = {}
        self._snapshot: Sequence[Mapping] | None = None
        self._regions: list[Region] = []

    def find(self, addr: int, mappings: Sequence[Mapping]) -> Allocation | NotFound | None:
        """The malloc'ed block holding `addr`, given the process's mappings (in address
        order); NotFound with why when the heap cannot be read as glibc's; None when `addr`
        is not in glibc's memory."""
        try:
            region = self._region(addr, mappings)
            if region is None:
                return None
            layout = self._layouts.get(region)
            if layout is not None:
                try:
                    found = self._look_up(addr, layout, check=True)
                except _Changed:
                    pass
                else:
                    if found is not None or layout.snapshot is mappings:
                        return found
            layout = self._layouts[region] = self._lay_out(region, _Budget(MAX_CHUNKS))
            layout.snapshot = mappings
            return self._look_up(addr, layout, check=False)
        except (CorruptHeap, MemoryReadError) as exc:
            return NotFound(f"glibc's heap could not be read: {exc}")

    def in_use(self, mappings: list[Mapping], limit: int = SUM_CHUNKS) -> tuple[int, int]:
        """(bytes, blocks) of every chunk in use in the process's glibc heaps: the brk heap,
        the thread arenas' heaps, blocks of their own mappings. A chunk's bytes are its
        size: the request plus 8, rounded up to 16 (32 at least); a block of its own
        mapping, the mapping's. CorruptHeap or MemoryReadError when a heap does not read
        as glibc's (or changed under the walk); HeapTooBig past `limit` chunks in all
        (~0.65 us each) or SCAN_PAGES pages searched."""
        used = blocks = 0
        budget = _Budget(limit)
        for region in regions(mappings):
            layout = self._lay_out(region, budget)
            for _heap, first, _how in layout.heaps:
                chunks = self._heaps[first]
                used, blocks = used + chunks.used_bytes, blocks + chunks.used_blocks
            used += sum(length for _chunk, length in layout.mmapped)
            blocks += len(layout.mmapped)
        return used, blocks

    def chunks(
        self, mappings: list[Mapping], limit: int = MAX_CHUNKS
    ) -> tuple[list[tuple[int, int, list[int], list[int], int]], list[tuple[int, int]]]:
        """Every heap's chunks, walked now, for walkers that read the whole heap
        (probes.attach.owned): [(heap start, first chunk, chunk starts, chunk sizes, where
        the chain ended)] and the blocks of their own mapping [(chunk, length)]; raises as
        in_use() does."""
        heaps: list[tuple[int, int, list[int], list[int], int]] = []
        blocks: list[tuple[int, int]] = []
        budget = _Budget(limit)
        for region in regions(mappings):
            layout = self._lay_out(region, budget)
            for heap, first, _how in layout.heaps:
                walked = self._heaps[first]
                heaps.append((heap, first, walked.starts, walked.sizes, walked.end))
            blocks += layout.mmapped
        return heaps, blocks

    def _region(self, addr: int, mappings: Sequence[Mapping]) -> Region | None:
        if mappings is not self._snapshot:
            self._snapshot = mappings  # held, so that it is not another list of the same id
            self._regions = regions(mappings)
            live = set(self._regions)
            self._layouts = {r: lay for r, lay in self._layouts.items() if r in live}
        i = bisect.bisect_right(self._regions, addr, key=lambda r: r.start) - 1
        return self._regions[i] if i >= 0 and addr < self._regions[i].end else None

    def _lay_out(self, region: Region, budget: _Budget) -> _Layout:
        """Walk `region`: the brk heap's chain, the thread arenas' heaps, and a search of
        the rest for blocks of their own mapping."""
        layout = _Layout()
        p = region.start
        if region.heap is not None:
            start, end = region.heap
            if p < start:
                self._search(p, start, budget, layout)
            # the chain may run on into the mappings after the brk heap's (a forked child's
            # heap grown by brk), and ends at one of their boundaries at the latest
            stops = [e for e in region.ends if e >= end]
            chunks = walk_chunks(self.mem, start, region.end, budget.chunks, stops)
            budget.walked(chunks)
            self._heaps[start] = chunks
            layout.heaps.append((start, start, "glibc"))
            p = -(-chunks.end // PAGE) * PAGE
        self._search(p, region.end, budget, layout)
        return layout

    def _search(self, lo: int, hi: int, budget: _Budget, layout: _Layout) -> None:
        """Thread arenas' heaps and blocks of their own mapping in [lo, hi): each page that
        holds memory is read, except those inside what was found already."""
        if lo >= hi:
            return
        pages = self.mem.touched_pages(lo, hi)
        budget.read((hi - lo) // PAGE // PAGEMAP_PAGES_PER_READ)
        i = 0
        while i < len(pages):
            p = pages[i]
            after = p + PAGE
            arena = self._arena_at(p, hi, budget) if p % HEAP_MAX == 0 else None
            if arena is not None:
                first, end = arena
                layout.heaps.append((p, first, "glibc thread arena"))
                after = -(-end // PAGE) * PAGE
            else:
                budget.read(1)
                length = self._block_at(p, hi)
                if length:
                    layout.mmapped.append((p, length))
                    after = p + length
            i = bisect.bisect_left(pages, after, i + 1)

    def _block_at(self, p: int, hi: int) -> int:
        """The length of the block of its own mapping that starts at page `p` (its mapping
        not past `hi`), or 0."""
        prev_size, size = struct.unpack("<QQ", self.mem.read(p, HEADER))
        length = size & ~SIZE_BITS
        if (
            prev_size != 0
            or size & SIZE_BITS != IS_MMAPPED
            or length < PAGE
            or length % PAGE
            or p + length > hi
        ):
            return 0
        # a block never holds an arena's heap (a page of a block's data could read as a
        # header: then the heap is what the kernel says is there)
        h = (p + HEAP_MAX) & ~(HEAP_MAX - 1)
        while h < p + length:
            if self._heap_info(h) is not None:
                return 0
            h += HEAP_MAX
        return length

    def _heap_info(self, h: int) -> tuple[int, int] | None:
        """(ar_ptr, size) of the heap_info at `h` (HEAP_MAX-aligned), if it reads as one:
        its arena's malloc_state follows the first heap_info of that arena, sizes are whole
        pages within HEAP_MAX, prev is another heap or none."""
        try:
            ar_ptr, prev, size, mprotect = struct.unpack("<QQQQ", self.mem.read(h, 32))
        except MemoryReadError:
            return None
        if (
            ar_ptr % HEAP_MAX not in HEAP_INFO_SIZES
            or prev % HEAP_MAX
            or not 0 < size <= mprotect <= HEAP_MAX
            or size % PAGE
            or mprotect % PAGE
        ):
            return None
        return ar_ptr, size

    def _arena_at(self, h: int, hi: int, budget: _Budget) -> tuple[int, int] | None:
        """(first chunk, end) of the thread-arena heap at `h` (its chunks walked), or None."""
        info = self._heap_info(h)
        if info is None:
            return None
        ar_ptr, size = info
        if h + size > hi:
            return None
        known = self._arenas.get(h)
        sizes = [known[0]] if known is not None else list(HEAP_INFO_SIZES)
        why: CorruptHeap | None = None
        for info_size in sizes:
            if ar_ptr == h + info_size:  # the arena's first heap: its malloc_state first
                first = (ar_ptr + MALLOC_STATE + ALIGN - 1) & ~(ALIGN - 1)
            else:
                first = h + info_size
            try:
                chunks = walk_chunks(self.mem, first, h + size, budget.chunks)
            except HeapTooBig:
                raise
            except CorruptHeap as exc:
                why = exc
                continue
            budget.walked(chunks)
            self._heaps[first] = chunks
            self._arenas[h] = (info_size, first, h + size)
            return first, h + size
        # a heap_info as glibc writes it, and no chain after it: the heap changed under
        # the walk, or it is not glibc's as this walker knows it
        raise CorruptHeap(f"a thread arena's heap at {h:#x}: {why}")

    def _look_up(self, addr: int, layout: _Layout, check: bool) -> Allocation | NotFound | None:
        """The block holding `addr` in `layout`, None if none does; with `check`, _Changed
        when that block no longer reads as it did."""
        for heap, first, how in layout.heaps:
            chunks = self._heaps[first]
            if not heap <= addr < chunks.end:
                continue
            found = chunks.holding(addr)
            if found is None:  # an arena's heap_info or malloc_state
                return NotFound("inside glibc's heap but in no chunk")
            start, size = found
            if check and not self._still(start, size):
                raise _Changed
            # an in-use chunk's block runs from after its header over the next chunk's
            # prev_size
            return Allocation(start + HEADER, size - 8, how)
        i = bisect.bisect_right(layout.mmapped, (addr, 1 << 64)) - 1
        if i >= 0 and addr < sum(layout.mmapped[i]):
            chunk, length = layout.mmapped[i]
            if check and not self._still(chunk, length, IS_MMAPPED):
                raise _Changed
            return Allocation(chunk + HEADER, length - HEADER, "glibc mmap")
        return None

    def _still(self, start: int, size: int, flags: int | None = None) -> bool:
        raw = struct.unpack("<Q", self.mem.read(start + 8, 8))[0]
        return bool(raw & ~SIZE_BITS == size and (flags is None or raw & SIZE_BITS == flags))
