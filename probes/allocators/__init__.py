"""Allocator walkers: the allocation holding an address, read from the allocator's own
structures in the process's memory instead of probes on every malloc and free.

`HeapWalker(pid)` picks the walkers a process needs - Go's heap for a Go binary, glibc's for
a program that uses glibc malloc - and falls back to the mapping an address lies in. A
process that links another allocator (jemalloc, tcmalloc, mimalloc) has no walker here: the
recorder probes that allocator instead (`method` says which was used).
"""

from __future__ import annotations

from collections.abc import Iterable

from probes.allocators.base import Allocation, Mappings, NotFound
from probes.allocators.glibc import CorruptHeap, GlibcHeap, HeapTooBig
from probes.allocators.go import GoHeap
from probes.golang import GoLayoutError, NotGo, binary_of, load_bias
from probes.process_memory import MemoryReadError, ProcessMemory

OTHER_ALLOCATORS = ("libjemalloc", "libtcmalloc", "libmimalloc")


def other_allocator(mappings: Mappings) -> str | None:
    """The allocator library (other than glibc's) a process maps, if any."""
    for lib in sorted(mappings.libraries()):
        if any(name in lib.rsplit("/", 1)[-1] for name in OTHER_ALLOCATORS):
            return lib
    return None


class HeapWalker:
    """Finds allocations in one process's memory. `method`: "walk:go+glibc",
    "walk:glibc" or "probes:<library>" (this walker cannot read that allocator)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.mem = ProcessMemory(pid)
        mappings = Mappings(pid)
        self.go: GoHeap | None = None
        self.go_why: str | None = None
        try:
            binary = binary_of(pid)
            self.go = GoHeap(self.mem, binary, load_bias(pid, binary))
        except NotGo:
            pass
        except GoLayoutError as exc:
            self.go_why = f"a Go binary whose heap cannot be read: {exc}"
        self.glibc = GlibcHeap(self.mem)
        other = other_allocator(mappings)
        self.method = f"probes:{other}" if other else ("walk:go+glibc" if self.go else "walk:glibc")

    @property
    def walks(self) -> bool:
        return self.method.startswith("walk")

    def find(self, addrs: Iterable[int]) -> dict[int, Allocation | NotFound]:
        """The allocation (or the program's own mapping) holding each address."""
        try:
            mappings = Mappings(self.pid)
        except OSError as exc:
            return {a: NotFound(f"the process is gone: {exc.strerror}") for a in addrs}
        out: dict[int, Allocation | NotFound] = {}
        for addr in addrs:
            out[addr] = self._one(addr, mappings)
        return out

    def _one(self, addr: int, mappings: Mappings) -> Allocation | NotFound:
        mapping = mappings.holding(addr)
        if mapping is None:
            return NotFound("in no mapping of the process (unmapped since)")
        if self.go is not None:
            found = self.go.find(addr)
            if found is not None:
                return found
        elif self.go_why and mapping.anonymous:
            return NotFound(self.go_why)
        try:
            glibc = self.glibc.find(addr, mappings.all)
        except MemoryReadError as exc:
            return NotFound(f"unreadable: {exc}")
        if glibc is not None:
            return glibc
        # not an allocator's memory: a mapping the program made itself (anonymous, shared
        # /dev/zero, a file, a thread's stack)
        return Allocation(mapping.start, mapping.end - mapping.start, "mapping")

    def in_use(self) -> tuple[int, int] | str:
        """(bytes, blocks) in use in the whole heap now, or why that cannot be known. Only
        glibc's heap is summed; a Go heap's totals are not walked (RSS stands for them)."""
        if not self.walks:
            return f"the heap of {self.method.split(':', 1)[1]} is not walked"
        if self.go is not None:
            return "a Go heap's totals are not walked"
        try:
            return self.glibc.in_use(Mappings(self.pid).all)
        except OSError as exc:
            return f"the process is gone: {exc.strerror}"
        except HeapTooBig as exc:
            return f"not summed: a heap of {exc} (record with --alloc-probes to fit it)"
        except (CorruptHeap, MemoryReadError) as exc:
            return f"glibc's heap could not be read: {exc}"

    def close(self) -> None:
        self.mem.close()
