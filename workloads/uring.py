"""A small, real io_uring for the workloads: the raw syscalls through ctypes, no emulation.

Only what the servers need: set-up (optionally with SQPOLL), submitting SQEs, reaping CQEs,
and registering a provided-buffer ring (IORING_REGISTER_PBUF_RING). The layouts follow
include/uapi/linux/io_uring.h; see io_uring_setup(2), io_uring_enter(2), io_uring_register(2).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from dataclasses import dataclass

from workloads.common import address_of

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_IO_URING_SETUP, SYS_IO_URING_ENTER, SYS_IO_URING_REGISTER = 425, 426, 427

# opcodes (enum io_uring_op)
OP_READV, OP_READ_FIXED, OP_POLL_ADD, OP_RECVMSG, OP_ASYNC_CANCEL = 1, 4, 6, 10, 14
OP_READ, OP_RECV, OP_PROVIDE_BUFFERS, OP_READ_MULTISHOT = 22, 27, 31, 49
IOSQE_BUFFER_SELECT = 1 << 5
IORING_RECV_MULTISHOT = 1 << 1
IORING_RECVSEND_BUNDLE = 1 << 4
IORING_SETUP_SQPOLL = 1 << 1
IORING_ENTER_GETEVENTS, IORING_ENTER_SQ_WAKEUP = 1, 2
IORING_SQ_NEED_WAKEUP = 1
IORING_CQE_F_BUFFER, IORING_CQE_F_MORE = 1, 2
IORING_REGISTER_BUFFERS, IORING_REGISTER_EVENTFD, IORING_REGISTER_PBUF_RING = 0, 4, 22
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000

_SQE = struct.Struct("<BBHiQQIIQHHIQQ")  # 64 bytes
_CQE = struct.Struct("<QiI")  # 16 bytes


class _SqOff(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint32)
        for n in ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array", "resv1")
    ] + [("user_addr", ctypes.c_uint64)]


class _CqOff(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint32)
        for n in ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags", "resv1")
    ] + [("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqOff),
        ("cq_off", _CqOff),
    ]


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


@dataclass(frozen=True)
class Completion:
    user_data: int
    res: int
    flags: int

    @property
    def more(self) -> bool:
        return bool(self.flags & IORING_CQE_F_MORE)

    @property
    def buffer_id(self) -> int | None:
        return self.flags >> 16 if self.flags & IORING_CQE_F_BUFFER else None


class Ring:
    def __init__(self, entries: int = 4096, sqpoll: bool = False, sq_thread_idle_ms: int = 2000):
        p = _Params()
        if sqpoll:
            p.flags |= IORING_SETUP_SQPOLL
            p.sq_thread_idle = sq_thread_idle_ms
        p.cq_entries = entries * 2
        self.fd = _check(_libc.syscall(SYS_IO_URING_SETUP, entries, ctypes.byref(p)))
        self.sqpoll = sqpoll
        self._p = p
        sq_size = p.sq_off.array + p.sq_entries * 4
        cq_size = p.cq_off.cqes + p.cq_entries * _CQE.size
        prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | mmap.MAP_POPULATE
        self._sq = mmap.mmap(self.fd, sq_size, flags, prot, offset=_OFF_SQ_RING)
        self._cq = mmap.mmap(self.fd, cq_size, flags, prot, offset=_OFF_CQ_RING)
        self._sqes = mmap.mmap(self.fd, p.sq_entries * _SQE.size, flags, prot, offset=_OFF_SQES)
        # Ring indices are shared with the kernel: load and store them whole, as 32-bit words
        # (struct.pack_into writes byte by byte, which the kernel could read half-done).
        u32 = ctypes.c_uint32
        self._sq_head = u32.from_buffer(self._sq, p.sq_off.head)
        self._sq_tail = u32.from_buffer(self._sq, p.sq_off.tail)
        self._sq_flags = u32.from_buffer(self._sq, p.sq_off.flags)
        self._sq_array = (u32 * p.sq_entries).from_buffer(self._sq, p.sq_off.array)
        self._cq_head = u32.from_buffer(self._cq, p.cq_off.head)
        self._cq_tail = u32.from_buffer(self._cq, p.cq_off.tail)
        self._sq_mask = p.sq_entries - 1
        self._cq_mask = p.cq_entries - 1
        self._pending = 0
        self._keep: list[object] = []  # user memory the kernel reads after submission

    def prep(
        self,
        opcode: int,
        fd: int,
        addr: int = 0,
        length: int = 0,
        off: int = 0,
        user_data: int = 0,
        flags: int = 0,
        ioprio: int = 0,
        op_flags: int = 0,
        buf_group: int = 0,
    ) -> None:
        """Queue one SQE; `submit` hands queued SQEs to the kernel."""
        tail = self._sq_tail.value
        if (tail - self._sq_head.value) & 0xFFFFFFFF >= self._p.sq_entries:
            self.submit()
            if (tail - self._sq_head.value) & 0xFFFFFFFF >= self._p.sq_entries:
                raise OSError("submission queue full")
        idx = tail & self._sq_mask
        _SQE.pack_into(
            self._sqes,
            idx * _SQE.size,
            opcode,
            flags,
            ioprio,
            fd,
            off,
            addr,
            length,
            op_flags,
            user_data,
            buf_group,
            0,
            0,
            0,
            0,
        )
        self._sq_array[idx] = idx
        self._sq_tail.value = (tail + 1) & 0xFFFFFFFF  # publishes the SQE (x86: stores in order)
        self._pending += 1

    def submit(self, wait: int = 0) -> int:
        flags = IORING_ENTER_GETEVENTS if wait else 0
        to_submit = self._pending
        if self.sqpoll:
            # The kernel thread takes SQEs itself, but may be going to sleep: liburing checks
            # IORING_SQ_NEED_WAKEUP after a full memory barrier, which Python cannot issue, so
            # new work always comes with a wake-up (a cheap, harmless syscall).
            to_submit = 0
            if self._pending or self._sq_flags.value & IORING_SQ_NEED_WAKEUP:
                flags |= IORING_ENTER_SQ_WAKEUP
            if not flags:
                return 0
        submitted = 0
        while True:
            ret = _libc.syscall(SYS_IO_URING_ENTER, self.fd, to_submit, wait, flags, None, 0)
            if ret < 0 and ctypes.get_errno() == errno.EINTR:
                continue
            ret = _check(ret)
            submitted += ret
            to_submit -= ret
            # the kernel may take fewer SQEs than offered (it stops at one it cannot
            # allocate for); the rest stay queued in the ring and must be offered again
            if to_submit <= 0 or self.sqpoll:
                break
            if ret == 0:
                raise OSError(errno.EAGAIN, f"io_uring_enter took none of {to_submit} SQEs")
            wait, flags = 0, flags & ~IORING_ENTER_GETEVENTS
        self._pending = 0
        return submitted

    def sq_empty(self) -> bool:
        return self._sq_head.value == self._sq_tail.value

    def completions(self) -> list[Completion]:
        """Reap every CQE available now."""
        cqes = self._p.cq_off.cqes
        head, tail = self._cq_head.value, self._cq_tail.value
        out = []
        while head != tail:
            pos = cqes + (head & self._cq_mask) * _CQE.size
            out.append(Completion(*_CQE.unpack_from(self._cq, pos)))
            head = (head + 1) & 0xFFFFFFFF
        self._cq_head.value = head
        return out

    def register(self, opcode: int, arg: object, nr_args: int) -> None:
        _check(_libc.syscall(SYS_IO_URING_REGISTER, self.fd, opcode, ctypes.byref(arg), nr_args))  # type: ignore[arg-type]

    def register_eventfd(self, efd: int) -> None:
        """Have the kernel signal `efd` on every completion (so select() can wait on it)."""
        self.register(IORING_REGISTER_EVENTFD, ctypes.c_int32(efd), 1)

    def register_buffer(self, memory: bytearray) -> int:
        """Register `memory` as fixed buffer 0 (for READ_FIXED); returns its address."""
        addr = address_of(memory)
        self.register(IORING_REGISTER_BUFFERS, (ctypes.c_uint64 * 2)(addr, len(memory)), 1)
        self._keep.append(memory)
        return addr

    def register_buffer_ring(self, group: int, count: int, size: int) -> BufferRing:
        return BufferRing(self, group, count, size)

    def close(self) -> None:
        # ctypes views pin the mappings; drop them first
        del self._sq_head, self._sq_tail, self._sq_flags, self._sq_array
        del self._cq_head, self._cq_tail
        for m in (self._sq, self._cq, self._sqes):
            m.close()
        os.close(self.fd)


class _BufReg(ctypes.Structure):
    _fields_ = [
        ("ring_addr", ctypes.c_uint64),
        ("ring_entries", ctypes.c_uint32),
        ("bgid", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("min_left", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 5),
    ]


class BufferRing:
    """A provided-buffer ring: `count` buffers of `size` bytes the kernel picks from on demand."""

    def __init__(self, ring: Ring, group: int, count: int, size: int) -> None:
        entries = 1 << max(0, (count - 1).bit_length())  # a power of two >= count
        self.group, self.count, self.size, self.entries = group, count, size, entries
        self._ring_mem = mmap.mmap(-1, max(mmap.PAGESIZE, entries * 16))  # page aligned
        self.ring_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._ring_mem))
        self.memory = bytearray(count * size)
        self.base = address_of(self.memory)
        reg = _BufReg(ring_addr=self.ring_addr, ring_entries=entries, bgid=group)
        ring.register(IORING_REGISTER_PBUF_RING, reg, 1)
        # the ring's tail overlays the resv field of entry 0; store it as one 16-bit word
        self._tail_word = ctypes.c_uint16.from_buffer(self._ring_mem, 14)
        self._tail = 0
        self._slots = [0] * entries  # the buffer id in each ring entry
        self._position: dict[int, int] = {}  # buffer id -> the tail value it was added at
        self.consumed = 0  # buffers the kernel filled (a bundle's completion fills several)
        for bid in range(count):
            self._add(bid)
        self._publish()

    def address(self, bid: int) -> int:
        return self.base + bid * self.size

    def _add(self, bid: int) -> None:
        slot = (self._tail & (self.entries - 1)) * 16
        # struct io_uring_buf {u64 addr; u32 len; u16 bid; u16 resv} (resv of slot 0 = tail)
        struct.pack_into("<QIH", self._ring_mem, slot, self.address(bid), self.size, bid)
        self._slots[self._tail & (self.entries - 1)] = bid
        self._position[bid] = self._tail
        self._tail = (self._tail + 1) & 0xFFFF

    def _publish(self) -> None:
        self._tail_word.value = self._tail

    def taken(self, bid: int, nbytes: int) -> list[int]:
        """The buffers one completion filled: `bid` alone, or with a recv bundle the ring
        entries after it too, as many as `nbytes` spans (the kernel takes them in ring
        order and reports the first)."""
        count = max(1, -(-nbytes // self.size))
        first = self._position[bid]
        return [self._slots[(first + i) & (self.entries - 1)] for i in range(count)]

    def give_back(self, *bids: int) -> None:
        for bid in bids:
            self._add(bid)
        self._publish()


class ProvidedBuffers:
    """The older mechanism: buffers handed to a group with IORING_OP_PROVIDE_BUFFERS requests;
    each use consumes one until it is provided again."""

    USER_DATA = 1 << 63  # marks the PROVIDE_BUFFERS completions

    def __init__(self, ring: Ring, group: int, count: int, size: int) -> None:
        self.ring, self.group, self.count, self.size = ring, group, count, size
        self.memory = bytearray(count * size)
        self.base = address_of(self.memory)
        self.consumed = 0
        self.provide(0, count)

    def address(self, bid: int) -> int:
        return self.base + bid * self.size

    def provide(self, first: int, count: int) -> None:
        # sqe: fd = number of buffers, addr = first buffer, len = size, off = first id
        self.ring.prep(
            OP_PROVIDE_BUFFERS,
            count,
            self.address(first),
            self.size,
            off=first,
            user_data=self.USER_DATA,
            buf_group=self.group,
        )

    def taken(self, bid: int, nbytes: int) -> list[int]:
        """The buffers one completion filled: always one (bundles take one provided buffer
        from a PROVIDE_BUFFERS group)."""
        return [bid]

    def give_back(self, *bids: int) -> None:
        for bid in bids:
            self.provide(bid, 1)
