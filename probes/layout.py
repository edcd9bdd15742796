"""The trace format, defined once: wire records shared with BPF, and the tables on disk.

Everything else derives from the definitions here: the C header the BPF programs include
(`c_header()`), the numpy dtype the consumer bulk-decodes with (`Record.dtype`) and the Parquet
schema of each table (`Table.arrow_schema()`). Nothing here imports bcc, so offline analysis can
use it on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

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


# Counters that mean lost information; a figure from a trace with any of these non-zero says so.
DROP_COUNTERS = (Counter.RINGBUF_FULL, Counter.INFLIGHT_FULL, Counter.TARGETS_FULL)


class PostFlag(IntEnum):
    SCANNED = 1  # found already blocked by the /proc scan when tracing started
    VECTORED = 2  # readv/recvmsg-style: addr is the first iovec's base, len the total
    IOV_TRUNCATED = 4  # more iovecs than the probe sums; len is a lower bound


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
READ_EVENT = Record(
    "read_event",
    (
        Field("ts_ns", "__u64"),  # bpf_ktime_get_ns (CLOCK_MONOTONIC)
        Field("key", "__u64"),  # identifies the read in flight: tid (syscall), req (uring)
        Field("addr", "__u64"),  # buffer address (POST)
        Field("value", "__s64"),  # POST: buffer length; COMPLETE: bytes returned or -errno
        Field("pid", "__u32"),
        Field("tid", "__u32"),
        Field("fd", "__s32"),
        Field("flags", "__u32"),  # PostFlag bits
        Field("nvec", "__u32"),  # iovec count for vectored reads, else 0
        Field("op", "__u16"),  # syscall number (syscall), opcode (uring)
        Field("kind", "__u8"),  # Kind
        Field("source", "__u8"),  # Source
    ),
)


@dataclass(frozen=True)
class Column:
    name: str
    arrow_type: pa.DataType
    wire: str | None = None  # the READ_EVENT field it comes from, if any


@dataclass(frozen=True)
class Table:
    """One Parquet table of the trace directory (a folder of part-NNNNNN.parquet files)."""

    name: str
    columns: tuple[Column, ...]

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.arrow_type, nullable=False) for c in self.columns])

    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


def _wire(name: str, field: str | None = None) -> Column:
    """A table column taken as-is from a READ_EVENT field."""
    field = field or name
    ctype = next(f.ctype for f in READ_EVENT.fields if f.name == field)
    return Column(name, _TYPES[ctype][1], field)


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

TABLES: dict[str, Table] = {t.name: t for t in (POSTS, COMPLETIONS, PROCESSES)}
TABLE_OF_KIND: dict[Kind, Table] = {Kind.POST: POSTS, Kind.COMPLETE: COMPLETIONS}

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
SYSCALL_NAMES: dict[int, str] = {nr: name for name, nr in SYSCALLS.items()}


def c_header() -> str:
    """The C side of the interface, included by every BPF program."""
    consts = [f"#define KIND_{k.name} {k.value}" for k in Kind]
    consts += [f"#define SOURCE_{s.name} {s.value}" for s in Source]
    consts += [f"#define CNT_{c.name} {c.value}" for c in Counter]
    consts += [f"#define N_COUNTERS {len(Counter)}"]
    consts += [f"#define FLAG_{p.name} {p.value}" for p in PostFlag]
    consts += [f"#define NR_{name} {nr}" for name, nr in SYSCALLS.items()]
    return "\n".join(
        [
            "/* Generated from probes/layout.py: do not edit. */",
            *consts,
            READ_EVENT.c_struct(),
            "",
        ]
    )
