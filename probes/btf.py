"""A small reader for the kernel's BTF: structure member offsets and enum values, at run time.

Kernel structure layouts differ between kernels and configurations, so probes never take them
from header files; they ask the running kernel's BTF (/sys/kernel/btf/vmlinux) and pass the
answers to BPF as compile-time constants. The format is documented in the kernel's
Documentation/bpf/btf.rst; only what idlebuf needs is decoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from probes.format.errors import BTFError

VMLINUX = Path("/sys/kernel/btf/vmlinux")
_MAGIC = 0xEB9F

# BTF kinds (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)

# bytes of kind-specific data after the 12-byte btf_type header: (fixed, per vlen item)
_TRAILER = {
    INT: (4, 0),
    ARRAY: (12, 0),
    STRUCT: (0, 12),
    UNION: (0, 12),
    ENUM: (0, 8),
    FUNC_PROTO: (0, 8),
    VAR: (4, 0),
    DATASEC: (0, 12),
    DECL_TAG: (4, 0),
    ENUM64: (0, 12),
}
_MODIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int  # 0 for ordinary members


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    size_or_type: int
    vlen: int
    kind_flag: bool
    data: int  # offset of the trailer in the raw blob


class BTF:
    """Parsed BTF. Type lookups by name are indexed on first use."""

    def __init__(self, raw: bytes) -> None:
        if len(raw) < 24:
            raise BTFError("BTF blob is too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", raw, 0)
        if magic != _MAGIC:
            raise BTFError(f"bad BTF magic {magic:#x}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", raw, 8)
        self._raw = raw
        self._strings = raw[hdr_len + str_off : hdr_len + str_off + str_len]
        self._types: list[_Type | None] = [None]  # type id 0 is void
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack = struct.Struct("<III").unpack_from
        while pos < end:
            name_off, info, size_or_type = unpack(raw, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            fixed, per_item = _TRAILER.get(kind, (0, 0))
            self._types.append(
                _Type(kind, self._str(name_off), size_or_type, vlen, bool(info >> 31), pos + 12)
            )
            pos += 12 + fixed + per_item * vlen
        self._by_name: dict[tuple[int, str], int] | None = None
        self._enumerators: dict[str, int] | None = None

    @classmethod
    def load(cls, path: Path = VMLINUX) -> BTF:
        try:
            return cls(path.read_bytes())
        except OSError as exc:
            raise BTFError(f"cannot read {path}: {exc.strerror}") from None

    def _str(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def type_id(self, kind: int, name: str) -> int:
        if self._by_name is None:
            self._by_name = {}
            for tid, t in enumerate(self._types):
                if t is not None and t.name:
                    self._by_name.setdefault((t.kind, t.name), tid)
        try:
            return self._by_name[(kind, name)]
        except KeyError:
            raise BTFError(f"no type {name!r} (kind {kind}) in BTF") from None

    def members(self, type_id: int) -> list[Member]:
        t = self._resolve(type_id)
        if t.kind not in (STRUCT, UNION):
            raise BTFError(f"type {type_id} is not a struct or union")
        out = []
        for i in range(t.vlen):
            name_off, mtype, offset = struct.unpack_from("<III", self._raw, t.data + 12 * i)
            if t.kind_flag:
                out.append(Member(self._str(name_off), mtype, offset & 0xFFFFFF, offset >> 24))
            else:
                out.append(Member(self._str(name_off), mtype, offset, 0))
        return out

    def _resolve(self, type_id: int) -> _Type:
        """Follow typedefs and qualifiers to the underlying type."""
        t = self._types[type_id]
        while t is not None and t.kind in _MODIFIERS:
            t = self._types[t.size_or_type]
        if t is None:
            raise BTFError(f"type {type_id} is void")
        return t

    def _find(self, type_id: int, name: str) -> tuple[int, Member] | None:
        """Byte-accurate search that descends into anonymous struct/union members."""
        for m in self.members(type_id):
            if m.name == name:
                return m.bit_offset, m
            if not m.name and self._resolve(m.type_id).kind in (STRUCT, UNION):
                found = self._find(m.type_id, name)
                if found:
                    return m.bit_offset + found[0], found[1]
        return None

    def _member(self, struct_name: str, path: str) -> tuple[int, int]:
        """(byte offset, type id) of `path` ("a.b.c", through named and anonymous members)."""
        type_id = self.type_id(STRUCT, struct_name)
        total = 0
        for part in path.split("."):
            found = self._find(type_id, part)
            if found is None:
                raise BTFError(f"struct {struct_name} has no member {path!r}")
            bits, member = found
            if member.bitfield_size or bits % 8:
                raise BTFError(f"{struct_name}.{path} is a bitfield")
            total += bits // 8
            type_id = member.type_id
        return total, type_id

    def offsetof(self, struct_name: str, path: str) -> int:
        """Byte offset of `path` ("a.b.c", through named and anonymous members)."""
        return self._member(struct_name, path)[0]

    def member_size(self, struct_name: str, path: str) -> int:
        """Size in bytes of the member at `path` (integers, enums, pointers, structs)."""
        t = self._resolve(self._member(struct_name, path)[1])
        if t.kind == PTR:
            return 8
        if t.kind in (INT, ENUM, STRUCT, UNION):
            return t.size_or_type
        raise BTFError(f"{struct_name}.{path} has no fixed size")

    def sizeof(self, struct_name: str) -> int:
        return self._resolve(self.type_id(STRUCT, struct_name)).size_or_type

    def enumerator(self, constant: str) -> int:
        """The value of an enum constant wherever it is declared (anonymous enums included)."""
        if self._enumerators is None:
            self._enumerators = {}
            for t in self._types:
                if t is not None and t.kind == ENUM:
                    for i in range(t.vlen):
                        name_off, value = struct.unpack_from("<Ii", self._raw, t.data + 8 * i)
                        self._enumerators.setdefault(self._str(name_off), value)
        try:
            return self._enumerators[constant]
        except KeyError:
            raise BTFError(f"no enum constant {constant} in BTF") from None

    def enum_value(self, enum_name: str, constant: str) -> int:
        t = self._resolve(self.type_id(ENUM, enum_name))
        for i in range(t.vlen):
            name_off, value = struct.unpack_from("<Ii", self._raw, t.data + 8 * i)
            if self._str(name_off) == constant:
                return value
        raise BTFError(f"enum {enum_name} has no constant {constant}")
