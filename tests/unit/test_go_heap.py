"""Listing every object of a Go heap (probes.allocators.go.GoHeap.objects) on a heap built
by hand in a fake process memory: the runtime's rule for what is allocated (below freeindex,
or its allocBits bit set), large spans, stack spans, the page table's stale entries, and a
span read while it changed."""

from __future__ import annotations

import struct
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from probes.allocators.base import Allocation
from probes.allocators.go import GoHeap, GoStack
from probes.golang import GoLayoutError, HeapLayout
from probes.process_memory import PAGE, MemoryReadError

GO_PAGE = 8192
PER_ARENA = 8
ARENA = 2  # the arena's index: it starts at ARENA * PER_ARENA * GO_PAGE
BASE = ARENA * PER_ARENA * GO_PAGE
MHEAP, L2, HEAP_ARENA, SPANS, BITS, ALL = 0x1000, 0x2000, 0x3000, 0x4000, 0x6000, 0x7000

LAYOUT = HeapLayout(
    arenas=0,
    spans=0,
    start_addr=0,
    npages=8,
    elemsize=40,
    state=48,
    page_size=GO_PAGE,
    arena_bytes=PER_ARENA * GO_PAGE,
    pages_per_arena=PER_ARENA,
    l1_bits=0,
    l2_bits=4,
    base_offset=0,
    all_arenas=16,
    nelems=16,
    freeindex=24,
    alloc_bits=32,
    spanclass=49,
    span_bytes=64,
)


class FakeMemory:
    """Bytes at addresses; reads outside them fail as /proc/PID/mem's do."""

    def __init__(self) -> None:
        self.regions: dict[int, bytearray] = {}

    def put(self, addr: int, data: bytes) -> None:
        self.regions[addr] = bytearray(data)

    def read(self, addr: int, size: int) -> bytes:
        for base, data in self.regions.items():
            if base <= addr and addr + size <= base + len(data):
                return bytes(data[addr - base : addr - base + size])
        raise MemoryReadError(f"no memory at {addr:#x}")

    def touched_pages(self, start: int, end: int) -> list[int]:
        return list(range(start, end, PAGE))


def span(start_page: int, npages: int, elemsize: int, nelems: int, free: int, bits: int,
         state: int = 1, spanclass: int = 2) -> bytes:  # fmt: skip
    header = struct.pack(
        "<QQQQQQBB",
        BASE + start_page * GO_PAGE,
        npages,
        nelems,
        free,
        bits,
        elemsize,
        state,
        spanclass,
    )
    return header.ljust(64, b"\0")


def heap(**changes: Any) -> tuple[GoHeap, FakeMemory]:
    """Pages 0: span A (1 KiB objects: 0-2 handed out since the sweep, 4 and 6 alive at it);
    1-2: span B, one large noscan object; 3: a stack span; 4-5: a free span; 6: a stale
    entry to A; 7: a span whose header no longer says it holds page 7 (it changed)."""
    mem = FakeMemory()
    mem.put(MHEAP, struct.pack("<QQQQ", L2, 0, ALL, 1))  # arenas[0], pad, allArenas {ptr, len}
    mem.put(ALL, struct.pack("<Q", ARENA))
    l2 = [0] * 16
    l2[ARENA] = HEAP_ARENA
    mem.put(L2, struct.pack("<16Q", *l2))
    a, b, c, d, e = (SPANS + 64 * i for i in range(5))
    mem.put(HEAP_ARENA, struct.pack("<8Q", a, b, b, c, d, d, a, e))
    headers = [
        span(0, 1, 1024, 8, 3, BITS),
        span(1, 2, 2 * GO_PAGE, 1, 1, BITS + 8, spanclass=3),
        span(3, 1, GO_PAGE, 1, 0, 0, state=2),
        span(4, 2, 0, 0, 0, 0, state=0),
        span(6, 1, 512, 16, 16, BITS + 16),
    ]
    mem.put(SPANS, b"".join(headers))
    mem.put(BITS, bytes([0b01010010, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
    binary = SimpleNamespace(heap=replace(LAYOUT, **changes), mheap=MHEAP)
    return GoHeap(mem, binary, 0), mem  # type: ignore[arg-type]


def test_every_allocated_object_is_listed_and_nothing_else() -> None:
    go, _ = heap()
    found = go.objects()
    a = [BASE + k * 1024 for k in (0, 1, 2, 4, 6)]  # below freeindex 3, then bits 4 and 6
    large = BASE + GO_PAGE
    assert found.lo.tolist() == [*a, large]
    assert found.lo.dtype == np.uint64 and found.bytes.dtype == np.int64
    assert (found.hi - found.lo).tolist() == found.bytes.tolist() == [1024] * 5 + [2 * GO_PAGE]
    assert found.noscan.tolist() == [False] * 5 + [True]
    assert found.extents == [(BASE, BASE + 3 * GO_PAGE)]  # A and B touch: one extent
    assert found.stacks == [(BASE + 3 * GO_PAGE, BASE + 4 * GO_PAGE)]
    assert found.spans == 2
    assert found.raced == 1  # the span whose header moved; the stale entry to A is no race


def test_find_agrees_with_the_listing() -> None:
    go, _ = heap()
    found = go.objects()
    for lo, size in zip(found.lo.tolist(), found.bytes.tolist()):
        for addr in (lo, lo + size // 2, lo + size - 1):
            assert go.find(addr) == Allocation(lo, size, "go")


def test_a_runtime_whose_dwarf_lacks_a_field_is_told_not_guessed() -> None:
    go, _ = heap(alloc_bits=None)
    with pytest.raises(GoLayoutError, match="cannot be listed"):
        go.objects()


def test_an_arena_list_that_is_not_one_is_a_layout_error() -> None:
    go, mem = heap()
    mem.put(MHEAP, struct.pack("<QQQQ", L2, 0, ALL, 1 << 40))
    with pytest.raises(GoLayoutError, match="allArenas"):
        go.objects()


def test_allocation_bits_that_cannot_be_read_are_a_read_error() -> None:
    go, mem = heap()
    del mem.regions[BITS]
    with pytest.raises(MemoryReadError):
        go.objects()


def test_a_goroutine_s_live_stack() -> None:
    parked = GoStack(g=1, goid=7, status=4, sp=0x1F80, lo=0x1000, hi=0x2000)
    assert parked.live == (0x1F80, 0x2000)
    assert replace(parked, status=2).live == (0x1000, 0x2000)  # running: its sp is stale
    assert replace(parked, status=6).live is None  # dead
    assert replace(parked, sp=0x9000).live == (0x1000, 0x2000)  # an sp off its stack
