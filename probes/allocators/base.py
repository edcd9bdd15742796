"""What the allocator walkers share: the allocation found, the mappings of a process."""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class Allocation:
    """A block as its allocator handed it out: its address, its usable size, and whose."""

    addr: int
    size: int
    allocator: str  # "glibc", "glibc thread arena", "glibc mmap", "go", "mapping"


@dataclass(frozen=True)
class NotFound:
    """An address whose allocation could not be told, and why."""

    why: str


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    inode: int
    name: str  # path, "[heap]", "[stack]", "" (anonymous)...

    @property
    def anonymous(self) -> bool:
        """Private anonymous memory, where allocators keep arenas and big blocks."""
        return self.inode == 0 and (not self.name or self.name.startswith("[anon"))


class Mappings:
    """A process's /proc/PID/maps, for lookups by address."""

    def __init__(self, pid: int) -> None:
        self.all: list[Mapping] = []
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 5:
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                name = parts[5].strip() if len(parts) > 5 else ""
                self.all.append(Mapping(lo, hi, parts[1], int(parts[4]), name))
        self._starts = [m.start for m in self.all]

    def holding(self, addr: int) -> Mapping | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        return self.all[i] if i >= 0 and addr < self.all[i].end else None

    def libraries(self) -> set[str]:
        return {m.name for m in self.all if m.name.startswith("/")}
