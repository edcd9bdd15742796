"""Reading another process's memory through /proc/PID/mem: never writing it, never stopping it.

The process runs on while it is read, so anything read can be stale or torn: readers that
follow pointers validate what they find (in range, aligned, consistent) and treat a failed
read as "unknown", never as zero.
"""

from __future__ import annotations

import os
import struct

from probes.format.errors import RecordError


class MemoryReadError(RecordError):
    """A range of the process's memory could not be read (unmapped now, or the process
    exited)."""


class ProcessMemory:
    def __init__(self, pid: int) -> None:
        self.pid = pid
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

    def u64(self, addr: int) -> int:
        return int(struct.unpack("<Q", self.read(addr, 8))[0])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ProcessMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
