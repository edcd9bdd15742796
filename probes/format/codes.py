"""The numbers both sides of the trace format agree on: what a wire record says happened
(`Kind`), where a posted read comes from (`Source`), the kernel's counters, the flags and
function codes a record carries, and the syscall and io_uring numbers that are traced.

BPF programs get them as #defines (probes.format.wire.c_header); a new value is added here,
once, and both sides see it.
"""

from __future__ import annotations

from enum import IntEnum


class Kind(IntEnum):
    """What a wire record says happened."""

    POST = 1  # a read took a buffer and waits for data
    COMPLETE = 2  # that read returned (bytes or -errno)
    BUFFER_USED = 3  # the kernel filled a buffer taken from a provided-buffer group
    BUFFER_GROUP = 4  # buffers were provided to a group (a registered ring or PROVIDE_BUFFERS)
    ALLOC = 5  # a heap allocation: addr, value = size, op = AllocFn
    FREE = 6  # a tracked allocation was freed: addr
    RSS = 7  # a resident-memory counter changed: op = RssMember, value = bytes
    MAP = 8  # address space grew: addr, value = length, op = MapFn, key = mremap's old address
    UNMAP = 9  # munmap: addr, value = length
    WAIT = 10  # a readiness wait began: op = WaitCall, fd = epoll fd or -1, value = watched
    WAIT_END = 11  # it returned: value = ready count or -errno
    WRITE_POST = 12  # a write to a socket began: its buffer is held until the call returns
    WRITE_COMPLETE = 13  # that write returned (bytes or -errno)


class Source(IntEnum):
    """Where a posted read comes from (DESIGN.md vocabulary)."""

    SYSCALL = 1
    URING = 2
    PARKED = 3


class Counter(IntEnum):
    """In-kernel counters (a per-CPU array indexed by these values)."""

    RINGBUF_FULL = 0  # bpf_ringbuf_reserve failed: the event is lost
    INFLIGHT_FULL = 1  # the in-flight table was full: the read is not tracked at all
    POSTS = 2
    COMPLETIONS = 3
    TARGETS_FULL = 4  # a followed child could not be added to the target table
    SELECT_FULL = 5  # a multishot buffer-select request could not be remembered
    URING_UNREADABLE = 6  # a request's buffer could not be read from the kernel
    ALLOCS_FULL = 7  # the live-allocation table was full: an allocation is not tracked
    STACK_MISSED = 8  # an allocation's user stack could not be walked or stored
    QUICK = 9  # --min-wait: reads and writes that returned sooner, counted and not recorded
    # --min-wait on the scheduler hooks: calls seen waiting (each then counted QUICK, recorded
    # at its return, or still waiting)
    BLOCKED = 10


# Counters that mean lost information; a figure from a trace with any of these non-zero says so.
DROP_COUNTERS = (
    Counter.RINGBUF_FULL,
    Counter.INFLIGHT_FULL,
    Counter.TARGETS_FULL,
    Counter.SELECT_FULL,
    Counter.URING_UNREADABLE,
    Counter.ALLOCS_FULL,
)


class AllocFn(IntEnum):
    """The allocator function behind an ALLOC record (`op`); matches enum alloc_fn in C."""

    MALLOC = 1
    CALLOC = 2
    REALLOC = 3
    POSIX_MEMALIGN = 4
    ALIGNED_ALLOC = 5
    MEMALIGN = 6
    VALLOC = 7


class WaitCall(IntEnum):
    """The readiness-wait syscall behind a WAIT record (`op`)."""

    EPOLL_WAIT = 1
    EPOLL_PWAIT = 2
    POLL = 3
    PPOLL = 4
    SELECT = 5
    PSELECT6 = 6


class MapFn(IntEnum):
    """The syscall behind a MAP record (`op`)."""

    MMAP = 1
    MREMAP = 2
    BRK = 3  # addr = the new program break
    AT_ATTACH = 4  # not a syscall: an anonymous mapping /proc/PID/maps showed at attach


class RssMember(IntEnum):
    """kmem:rss_stat's `member` (enum of mm counters, include/linux/mm_types_task.h)."""

    FILE = 0
    ANON = 1
    SWAP = 2
    SHMEM = 3


class PostFlag(IntEnum):
    SCANNED = 1  # found already blocked by the /proc scan when tracing started
    VECTORED = 2  # readv/recvmsg-style: addr is the first iovec's base, len the total
    IOV_TRUNCATED = 4  # more iovecs than the probe sums; len is a lower bound
    SOCKET = 8  # uring: the target is a socket (syscall posts are sockets by construction)
    FIXED_FILE = 16  # uring: a registered file; the kernel does not say yet if it is a socket
    BUFFER_SELECT = 32  # uring: the buffer comes from a provided-buffer group on arrival
    MULTISHOT = 64  # uring: stays posted across completions until the final one
    FIXED_BUFFER = 128  # uring: READ_FIXED into a registered buffer
    BUNDLE = 256  # uring: a recv bundle (several provided buffers per completion)
    WRITE = 512  # a write to a socket (writes table), not a read
    SWEPT = 1024  # --min-wait: recorded by the recorder's sweep while the call still waited


class GroupKind(IntEnum):
    """How buffers reached a provided-buffer group (BUFFER_GROUP records' `op`)."""

    RING = 1  # IORING_REGISTER_PBUF_RING: addr = ring address, value = ring entries
    PROVIDE = 2  # IORING_OP_PROVIDE_BUFFERS: addr = first buffer, value = bytes per buffer,
    #              nvec = buffers


# io_uring opcodes that read into a buffer (enum io_uring_op; values checked against BTF).
URING_READ_OPS: dict[str, int] = {
    "READV": 1,
    "READ_FIXED": 4,
    "RECVMSG": 10,
    "READ": 22,
    "RECV": 27,
    "READ_MULTISHOT": 49,
}
# ... that wait for readiness instead: a POLL_ADD armed on a socket holds no buffer, but its
# request (an io_kiocb) waits for that connection alone - its waiter. Traced as posts of
# len 0 (source URING, op POLL_ADD) and counted apart from the reads.
URING_WAIT_OPS: dict[str, int] = {"POLL_ADD": 6}
URING_OP_NAMES: dict[int, str] = {
    nr: name for name, nr in (URING_READ_OPS | URING_WAIT_OPS).items()
}
URING_PROVIDE_BUFFERS = 31

# Syscalls whose posted reads are traced, x86_64 numbers (the tracepoint names carry them on
# other architectures; numbers only label rows).
SYSCALLS: dict[str, int] = {
    "read": 0,
    "readv": 19,
    "recvfrom": 45,
    "recvmsg": 47,
    "recvmmsg": 299,
    "preadv2": 327,
}
# Syscalls whose writes to sockets are traced (pending write bytes), x86_64 numbers.
WRITE_SYSCALLS: dict[str, int] = {"write": 1, "writev": 20, "sendto": 44, "sendmsg": 46}
NR_IO_URING_REGISTER = 427
SYSCALL_NAMES: dict[int, str] = {nr: name for name, nr in (SYSCALLS | WRITE_SYSCALLS).items()}
