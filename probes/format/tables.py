"""The trace directory's tables, each defined once: a folder of Parquet parts per table, its
columns and their Arrow types. An event table's columns are wire-record fields
(probes.format.wire), renamed where the table's name says more; the others are rows the
recorder makes itself (samples, scans, end measurements). `TABLE_OF_KIND` says which table
each kind of wire record goes to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from probes.format.codes import Kind
from probes.format.wire import C_TYPES, WIRE_EVENT


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
        rows = rows.select(self.column_names())
        schema = self.arrow_schema()
        return rows if rows.schema.equals(schema, check_metadata=True) else rows.cast(schema)

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
    return Column(name, C_TYPES[ctype][1], field, default)


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

# What carries each connection's wait (record --memory; probes.attach.waiters), read from
# /proc at attach, at the end and while recording (paced; format 4): a thread blocked on one
# connection alone (in a read, or in poll/select/epoll_wait watching it alone), its user
# stack's resident bytes and reservation;
# a process that exists for one connection (a forked child holding it alone), its private
# memory, page tables, mappings and threads. The kernel's part of a thread or process (its
# kernel stack, its task_struct...) is the analysis's, from meta.json. A scan writes a
# waiter's row when it is new or changed since the target's last scan (attach and end, and a
# target's first live rows: the whole scan) and a row with fd -1 for a waiter it no longer
# finds (analysis.waiters.latest_waiters puts them together).
WAITERS = Table(
    "waiters",
    (
        Column("ts_ns", pa.uint64()),
        Column("pid", pa.uint32()),
        Column("tid", pa.uint32()),
        Column("fd", pa.int32()),  # the connection it waits on
        # "thread", "process" or "goroutine" (tid: its goid); "unreadable" (fd -1): what the
        # process's threads wait in could not be read, `why`
        Column("kind", pa.string()),
        Column("call", pa.int32()),  # a thread: the syscall it is blocked in
        Column("stack_bytes", pa.uint64()),  # a thread: resident bytes of its stack mapping
        Column("stack_size", pa.uint64()),  # ... the mapping's size
        Column("private_bytes", pa.uint64(), default=0),  # a process: its private memory
        Column("page_table_bytes", pa.uint64(), default=0),  # ... its page tables (VmPTE)
        Column("mappings", pa.uint32(), default=0),  # ... its mappings (VMAs)
        Column("threads", pa.uint32(), default=1),  # ... its threads
        Column("g_bytes", pa.uint32(), default=0),  # a goroutine: its runtime.g
        # a process: its mappings holding anonymous pages (an anon_vma and its chain links)
        Column("anon_mappings", pa.uint32(), default=0),
        Column("what", pa.string()),  # "attach", "live" (at a flush, format 4) or "end"
        # kind "unreadable" (fd -1): what the process's threads wait in could not be read
        Column("why", pa.string(), default=""),
    ),
)

# The state each connection keeps alive (record --memory; probes.attach.owned), walked at
# attach and at the end in a process whose heap is glibc's: per connection (fd >= 0) the
# allocations its roots (its waiter's stack, its epoll data) reach and no other
# connection's, less its buffers' allocations (`buffer_bytes`: those among them, the buffer
# part); per process (fd -1) its allocator, and what the walk saw: the heap in use, what
# connections share, what is the program's, what nothing reached, the reads that raced with
# the process, what the walk cost. `why`: not known (or a lower bound), and why. Sizes and
# counts only, never memory contents.
OWNED = Table(
    "owned",
    (
        Column("ts_ns", pa.uint64()),
        Column("pid", pa.uint32()),
        Column("fd", pa.int32()),  # the connection; -1: the process's row
        Column("tid", pa.uint32()),  # its waiter thread (0: none)
        Column("root", pa.string()),  # "stack", "epoll", "stack+epoll"
        Column("owned_bytes", pa.uint64()),
        Column("allocations", pa.uint64()),
        Column("buffer_bytes", pa.uint64()),
        Column("how", pa.string()),  # "reachable"
        Column("why", pa.string()),
        Column("allocator", pa.string()),  # "glibc", "go", or the library not walked
        Column("heap_bytes", pa.uint64(), default=0),  # the process's row: in use, walked
        Column("chunks", pa.uint64(), default=0),
        Column("shared_bytes", pa.uint64(), default=0),
        Column("global_bytes", pa.uint64(), default=0),
        Column("unreached_bytes", pa.uint64(), default=0),
        Column("raced", pa.uint32(), default=0),
        Column("took_ms", pa.uint32(), default=0),
        Column("cpu_ms", pa.uint32(), default=0),
        Column("what", pa.string()),  # "attach", "live" (at a flush, format 4) or "end"
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
        WAITERS,
        OWNED,
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
