"""Reads registered provided-buffer rings from the traced process's memory.

User space adds buffers to a ring by writing its memory (struct io_uring_buf entries and the
tail), with no syscall and so no tracepoint; the kernel's side (the head) advances as buffers
are used, which the probes see as completions. The recorder learns each ring's address when it
is registered (a BUFFER_GROUP record) and reads it through /proc/PID/mem at every flush. A
ring registered before the attach is known only by its kernel address (the walk at attach,
probes.attach.uring): it is read from kernel memory instead.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from probes.format.schema import GroupKind, Kind, PostFlag
from probes.process_memory import MemoryReadError, ProcessMemory

Reader = Callable[[int, int], "bytes | None"]  # (address, size) -> bytes, None if unreadable

_ENTRY = struct.Struct("<QIHH")  # struct io_uring_buf {u64 addr; u32 len; u16 bid; u16 resv}
_MAX_ENTRIES = 1 << 15


@dataclass
class _Ring:
    pid: int
    ring: int
    group: int
    addr: int
    entries: int
    read: Reader | None = None  # None: the process's memory at a user address
    sizes: dict[int, int] = field(default_factory=dict)  # buffer id -> length, as last seen


class BufferRingWatcher:
    def __init__(self) -> None:
        self._rings: dict[tuple[int, int, int], _Ring] = {}

    def note(self, records: np.ndarray) -> None:
        """Remember rings registered in these BUFFER_GROUP wire records (those found at
        attach, with no user address, are watched through watch_kernel)."""
        regs = records[
            (records["kind"] == Kind.BUFFER_GROUP)
            & (records["op"] == GroupKind.RING)
            & (records["flags"] & PostFlag.SCANNED == 0)
        ]
        for r in regs:
            key = (int(r["pid"]), int(r["ring"]), int(r["group"]))
            entries = min(int(r["value"]), _MAX_ENTRIES)
            self._rings[key] = _Ring(*key, addr=int(r["addr"]), entries=entries)

    def watch_kernel(
        self, pid: int, ring: int, group: int, addr: int, entries: int, read: Reader
    ) -> None:
        """A ring found at attach: its entries at kernel address `addr`, read with `read`."""
        self._rings[(pid, ring, group)] = _Ring(pid, ring, group, addr, entries, read)

    def snapshot(self, ts_ns: int) -> list[dict[str, int]]:
        """One row per ring still readable: its tail and the buffers seen in it so far."""
        rows = []
        for key, ring in list(self._rings.items()):
            raw = self._entries(ring)
            if raw is None:  # the process or the ring is gone
                del self._rings[key]
                continue
            if len(raw) < _ENTRY.size:
                continue
            tail = _ENTRY.unpack_from(raw, 0)[3]
            for i in range(len(raw) // _ENTRY.size):
                addr, length, bid, _ = _ENTRY.unpack_from(raw, i * _ENTRY.size)
                if addr and length:
                    ring.sizes[bid] = length
            rows.append(
                {
                    "ts_ns": ts_ns,
                    "pid": ring.pid,
                    "ring": ring.ring,
                    "group": ring.group,
                    "entries": ring.entries,
                    "tail": tail,
                    "buffers": len(ring.sizes),
                    "bytes": sum(ring.sizes.values()),
                }
            )
        return rows

    @staticmethod
    def _entries(ring: _Ring) -> bytes | None:
        size = ring.entries * _ENTRY.size
        if ring.read is not None:
            return ring.read(ring.addr, size)
        try:
            with ProcessMemory(ring.pid) as mem:
                return mem.read(ring.addr, size)
        except MemoryReadError:
            return None
