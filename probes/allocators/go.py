"""Go's heap, read from the outside: the object that holds an address (find), and every live
object of the heap at once (objects), from the runtime's spans (mheap_.arenas ->
heapArena.spans -> mspan), laid out by the binary's DWARF.

An object is allocated, as the runtime itself tells (mspan.isFree, runtime/mbitmap.go), when
its index in its span is below the span's freeindex (handed out since the span was last
swept: the allocator moves freeindex past every slot it gives, and does not touch allocBits)
or its bit in allocBits is set (alive at the last sweep, which makes allocBits the mark bits
and resets freeindex to 0). allocCache is only the allocator's shifted, inverted copy of
allocBits from freeindex on: it says nothing the two do not. So a span not swept since the
last GC still counts the objects that GC found dead as allocated - as runtime.MemStats'
HeapAlloc does until the sweeper frees them; after runtime.GC() (which sweeps every span)
the two agree. A large object is a span of its own (nelems 1, freeindex 1 once allocated).

The process runs on while it is read: a span whose header no longer agrees with the arena's
page table (or with itself) is skipped and counted as a read that raced, never guessed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from probes.allocators.base import Allocation, NotFound
from probes.golang import M_SPAN_IN_USE, M_SPAN_MANUAL, GoBinary, GoLayoutError, HeapLayout
from probes.process_memory import MemoryReader, MemoryReadError

GATHER_GAP = 64 << 10  # reads of runtime metadata closer than this are made as one
MAX_ARENAS = 1 << 16  # 4 TiB of 64 MiB arenas: past it, mheap_.allArenas is not what it says
MAX_GOROUTINES = 4_000_000
G_RUNNING, G_SYSCALL, G_DEAD = 2, 3, 6  # runtime._Grunning, _Gsyscall, _Gdead
G_SCAN = 0x1000


@dataclass
class GoObjects:
    """Every allocated object of a Go heap, as one read of its spans found them.

    lo (uint64, sorted), hi = lo + elemsize, bytes = elemsize (int64): the objects (the
    runtime's size classes: an object's bytes are its slot, as HeapAlloc counts them);
    noscan: objects of a span the runtime knows holds no pointer ([]byte buffers, strings'
    bytes): a walker need not read their words for edges. extents: the address ranges
    of the spans in use (sorted, merged): the heap, whose free slots hold stale pointers -
    not global roots. stacks: the ranges of the manually managed spans (goroutine stacks,
    and the GC's work buffers): not global roots as a whole either; a goroutine's live part
    is [sp, hi) (GoHeap.goroutines). raced: spans skipped because what was read of them
    did not agree (the process moved on meanwhile)."""

    lo: np.ndarray
    hi: np.ndarray
    bytes: np.ndarray
    noscan: np.ndarray
    extents: list[tuple[int, int]] = field(default_factory=list)
    stacks: list[tuple[int, int]] = field(default_factory=list)
    spans: int = 0  # spans in use read
    raced: int = 0

    def __len__(self) -> int:
        return len(self.lo)


@dataclass(frozen=True)
class GoStack:
    """A goroutine's stack [lo, hi) and its saved stack pointer: [sp, hi) is what it holds
    live while it is not running (status: runtime._G*, without _Gscan)."""

    g: int
    goid: int
    status: int
    sp: int
    lo: int
    hi: int

    @property
    def live(self) -> tuple[int, int] | None:
        """The part of its stack that holds its frames: [sp, hi) if it is parked, the whole
        stack if it runs (its saved sp is stale), None if it is dead."""
        if self.status == G_DEAD or not 0 < self.lo < self.hi:
            return None
        if self.status in (G_RUNNING, G_SYSCALL) or not self.lo <= self.sp <= self.hi:
            return (self.lo, self.hi)
        return (self.sp & ~7, self.hi)


class GoHeap:
    def __init__(self, mem: MemoryReader, binary: GoBinary, bias: int) -> None:
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
            l2_array = _u64(self.mem, self.binary.mheap + self.bias + layout.arenas + 8 * l1)
            if not l2_array:
                return None
            arena = _u64(self.mem, l2_array + 8 * l2)
            if not arena:
                return None
            page = (addr // layout.page_size) % layout.pages_per_arena
            span = _u64(self.mem, arena + layout.spans + 8 * page)
            if not span:
                return None
            start, npages = (
                struct.unpack("<QQ", self.mem.read(span + layout.start_addr, 16))
                if layout.npages == layout.start_addr + 8
                else (
                    _u64(self.mem, span + layout.start_addr),
                    _u64(self.mem, span + layout.npages),
                )
            )
            elemsize = _u64(self.mem, span + layout.elemsize)
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

    # --- every object at once ----------------------------------------------------------------
    def _layout(self) -> HeapLayout:
        layout = self.binary.heap
        if layout is None or not self.binary.mheap:
            raise GoLayoutError("this Go runtime's heap layout is not understood")
        if not layout.enumerable:
            raise GoLayoutError(
                "this Go runtime's DWARF lacks mheap.allArenas or mspan's nelems, freeindex, "
                "allocBits, spanclass or state: its objects cannot be listed"
            )
        return layout

    def arenas(self) -> list[tuple[int, int]]:
        """(arena start address, address of its heapArena) of every arena the heap maps."""
        layout = self._layout()
        assert layout.all_arenas is not None
        mheap = self.binary.mheap + self.bias
        ptr, length = struct.unpack("<QQ", self.mem.read(mheap + layout.all_arenas, 16))
        if length > MAX_ARENAS or (length and not ptr):
            raise GoLayoutError(f"mheap_.allArenas reads {length} arenas at {ptr:#x}")
        if not length:
            return []
        index = np.frombuffer(self.mem.read(ptr, 8 * length), "<u8")
        l1 = index >> np.uint64(layout.l2_bits) if layout.l1_bits else np.zeros_like(index)
        l2 = index & np.uint64((1 << layout.l2_bits) - 1)
        out = []
        l2_arrays: dict[int, int] = {}
        for i, a, b in zip(index.tolist(), l1.tolist(), l2.tolist()):
            if a not in l2_arrays:
                l2_arrays[a] = _u64(self.mem, mheap + layout.arenas + 8 * a)
            if not l2_arrays[a]:
                raise GoLayoutError(f"arena {i} of mheap_.allArenas has no L2 entry")
            arena = _u64(self.mem, l2_arrays[a] + 8 * b)
            if not arena:
                raise GoLayoutError(f"arena {i} of mheap_.allArenas has no heapArena")
            start = (i * layout.arena_bytes + layout.base_offset) % (1 << 64)
            out.append((start, arena))
        return out

    def objects(self) -> GoObjects:
        """Every allocated object of the heap, with the heap's extents and its stack spans.
        GoLayoutError: the layout does not match what is read; MemoryReadError: the runtime
        could not be read (the process exited, or its metadata moved)."""
        layout = self._layout()
        assert layout.nelems is not None and layout.freeindex is not None
        assert layout.alloc_bits is not None and layout.spanclass is not None
        assert layout.state is not None
        page, per_arena = layout.page_size, layout.pages_per_arena
        arenas = self.arenas()
        # every page's span, arena by arena: one read of heapArena.spans each
        table = [
            np.frombuffer(self.mem.read(ha + layout.spans, 8 * per_arena), "<u8")
            for _, ha in arenas
        ]
        if not table:
            empty = np.zeros(0, np.uint64)
            return GoObjects(empty, empty, np.zeros(0, np.int64), np.zeros(0, bool))
        pages = np.concatenate(table)
        spans = np.unique(pages[pages != 0])
        # the span headers (fixalloc'ed side by side: read in a few large reads)
        fields = {
            "start": (layout.start_addr, 8),
            "npages": (layout.npages, 8),
            "nelems": (layout.nelems, 8),
            "freeindex": (layout.freeindex, 8),
            "alloc_bits": (layout.alloc_bits, 8),
            "elemsize": (layout.elemsize, 8),
            "state": (layout.state, 1),
            "spanclass": (layout.spanclass, 1),
        }
        extent = max(off + size for off, size in fields.values())
        raw = _gather(self.mem, spans, np.full(len(spans), extent, np.int64))
        f = {name: _field(raw, off, size) for name, (off, size) in fields.items()}
        start, npages, state = f["start"], f["npages"], f["state"]
        end = start + npages * np.uint64(page)
        # the page table also holds stale pointers (the inner pages of free spans map to any
        # span): a span counts from its own first and last pages, which must map back to it
        # - otherwise it changed (freed, reused) since the page table was read
        claimed = (state == M_SPAN_IN_USE) | (state == M_SPAN_MANUAL)
        head = _page_index(arenas, start, page, per_arena)
        tail = _page_index(arenas, end - np.uint64(1), page, per_arena)
        sane = (npages > 0) & (start % np.uint64(page) == 0) & (head >= 0) & (tail >= 0)
        sane &= (pages[np.maximum(head, 0)] == spans) & (pages[np.maximum(tail, 0)] == spans)
        in_use = sane & (state == M_SPAN_IN_USE)
        manual = sane & (state == M_SPAN_MANUAL)
        nelems, freeindex, elemsize = f["nelems"], f["freeindex"], f["elemsize"]
        fits = (
            (elemsize > 0)
            & (nelems > 0)
            & (nelems * elemsize <= end - start)
            & (freeindex <= nelems)
            & (f["alloc_bits"] != 0)
        )
        raced = int(np.count_nonzero(in_use & ~fits)) + int(np.count_nonzero(claimed & ~sane))
        in_use &= fits
        s_start, s_end = start[in_use], end[in_use]
        s_n, s_free = nelems[in_use].astype(np.int64), freeindex[in_use].astype(np.int64)
        s_size, s_bits = elemsize[in_use], f["alloc_bits"][in_use]
        s_noscan = (f["spanclass"][in_use] & np.uint64(1)) != 0
        # allocBits: one bit per object, read once per span
        nbytes = (s_n + 7) // 8
        bits = _gather(self.mem, s_bits, nbytes, flat=True)
        byte_at = np.zeros(len(s_n) + 1, np.int64)
        np.cumsum(nbytes, out=byte_at[1:])
        flat = np.unpackbits(bits, bitorder="little")
        total = int(s_n.sum())
        span_of = np.repeat(np.arange(len(s_n)), s_n)
        first_obj = np.zeros(len(s_n) + 1, np.int64)
        np.cumsum(s_n, out=first_obj[1:])
        k = np.arange(total, dtype=np.int64) - first_obj[:-1][span_of]
        alive = (k < s_free[span_of]) | (flat[byte_at[:-1][span_of] * 8 + k] != 0)
        span_of, k = span_of[alive], k[alive]
        size = s_size[span_of]
        lo = s_start[span_of] + k.astype(np.uint64) * size
        order = np.argsort(lo, kind="stable")
        lo, size, noscan = lo[order], size[order], s_noscan[span_of][order]
        return GoObjects(
            lo,
            lo + size,
            size.astype(np.int64),
            noscan,
            extents=_merged(s_start, s_end),
            stacks=_merged(start[manual], end[manual]),
            spans=int(np.count_nonzero(in_use)),
            raced=raced,
        )

    # --- the roots ---------------------------------------------------------------------------
    def goroutines(self) -> list[GoStack]:
        """Every goroutine of runtime.allgs with its stack (dead ones included: status
        says)."""
        b, mem = self.binary, self.mem
        count = _u64(mem, b.allglen + self.bias)
        if count > MAX_GOROUTINES:
            raise MemoryReadError(f"runtime.allglen reads {count}: not a count of goroutines")
        array = _u64(mem, b.allgs + self.bias)
        gs = struct.unpack(f"<{count}Q", mem.read(array, 8 * count)) if count else ()
        out = []
        for g in gs:
            try:
                raw = mem.read(g, b.g_size)
            except MemoryReadError:
                continue  # freed meanwhile
            status = struct.unpack_from("<I", raw, b.g_status)[0] & ~G_SCAN
            goid = struct.unpack_from("<q", raw, b.g_goid)[0]
            sp = struct.unpack_from("<Q", raw, b.g_sp)[0]
            lo, hi = struct.unpack_from("<QQ", raw, b.g_stack)
            out.append(GoStack(g, goid, status, sp, lo, hi))
        return out

    def data(self) -> list[tuple[int, int]]:
        """The binary's global variables (.data, .noptrdata, .bss, .noptrbss) as address
        ranges in the process: with the goroutines' stacks, the roots the GC itself scans."""
        return [
            (addr + self.bias, addr + self.bias + size)
            for _name, addr, size in self.binary.data_sections
        ]


def _u64(mem: MemoryReader, addr: int) -> int:
    return int(struct.unpack("<Q", mem.read(addr, 8))[0])


def _page_index(
    arenas: list[tuple[int, int]], addrs: np.ndarray, page: int, per_arena: int
) -> np.ndarray:
    """Each address's row in the concatenated page table of `arenas` (-1: in none)."""
    starts = np.asarray([a for a, _ in arenas], np.uint64)
    order = np.argsort(starts)
    i = np.searchsorted(starts[order], addrs, side="right").astype(np.int64) - 1
    arena = order[np.maximum(i, 0)]
    offset = (addrs - starts[arena]) // np.uint64(page)
    ok = (i >= 0) & (addrs >= starts[arena]) & (offset < np.uint64(per_arena))
    return np.where(ok, arena * per_arena + offset.astype(np.int64), -1)


def _gather(
    mem: MemoryReader, addrs: np.ndarray, sizes: np.ndarray, flat: bool = False
) -> np.ndarray:
    """`sizes[i]` bytes at each `addrs[i]`, read in as few reads as the addresses allow
    (those closer than GATHER_GAP together): rows of a (n, size) uint8 array (one size), or
    their concatenation (`flat`). A run that cannot be read whole is read piece by piece."""
    n = len(addrs)
    addrs = np.asarray(addrs, np.uint64)
    sizes = np.asarray(sizes, np.int64)
    out_at = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=out_at[1:])
    out = np.zeros(int(out_at[-1]), np.uint8)
    if not n:
        return out if flat else out.reshape(0, 0)
    order = np.argsort(addrs, kind="stable")
    a = addrs[order].astype(object)  # Python ints: no overflow in the arithmetic below
    s = sizes[order].tolist()
    run_lo, run_hi, members = int(a[0]), int(a[0]) + s[0], [0]
    runs = []
    for j in range(1, n):
        lo = int(a[j])
        if lo - run_hi <= GATHER_GAP:
            run_hi = max(run_hi, lo + s[j])
            members.append(j)
        else:
            runs.append((run_lo, run_hi, members))
            run_lo, run_hi, members = lo, lo + s[j], [j]
    runs.append((run_lo, run_hi, members))
    for lo, hi, members in runs:
        try:
            block = mem.read(lo, hi - lo)
        except MemoryReadError:
            block = None  # a gap that is not mapped: one read each
        for j in members:
            i, at, size = int(order[j]), int(a[j]), s[j]
            piece = block[at - lo : at - lo + size] if block is not None else mem.read(at, size)
            out[out_at[i] : out_at[i] + size] = np.frombuffer(piece, np.uint8)
    return out if flat else out.reshape(n, int(sizes[0]))


def _field(raw: np.ndarray, offset: int, size: int) -> np.ndarray:
    """A little-endian unsigned field of each row of `raw`, as uint64."""
    part = np.ascontiguousarray(raw[:, offset : offset + size])
    if size == 8:
        return part.view("<u8").reshape(-1).astype(np.uint64)
    return part[:, 0].astype(np.uint64)


def _merged(lo: np.ndarray, hi: np.ndarray) -> list[tuple[int, int]]:
    """The ranges [lo, hi) sorted and merged where they touch."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(zip(lo.tolist(), hi.tolist())):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
