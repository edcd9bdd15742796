"""The state each connection keeps alive, found without waiting for it to change: the
allocations of a glibc heap that one connection's roots reach and no other connection's
(the rule is probes.attach.reach's), read from /proc at attach and at the end of a --memory
recording.

Roots of a connection: its waiter thread's stack from its stack pointer to the end of its
stack mapping (a thread's TLS and glibc's descriptor of it are at the top), and the pointer
the program registered for it with epoll (`data` in /proc/PID/fdinfo/EPFD). When one
allocation or one mapping holds the pointers of several connections (an array of connection
slots, as event-loop servers keep), each connection's root is its slot - the words from its
pointer to the next one's (the smallest gap between them) - and the array is the program's.
Global roots: every other writable mapping (the binary's and libraries' data, other threads'
live stacks, memory the program mapped itself), except the heap itself, whose free chunks
and metadata hold stale pointers.

How: glibc's chunk chains walked (probes.allocators.glibc), then the heap read with a few
large preads of /proc/PID/mem (only the pages that hold memory: reading others would map
the zero page into the target), the process never stopped. The heap may change meanwhile:
chunk headers read again in the snapshot that no longer match the walk, and short reads,
are counted as reads that raced. A time budget bounds the walk; what it cut short is
unknown, with why. Registers are not read (no ptrace): a pointer a thread holds only in a
register across its call is missed. Chunks glibc keeps free in a thread's cache or its
fastbins look in use from the outside, and count where they are reached from.

Only sizes, counts and addresses reach the trace, never memory contents.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from probes.allocators import pymalloc
from probes.allocators.base import Mapping as MemoryMapping
from probes.allocators.glibc import (
    HEADER,
    IS_MMAPPED,
    CorruptHeap,
    GlibcHeap,
    HeapTooBig,
)
from probes.attach import reach
from probes.attach.waiters import Waiter, blocked_call
from probes.attach.walked import Found, Walked, credit
from probes.format.schema import SYSCALLS
from probes.process_memory import PAGE, MemoryReadError, ProcessMemory

DEFAULT_BUDGET_S = 10.0
MAX_CHUNKS = 20_000_000  # ~2.5 GiB of 128-byte chunks: past it, unknown
READ_SPAN = 32 << 20  # bytes per pread
MAX_SLOT = 1 << 16  # a connection's slot in an array of them: at most this many bytes
EPOLL = "anon_inode:[eventpoll]"
# runtimes whose objects live in heaps of their own, on top of glibc's (mapped by mmap):
# what their objects hold is not walked, so what a connection owns is a lower bound
PYMALLOC = "CPython's small objects (pymalloc's arenas)"  # walked: probes.allocators.pymalloc
RUNTIMES = {  # a mapped file's name (its start) -> the runtime's heap
    "libpython": PYMALLOC,
    "python3": PYMALLOC,
    "libjvm.so": "the JVM's heap",
    "libnode.so": "V8's heap",
    "node": "V8's heap",  # the executable itself: the whole name
}
_PLAIN_READS = {SYSCALLS["read"], SYSCALLS["recvfrom"]}  # the buffer: the 2nd argument
_VECTOR_READS = {SYSCALLS["readv"]: 0, SYSCALLS["recvmsg"]: 16}  # the iovec's pointer at


@dataclass
class Roots:
    """One connection's roots in its process."""

    fd: int
    tid: int = 0  # its waiter thread, 0: none
    stack: tuple[int, int] | None = None  # [sp, end) of the waiter's stack mapping
    stack_mapping: tuple[int, int] | None = None
    pointers: list[int] = field(default_factory=list)  # registered with epoll for it
    user_data: list[int] = field(default_factory=list)  # of its io_uring requests
    buffers: set[int] = field(default_factory=set)  # its buffers (the buffer part's)

    @property
    def kind(self) -> str:
        kinds = (("stack", self.stack), ("epoll", self.pointers), ("uring", self.user_data))
        return "+".join(k for k, has in kinds if has)


# --- the roots, from /proc -----------------------------------------------------------------
def epoll_registrations(pid: int) -> dict[int, list[int]]:
    """fd -> the `data` values the program registered for it, over its epoll sets."""
    out: dict[int, list[int]] = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != EPOLL:
                continue
            with open(f"/proc/{pid}/fdinfo/{name}", encoding="ascii", errors="replace") as f:
                lines = [line.split() for line in f if line.startswith("tfd:")]
        except OSError:
            continue
        for fields in lines:  # tfd: N events: MASK data: VALUE pos: ...
            try:
                fd = int(fields[1])
                data = int(fields[fields.index("data:") + 1], 16)
            except (ValueError, IndexError):
                continue
            out.setdefault(fd, []).append(data)
    return out


def _word(pid: int, addr: int) -> int:
    """The 8 bytes at `addr` in `pid`'s memory, 0 when they cannot be read."""
    try:
        with ProcessMemory(pid) as mem:
            return mem.u64(addr)
    except MemoryReadError:
        return 0


def runtime_heap(mappings: Sequence[MemoryMapping]) -> str | None:
    """What heap of its own a runtime mapped in this process keeps objects in, if any."""
    for m in mappings:
        name = m.name.rsplit("/", 1)[-1]
        for prefix, heap in RUNTIMES.items():
            whole = prefix == "node"
            if m.name.startswith("/") and (name == prefix if whole else name.startswith(prefix)):
                return heap
    return None


def _mapping_of(mappings: Sequence[MemoryMapping], addr: int) -> MemoryMapping | None:
    i = bisect.bisect_right([m.start for m in mappings], addr) - 1
    return mappings[i] if i >= 0 and addr < mappings[i].end else None


def roots_of(
    pid: int,
    waiters: Sequence[Waiter],
    connections: Iterable[int],
    buffers: Mapping[int, Iterable[int]],
    mappings: Sequence[MemoryMapping],
    user_data: Mapping[int, Iterable[int]] | None = None,
) -> tuple[list[Roots], list[tuple[int, int, int]]]:
    """(each connection's roots, the other blocked threads' stacks as (mapping start, stack
    pointer, mapping end)): `waiters` its threads blocked on one connection each,
    `connections` its connections' fds, `buffers` each fd's buffers the recorder knows
    of, `user_data` the user_data of each fd's io_uring requests seen."""
    by_fd: dict[int, Roots] = {}
    wanted = set(connections)
    waiting = {w.tid: w.fd for w in waiters if w.pid == pid}
    others: list[tuple[int, int, int]] = []
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        tids = []
    for tid in tids:
        blocked = blocked_call(pid, tid)
        if blocked is None:
            continue  # running: its whole stack is the program's
        nr, args, sp = blocked
        mapping = _mapping_of(mappings, sp)
        if mapping is None:
            continue
        fd = waiting.get(tid)
        if fd is None:
            others.append((mapping.start, sp & ~7, mapping.end))
            continue
        roots = by_fd.setdefault(fd, Roots(fd))
        roots.tid = tid
        roots.stack = (sp & ~7, mapping.end)
        roots.stack_mapping = (mapping.start, mapping.end)
        if nr in _PLAIN_READS and args[1]:
            roots.buffers.add(args[1])
        elif nr in _VECTOR_READS and args[1]:  # the first iovec's base
            iov = _word(pid, args[1] + _VECTOR_READS[nr]) if _VECTOR_READS[nr] else args[1]
            base = _word(pid, iov) if iov else 0
            if base:
                roots.buffers.add(base)
    for fd, values in epoll_registrations(pid).items():
        if fd in wanted:
            by_fd.setdefault(fd, Roots(fd)).pointers.extend(values)
    for fd, data in (user_data or {}).items():
        if fd in wanted:
            by_fd.setdefault(fd, Roots(fd)).user_data.extend(data)
    for fd, addrs in buffers.items():
        if fd in by_fd:
            by_fd[fd].buffers.update(addrs)
    return [by_fd[fd] for fd in sorted(by_fd)], others


# --- reading the process --------------------------------------------------------------------
class _Reader:
    """Reads of the process's memory into word arrays, counting those that raced."""

    def __init__(self, mem: ProcessMemory) -> None:
        self.mem = mem
        self.raced = 0

    def dense(self, lo: int, hi: int) -> np.ndarray:
        """The words of [lo, hi) (8-aligned), zeros on pages that hold no memory."""
        words = np.zeros((hi - lo) // 8, np.uint64)
        for a, b in self._runs(lo, hi):
            self._fill(words, lo, a, b)
        return words

    def sparse(self, lo: int, hi: int) -> list[tuple[int, np.ndarray]]:
        """The runs of [lo, hi) that hold memory, as (address, words)."""
        out = []
        for a, b in self._runs(lo, hi):
            words = np.zeros((b - a) // 8, np.uint64)
            self._fill(words, a, a, b)
            out.append((a, words))
        return out

    def _runs(self, lo: int, hi: int) -> list[tuple[int, int]]:
        first, last = lo - lo % PAGE, -(-hi // PAGE) * PAGE
        try:
            pages = self.mem.touched_pages(first, last)
        except MemoryReadError:
            self.raced += 1
            return []
        runs: list[tuple[int, int]] = []
        for p in pages:
            if runs and runs[-1][1] == p:
                runs[-1] = (runs[-1][0], p + PAGE)
            else:
                runs.append((p, p + PAGE))
        return [(max(a, lo), min(b, hi)) for a, b in runs if max(a, lo) < min(b, hi)]

    def _fill(self, words: np.ndarray, base: int, a: int, b: int) -> None:
        view = words.view(np.uint8).data
        for at in range(a, b, READ_SPAN):
            end = min(b, at + READ_SPAN)
            got = self.mem.read_into(at, view[at - base : end - base])
            if got != end - at:
                self.raced += 1
                break


@dataclass
class _Heap:
    """The live allocations as a graph, and the snapshot they were read in."""

    nodes: reach.Nodes
    segments: list[tuple[int, np.ndarray]]  # (address, words), in address order
    extents: list[tuple[int, int]]  # what the heap spans (not global roots)

    def words(self, lo: int, hi: int) -> np.ndarray:
        i = bisect.bisect_right([s[0] for s in self.segments], lo) - 1
        if i < 0:
            return np.zeros(0, np.uint64)
        base, words = self.segments[i]
        return words[(lo - base) // 8 : (hi - base) // 8]


def _read_heap(
    glibc: GlibcHeap, reader: _Reader, mappings: list[MemoryMapping], limit: int
) -> _Heap:
    """Walk the chunk chains, then read every heap at once and keep the chunks still in
    use (the next chunk's PREV_INUSE bit, in the snapshot)."""
    heaps, blocks = glibc.chunks(mappings, limit)
    los, his, ends, sizes, segments, extents = [], [], [], [], [], []
    for heap, first, starts, lengths, end in heaps:
        mapping = _mapping_of(mappings, end - 1)
        limit_end = mapping.end if mapping is not None else end
        hi = end + HEADER if end + HEADER <= limit_end else end
        words = reader.dense(first, hi)
        st = np.asarray(starts, np.uint64)
        sz = np.asarray(lengths, np.uint64)
        head = ((st - np.uint64(first)) // np.uint64(8) + np.uint64(1)).astype(np.int64)
        reader.raced += int(np.count_nonzero(words[head] & ~np.uint64(7) != sz))
        nxt = head + (sz // np.uint64(8)).astype(np.int64)
        inside = nxt < len(words)
        # the last chunk has no successor here: it is the top chunk (or ends the heap at a
        # mapping's end), free as glibc's walker counts it
        used = np.zeros(len(st), bool)
        used[inside] = (words[nxt[inside]] & np.uint64(1)) != 0
        los.append(st[used] + np.uint64(HEADER))
        his.append(st[used] + sz[used])
        ends.append(st[used] + sz[used] + np.uint64(8))
        sizes.append(sz[used].astype(np.int64))
        segments.append((first, words))
        extents.append((heap, max(limit_end, hi)))
    for chunk, length in blocks:
        words = reader.dense(chunk, chunk + length)
        if len(words) < 2 or int(words[1]) != length | IS_MMAPPED:
            reader.raced += 1
        los.append(np.array([chunk + HEADER], np.uint64))
        his.append(np.array([chunk + length], np.uint64))
        ends.append(his[-1])
        sizes.append(np.array([length], np.int64))
        segments.append((chunk, words))
        extents.append((chunk, chunk + length))
    return _heap(los, his, ends, sizes, segments, extents)


def _heap(
    los: list[np.ndarray],
    his: list[np.ndarray],
    ends: list[np.ndarray],
    sizes: list[np.ndarray],
    segments: list[tuple[int, np.ndarray]],
    extents: list[tuple[int, int]],
) -> _Heap:
    """The heap of these allocations (their pieces, in any order; disjoint)."""
    if not los:
        empty = np.zeros(0, np.uint64)
        return _Heap(reach.Nodes(empty, empty, np.zeros(0, np.int64)), [], [])
    node_lo, node_hi = np.concatenate(los), np.concatenate(his)
    order = np.argsort(node_lo, kind="stable")
    segments.sort(key=lambda s: s[0])
    nodes = reach.Nodes(
        node_lo[order],
        node_hi[order],
        np.concatenate(sizes)[order],
        np.concatenate(ends)[order],
    )
    return _Heap(nodes, segments, sorted(extents))


def _with_pymalloc(
    heap: _Heap, reader: _Reader, mappings: list[MemoryMapping], holes: list[tuple[int, int]]
) -> tuple[_Heap, pymalloc.Blocks]:
    """`heap` with CPython's small objects and frame chunks (probes.allocators.pymalloc),
    found in the process's anonymous memory outside glibc's heaps and the threads' stacks."""
    taken = sorted(heap.extents + holes)
    segments = []
    for m in mappings:
        if m.perms[:2] == "rw" and m.perms[3:4] == "p" and m.anonymous:
            for lo, hi in _minus(m.start, m.end, taken):
                segments += reader.sparse(lo, hi)
    found = pymalloc.find(segments)
    if not found.lo:
        return heap, found
    nodes = heap.nodes
    los = [nodes.lo, *found.lo]
    his = [nodes.hi, *found.hi]
    ends = [nodes.ends if nodes.ends is not None else nodes.hi, *found.hi]
    sizes = [nodes.bytes, *found.bytes]
    mine = sorted(found.extents)
    kept = [
        s
        for s in segments
        if _minus(s[0], s[0] + 8 * len(s[1]), mine) != [(s[0], s[0] + 8 * len(s[1]))]
    ]
    reader.raced += found.raced
    return _heap(los, his, ends, sizes, heap.segments + kept, heap.extents + mine), found


def _minus(lo: int, hi: int, holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) less the sorted, disjoint `holes`."""
    out, at = [], lo
    for a, b in holes:
        if b <= at or a >= hi:
            continue
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < hi:
        out.append((at, hi))
    return out


def _slots(pointers: dict[int, list[int]]) -> dict[int, int]:
    """Pointer -> the slot size of the array it lies in (the smallest gap between the
    pointers of different connections in one container), for containers holding several
    connections' pointers."""
    out: dict[int, int] = {}
    values = sorted({p for ps in pointers.values() for p in ps})
    if len(values) < 2:
        return out
    gaps = np.diff(np.asarray(values, np.int64))
    gap = int(gaps[gaps > 0].min()) if np.any(gaps > 0) else 0
    if 8 <= gap <= MAX_SLOT:
        out = {p: gap - gap % 8 for p in values}
    return out


def _epoll_seeds(
    roots: list[Roots], heap: _Heap, reader: _Reader, mappings: list[MemoryMapping]
) -> tuple[list[np.ndarray], list[str]]:
    """Each connection's seeds from its epoll pointers, and why a connection's pointers
    root nothing ("" when they do or it has none)."""
    nodes = heap.nodes
    by_container: dict[tuple[str, int], dict[int, list[int]]] = {}
    for c, r in enumerate(roots):
        registered = r.pointers + r.user_data
        if not registered:
            continue
        held = nodes.holding(np.asarray(registered, np.uint64))
        for p, node in zip(registered, held.tolist()):
            mapping = _mapping_of(mappings, p) if node < 0 else None
            if node >= 0:
                key = ("node", node)
            elif mapping is not None and "w" in mapping.perms:
                key = ("mapping", mapping.start)
            else:
                continue
            by_container.setdefault(key, {}).setdefault(c, []).append(p)
    seeds: list[list[np.ndarray]] = [[] for _ in roots]
    for (kind, where), by_conn in by_container.items():
        slots = _slots(by_conn) if len(by_conn) > 1 else {}
        for c, ps in by_conn.items():
            for p in ps:
                if p in slots:  # its slot in an array of connections
                    end = p + slots[p]
                    if kind == "node":
                        words = heap.words(p & ~7, min(end, int(nodes.hi[where])) & ~7)
                    else:
                        words = np.concatenate(
                            [w for _, w in reader.sparse(p & ~7, end & ~7)] or [heap.words(0, 0)]
                        )
                    seeds[c].append(reach.targets(words, nodes))
                elif kind == "node":
                    seeds[c].append(np.array([where], np.int64))
    why = "its epoll data or io_uring user_data points to no allocation (the fd, or an index?)"
    whys = ["" if seeds[c] or not (r.pointers or r.user_data) else why for c, r in enumerate(roots)]
    return [np.unique(np.concatenate(s)) if s else np.zeros(0, np.int64) for s in seeds], whys


def walk(
    pid: int,
    mem: ProcessMemory,
    mappings: list[MemoryMapping],
    roots: list[Roots],
    others: list[tuple[int, int, int]],
    budget_s: float = DEFAULT_BUDGET_S,
    limit: int = MAX_CHUNKS,
) -> Walked:
    """Each connection's owned state in process `pid` (whose allocator is glibc's): `roots`
    and `others` as roots_of() found them."""
    began, cpu = time.monotonic(), time.thread_time()
    deadline = began + budget_s
    out = Walked(pid)
    reader = _Reader(mem)

    def done(why: str = "") -> Walked:
        out.why = out.why or why
        out.raced = reader.raced
        out.took_s, out.cpu_s = time.monotonic() - began, time.thread_time() - cpu
        return out

    out.connections = [Found(r.fd, r.tid, r.kind) for r in roots]
    try:
        heap = _read_heap(GlibcHeap(mem), reader, mappings, limit)
    except HeapTooBig as exc:
        return done(f"not walked: a heap of {exc}")
    except (CorruptHeap, MemoryReadError) as exc:
        return done(f"glibc's heap could not be read: {exc}")
    stacks = [(lo, hi) for lo, _sp, hi in others] + [
        r.stack_mapping for r in roots if r.stack_mapping is not None
    ]
    runtime = runtime_heap(mappings)
    if runtime == PYMALLOC:
        try:
            heap, _found = _with_pymalloc(heap, reader, mappings, stacks)
        except MemoryReadError as exc:
            return done(f"CPython's small objects could not be read: {exc}")
        out.allocator = "glibc+pymalloc"
        runtime = None
    nodes = heap.nodes
    out.chunks, out.heap_bytes = len(nodes), int(nodes.bytes.sum())
    if time.monotonic() > deadline:
        return done(f"time budget: {budget_s:g} s ran out reading the heap")
    src, dst = [], []
    for base, words in heap.segments:
        s, d = reach.edges(base, words, nodes)
        src.append(s)
        dst.append(d)
    indptr, indices = reach.csr(
        len(nodes),
        np.concatenate(src) if src else np.zeros(0, np.int64),
        np.concatenate(dst) if dst else np.zeros(0, np.int64),
    )
    del src, dst
    # the roots: each connection's, then the program's (the rest of its writable memory)
    seeds, whys = _epoll_seeds(roots, heap, reader, mappings)
    for c, r in enumerate(roots):
        if r.stack is not None:
            pieces = [w for _, w in reader.sparse(*r.stack)]
            if pieces:
                seeds[c] = np.union1d(seeds[c], reach.targets(np.concatenate(pieces), nodes))
    holes = sorted(heap.extents + stacks)
    global_words = []
    for m in mappings:
        # shared memory holds no pointer into one process's heap (other processes map it
        # elsewhere): a database's shared buffers are not read
        if m.perms[:2] != "rw" or m.perms[3:4] == "s" or m.name in ("[vvar]", "[vsyscall]"):
            continue
        if time.monotonic() > deadline:
            return done(f"time budget: {budget_s:g} s ran out reading the program's memory")
        for lo, hi in _minus(m.start, m.end, holes):
            global_words += [w for _, w in reader.sparse(lo, hi)]
    for _lo, sp, hi in others:  # other threads' live stacks (their dead parts left out)
        global_words += [w for _, w in reader.sparse(sp, hi)]
    cut = credit(out, nodes, (indptr, indices), seeds, global_words, [r.buffers for r in roots],
                 deadline, budget_s)  # fmt: skip
    if cut is None:
        return done(f"time budget: {budget_s:g} s ran out reading the roots")
    for c, (r, found) in enumerate(zip(roots, out.connections)):
        # a stack that points to no allocation owns none; an epoll pointer that is none is
        # no root at all
        found.why = (whys[c] if r.stack is None else "") or cut
    if runtime is not None:
        return done(f"{runtime} are not walked: what it found is a lower bound")
    return done()
