"""A Go binary's runtime, as its own symbols and DWARF lay it out: what the attach-time walk of
goroutines (probes.attach.goroutines) and the heap walker (probes.allocators.go) read.

Layouts come from the binary's DWARF (pyelftools) - struct members, constants such as
runtime.heapArenaBytes, location lists, call-frame tables - not from constants of one Go
version. A stripped binary has none of it; the callers say so.
"""

from __future__ import annotations

import bisect
import functools
import os
import platform
from dataclasses import dataclass
from typing import Any

DW_OP_CALL_FRAME_CFA = 0x9C
RSP = 7  # DWARF register number of rsp on x86-64
READ_FUNCTION = "internal/poll.(*FD).Read"
ARENA_BASE_OFFSET = {"x86_64": 0xFFFF800000000000}  # runtime.arenaBaseOffset (not in DWARF)
M_SPAN_IN_USE = 1  # runtime.mSpanInUse
M_SPAN_MANUAL = 2  # runtime.mSpanManual: goroutine stacks (and the GC's work buffers)
DATA_SECTIONS = (".data", ".noptrdata", ".bss", ".noptrbss")  # a Go binary's global variables


class NotGo(Exception):
    """The binary is not a Go program."""


class GoLayoutError(Exception):
    """A Go binary whose runtime layout cannot be read (stripped, or names this reader does
    not know); the message says which."""


@dataclass(frozen=True)
class Piece:
    """Where `size` bytes of a variable are: an address in memory, or None (a register of a
    frame that is not the innermost one: unknowable)."""

    addr: int | None
    size: int


@dataclass(frozen=True)
class _Frame:
    """The call-frame rows of one function: (pc, cfa offset from rsp), in pc order."""

    start: int
    end: int
    pcs: list[int]
    offsets: list[int | None]  # None: CFA not rsp-relative at that pc


class GoBinary:
    """The parts of a Go binary's symbols and DWARF the walk needs."""

    def __init__(self, path: str) -> None:
        from elftools.common.exceptions import ELFError  # noqa: PLC0415
        from elftools.elf.elffile import ELFFile  # noqa: PLC0415

        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                if not (
                    elf.get_section_by_name(".gopclntab")
                    or elf.get_section_by_name(".go.buildinfo")
                ):
                    raise NotGo(path)
                self.elf_type = elf.header["e_type"]
                self.load_vaddr = min(
                    s["p_vaddr"] - s["p_offset"]
                    for s in elf.iter_segments()
                    if s["p_type"] == "PT_LOAD"
                )
                self._symbols(elf)
                # the global variables: the GC's roots besides the stacks (link addresses)
                self.data_sections = [
                    (name, int(sec["sh_addr"]), int(sec["sh_size"]))
                    for name in DATA_SECTIONS
                    if (sec := elf.get_section_by_name(name)) is not None and sec["sh_size"]
                ]
                if not elf.has_dwarf_info():
                    raise GoLayoutError("it is stripped of DWARF debug information")
                self._dwarf(elf.get_dwarf_info())
        except (OSError, ELFError) as exc:
            raise GoLayoutError(f"cannot read {path}: {exc}") from None

    def _symbols(self, elf: Any) -> None:
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            raise GoLayoutError("it is stripped of its symbol table")
        wanted = (
            "runtime.allgs",
            "runtime.allglen",
            "runtime.waitReasonStrings",
            "runtime.mheap_",
        )
        found = {}
        for name in wanted:
            syms = symtab.get_symbol_by_name(name)
            if syms:
                found[name] = (int(syms[0]["st_value"]), int(syms[0]["st_size"]))
        missing = [n for n in wanted[:2] if n not in found]
        if missing:
            raise GoLayoutError(f"its symbol table lacks {', '.join(missing)}")
        self.allgs = found["runtime.allgs"][0]
        self.allglen = found["runtime.allglen"][0]
        self.wait_reasons = found.get("runtime.waitReasonStrings")
        self.mheap = found.get("runtime.mheap_", (0, 0))[0]

    def _dwarf(self, dwarf: Any) -> None:
        from elftools.dwarf.dwarf_expr import DWARFExprParser  # noqa: PLC0415
        from elftools.dwarf.locationlists import BaseAddressEntry, LocationEntry  # noqa: PLC0415

        units: dict[str, list[Any]] = {}  # a package may span several units
        for cu in dwarf.iter_CUs():
            units.setdefault(cu.get_top_DIE().attributes["DW_AT_name"].value.decode(), []).append(
                cu
            )
        if "runtime" not in units or "internal/poll" not in units:
            raise GoLayoutError("its DWARF has no runtime or internal/poll unit")
        # the Go linker puts every type in the runtime unit; look elsewhere only if it did not
        wanted = (
            "runtime.g",
            "runtime.gobuf",
            "internal/poll.FD",
            "runtime.mheap",
            "runtime.heapArena",
            "runtime.mspan",
        )
        types: dict[str, dict[str, int]] = {}
        for cu in units["runtime"] + [
            cu for name, cus in units.items() if name != "runtime" for cu in cus
        ]:
            if set(wanted) <= set(types):
                break
            types = {**_types(cu, wanted), **types}
        g, gobuf = types.get("runtime.g"), types.get("runtime.gobuf")
        if g is None or gobuf is None:
            raise GoLayoutError("its DWARF lacks runtime.g or runtime.gobuf")
        try:
            self.g_status = g["atomicstatus"]
            self.g_wait_reason = g["waitreason"]
            self.g_goid = g["goid"]
            self.g_sp = g["sched"] + gobuf["sp"]
            self.g_pc = g["sched"] + gobuf["pc"]
            self.g_stack = g["stack"]  # runtime.stack {lo, hi}
        except KeyError as exc:
            raise GoLayoutError(f"runtime.g has no member {exc}") from None
        self.g_size = max(self.g_status, self.g_wait_reason, self.g_goid, self.g_sp, self.g_pc) + 8
        self.g_size = max(self.g_size, self.g_stack + 16)
        self.g_bytes = g.get(SIZE, 0)  # sizeof(runtime.g): what a goroutine takes besides its stack

        constants: dict[str, int] = {}
        for cu in units["runtime"]:
            constants.update(_constants(cu))
        self.heap = HeapLayout.from_dwarf(types, constants)
        fd_type = types.get("internal/poll.FD", {})
        if "Sysfd" not in fd_type:
            raise GoLayoutError("internal/poll.FD has no Sysfd")
        self.sysfd = fd_type["Sysfd"]
        parser = DWARFExprParser(dwarf.structs)
        lists = dwarf.location_lists()
        self.read_range: tuple[int, int] | None = None
        self.locations: dict[str, list[tuple[int, int, list[Any]]]] = {}
        for die in (d for cu in units["internal/poll"] for d in cu.iter_DIEs()):
            name = die.attributes.get("DW_AT_name")
            if die.tag != "DW_TAG_subprogram" or not name or name.value.decode() != READ_FUNCTION:
                continue
            low = die.attributes["DW_AT_low_pc"].value
            high = die.attributes["DW_AT_high_pc"].value
            if die.attributes["DW_AT_high_pc"].form != "DW_FORM_addr":
                high += low
            self.read_range = (low, high)
            if die.attributes.get("DW_AT_frame_base").value != [DW_OP_CALL_FRAME_CFA]:
                raise GoLayoutError(f"{READ_FUNCTION}'s frame base is not the CFA")
            for param in die.iter_children():
                pname = param.attributes.get("DW_AT_name")
                loc = param.attributes.get("DW_AT_location")
                if param.tag != "DW_TAG_formal_parameter" or not pname or not loc:
                    continue
                ranges = []
                if loc.form == "DW_FORM_sec_offset":
                    base = low
                    for entry in lists.get_location_list_at_offset(loc.value):
                        if isinstance(entry, BaseAddressEntry):
                            base = entry.base_address
                        elif isinstance(entry, LocationEntry):
                            ops = parser.parse_expr(entry.loc_expr)
                            ranges.append((base + entry.begin_offset, base + entry.end_offset, ops))
                elif loc.value:
                    ranges.append((low, high, parser.parse_expr(loc.value)))
                self.locations[pname.value.decode()] = ranges
            break
        if self.read_range is None or not {"fd", "p"} <= set(self.locations):
            raise GoLayoutError(f"its DWARF has no {READ_FUNCTION} with parameters fd and p")
        self.frames = _call_frames(dwarf)
        self._starts = [f.start for f in self.frames]

    def cfa(self, pc: int, sp: int) -> int | None:
        """The canonical frame address of the frame executing at `pc` with stack pointer `sp`."""
        i = bisect.bisect_right(self._starts, pc) - 1
        if i < 0 or pc >= self.frames[i].end:
            return None
        frame = self.frames[i]
        j = bisect.bisect_right(frame.pcs, pc) - 1
        offset = frame.offsets[j] if j >= 0 else None
        return None if offset is None else sp + offset

    def pieces(self, name: str, pc: int, cfa: int) -> list[Piece] | None:
        """Where parameter `name` of the Read frame is at `pc`; None where DWARF says nothing."""
        for low, high, ops in self.locations[name]:
            if low <= pc < high:
                return _evaluate(ops, cfa)
        return None


@dataclass(frozen=True)
class HeapLayout:
    """Where the Go heap says which span (and so which object) an address is in:
    mheap_.arenas[l1][l2] -> heapArena, .spans[page in arena] -> mspan {startAddr, npages,
    elemsize, state}. None members: this binary's runtime does not match (unknown).

    What enumerating every object needs besides (probes.allocators.go.GoHeap.objects):
    mheap.allArenas (the arenas mapped), and of an mspan nelems, freeindex, allocBits and
    spanclass (its low bit: noscan). None: not in this runtime's DWARF (the enumeration then
    says so; find() does not need them)."""

    arenas: int  # offset of mheap.arenas
    spans: int  # offset of heapArena.spans
    start_addr: int
    npages: int
    elemsize: int
    state: int | None
    page_size: int
    arena_bytes: int
    pages_per_arena: int
    l1_bits: int
    l2_bits: int
    base_offset: int
    all_arenas: int | None = None  # offset of mheap.allArenas ([]arenaIdx)
    nelems: int | None = None
    freeindex: int | None = None
    alloc_bits: int | None = None  # *gcBits: bit k set = object k allocated at the last sweep
    spanclass: int | None = None
    span_bytes: int = 0  # sizeof(runtime.mspan), 0 if DWARF did not say

    @property
    def enumerable(self) -> bool:
        """Whether every object of the heap can be listed (GoHeap.objects)."""
        needed = (self.all_arenas, self.nelems, self.freeindex, self.alloc_bits, self.state)
        return all(x is not None for x in needed) and self.spanclass is not None

    @classmethod
    def from_dwarf(
        cls, types: dict[str, dict[str, int]], consts: dict[str, int]
    ) -> HeapLayout | None:
        mheap, arena, span = (
            types.get(t) for t in ("runtime.mheap", "runtime.heapArena", "runtime.mspan")
        )
        needed = ("pageSize", "heapArenaBytes", "pagesPerArena", "arenaL1Bits", "arenaL2Bits")
        if not mheap or not arena or not span or any(c not in consts for c in needed):
            return None
        try:
            return cls(
                arenas=mheap["arenas"],
                spans=arena["spans"],
                start_addr=span["startAddr"],
                npages=span["npages"],
                elemsize=span["elemsize"],
                state=span.get("state"),
                page_size=consts["pageSize"],
                arena_bytes=consts["heapArenaBytes"],
                pages_per_arena=consts["pagesPerArena"],
                l1_bits=consts["arenaL1Bits"],
                l2_bits=consts["arenaL2Bits"],
                base_offset=ARENA_BASE_OFFSET.get(platform.machine(), 0),
                all_arenas=mheap.get("allArenas"),
                nelems=span.get("nelems"),
                freeindex=span.get("freeindex"),
                alloc_bits=span.get("allocBits"),
                spanclass=span.get("spanclass"),
                span_bytes=span.get(SIZE, 0),
            )
        except KeyError:
            return None


def _constants(cu: Any) -> dict[str, int]:
    """The runtime's constants its DWARF carries (runtime.pageSize, ...), by short name."""
    out = {}
    for die in cu.iter_DIEs():
        name = die.attributes.get("DW_AT_name")
        value = die.attributes.get("DW_AT_const_value")
        if die.tag == "DW_TAG_constant" and name and value is not None:
            full = name.value.decode()
            if full.startswith("runtime."):
                out[full[len("runtime.") :]] = int(value.value)
    return out


SIZE = ""  # _types' key for a struct's byte size (no member is unnamed)


def _types(cu: Any, names: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Member offsets of the named struct types in one compile unit."""
    out: dict[str, dict[str, int]] = {}
    for die in cu.iter_DIEs():
        name = die.attributes.get("DW_AT_name")
        if die.tag != "DW_TAG_structure_type" or not name or name.value.decode() not in names:
            continue
        members = {}
        size = die.attributes.get("DW_AT_byte_size")
        if size is not None:
            members[SIZE] = int(size.value)  # the struct's own size, beside its members'
        for member in die.iter_children():
            mname = member.attributes.get("DW_AT_name")
            where = member.attributes.get("DW_AT_data_member_location")
            if member.tag == "DW_TAG_member" and mname and where is not None:
                members[mname.value.decode()] = int(where.value)
        out.setdefault(name.value.decode(), members)
    return out


def _call_frames(dwarf: Any) -> list[_Frame]:
    """Each function's CFA rules (Go's CFA is always rsp + an offset)."""
    from elftools.dwarf.callframe import FDE  # noqa: PLC0415

    frames = []
    for entry in dwarf.CFI_entries():
        if not isinstance(entry, FDE):
            continue
        start = entry.header["initial_location"]
        pcs, offsets = [], []
        for row in entry.get_decoded().table:
            rule = row.get("cfa")
            pcs.append(row["pc"])
            offsets.append(rule.offset if rule is not None and rule.reg == RSP else None)
        frames.append(_Frame(start, start + entry.header["address_range"], pcs, offsets))
    frames.sort(key=lambda f: f.start)
    return frames


def _evaluate(ops: list[Any], cfa: int) -> list[Piece]:
    """A location expression of a parked frame as pieces (the frame base is the CFA)."""
    pieces: list[Piece] = []
    current: int | None = None
    for op in ops:
        if op.op_name == "DW_OP_call_frame_cfa":
            current = cfa
        elif op.op_name == "DW_OP_fbreg":
            current = cfa + op.args[0]
        elif op.op_name.startswith("DW_OP_reg"):
            current = None  # a register of a frame that is not running: unknowable
        elif op.op_name == "DW_OP_piece":
            pieces.append(Piece(current, op.args[0]))
            current = None
        else:
            return [Piece(None, 8)]
    if not pieces:
        pieces.append(Piece(current, 8))
    return pieces


@functools.lru_cache(maxsize=8)
def _binary(key: tuple[int, int, int], path: str) -> GoBinary:
    return GoBinary(path)


def binary_of(pid: int) -> GoBinary:
    """The layout of `pid`'s executable (parsed once per binary). NotGo, GoLayoutError."""
    path = f"/proc/{pid}/exe"
    try:
        st = os.stat(path)
    except OSError as exc:
        raise GoLayoutError(f"cannot open the executable of pid {pid}: {exc.strerror}") from None
    return _binary((st.st_dev, st.st_ino, int(st.st_mtime)), path)


def load_bias(pid: int, binary: GoBinary) -> int:
    """How far a position-independent executable was moved from its link address."""
    if binary.elf_type != "ET_DYN":
        return 0
    exe = os.readlink(f"/proc/{pid}/exe")
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == exe and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16) - binary.load_vaddr
    return 0
