"""probes.allocators.glibc on fake process memory: blocks of their own mapping wherever the
kernel merged their mapping, the brk heap across adjacent mappings, thread arenas, exact sums
(no root: the memory is built here, laid out as glibc lays it out)."""

from __future__ import annotations

import struct

import pytest

from probes.allocators.base import Allocation, Mapping, NotFound
from probes.allocators.glibc import (
    HEAP_MAX,
    IS_MMAPPED,
    MALLOC_STATE,
    PREV_INUSE,
    GlibcHeap,
    HeapTooBig,
)
from probes.process_memory import PAGE, MemoryReadError

NON_MAIN_ARENA = 0x4


class FakeMemory:
    """A process's memory as /proc/PID/mem and /proc/PID/pagemap show it: the pages written
    hold their bytes, the others of a mapping read as zeros (and are not touched pages);
    reads outside every mapping fail. Reads of untouched pages are counted: the real ones
    would map pages into the process."""

    def __init__(self, mappings: list[Mapping]) -> None:
        self.mappings = mappings
        self.pages: dict[int, bytearray] = {}
        self.untouched_reads = 0
        self.reads = 0

    def write(self, addr: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            page = self.pages.setdefault((addr + i) // PAGE * PAGE, bytearray(PAGE))
            page[(addr + i) % PAGE] = byte

    def words(self, addr: int, *values: int) -> None:
        self.write(addr, struct.pack(f"<{len(values)}Q", *values))

    def read(self, addr: int, size: int) -> bytes:
        self.reads += 1
        if not any(m.start <= addr and addr + size <= m.end for m in self._runs()):
            raise MemoryReadError(f"no memory at {addr:#x}")
        out = bytearray()
        for page_at in range(addr // PAGE * PAGE, addr + size, PAGE):
            page = self.pages.get(page_at)
            if page is None:
                self.untouched_reads += 1
                page = bytearray(PAGE)
            out += page
        offset = addr % PAGE
        return bytes(out[offset : offset + size])

    def touched_pages(self, start: int, end: int) -> list[int]:
        return sorted(p for p in self.pages if start <= p < end)

    def _runs(self) -> list[Mapping]:
        """Adjacent mappings as one (a read may cross from one into the next)."""
        runs: list[Mapping] = []
        for m in sorted(self.mappings, key=lambda m: m.start):
            if runs and runs[-1].end == m.start:
                runs[-1] = Mapping(runs[-1].start, m.end, "", 0, "")
            else:
                runs.append(m)
        return runs


def anon(start: int, end: int, perms: str = "rw-p") -> Mapping:
    return Mapping(start, end, perms, 0, "")


def heap(start: int, end: int) -> Mapping:
    return Mapping(start, end, "rw-p", 0, "[heap]")


def block(mem: FakeMemory, at: int, length: int) -> None:
    """A block of its own mapping at page `at`, as sysmalloc_mmap writes it; its data
    touched on every page, with words that read as a header at some (inside the block,
    they are data)."""
    mem.words(at, 0, length | IS_MMAPPED)
    for page in range(at + PAGE, at + length, PAGE):
        mem.words(page, 0, PAGE | IS_MMAPPED)


def chain(mem: FakeMemory, first: int, sizes: list[int], free: set[int], flags: int = 0) -> int:
    """Chunks of `sizes` from `first`, those whose index is in `free` free, the last one the
    top chunk (free); each header's PREV_INUSE tells whether the one before is in use.
    Returns the bytes in use."""
    p, used = first, 0
    for i, size in enumerate(sizes):
        before_used = i == 0 or (i - 1) not in free
        mem.words(p + 8, size | flags | (PREV_INUSE if before_used else 0))
        if i < len(sizes) - 1 and i not in free:
            used += size
        p += size
    return used


def non_chunk_memory(mem: FakeMemory, start: int, end: int) -> None:
    """Memory that is not malloc's (an interpreter's arena, a thread's stack): pointers,
    counters, and words that almost read as a block's header."""
    almost = [
        (0, 0),  # zeros
        (7, 3 * PAGE | IS_MMAPPED),  # prev_size not 0
        (0, 3 * PAGE | IS_MMAPPED | PREV_INUSE),  # other flags
        (0, 100 | IS_MMAPPED),  # not whole pages
    ]
    for i, page in enumerate(range(start, end, PAGE)):
        mem.words(page, *(almost[i] if i < len(almost) else (1, 0x7F00_0000_1230)))


# One merged mapping as the kernel leaves it: another library's memory (5 pages touched,
# then 3 never touched), a block of 59 pages (the list's block of the BPF test), two blocks of
# 37 and 13 pages made one after the other, then 11 pages of a thread's stack.
LO = 0x7F12_3450_0000
OTHER, UNTOUCHED, LIST_BLOCK, BLOCK_B, BLOCK_C, STACK = (
    5 * PAGE,
    3 * PAGE,
    59 * PAGE,
    37 * PAGE,
    13 * PAGE,
    11 * PAGE,
)


def merged() -> tuple[FakeMemory, list[Mapping], dict[str, int]]:
    at = {"list": LO + OTHER + UNTOUCHED}
    at["b"] = at["list"] + LIST_BLOCK
    at["c"] = at["b"] + BLOCK_B
    at["stack"] = at["c"] + BLOCK_C
    end = at["stack"] + STACK
    mappings = [anon(LO, end)]
    mem = FakeMemory(mappings)
    non_chunk_memory(mem, LO, LO + OTHER)
    block(mem, at["list"], LIST_BLOCK)
    block(mem, at["b"], BLOCK_B)
    block(mem, at["c"], BLOCK_C)
    non_chunk_memory(mem, at["stack"], end)
    return mem, mappings, at


def test_blocks_behind_other_memory_in_a_merged_mapping_are_all_summed() -> None:
    mem, mappings, _at = merged()
    walk = GlibcHeap(mem)
    assert walk.in_use(mappings) == (LIST_BLOCK + BLOCK_B + BLOCK_C, 3)
    assert mem.untouched_reads == 0  # pages never touched are not read
    # one read per page holding memory outside the blocks (5 + 11) and one per block
    assert mem.reads == 5 + 11 + 3


def test_a_block_behind_other_memory_is_found_by_address() -> None:
    mem, mappings, at = merged()
    walk = GlibcHeap(mem)
    inside = at["list"] + 23 * PAGE + 17
    assert walk.find(inside, mappings) == Allocation(at["list"] + 16, LIST_BLOCK - 16, "glibc mmap")
    assert walk.find(at["c"] + 16, mappings) == Allocation(at["c"] + 16, BLOCK_C - 16, "glibc mmap")
    # the other memory is no block of malloc's
    assert walk.find(LO + 2 * PAGE + 8, mappings) is None
    assert walk.find(at["stack"] + 3 * PAGE, mappings) is None
    reads = mem.reads
    walk.find(at["b"] + 99, mappings)  # the same snapshot: its header read again, no search
    assert mem.reads == reads + 1


def test_a_block_found_before_that_changed_is_found_again() -> None:
    mem, mappings, at = merged()
    walk = GlibcHeap(mem)
    walk.find(at["b"] + 16, mappings)
    # block B freed, and two blocks of 29 and 8 pages made in its place: the kernel keeps
    # the one mapping
    block(mem, at["b"], 29 * PAGE)
    block(mem, at["b"] + 29 * PAGE, 8 * PAGE)
    later = list(mappings)
    assert walk.find(at["b"] + 31 * PAGE, later) == Allocation(
        at["b"] + 29 * PAGE + 16, 8 * PAGE - 16, "glibc mmap"
    )
    assert walk.in_use(later) == (LIST_BLOCK + 29 * PAGE + 8 * PAGE + BLOCK_C, 4)


def test_a_block_alone_in_its_mapping_and_one_past_a_guard() -> None:
    """The plain case (a block is its mapping), and a mapping the walk must not read into:
    a guard page (no access) ends what a block can span."""
    lo = 0x7F00_0000_0000
    mappings = [anon(lo, lo + 31 * PAGE), anon(lo + 31 * PAGE, lo + 32 * PAGE, "---p")]
    mem = FakeMemory(mappings)
    block(mem, lo, 31 * PAGE)
    # a second mapping, after the guard: a block claiming more than its mapping
    mappings.append(anon(lo + 32 * PAGE, lo + 35 * PAGE))
    mem.words(lo + 32 * PAGE, 0, 7 * PAGE | IS_MMAPPED)
    assert GlibcHeap(mem).in_use(mappings) == (31 * PAGE, 1)


# The brk heap of a forked child grown by brk: two mappings, one chunk across the boundary
# (13,536 bytes, as in a PostgreSQL backend), the top chunk at the end.
HEAP_LO = 0x5555_5600_0000
HEAP_SIZES = [0x290, 13_536, *([112] * 23), 0x2010, 4_096, 1_040]


def forked_heap(second: str) -> tuple[FakeMemory, list[Mapping], int, int]:
    """`second`: how /proc/PID/maps names the mapping the heap grew into."""
    free = {3, 7}
    top = 16 * PAGE - sum(HEAP_SIZES[:-1])
    sizes = [*HEAP_SIZES[:-1], top]
    boundary = HEAP_LO + 3 * PAGE
    mappings = [heap(HEAP_LO, boundary), Mapping(boundary, HEAP_LO + 16 * PAGE, "rw-p", 0, second)]
    mem = FakeMemory(mappings)
    used = chain(mem, HEAP_LO, sizes, free)
    # the chunk of 13,536 bytes runs from the first mapping into the second
    assert HEAP_LO + 0x290 < boundary < HEAP_LO + 0x290 + 13_536
    return mem, mappings, used, len(sizes) - 1 - len(free)


@pytest.mark.parametrize("second", ["[heap]", ""], ids=["labelled", "anonymous"])
def test_the_brk_heap_is_followed_across_adjacent_mappings(second: str) -> None:
    mem, mappings, used, blocks = forked_heap(second)
    walk = GlibcHeap(mem)
    assert walk.in_use(mappings) == (used, blocks)
    # a chunk wholly in the second mapping: the 23rd of 112 bytes
    at = HEAP_LO + sum(HEAP_SIZES[:24])
    assert at >= HEAP_LO + 3 * PAGE
    assert walk.find(at + 50, mappings) == Allocation(at + 16, 112 - 8, "glibc")
    crossing = HEAP_LO + 0x290
    assert walk.find(HEAP_LO + 3 * PAGE + 5, mappings) == Allocation(
        crossing + 16, 13_536 - 8, "glibc"
    )


def test_the_brk_heap_ends_where_its_mapping_does_and_what_follows_is_searched() -> None:
    """The top chunk ends with the [heap] mapping; the adjacent anonymous mapping is not the
    heap's (a block of its own mapping first, then memory of no allocator's)."""
    sizes = [0x290, 112, 224, 8 * PAGE - 0x290 - 112 - 224]
    end = HEAP_LO + 8 * PAGE
    mappings = [heap(HEAP_LO, end), anon(end, end + 19 * PAGE)]
    mem = FakeMemory(mappings)
    used = chain(mem, HEAP_LO, sizes, set())
    block(mem, end, 17 * PAGE)
    non_chunk_memory(mem, end + 17 * PAGE, end + 19 * PAGE)
    walk = GlibcHeap(mem)
    assert walk.in_use(mappings) == (used + 17 * PAGE, 3 + 1)
    assert walk.find(end + 16, mappings) == Allocation(end + 16, 17 * PAGE - 16, "glibc mmap")


def test_a_block_merged_into_the_brk_heaps_mapping_ends_the_chain() -> None:
    """A block of its own mapping right after the brk heap, merged into the same mapping:
    the chain ends at its page (no chunk of the brk heap has IS_MMAPPED set)."""
    sizes = [0x290, 112, 112, 6 * PAGE - 0x290 - 224]
    brk = HEAP_LO + 6 * PAGE
    mappings = [heap(HEAP_LO, brk + 41 * PAGE)]
    mem = FakeMemory(mappings)
    used = chain(mem, HEAP_LO, sizes, set())
    block(mem, brk, 41 * PAGE)
    walk = GlibcHeap(mem)
    assert walk.in_use(mappings) == (used + 41 * PAGE, 3 + 1)
    assert walk.find(brk + 99, mappings) == Allocation(brk + 16, 41 * PAGE - 16, "glibc mmap")


def arena_heap(mem: FakeMemory, h: int, size: int, first_heap: int, fenceposts: bool) -> int:
    """A thread arena's heap at `h` (glibc 2.35+: a heap_info of 48 bytes); the arena's
    first heap at `first_heap`. Returns the bytes in use."""
    mem.words(h, first_heap + 48, 0 if h == first_heap else first_heap, size, size, PAGE, 0)
    first = (first_heap + 48 + MALLOC_STATE + 15) & ~15 if h == first_heap else h + 48
    if h == first_heap:
        mem.words(first_heap + 48, 0, 1)  # the malloc_state
    room = h + size - first
    if not fenceposts:
        sizes = [1_040, 112, 112, 4_112, room - 1_040 - 224 - 4_112]
        return chain(mem, first, sizes, {2}, NON_MAIN_ARENA)
    # the heap the arena left for a new one: its old top freed, glibc's fenceposts after it
    sizes = [1_040, 112, room - 1_040 - 112 - 32, 16]
    return chain(mem, first, [*sizes, 0], {2}, NON_MAIN_ARENA) - 16  # fenceposts: no blocks


def test_thread_arenas_inside_merged_mappings_and_with_fenceposts() -> None:
    """An arena's first heap whose mapping the kernel merged behind a block of its own
    mapping (the heap does not begin its line of /proc/PID/maps), and the arena's older
    heap, which ends in glibc's fenceposts."""
    h1 = 0x7F00_0000_0000 + 3 * HEAP_MAX
    h2 = h1 + 2 * HEAP_MAX
    mappings = [
        anon(h1 - 7 * PAGE, h1 + 33 * PAGE),
        anon(h1 + 33 * PAGE, h1 + HEAP_MAX, "---p"),
        anon(h2, h2 + 16 * PAGE),
        anon(h2 + 16 * PAGE, h2 + HEAP_MAX, "---p"),
    ]
    mem = FakeMemory(mappings)
    block(mem, h1 - 7 * PAGE, 7 * PAGE)
    used1 = arena_heap(mem, h1, 33 * PAGE, h1, fenceposts=True)
    used2 = arena_heap(mem, h2, 16 * PAGE, h1, fenceposts=False)
    walk = GlibcHeap(mem)
    assert walk.in_use(mappings) == (7 * PAGE + used1 + used2, 1 + 2 + 3)
    first = (h1 + 48 + MALLOC_STATE + 15) & ~15
    assert walk.find(first + 1_040 + 20, mappings) == Allocation(
        first + 1_040 + 16, 104, "glibc thread arena"
    )
    assert walk.find(h1 + 100, mappings) == NotFound("inside glibc's heap but in no chunk")
    assert walk.find(h1 - 7 * PAGE + 16, mappings) == Allocation(
        h1 - 7 * PAGE + 16, 7 * PAGE - 16, "glibc mmap"
    )


def test_a_search_past_its_page_budget_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    from probes.allocators import glibc

    mem, mappings, _at = merged()
    monkeypatch.setattr(glibc, "SCAN_PAGES", 13)
    with pytest.raises(HeapTooBig, match="13 pages"):
        GlibcHeap(mem).in_use(mappings)
    found = GlibcHeap(mem).find(LO + 2 * PAGE, mappings)
    assert isinstance(found, NotFound) and "13 pages" in found.why
