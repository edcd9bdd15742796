"""The wire record, defined once: the fixed-size record every BPF program emits, its C struct
(with offset asserts), the numpy dtype the consumer bulk-decodes with, and the C header every
BPF program includes (`c_header()`). The Parquet tables take their column types from it
(probes.format.tables).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from probes.format.codes import (
    NR_IO_URING_REGISTER,
    SYSCALLS,
    URING_PROVIDE_BUFFERS,
    URING_READ_OPS,
    URING_WAIT_OPS,
    WRITE_SYSCALLS,
    Counter,
    GroupKind,
    Kind,
    MapFn,
    PostFlag,
    Source,
    WaitCall,
)

# C type name -> (numpy dtype, arrow type, size in bytes)
C_TYPES: dict[str, tuple[str, pa.DataType, int]] = {
    "__u64": ("<u8", pa.uint64(), 8),
    "__s64": ("<i8", pa.int64(), 8),
    "__u32": ("<u4", pa.uint32(), 4),
    "__s32": ("<i4", pa.int32(), 4),
    "__u16": ("<u2", pa.uint16(), 2),
    "__u8": ("<u1", pa.uint8(), 1),
}


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str  # one of C_TYPES

    @property
    def size(self) -> int:
        return C_TYPES[self.ctype][2]


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
        return np.dtype([(f.name, C_TYPES[f.ctype][0]) for f in self.fields])

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


def c_header() -> str:
    """The C side of the interface, included by every BPF program."""
    consts = [f"#define KIND_{k.name} {k.value}" for k in Kind]
    consts += [f"#define SOURCE_{s.name} {s.value}" for s in Source]
    consts += [f"#define CNT_{c.name} {c.value}" for c in Counter]
    consts += [f"#define N_COUNTERS {len(Counter)}"]
    consts += [f"#define FLAG_{p.name} {p.value}" for p in PostFlag]
    consts += [f"#define NR_{name} {nr}" for name, nr in (SYSCALLS | WRITE_SYSCALLS).items()]
    consts += [
        f"#define URING_OP_{name} {nr}" for name, nr in (URING_READ_OPS | URING_WAIT_OPS).items()
    ]
    consts += [f"#define URING_OP_PROVIDE_BUFFERS {URING_PROVIDE_BUFFERS}"]
    consts += [f"#define NR_io_uring_register {NR_IO_URING_REGISTER}"]
    consts += [f"#define GROUP_{g.name} {g.value}" for g in GroupKind]
    consts += [f"#define MAP_{m.name} {m.value}" for m in MapFn]
    consts += [f"#define WAIT_{w.name} {w.value}" for w in WaitCall]
    return "\n".join(
        [
            "/* Generated from probes/format/wire.py and codes.py: do not edit. */",
            *consts,
            WIRE_EVENT.c_struct(),
            "",
        ]
    )
