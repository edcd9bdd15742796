"""The trace format, defined once, in the one place capture and analysis both import
(DESIGN.md rule 3): its name and version here, and its parts gathered from their rooms.

- probes/format/codes.py: the numbers both sides agree on (record kinds, sources, counters,
  flags, syscall and io_uring numbers);
- probes/format/wire.py: the wire record BPF emits, written once, with its C struct, numpy
  dtype and the C header generated from it;
- probes/format/tables.py: the Parquet tables of a trace directory, whose event columns take
  their types from the wire record.

A new record kind costs one `Kind` value and one table (with its entry in `TABLE_OF_KIND`);
the C, numpy and Arrow views follow. Nothing here imports bcc, so offline analysis can use it
on any machine.
"""

from __future__ import annotations

from probes.format.codes import (
    DROP_COUNTERS,
    NR_IO_URING_REGISTER,
    SYSCALL_NAMES,
    SYSCALLS,
    URING_OP_NAMES,
    URING_PROVIDE_BUFFERS,
    URING_READ_OPS,
    URING_WAIT_OPS,
    WRITE_SYSCALLS,
    AllocFn,
    Counter,
    GroupKind,
    Kind,
    MapFn,
    PostFlag,
    RssMember,
    Source,
    WaitCall,
)
from probes.format.tables import (
    ALLOCS,
    BUFFER_GROUPS,
    BUFFER_RINGS,
    BUFFER_USES,
    COMPLETIONS,
    FREES,
    HEAP_BLOCKS,
    MAPS,
    MEMORY_POINTS,
    OWNED,
    POSTS,
    PROC_STATUS,
    PROCESSES,
    RESIDENCY,
    RSS,
    SKMEM_FIELDS,
    SOCKETS,
    STACKS,
    TABLE_OF_KIND,
    TABLES,
    UNMAPS,
    WAIT_ENDS,
    WAITERS,
    WAITS,
    WRITE_COMPLETIONS,
    WRITES,
    Column,
    Table,
)
from probes.format.wire import C_TYPES, WIRE_EVENT, Field, Record, c_header, wire_records

FORMAT_NAME = "idlebuf-trace"
# 2: the waiters table, meta.json's kernel_stack_bytes; 3: the owned table; 4: waiters
# scanned while recording too (what "live"), only changes written, fd -1: waits no more
FORMAT_VERSION = 4

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    # codes
    "DROP_COUNTERS",
    "NR_IO_URING_REGISTER",
    "SYSCALLS",
    "SYSCALL_NAMES",
    "URING_OP_NAMES",
    "URING_PROVIDE_BUFFERS",
    "URING_READ_OPS",
    "URING_WAIT_OPS",
    "WRITE_SYSCALLS",
    "AllocFn",
    "Counter",
    "GroupKind",
    "Kind",
    "MapFn",
    "PostFlag",
    "RssMember",
    "Source",
    "WaitCall",
    # wire
    "C_TYPES",
    "WIRE_EVENT",
    "Field",
    "Record",
    "c_header",
    "wire_records",
    # tables
    "ALLOCS",
    "BUFFER_GROUPS",
    "BUFFER_RINGS",
    "BUFFER_USES",
    "COMPLETIONS",
    "FREES",
    "HEAP_BLOCKS",
    "MAPS",
    "MEMORY_POINTS",
    "OWNED",
    "POSTS",
    "PROCESSES",
    "PROC_STATUS",
    "RESIDENCY",
    "RSS",
    "SKMEM_FIELDS",
    "SOCKETS",
    "STACKS",
    "TABLES",
    "TABLE_OF_KIND",
    "UNMAPS",
    "WAITERS",
    "WAITS",
    "WAIT_ENDS",
    "WRITES",
    "WRITE_COMPLETIONS",
    "Column",
    "Table",
]
