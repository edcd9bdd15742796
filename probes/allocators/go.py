"""Go's heap, read from the outside: the object that holds an address, from the runtime's
spans (mheap_.arenas -> heapArena.spans -> mspan), laid out by the binary's DWARF."""

from __future__ import annotations

import struct

from probes.allocators.base import Allocation, NotFound
from probes.golang import M_SPAN_IN_USE, GoBinary
from probes.process_memory import MemoryReadError, ProcessMemory


class GoHeap:
    def __init__(self, mem: ProcessMemory, binary: GoBinary, bias: int) -> None:
        self.mem, self.binary, self.bias = mem, binary, bias

    def find(self, addr: int) -> Allocation | NotFound | None:
        """The Go object holding `addr`; None if `addr` is not in the Go heap."""
        layout = self.binary.heap
        if layout is None or not self.binary.mheap:
            return NotFound("this Go runtime's heap layout is not understood")
        index = ((addr - layout.base_offset) % (1 << 64)) // layout.arena_bytes
        l1 = index >> layout.l2_bits if layout.l1_bits else 0
        l2 = index & ((1 << layout.l2_bits) - 1)
        try:
            l2_array = self.mem.u64(self.binary.mheap + self.bias + layout.arenas + 8 * l1)
            if not l2_array:
                return None
            arena = self.mem.u64(l2_array + 8 * l2)
            if not arena:
                return None
            page = (addr // layout.page_size) % layout.pages_per_arena
            span = self.mem.u64(arena + layout.spans + 8 * page)
            if not span:
                return None
            start, npages = (
                struct.unpack("<QQ", self.mem.read(span + layout.start_addr, 16))
                if layout.npages == layout.start_addr + 8
                else (
                    self.mem.u64(span + layout.start_addr),
                    self.mem.u64(span + layout.npages),
                )
            )
            elemsize = self.mem.u64(span + layout.elemsize)
            if (
                layout.state is not None
                and self.mem.read(span + layout.state, 1)[0] != M_SPAN_IN_USE
            ):
                return None  # a free or stack span: not a heap object
        except MemoryReadError as exc:
            return NotFound(f"the Go heap could not be read: {exc}")
        end = start + npages * layout.page_size
        if not (start <= addr < end) or not 0 < elemsize <= end - start:
            return NotFound(f"the Go span at {span:#x} does not hold {addr:#x} as read")
        base = start + (addr - start) // elemsize * elemsize
        return Allocation(base, elemsize, "go")
