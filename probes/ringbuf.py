"""Bulk consumer of a BPF ring buffer of fixed-size records, read through its mmap.

bcc's `open_ring_buffer` calls a Python function per event, and decoding each event with ctypes
tops out below 1M events/s (KERNEL_NOTES.md). Every idlebuf record has the same size, so the
records between the consumer and producer positions form a strided array: this consumer maps
the ring buffer the way libbpf does, and hands out whole batches as numpy structured arrays,
doing no Python work per event.

Ring buffer memory (kernel/bpf/ringbuf.c): page 0 holds the consumer position (read-write);
from page 1 the producer position page, then the data area mapped twice in a row so that a
record wrapping around the end is contiguous. Each record starts with an 8-byte header:
u32 length (bit 31: still being written, bit 30: discarded), u32 page offset.
"""

from __future__ import annotations

import mmap
import select

import numpy as np

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8


class RingBufferConsumer:
    def __init__(self, map_fd: int, max_entries: int, record: np.dtype) -> None:
        if max_entries & (max_entries - 1):
            raise ValueError("ring buffer size must be a power of two")
        page = mmap.PAGESIZE
        self._mask = max_entries - 1
        self._slot = (_HDR + record.itemsize + 7) & ~7
        self._record = record
        self._slot_dtype = np.dtype(
            {
                "names": ["len", "payload"],
                "formats": ["<u4", record],
                "offsets": [0, _HDR],
                "itemsize": self._slot,
            }
        )
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._prod_map = mmap.mmap(
            map_fd, page + 2 * max_entries, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        self._cons = np.frombuffer(self._cons_map, dtype="<u8", count=1)
        self._prod = np.frombuffer(self._prod_map, dtype="<u8", count=1)
        self._data = np.frombuffer(self._prod_map, dtype=np.uint8, offset=page)
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def wait(self, timeout_s: float) -> None:
        """Sleep until the kernel signals new data, or timeout."""
        if int(self._prod[0]) == int(self._cons[0]):
            self._epoll.poll(timeout_s)

    def drain(self, limit: int = 1 << 20) -> np.ndarray:
        """Take up to `limit` committed records; returns a copy, so the space is freed."""
        cons = int(self._cons[0])
        prod = int(self._prod[0])
        if prod == cons:
            return np.empty(0, dtype=self._record)
        nslots = min((prod - cons) // self._slot, limit)
        start = cons & self._mask
        slots = np.frombuffer(self._data, dtype=self._slot_dtype, count=nslots, offset=start)
        lengths = slots["len"]
        busy = np.flatnonzero(lengths & _BUSY)
        if busy.size:
            nslots = int(busy[0])
            slots, lengths = slots[:nslots], lengths[:nslots]
        sizes = lengths & ~np.uint32(_DISCARD)
        if nslots and not np.all(sizes == self._record.itemsize):
            raise RuntimeError("ring buffer holds a record of an unexpected size")
        # Copy the payloads out as rows of bytes (a plain strided copy: copying the structured
        # field is ~20x slower), dropping discarded records, then view them as records.
        raw = self._data[start : start + nslots * self._slot].reshape(nslots, self._slot)
        payload = raw[:, _HDR : _HDR + self._record.itemsize]
        discarded = (lengths & _DISCARD) != 0
        out = (payload[~discarded] if discarded.any() else payload).copy()
        self._cons[0] = cons + nslots * self._slot  # release the space to the producer
        return out.view(self._record).reshape(-1)

    def close(self) -> None:
        self._epoll.close()
        del self._cons, self._prod, self._data
        self._cons_map.close()
        self._prod_map.close()
