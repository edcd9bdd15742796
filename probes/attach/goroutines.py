"""Goroutines parked in socket reads, found from outside the process: the Go runtime's own
structures read from /proc/PID/mem, laid out by the binary's DWARF.

A goroutine blocked in `conn.Read(buf)` on an idle connection is parked by the netpoller
(status _Gwaiting, wait reason "IO wait") inside `internal/poll.(*FD).Read`, whose argument
`p` is the buffer it holds. From the runtime's list of goroutines (`runtime.allgs`) each such
goroutine's stack is unwound from its saved registers (g.sched) with the binary's call-frame
information (.debug_frame) up to that frame, where the DWARF location lists say where `p` and
the receiver (the FD, whose Sysfd is the socket) are. Layouts come from the binary's DWARF,
so other Go versions work as long as these names exist. A stripped binary has no DWARF: its
parked readers cannot be found this way, and the caller says so.

Nothing here writes to or stops the process; a goroutine that moves while it is read is
skipped and counted, never guessed.
"""

from __future__ import annotations

import bisect
import functools
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from probes.process_memory import MemoryReadError, ProcessMemory

G_WAITING = 4  # runtime._Gwaiting
G_SCAN = 0x1000  # runtime._Gscan, or'ed in while the GC scans the stack
READ_FUNCTION = "internal/poll.(*FD).Read"
MAX_FRAMES = 64
MAX_GOROUTINES = 4_000_000
DW_OP_CALL_FRAME_CFA = 0x9C
RSP = 7  # DWARF register number of rsp on x86-64


class NotGo(Exception):
    """The binary is not a Go program."""


class GoLayoutError(Exception):
    """A Go binary whose runtime layout cannot be read (stripped, or names this reader does
    not know); the message says which."""


@dataclass(frozen=True)
class ParkedRead:
    """A goroutine parked in a socket read, holding its buffer."""

    goid: int
    fd: int
    addr: int
    length: int


@dataclass
class GoScan:
    """What a walk of one process found."""

    reads: list[ParkedRead] = field(default_factory=list)
    io_waiting: int = 0  # goroutines waiting on the netpoller ("IO wait"), reads or not
    skipped: int = 0  # goroutines that moved or could not be decoded while read
    unknown_why: str | None = None  # set when parked reads could not be looked for at all


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
                if not elf.has_dwarf_info():
                    raise GoLayoutError("it is stripped of DWARF debug information")
                self._dwarf(elf.get_dwarf_info())
        except (OSError, ELFError) as exc:
            raise GoLayoutError(f"cannot read {path}: {exc}") from None

    def _symbols(self, elf: Any) -> None:
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            raise GoLayoutError("it is stripped of its symbol table")
        wanted = ("runtime.allgs", "runtime.allglen", "runtime.waitReasonStrings")
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

    def _dwarf(self, dwarf: Any) -> None:
        from elftools.dwarf.dwarf_expr import DWARFExprParser  # noqa: PLC0415
        from elftools.dwarf.locationlists import BaseAddressEntry, LocationEntry  # noqa: PLC0415

        units = {
            cu.get_top_DIE().attributes["DW_AT_name"].value.decode(): cu for cu in dwarf.iter_CUs()
        }
        if "runtime" not in units or "internal/poll" not in units:
            raise GoLayoutError("its DWARF has no runtime or internal/poll unit")
        # the Go linker puts every type in the runtime unit; look elsewhere only if it did not
        wanted = ("runtime.g", "runtime.gobuf", "internal/poll.FD")
        types = _types(units["runtime"], wanted)
        for cu in units.values():
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
        except KeyError as exc:
            raise GoLayoutError(f"runtime.g has no member {exc}") from None
        self.g_size = max(self.g_status, self.g_wait_reason, self.g_goid, self.g_sp, self.g_pc) + 8

        poll = units["internal/poll"]
        fd_type = types.get("internal/poll.FD", {})
        if "Sysfd" not in fd_type:
            raise GoLayoutError("internal/poll.FD has no Sysfd")
        self.sysfd = fd_type["Sysfd"]
        parser = DWARFExprParser(dwarf.structs)
        lists = dwarf.location_lists()
        self.read_range: tuple[int, int] | None = None
        self.locations: dict[str, list[tuple[int, int, list[Any]]]] = {}
        for die in poll.iter_DIEs():
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


def _types(cu: Any, names: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Member offsets of the named struct types in one compile unit."""
    out: dict[str, dict[str, int]] = {}
    for die in cu.iter_DIEs():
        name = die.attributes.get("DW_AT_name")
        if die.tag != "DW_TAG_structure_type" or not name or name.value.decode() not in names:
            continue
        members = {}
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


def _strings(mem: ProcessMemory, addr: int, count: int) -> list[str]:
    out = []
    raw = mem.read(addr, 16 * count)
    for i in range(count):
        ptr, length = struct.unpack_from("<QQ", raw, 16 * i)
        out.append(mem.read(ptr, length).decode(errors="replace") if 0 < length < 256 else "")
    return out


def _goroutines(mem: ProcessMemory, binary: GoBinary, bias: int) -> Iterator[int]:
    count = mem.u64(binary.allglen + bias)
    if count > MAX_GOROUTINES:
        raise MemoryReadError(f"runtime.allglen reads {count}: not a count of goroutines")
    array = mem.u64(binary.allgs + bias)
    raw = mem.read(array, 8 * count) if count else b""
    yield from struct.unpack(f"<{count}Q", raw)


def _io_wait_reason(mem: ProcessMemory, binary: GoBinary, bias: int) -> int:
    """The runtime's number for the wait reason "IO wait" (runtime.waitReasonStrings)."""
    if binary.wait_reasons:
        addr, size = binary.wait_reasons
        names = _strings(mem, addr + bias, size // 16)
        if "IO wait" in names:
            return names.index("IO wait")
    return 2  # waitReasonIOWait since Go 1.11


def parked_reads(pid: int, is_socket: Any) -> GoScan:
    """The goroutines of `pid` parked in a read of a socket (`is_socket(fd)`), with their
    buffers. A process that is not Go gives an empty scan; one whose layout cannot be read
    says why in `unknown_why`."""
    try:
        binary = binary_of(pid)
    except NotGo:
        return GoScan()
    except GoLayoutError as exc:
        return GoScan(unknown_why=f"a Go binary whose goroutines cannot be read: {exc}")
    scan = GoScan()
    try:
        with ProcessMemory(pid) as mem:
            bias = load_bias(pid, binary)
            io_wait = _io_wait_reason(mem, binary, bias)
            for g in _goroutines(mem, binary, bias):
                found = _parked_read(mem, binary, g, io_wait, is_socket)
                if found is None:
                    continue
                scan.io_waiting += 1
                if isinstance(found, ParkedRead):
                    scan.reads.append(found)
                elif found == "skipped":
                    scan.skipped += 1
    except MemoryReadError as exc:
        return GoScan(unknown_why=f"the Go runtime could not be read: {exc}")
    return scan


def _parked_read(
    mem: ProcessMemory, binary: GoBinary, g: int, io_wait: int, is_socket: Any
) -> ParkedRead | str | None:
    """The read a goroutine is parked in; "skipped" if it waits on IO but could not be
    decoded (or waits on something else: a write, an accept), None if it is not waiting."""
    try:
        raw = mem.read(g, binary.g_size)
    except MemoryReadError:
        return None  # a goroutine freed meanwhile
    status = struct.unpack_from("<I", raw, binary.g_status)[0] & ~G_SCAN
    reason = raw[binary.g_wait_reason]
    if status != G_WAITING or reason != io_wait:
        return None
    goid = struct.unpack_from("<q", raw, binary.g_goid)[0]
    pc = struct.unpack_from("<Q", raw, binary.g_pc)[0]
    sp = struct.unpack_from("<Q", raw, binary.g_sp)[0]
    assert binary.read_range is not None
    try:
        for depth in range(MAX_FRAMES):
            cfa = binary.cfa(pc - 1, sp)
            if cfa is None:  # the bottom of the stack (runtime.goexit), or lost on the way
                return "other" if depth > 1 else "skipped"
            if binary.read_range[0] <= pc - 1 < binary.read_range[1]:
                return _decode_read(mem, binary, goid, pc - 1, cfa, is_socket)
            pc, sp = mem.u64(cfa - 8), cfa
    except MemoryReadError:
        return "skipped"
    return "other"  # parked on IO, but not in a read (a write, an accept, a dial)


def _decode_read(
    mem: ProcessMemory, binary: GoBinary, goid: int, pc: int, cfa: int, is_socket: Any
) -> ParkedRead | str:
    receiver = binary.pieces("fd", pc, cfa)
    buffer = binary.pieces("p", pc, cfa)
    if not receiver or receiver[0].addr is None or not buffer or len(buffer) < 2:
        return "skipped"
    if buffer[0].addr is None or buffer[1].addr is None:
        return "skipped"
    fd_struct = mem.u64(receiver[0].addr)
    fd = struct.unpack("<q", mem.read(fd_struct + binary.sysfd, 8))[0]
    addr, length = mem.u64(buffer[0].addr), mem.u64(buffer[1].addr)
    if not 0 <= fd < 1 << 31 or length >= 1 << 40 or not is_socket(fd):
        return "other" if 0 <= fd < 1 << 31 else "skipped"
    return ParkedRead(goid, fd, addr, length)
