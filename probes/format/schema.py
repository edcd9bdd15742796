"""The trace format, defined once: wire records shared with BPF, and the tables on disk.

Everything else derives from the definitions here: the C header the BPF programs include
(`c_header()`), the numpy dtype the consumer bulk-decodes with (`Record.dtype`) and the Parquet
schema of each table (`Table.arrow_schema()`). Nothing here imports bcc, so offline analysis can
use it on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import pyarrow as pa

FORMAT_NAME = "idlebuf-trace"
FORMAT_VERSION = 1

# C type name -> (numpy dtype, arrow type, size in bytes)
_TYPES: dict[str, tuple[str, pa.DataType, int]] = {
    "__u64": ("<u8", pa.uint64(), 8),
    "__s64": ("<i8", pa.int64(), 8),
    "__u32": ("<u4", pa.uint32(), 4),
    "__s32": ("<i4", pa.int32(), 4),
    "__u16": ("<u2", pa.uint16(), 2),
    "__u8": ("<u1", pa.uint8(), 1),
}


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


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str  # one of _TYPES

    @property
    def size(self) -> int:
        return _TYPES[self.ctype][2]


@dataclass(frozen=True)
class Record:
    """A fixed-size wire record. Fields are laid out widest first with no implicit holes."""

    name: str
    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        offset = 0
        for f in self.fields:
            if offset % f.size:
                raise ValueError(f"{self.name}.{f.name} would need padding at offset {offset}")
            offset += f.size
        if offset % 8:
            raise ValueError(f"{self.name} size {offset} is not a multiple of 8")

    @property
    def size(self) -> int:
        return sum(f.size for f in self.fields)

    def offsets(self) -> dict[str, int]:
        out, offset = {}, 0
        for f in self.fields:
            out[f.name] = offset
            offset += f.size
        return out

    @property
    def dtype(self) -> np.dtype:
        return np.dtype([(f.name, _TYPES[f.ctype][0]) for f in self.fields])

    def c_struct(self) -> str:
        lines = [f"struct {self.name} {{"]
        lines += [f"    {f.ctype} {f.name};" for f in self.fields]
        lines.append("};")
        lines += [
            f"_Static_assert(__builtin_offsetof(struct {self.name}, {name}) == {off}, "
            f'"{self.name}.{name} offset");'
            for name, off in self.offsets().items()
        ]
        lines.append(
            f'_Static_assert(sizeof(struct {self.name}) == {self.size}, "{self.name} size");'
        )
        return "\n".join(lines)


# One wire record for the whole read lifecycle: one size means the ring buffer can be
# bulk-decoded as a strided array (probes/ringbuf.py).
WIRE_EVENT = Record(
    "wire_event",
    (
        Field("ts_ns", "__u64"),  # bpf_ktime_get_ns (CLOCK_MONOTONIC)
        Field("key", "__u64"),  # identifies the read in flight: tid (syscall), req (uring)
        Field("addr", "__u64"),  # POST: buffer; BUFFER_USED: buffer id; BUFFER_GROUP: see GroupKind
        Field("value", "__s64"),  # POST: length; COMPLETE, BUFFER_USED: bytes or -errno
        Field("ring", "__u64"),  # uring: the ring (kernel io_ring_ctx address)
        Field("aux", "__u64"),  # uring: the request's user_data
        Field("pid", "__u32"),
        Field("tid", "__u32"),
        Field("fd", "__s32"),
        Field("flags", "__u32"),  # POST: PostFlag bits; COMPLETE: CQE flags
        Field("nvec", "__u32"),  # POST: iovec count (vectored), BUFFER_GROUP: buffers
        Field("op", "__u16"),  # syscall number (syscall), opcode (uring), GroupKind
        Field("group", "__u16"),  # uring: provided-buffer group id
        Field("kind", "__u8"),  # Kind
        Field("source", "__u8"),  # Source
        Field("reserved0", "__u16"),
        Field("first_id", "__u32"),  # BUFFER_GROUP (PROVIDE): id of the first buffer
    ),
)


def wire_records(rows: list[dict[str, int]]) -> np.ndarray:
    """WIRE_EVENT records made in user space (fields not given are zero)."""
    out = np.zeros(len(rows), dtype=WIRE_EVENT.dtype)
    for name in rows[0] if rows else ():
        out[name] = [r[name] for r in rows]
    return out


@dataclass(frozen=True)
class Column:
    name: str
    arrow_type: pa.DataType
    wire: str | None = None  # the WIRE_EVENT field it comes from, if any
    # a column added after the format's first version: parts written before have none, and
    # read it as this value (None: every part must have the column)
    default: Any = None


@dataclass(frozen=True)
class Table:
    """One Parquet table of the trace directory (a folder of part-NNNNNN.parquet files)."""

    name: str
    columns: tuple[Column, ...]

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.arrow_type, nullable=False) for c in self.columns])

    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def subset(self, names: list[str]) -> Table:
        """This table with only the columns `names` (in the table's order)."""
        wanted = set(names)
        return Table(self.name, tuple(c for c in self.columns if c.name in wanted))

    def missing(self, rows: pa.Table) -> list[str]:
        """Columns `rows` lacks that have no default."""
        have = set(rows.schema.names)
        return [c.name for c in self.columns if c.name not in have and c.default is None]

    def conform(self, rows: pa.Table) -> pa.Table:
        """`rows` as this table: columns it lacks that have a default (added since it was
        written) filled in, in order, cast to their types. KeyError if one is missing."""
        for column in self.columns:
            if column.default is None:
                continue
            if column.name not in rows.schema.names:
                rows = rows.append_column(
                    column.name, pa.array([column.default] * rows.num_rows, column.arrow_type)
                )
            elif rows[column.name].null_count:
                i = rows.schema.get_field_index(column.name)
                filled = rows[column.name].fill_null(pa.scalar(column.default, column.arrow_type))
                rows = rows.set_column(i, column.name, filled)
        return rows.select(self.column_names()).cast(self.arrow_schema())

    def filled(self, n: int, **columns: Any) -> pa.Table:
        """`n` rows: each given column an array/list of n values or one value for all; the
        others zero (empty strings, false). For synthetic traces in tests and benchmarks."""
        data: dict[str, Any] = {}
        for field in self.arrow_schema():
            if pa.types.is_string(field.type) or pa.types.is_boolean(field.type):
                value = columns.get(field.name, "" if pa.types.is_string(field.type) else False)
                data[field.name] = value if isinstance(value, list) else [value] * n
            else:
                value = columns.get(field.name, 0)
                data[field.name] = (
                    value if isinstance(value, (list, np.ndarray)) else np.full(n, value)
                )
        return pa.table(data, schema=self.arrow_schema())


def _wire(name: str, field: str | None = None, default: Any = None) -> Column:
    """A table column taken as-is from a WIRE_EVENT field."""
    field = field or name
    ctype = next(f.ctype for f in WIRE_EVENT.fields if f.name == field)
    return Column(name, _TYPES[ctype][1], field, default)


POSTS = Table(
    "posts",
    (
        _wire("ts_ns"),
        _wire("pid"),
        _wire("tid"),
        _wire("fd"),
        _wire("source"),
        _wire("op"),
        _wire("key"),
        _wire("addr"),
        _wire("len", "value"),
        _wire("nvec"),
        _wire("flags"),
        _wire("ring"),
        _wire("user_data", "aux"),
        _wire("group"),
        # the user stack that posted it (record --memory), id + 1 in `stacks`; 0: none
        _wire("stack_id", "first_id", default=0),
    ),
)

COMPLETIONS = Table(
    "completions",
    (
        _wire("ts_ns"),
        _wire("pid"),
        _wire("tid"),
        _wire("source"),
        _wire("key"),
        _wire("ret", "value"),
        _wire("ring"),
        _wire("cqe_flags", "flags"),
    ),
)

# The write side, recorded the same way: a blocked send() holds its buffer like a posted read.
WRITES = Table(
    "writes",
    tuple(c for c in POSTS.columns if c.name not in ("ring", "user_data", "group", "stack_id")),
)
WRITE_COMPLETIONS = Table(
    "write_completions",
    tuple(c for c in COMPLETIONS.columns if c.name not in ("ring", "cqe_flags")),
)

BUFFER_USES = Table(
    "buffer_uses",
    (
        _wire("ts_ns"),
        _wire("pid"),
        _wire("ring"),
        _wire("group"),
        _wire("buffer_id", "addr"),
        _wire("bytes", "value"),
        _wire("user_data", "aux"),
        _wire("request", "key"),  # 0 for a multishot completion that is not the final one
    ),
)

BUFFER_GROUPS = Table(
    "buffer_groups",
    (
        _wire("ts_ns"),
        _wire("pid"),
        _wire("ring"),
        _wire("group"),
        _wire("how", "op"),
        _wire("addr"),
        _wire("entries_or_size", "value"),
        _wire("buffers", "nvec"),
        _wire("first_id"),
    ),
)

ALLOCS = Table(
    "allocs",
    (
        _wire("ts_ns"),
        _wire("pid"),
        _wire("tid"),
        _wire("addr"),
        _wire("size", "value"),
        _wire("fn", "op"),
        _wire("stack_id", "key"),  # 0: none; else a row of the stacks table
    ),
)

FREES = Table("frees", (_wire("ts_ns"), _wire("pid"), _wire("tid"), _wire("addr")))

MAPS = Table(
    "maps",
    (
        _wire("ts_ns"),
        _wire("pid"),
        _wire("addr"),
        _wire("len", "value"),
        _wire("fn", "op"),
        _wire("flags"),
        _wire("fd"),
        _wire("old_addr", "key"),
    ),
)

WAITS = Table(
    "waits",
    (
        _wire("ts_ns"),
        _wire("pid"),
        _wire("tid"),
        _wire("call", "op"),
        _wire("fd"),
        _wire("watched", "value"),
    ),
)

WAIT_ENDS = Table("wait_ends", (_wire("ts_ns"), _wire("pid"), _wire("tid"), _wire("ret", "value")))

UNMAPS = Table("unmaps", (_wire("ts_ns"), _wire("pid"), _wire("addr"), _wire("len", "value")))

RSS = Table(
    "rss",
    (
        _wire("ts_ns"),
        _wire("pid"),
        _wire("mm_id", "key"),  # the address space: a new one after exec
        _wire("member", "op"),
        _wire("bytes", "value"),
    ),
)

# Where allocations were made: user stacks, symbolized while the process ran.
STACKS = Table(
    "stacks",
    (
        Column("pid", pa.uint32()),
        Column("stack_id", pa.uint64()),
        Column("frames", pa.list_(pa.uint64())),
        Column("symbols", pa.list_(pa.string())),
        # whose ids: "alloc" (allocations, --alloc-probes) or "post" (where reads were posted)
        Column("kind", pa.string(), default="alloc"),
    ),
)

# struct sk_meminfo, in order (include/uapi/linux/sock_diag.h SK_MEMINFO_*): what `ss -m` shows
# as skmem:(r, rb, t, tb, f, w, o, bl, d).
SKMEM_FIELDS = (
    "rmem_alloc",
    "rcvbuf",
    "wmem_alloc",
    "sndbuf",
    "fwd_alloc",
    "wmem_queued",
    "optmem",
    "backlog",
    "drops",
)

# Kernel memory of the targets' sockets, sampled through sock_diag (the figures `ss -m` shows).
SOCKETS = Table(
    "sockets",
    (
        Column("ts_ns", pa.uint64()),
        Column("pid", pa.uint32()),
        Column("fd", pa.int32()),
        Column("inode", pa.uint64()),
        Column("family", pa.string()),  # tcp, udp, unix
        Column("ipv6", pa.bool_()),
        Column("state", pa.string()),
        Column("local", pa.string()),
        Column("remote", pa.string()),
        Column("rqueue", pa.uint32()),
        Column("wqueue", pa.uint32()),
        *(Column(name, pa.uint32()) for name in SKMEM_FIELDS),
        # epoll sets the socket is in (/proc/PID/fdinfo of the target's epoll fds)
        Column("epoll", pa.uint16(), default=0),
        Column("sock_type", pa.uint8(), default=0),  # SOCK_STREAM 1, SOCK_DGRAM 2 (0: unknown)
    ),
)

# How much of each buffer that matters was in RAM when the recording ended (/proc/PID/pagemap):
# posted reads' buffers and each connection's last data buffer.
RESIDENCY = Table(
    "residency",
    (
        Column("pid", pa.uint32()),
        Column("fd", pa.int32()),
        Column("addr", pa.uint64()),
        Column("len", pa.int64()),
        Column("what", pa.string()),  # posted, last_data
        Column("resident_bytes", pa.int64()),
    ),
)

# Registered buffer rings as the recorder read them from the process's memory: the kernel
# never reports what user space adds to a ring, so the recorder looks.
BUFFER_RINGS = Table(
    "buffer_rings",
    (
        Column("ts_ns", pa.uint64()),
        Column("pid", pa.uint32()),
        Column("ring", pa.uint64()),
        Column("group", pa.uint16()),
        Column("entries", pa.uint32()),
        Column("tail", pa.uint16()),
        Column("buffers", pa.uint32()),  # distinct buffer ids seen in the ring so far
        Column("bytes", pa.uint64()),  # their total length
    ),
)

# The allocation holding each buffer that matters (posted, parked, last data), found by
# reading the allocator's own structures (record --memory, the default method): no probe on
# malloc. `what`: the walk it came from ("flush", "end"); a lookup that failed has size 0 and
# says why.
HEAP_BLOCKS = Table(
    "heap_blocks",
    (
        Column("ts_ns", pa.uint64()),
        Column("pid", pa.uint32()),
        Column("buffer", pa.uint64()),  # the address looked up
        Column("addr", pa.uint64()),  # the block holding it
        Column("size", pa.uint64()),
        Column("allocator", pa.string()),  # glibc, glibc thread arena, glibc mmap, go, mapping
        Column("what", pa.string()),
        Column("why", pa.string()),  # when not found
    ),
)

# Resident memory read from /proc/PID/status when the recording began and ended: the exact
# counts kmem:rss_stat does not give for a process that allocates nothing meanwhile.
PROC_STATUS = Table(
    "proc_status",
    (
        Column("ts_ns", pa.uint64()),
        Column("pid", pa.uint32()),
        Column("mm_id", pa.uint64()),  # the address space, as kmem:rss_stat names it (0: unknown)
        Column("what", pa.string()),  # "attach" (or launch) and "end"
        Column("vm_rss", pa.uint64()),
        Column("rss_anon", pa.uint64()),
        Column("rss_file", pa.uint64()),
        Column("rss_shmem", pa.uint64()),
    ),
)

# What a target's memory was as connections came and went (record --memory): at every flush
# and whenever its open files changed, the sockets it held, its heap in use (the allocator
# walked; 0 and `why` when it was not) and its resident memory. `moving`: the socket count
# changed during the sample (the point is not a settled one).
MEMORY_POINTS = Table(
    "memory_points",
    (
        Column("ts_ns", pa.uint64()),
        Column("pid", pa.uint32()),
        Column("sockets", pa.uint32()),
        Column("heap_bytes", pa.uint64()),
        Column("heap_blocks", pa.uint64()),
        Column("why", pa.string()),  # why the heap was not summed ("" when it was)
        Column("vm_rss", pa.uint64()),
        Column("rss_anon", pa.uint64()),
        Column("moving", pa.bool_()),
    ),
)

PROCESSES = Table(
    "processes",
    (
        Column("pid", pa.uint32()),
        Column("comm", pa.string()),
        Column("cmdline", pa.string()),
        Column("first_seen_ns", pa.uint64()),
    ),
)

TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        POSTS,
        COMPLETIONS,
        WRITES,
        WRITE_COMPLETIONS,
        BUFFER_USES,
        BUFFER_GROUPS,
        BUFFER_RINGS,
        ALLOCS,
        FREES,
        RSS,
        WAITS,
        WAIT_ENDS,
        MAPS,
        UNMAPS,
        SOCKETS,
        RESIDENCY,
        STACKS,
        PROC_STATUS,
        HEAP_BLOCKS,
        MEMORY_POINTS,
        PROCESSES,
    )
}
TABLE_OF_KIND: dict[Kind, Table] = {
    Kind.POST: POSTS,
    Kind.COMPLETE: COMPLETIONS,
    Kind.BUFFER_USED: BUFFER_USES,
    Kind.BUFFER_GROUP: BUFFER_GROUPS,
    Kind.ALLOC: ALLOCS,
    Kind.FREE: FREES,
    Kind.RSS: RSS,
    Kind.MAP: MAPS,
    Kind.UNMAP: UNMAPS,
    Kind.WAIT: WAITS,
    Kind.WAIT_END: WAIT_ENDS,
    Kind.WRITE_POST: WRITES,
    Kind.WRITE_COMPLETE: WRITE_COMPLETIONS,
}

# io_uring opcodes that read into a buffer (enum io_uring_op; values checked against BTF).
URING_READ_OPS: dict[str, int] = {
    "READV": 1,
    "READ_FIXED": 4,
    "RECVMSG": 10,
    "READ": 22,
    "RECV": 27,
    "READ_MULTISHOT": 49,
}
URING_OP_NAMES: dict[int, str] = {nr: name for name, nr in URING_READ_OPS.items()}
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


def c_header() -> str:
    """The C side of the interface, included by every BPF program."""
    consts = [f"#define KIND_{k.name} {k.value}" for k in Kind]
    consts += [f"#define SOURCE_{s.name} {s.value}" for s in Source]
    consts += [f"#define CNT_{c.name} {c.value}" for c in Counter]
    consts += [f"#define N_COUNTERS {len(Counter)}"]
    consts += [f"#define FLAG_{p.name} {p.value}" for p in PostFlag]
    consts += [f"#define NR_{name} {nr}" for name, nr in (SYSCALLS | WRITE_SYSCALLS).items()]
    consts += [f"#define URING_OP_{name} {nr}" for name, nr in URING_READ_OPS.items()]
    consts += [f"#define URING_OP_PROVIDE_BUFFERS {URING_PROVIDE_BUFFERS}"]
    consts += [f"#define NR_io_uring_register {NR_IO_URING_REGISTER}"]
    consts += [f"#define GROUP_{g.name} {g.value}" for g in GroupKind]
    consts += [f"#define MAP_{m.name} {m.value}" for m in MapFn]
    consts += [f"#define WAIT_{w.name} {w.value}" for w in WaitCall]
    return "\n".join(
        [
            "/* Generated from probes/format/schema.py: do not edit. */",
            *consts,
            WIRE_EVENT.c_struct(),
            "",
        ]
    )
