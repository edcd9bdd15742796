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

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from probes.golang import GoBinary, GoLayoutError, NotGo, binary_of, load_bias
from probes.process_memory import MemoryReadError, ProcessMemory

G_WAITING = 4  # runtime._Gwaiting
G_SCAN = 0x1000  # runtime._Gscan, or'ed in while the GC scans the stack
MAX_FRAMES = 64
MAX_GOROUTINES = 4_000_000


@dataclass(frozen=True)
class ParkedRead:
    """A goroutine parked in a socket read, holding its buffer."""

    goid: int
    fd: int
    addr: int
    length: int
    stack_bytes: int = 0  # its stack: hi - lo (Go's stacks are wholly its own)
    g_bytes: int = 0  # its runtime.g
    sp: int = 0  # its saved stack pointer (g.sched.sp): [sp, hi) holds its frames, its roots
    hi: int = 0  # the top of its stack (g.stack.hi); 0: not known


@dataclass
class GoScan:
    """What a walk of one process found."""

    reads: list[ParkedRead] = field(default_factory=list)
    io_waiting: int = 0  # goroutines waiting on the netpoller ("IO wait"), reads or not
    skipped: int = 0  # goroutines that moved or could not be decoded while read
    unknown_why: str | None = None  # set when parked reads could not be looked for at all


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
    lo, hi = struct.unpack_from("<QQ", raw, binary.g_stack)
    stack = hi - lo if 0 < lo < hi and hi - lo < 1 << 31 else 0
    saved = (sp, hi) if stack and lo <= sp <= hi else (0, 0)
    assert binary.read_range is not None
    try:
        for depth in range(MAX_FRAMES):
            cfa = binary.cfa(pc - 1, sp)
            if cfa is None:  # the bottom of the stack (runtime.goexit), or lost on the way
                return "other" if depth > 1 else "skipped"
            if binary.read_range[0] <= pc - 1 < binary.read_range[1]:
                return _decode_read(mem, binary, goid, pc - 1, cfa, is_socket, stack, saved)
            pc, sp = mem.u64(cfa - 8), cfa
    except MemoryReadError:
        return "skipped"
    return "other"  # parked on IO, but not in a read (a write, an accept, a dial)


def _decode_read(
    mem: ProcessMemory,
    binary: GoBinary,
    goid: int,
    pc: int,
    cfa: int,
    is_socket: Any,
    stack: int,
    saved: tuple[int, int] = (0, 0),
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
    return ParkedRead(goid, fd, addr, length, stack, binary.g_bytes, *saved)
