"""Reading another process's memory through /proc/PID/mem: never writing it, never stopping it.

The process runs on while it is read, so anything read can be stale or torn: readers that
follow pointers validate what they find (in range, aligned, consistent) and treat a failed
read as "unknown", never as zero.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Protocol

import numpy as np

from probes.format.errors import RecordError

PAGE = mmap.PAGESIZE
PAGEMAP_SPAN = 1 << 16  # pages of /proc/PID/pagemap read at once (512 KiB of entries)


class MemoryReadError(RecordError):
    """A range of the process's memory could not be read (unmapped now, or the process
    exited)."""


class MemoryReader(Protocol):
    """What walkers of a process's memory read it through (ProcessMemory, or a fake in
    tests)."""

    def read(self, addr: int, size: int) -> bytes: ...

    def touched_pages(self, start: int, end: int) -> list[int]: ...


class ProcessMemory:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pagemap = -2  # opened at its first use; -1: cannot be read
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise MemoryReadError(f"cannot read the memory of pid {pid}: {exc.strerror}") from None

    def read(self, addr: int, size: int) -> bytes:
        if addr <= 0 or size < 0 or addr + size >= 1 << 64:
            raise MemoryReadError(f"pid {self.pid}: no memory at {addr:#x}")
        try:
            data = os.pread(self._fd, size, addr)
        except OSError as exc:
            raise MemoryReadError(
                f"pid {self.pid}: cannot read {size} bytes at {addr:#x}: {exc.strerror}"
            ) from None
        if len(data) != size:
            raise MemoryReadError(f"pid {self.pid}: short read at {addr:#x}")
        return data

    def read_into(self, addr: int, buf: memoryview) -> int:
        """Read into `buf` from `addr`: the bytes read, fewer when the memory changed under
        the read (unmapped since) - a read that raced, never an error."""
        try:
            return os.preadv(self._fd, [buf], addr)
        except OSError:
            return 0

    def gone(self) -> bool:
        """Whether the memory this reads is gone: the process exited, or ran another
        program (exec). Its reads then give nothing, where an address it does not map
        fails (EIO)."""
        try:
            return os.pread(self._fd, 1, 0) == b""
        except OSError:
            return False

    def u64(self, addr: int) -> int:
        return int(struct.unpack("<Q", self.read(addr, 8))[0])

    def touched_pages(self, start: int, end: int) -> list[int]:
        """The pages of [start, end) (page-aligned) that hold memory: resident or swapped
        out, as /proc/PID/pagemap tells (bits 63 and 62 of a page's entry). A page never
        touched holds only zeros, and reading it through /proc/PID/mem would map the zero
        page into the process (page tables it did not have): walkers read only these.
        Every page when pagemap cannot be read."""
        if self._pagemap == -2:
            try:
                self._pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._pagemap = -1
        if self._pagemap < 0:
            return list(range(start, end, PAGE))
        pages: list[int] = []
        for lo in range(start // PAGE, end // PAGE, PAGEMAP_SPAN):
            count = min(PAGEMAP_SPAN, end // PAGE - lo)
            try:
                raw = os.pread(self._pagemap, count * 8, lo * 8)
            except OSError as exc:
                raise MemoryReadError(
                    f"pid {self.pid}: cannot read the page map at {lo * PAGE:#x}: {exc.strerror}"
                ) from None
            entries = np.frombuffer(raw, dtype="<u8")
            held = np.flatnonzero(entries >> np.uint64(62))
            pages.extend(((held + lo) * PAGE).tolist())
        return pages

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1

    def __enter__(self) -> ProcessMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
