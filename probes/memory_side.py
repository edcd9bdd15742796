"""The memory side of a recording (`record --memory`): what the targets' buffers and
connections cost in memory, measured beside the events.

While recording: the kernel memory of the targets' sockets (sock_diag), the allocation
holding each buffer that matters (posted, parked, last data), looked up by walking the
allocator's own structures unless the allocator is probed (--alloc-probes), and memory points
(sockets held, heap in use, resident memory) whenever a target's open files change, and
the waiters followed (paced scans, only their changes written). As the recording ends,
while the targets still run: how much of those buffers is resident, every buffer (and what
writes were sent from) looked up again, and the stacks that allocated or posted them,
symbolized.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from probes import kernel_objects, residency
from probes.allocators import HeapWalker
from probes.allocators.base import Allocation, Mapping, Mappings
from probes.attach import goroutines, owned, owned_go, process, waiters
from probes.attach.blocked import is_socket
from probes.batches import write_rows
from probes.format import schema
from probes.format.meta import Allocator, MemoryOptions, Meta
from probes.launch import alive
from probes.process_memory import MemoryReadError, ProcessMemory
from probes.residency import BufferTracker
from probes.socket_memory import SocketSampler, socket_inodes

if TYPE_CHECKING:
    from probes.format.writer import TraceWriter
    from probes.loader import Probes

MAX_WRITE_BUFFERS = 1 << 20  # distinct write buffers looked up at the end
PROBED = "the allocator is probed: allocations give the heap"
# Heap walks of one round of memory points (every target's, at a flush) stop once they have
# taken this long: a server forked per connection (PostgreSQL: 101 backends of ~0.5 s walk
# each) held the recorder in one flush for a minute, deaf to SIGINT. The targets not walked
# are walked first at the next rounds.
ROUND_WALK_S = 0.2
# Waiters are scanned live (at a flush) no sooner than this many times the last live scan's
# duration after it ended: the scans take at most ~2% of the recorder's time however many
# threads the targets have (1,000 waiting threads: ~0.1 s a scan, one every ~5 s).
LIVE_SCAN_PACE = 50


def open_fds(pid: int) -> list[int]:
    try:
        return [int(n) for n in os.listdir(f"/proc/{pid}/fd")]
    except (OSError, ValueError):
        return []


def walk_owned(
    pid: int,
    mem: ProcessMemory,
    mappings: list[Mapping],
    roots: list[owned.Roots],
    others: list[tuple[int, int, int]],
    budget_s: float,
) -> owned.Walked:
    """owned.walk(), unknown with why when the process's memory went away during it (it
    exited, or exec'd): its reads that failed then read as zeros, which were never there."""
    walked = owned.walk(pid, mem, mappings, roots, others, budget_s)
    if walked.raced and mem.gone():
        walked.why = walked.why or (
            f"the process's memory went away during the walk ({walked.raced:,} reads "
            "failed): it exited or ran another program"
        )
    return walked


class MemorySide:
    """The memory side of one recording, made when its first target is attached; it writes
    its own tables and keeps meta.json's `memory` up to date."""

    def __init__(
        self, probes: Probes, writer: TraceWriter, meta: Meta, now_ns: Callable[[], int]
    ) -> None:
        self._probes = probes
        self._writer = writer
        self._now_ns = now_ns
        options = probes.options
        meta.memory = self.memory = MemoryOptions(
            options.min_alloc, options.sample_every, alloc_probes=options.alloc_probes
        )
        meta.kernel_objects, meta.kernel_objects_why = kernel_objects.read_caches()
        meta.kernel_stack_bytes, meta.kernel_stack_why = waiters.kernel_stack_bytes()
        self._sockets = SocketSampler()
        self._buffers = BufferTracker()
        # without allocator probes: each target's heap walker (made at its first walk: a
        # launched command must have exec'd), and the buffers looked up so far
        self._walkers: dict[int, HeapWalker | None] = {}
        # why a process's memory cannot be read (it exists, its walker could not be made)
        self._unreadable: dict[int, str] = {}
        self._looked_up: set[tuple[int, int]] = set()
        self._write_buffers: set[tuple[int, int]] = set()  # (pid, addr) writes were sent from
        # (kind, pid, stack id + 1) of allocations ("alloc") and of posted reads ("post")
        self._stack_ids: set[tuple[str, int, int]] = set()
        # memory points (connections vs memory): each target's open files at its last point,
        # and when the last heap sum began and how long it took (walks get a time budget)
        self._files_at_point: dict[int, int] = {}
        self._heap_sum: dict[int, tuple[float, float]] = {}
        # pid -> fd -> the user_data of its latest io_uring request (a root of its state)
        self._user_data: dict[int, dict[int, int]] = {}
        # waiters: each target's as its last scan written found them ((kind, tid) -> row),
        # the targets with live rows written, and when the next live scan may begin
        self._waiting: dict[int, dict[tuple[str, int], dict]] = {}
        self._live_written: set[int] = set()
        self._live_scan_at = 0.0

    def attach(self, pids: list[int]) -> None:
        """New targets, attached together: each one's allocator probed if asked to
        (--alloc-probes), their sockets (one sample for all: it lists the machine's), and
        the threads already waiting on their connections - and the processes, where a
        child of one of them holds a single connection (`record -p PID --tree`)."""
        if self._probes.options.alloc_probes:
            for pid in pids:
                self.memory.allocators.append(self._probes.attach_allocator(pid))
        # their sockets as found, before the walks (seconds on a big heap): a connection
        # silent since then is idle, however short the recording after them
        write_rows(self._writer, schema.SOCKETS, self._sockets.sample(pids, self._now_ns()))
        self._waiters(pids, "attach")

    def note(self, by_kind: dict[int, np.ndarray], sampling: bool) -> None:
        """A flushed batch (split by kind): the buffers and stacks it names; with the
        allocator walked, the allocations of buffers not looked up yet."""
        empty = np.zeros(0, dtype=schema.WIRE_EVENT.dtype)
        allocs = by_kind.get(schema.Kind.ALLOC, empty)
        if allocs.size:
            self._stack_ids.update(
                ("alloc", p, k) for p, k in zip(allocs["pid"].tolist(), allocs["key"].tolist())
            )
        posts = by_kind.get(schema.Kind.POST, empty)
        posted_from = posts[posts["first_id"] != 0]
        self._stack_ids.update(
            ("post", p, k)
            for p, k in zip(posted_from["pid"].tolist(), posted_from["first_id"].tolist())
        )
        writes = by_kind.get(schema.Kind.WRITE_POST, empty)
        if writes.size and len(self._write_buffers) < MAX_WRITE_BUFFERS:
            self._write_buffers.update(zip(writes["pid"].tolist(), writes["addr"].tolist()))
        self._buffers.note(posts, by_kind.get(schema.Kind.COMPLETE, empty))
        uring = posts[posts["ring"] != 0]  # what names each connection in its requests
        for pid, fd, data in zip(*(uring[k].tolist() for k in ("pid", "fd", "aux"))):
            self._user_data.setdefault(pid, {})[fd] = data
        if not self._probes.options.alloc_probes and sampling:
            self._walk_heaps("flush")

    def flush(self, pids: list[int]) -> None:
        """At every flush: the targets' sockets sampled, and a memory point for each; the
        waiters scanned again when their pace allows (so that a recording that ends badly -
        a recorder killed, a target gone - still knows them as of its latest look)."""
        write_rows(self._writer, schema.SOCKETS, self._sockets.sample(pids, self._now_ns()))
        self._memory_points(pids)
        began = time.perf_counter()
        if began >= self._live_scan_at:
            self._waiters(pids, "live")
            ended = time.perf_counter()
            self._live_scan_at = ended + LIVE_SCAN_PACE * (ended - began)

    def sample(self, pids: list[int]) -> None:
        """Between flushes: a memory point for each target whose open files changed."""
        changed = [p for p in pids if self._files_at_point.get(p) != len(open_fds(p))]
        if changed:
            self._memory_points(changed)

    def end(self, pids: list[int]) -> None:
        """Residency of the buffers that matter, what waits on each connection, and the
        stacks, symbolized: they need the processes alive, so they are taken as the
        recording ends."""
        write_rows(self._writer, schema.RESIDENCY, residency.measure(self._buffers.ranges()))
        self._waiters(pids, "end")
        # with the probes too: the walk is then a cross-check of what they saw
        self._walk_heaps("end")
        stacks = []
        for kind, pid, stack_id in sorted(self._stack_ids):
            if stack_id:
                frames, symbols = self._probes.stack(stack_id, pid, kind)
                stacks.append(
                    {
                        "pid": pid,
                        "stack_id": stack_id,
                        "frames": frames,
                        "symbols": symbols,
                        "kind": kind,
                    }
                )
        write_rows(self._writer, schema.STACKS, stacks)

    def _waiters(self, pids: list[int], what: str) -> None:
        """The threads waiting on one connection each, and the processes that exist for
        one connection (probes.attach.waiters), now; at attach and at the end, the state
        each connection keeps alive (probes.attach.owned) - a process per connection's is
        its private memory. `what`: "attach", "live" (at a flush) or "end"."""
        rows, owned_rows = [], []
        for pid in pids:
            now = self._now_ns()
            threads, unreadable = waiters.waiters_of(pid)
            found = [{"kind": "thread", **dataclasses.asdict(w)} for w in threads]
            if unreadable:  # its connections' waiters: unknown, not none
                found.append(
                    {"kind": "unreadable", "pid": pid, "tid": 0, "fd": -1, "call": -1,
                     "stack_bytes": 0, "stack_size": 0, "why": unreadable}
                )  # fmt: skip
            # goroutines parked in reads: walked once, at the end (a walk parses the binary's
            # DWARF and unwinds every goroutine's stack: not for every flush)
            if what == "end":
                scan = goroutines.parked_reads(pid, functools.partial(is_socket, pid))
                found += [
                    {"kind": "goroutine", "pid": pid, "tid": r.goid & 0xFFFFFFFF, "fd": r.fd,
                     "call": -1, "stack_bytes": r.stack_bytes, "stack_size": r.stack_bytes,
                     "g_bytes": r.g_bytes}
                    for r in scan.reads
                ]  # fmt: skip
            process = waiters.process_waiter(pid, set(pids))
            if process is not None:
                found.append(
                    {"kind": "process", "tid": pid, "call": -1, "stack_bytes": 0,
                     "stack_size": 0, **dataclasses.asdict(process)}
                )  # fmt: skip
            elif what != "live":  # owned state: walked at attach and at the end only
                owned_rows += self._owned(pid, threads, what)
            if not alive(pid):  # gone while scanned: it keeps its latest scan
                continue
            rows += [{"ts_ns": now, "what": what, **r} for r in self._changes(pid, found, what)]
        write_rows(self._writer, schema.WAITERS, rows)
        write_rows(self._writer, schema.OWNED, owned_rows)

    def _changes(self, pid: int, found: list[dict], what: str) -> list[dict]:
        """The rows a scan of `pid` writes: the whole scan at attach, at the end and at its
        first live rows; at later live scans only the waiters new or changed since the last
        scan. Either way, a waiter the last scan had and this one does not gets a row with
        fd -1 (it waits no more), so that the latest rows of each kind of scan always
        say the waiters as of the latest look (analysis.waiters.latest_waiters)."""
        scan = {(r["kind"], r["tid"]): r for r in found}
        last = self._waiting.get(pid, {})
        self._waiting[pid] = scan
        if what == "live" and pid in self._live_written:
            out = [r for key, r in scan.items() if last.get(key) != r]
        else:
            out = list(scan.values())
        out += [
            {"kind": kind, "pid": pid, "tid": tid, "fd": -1, "call": -1, "stack_bytes": 0,
             "stack_size": 0}
            for kind, tid in last
            if (kind, tid) not in scan
        ]  # fmt: skip
        if what == "live" and out:
            self._live_written.add(pid)
        return out

    def _owned(self, pid: int, threads: list[waiters.Waiter], what: str) -> list[dict]:
        """The state each connection of `pid` keeps alive, walked where a connection has
        roots of its own (a waiter thread, an epoll pointer); at the end, the process's
        allocator in any case (a Go program's glibc heap is not its heap: no fit on it)."""
        try:
            mappings = Mappings(pid).all
        except OSError:
            return []  # gone
        buffers: dict[int, set[int]] = {}
        for r in self._buffers.ranges():
            if r["pid"] == pid:
                buffers.setdefault(r["fd"], set()).add(r["addr"])
        # (a walker is made at attach only where a connection has roots: a command launched
        # under idlebuf is attached before its exec, and a walker made then would be stale)
        walker = self._walker(pid) if what == "end" else self._walkers.get(pid)
        if walker is not None and walker.go is not None:  # its goroutines' stacks are roots
            parked = goroutines.parked_reads(pid, functools.partial(is_socket, pid)).reads
            budget = self._probes.options.owned_budget_s
            return owned_go.walk(pid, walker.go, parked, budget).rows(self._now_ns(), what)
        user_data = {fd: [d] for fd, d in self._user_data.get(pid, {}).items()}
        roots, others = owned.roots_of(
            pid, threads, waiters.connection_fds(pid), buffers, mappings, user_data
        )
        if not roots and what != "end":
            return []
        walker = self._walker(pid)
        now = self._now_ns()
        if walker is None:
            unreadable = self._unreadable.get(pid)
            if unreadable is None:
                return []  # gone, or its allocator probed
            return owned.Walked(pid, "unknown", why=unreadable).rows(now, what)[:1]
        if walker.go_why:
            return owned.Walked(pid, "go", why=walker.go_why).rows(now, what)[:1]
        if not walker.walks:
            library = walker.method.split(":", 1)[1]
            why = f"the heap of {library} is not walked (glibc's is)"
            return owned.Walked(pid, library, why=why).rows(now, what)[:1]
        if not roots:
            why = (
                "no connection has roots of its own (a waiter thread, an epoll or io_uring pointer)"
            )
            return owned.Walked(pid, why=why).rows(now, what)[:1]
        budget = self._probes.options.owned_budget_s
        return walk_owned(pid, walker.mem, mappings, roots, others, budget).rows(now, what)

    def close(self) -> None:
        self._sockets.close()
        for walker in self._walkers.values():
            if walker is not None:
                walker.close()

    def _memory_points(self, pids: list[int]) -> None:
        """Sockets held, heap in use and resident memory of each of `pids` now: the points
        analysis.cost fits memory against connections with."""
        rows = []
        round_began = time.perf_counter()
        # the least recently walked first, so that every target gets its turn
        for pid in sorted(pids, key=lambda p: self._heap_sum.get(p, (0.0, 0.0))[0]):
            files = open_fds(pid)
            before = len(socket_inodes([pid]))
            heap: tuple[int, int] | str = PROBED
            if not self._probes.options.alloc_probes:
                spent = time.perf_counter() - round_began
                heap = (
                    self._heap_in_use(pid)
                    if spent < ROUND_WALK_S
                    else f"not walked: this round's walks took {spent * 1000:.0f} ms (time budget)"
                )
            counts = process.status(pid)
            after = open_fds(pid)
            if counts is None:
                continue  # gone
            self._files_at_point[pid] = len(after)
            rows.append(
                {
                    "ts_ns": self._now_ns(),
                    "pid": pid,
                    "sockets": before,
                    "heap_bytes": heap[0] if isinstance(heap, tuple) else 0,
                    "heap_blocks": heap[1] if isinstance(heap, tuple) else 0,
                    "why": heap if isinstance(heap, str) else "",
                    "vm_rss": counts["vm_rss"],
                    "rss_anon": counts["rss_anon"],
                    "moving": after != files and len(socket_inodes([pid])) != before,
                }
            )
        write_rows(self._writer, schema.MEMORY_POINTS, rows)

    def _heap_in_use(self, pid: int) -> tuple[int, int] | str:
        """The heap in use (bytes, blocks), or why not; a walk waits until five times the
        last one's duration has passed since that began, so walking takes at most a fifth
        of the recorder's time however big the heap."""
        walker = self._walker(pid)
        if walker is None:
            if any(a.pid == pid for a in self.memory.allocators if a.method == "probes"):
                return PROBED
            return self._unreadable.get(pid, "the process is gone")
        began = time.perf_counter()
        last = self._heap_sum.get(pid)
        if last is not None and began - last[0] < 5 * last[1]:
            return f"not walked: the last walk took {last[1] * 1000:.0f} ms (time budget)"
        found = walker.in_use()
        self._heap_sum[pid] = (began, time.perf_counter() - began)
        return found

    def _walker(self, pid: int) -> HeapWalker | None:
        """The heap walker of `pid`, made at its first use; a process whose allocator has no
        walker (jemalloc...) gets its allocator probed from then on instead."""
        if pid in self._walkers:
            return self._walkers[pid]
        walker: HeapWalker | None = None
        try:
            walker = HeapWalker(pid)
        except MemoryReadError as exc:  # gone, or its memory may not be read
            if os.path.exists(f"/proc/{pid}"):
                self._unreadable[pid] = str(exc)
        probed = self._probes.options.alloc_probes
        if walker is not None and not walker.walks:
            walker.close()
            walker = None
            if not probed:
                self.memory.allocators.append(self._probes.attach_allocator(pid))
        elif walker is not None and not probed:
            self.memory.allocators.append(Allocator(pid=pid, method=walker.method))
        self._walkers[pid] = walker
        return walker

    def _walk_heaps(self, what: str) -> None:
        """Look up the allocation of each buffer that matters (posted, parked, last data):
        at every flush those not looked up yet, at the end all of them again."""
        if what == "end":
            self._looked_up.clear()
        wanted: dict[int, set[int]] = {}
        buffers = {(r["pid"], r["addr"]) for r in self._buffers.ranges()}
        if what == "end":  # what writes were sent from (write-buffer memory)
            buffers |= self._write_buffers
        for pid, addr in buffers - self._looked_up:
            wanted.setdefault(pid, set()).add(addr)
        rows = []
        began = time.perf_counter()
        for pid, addrs in wanted.items():
            walker = self._walker(pid)
            if walker is None:
                continue
            now = self._now_ns()
            for addr, found in walker.find(sorted(addrs)).items():
                self._looked_up.add((pid, addr))
                rows.append(
                    {"ts_ns": now, "pid": pid, "buffer": addr, "what": what}
                    | (
                        {
                            "addr": found.addr,
                            "size": found.size,
                            "allocator": found.allocator,
                            "why": "",
                        }
                        if isinstance(found, Allocation)
                        else {"addr": 0, "size": 0, "allocator": "", "why": found.why}
                    )
                )
        write_rows(self._writer, schema.HEAP_BLOCKS, rows)
        took, walks = (time.perf_counter() - began) * 1000, self.memory.walks
        if what == "end":
            walks.end_buffers, walks.end_ms = len(rows), round(took, 2)
        elif rows:
            walks.flushes += 1
            walks.buffers += len(rows)
            walks.total_ms = round(walks.total_ms + took, 2)
            walks.max_ms = max(walks.max_ms, round(took, 2))
