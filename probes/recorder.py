"""A recording: attach the probes to target processes and stream their events to a trace
directory, with the state found at attach and the measurements taken at the end.

Targets are live processes (`pids`, all their threads, including threads created later) or a
command the recorder launches (probes.launch) and traces from its first instruction, children
included. The loop (probes.session) stops on the duration, on SIGINT/SIGTERM or when every
target has exited; the trace is finalized in every case, and a bug keeps what was recorded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from probes import features, kernel_objects, residency, session
from probes.allocators import HeapWalker
from probes.allocators.base import Allocation
from probes.attach import blocked, goroutines, process
from probes.attach import uring as uring_state
from probes.batches import split_by_kind, write_records, write_rows
from probes.btf import BTF
from probes.buffer_rings import BufferRingWatcher
from probes.format import schema
from probes.format.errors import BTFError, IdlebufError, ProbeError, RecordError
from probes.format.meta import (
    Allocator,
    Clock,
    EventCounts,
    GoAtAttach,
    MemoryOptions,
    Meta,
    Probes,
    ProbeState,
    ProcessAtAttach,
    Switch,
    Targets,
)
from probes.format.writer import TraceWriter
from probes.launch import Child, alive, check_targets, finish_child, is_process, launch_paused
from probes.launch import proc_text as _proc_text
from probes.loader import ProbeOptions
from probes.loader import Probes as LoadedProbes
from probes.process_memory import MemoryReadError
from probes.residency import BufferTracker
from probes.socket_memory import SocketSampler, socket_inodes

VERSION = "0.1.0"
MAX_WRITE_BUFFERS = 1 << 20  # distinct write buffers looked up at the end


@dataclass
class RecordConfig:
    output: Path
    pids: list[int] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    duration: float | None = None
    force: bool = False
    flush_rows: int = 100_000  # a row group is written at least this often...
    flush_interval: float = 1.0  # ...and at least every this many seconds
    # switch tracing off and on every this many seconds (measuring what tracing costs)
    alternate: float | None = None
    probe_options: ProbeOptions = field(default_factory=ProbeOptions)

    def pacing(self) -> session.Pacing:
        return session.Pacing(
            duration=self.duration,
            flush_rows=self.flush_rows,
            flush_interval=self.flush_interval,
            alternate=self.alternate,
        )


@dataclass
class RecordSummary:
    output: Path
    posts: int
    completions: int
    drops: dict[str, int]
    elapsed: float
    stop_reason: str
    exit_code: int | None = None  # the launched command's, if any


def _now_ns() -> int:
    return time.monotonic_ns()  # the clock of bpf_ktime_get_ns


def _fds(pid: int) -> list[int]:
    try:
        return [int(n) for n in os.listdir(f"/proc/{pid}/fd")]
    except (OSError, ValueError):
        return []


class _Stop:
    """Turns SIGINT, SIGTERM and SIGHUP (a closed terminal) into a flag the loop checks, so
    the trace is always finalized."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        self.reason = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Recorder:
    """One recording. Towards the loop (probes.session) it is the Sink: it takes drained
    batches, flushes them as table parts, switches tracing and says when targets exited."""

    def __init__(
        self,
        config: RecordConfig,
        progress: Callable[[str], None] | None = None,
        clock: session.Clock | None = None,
    ) -> None:
        self.config = config
        self.progress = progress
        self.clock = clock or session.SystemClock()
        self._batches: list[np.ndarray] = []
        self._buffered = 0
        self._known: dict[int, str] = {}  # pid -> comm as last noted
        self._processes: list[dict[str, Any]] = []
        self._posts = 0
        self._completions = 0
        self._rings = BufferRingWatcher()
        self._sockets: SocketSampler | None = None
        self._buffers: BufferTracker | None = None
        # the memory side without allocator probes: each target's heap walker (made at its
        # first walk: a launched command must have exec'd), and the buffers looked up so far
        self._walkers: dict[int, HeapWalker | None] = {}
        self._looked_up: set[tuple[int, int]] = set()
        self._write_buffers: set[tuple[int, int]] = set()  # (pid, addr) writes were sent from
        # (kind, pid, stack id + 1) of allocations ("alloc") and of posted reads ("post")
        self._stack_ids: set[tuple[str, int, int]] = set()
        self._target_pids: list[int] = []
        self._probes: LoadedProbes | None = None
        self._child: Child | None = None
        self._started = False  # the targets are attached: from now on the trace is kept
        self._counters: dict[str, int] = {}  # the kernel's counters, as last read
        # memory points (connections vs memory): each target's open files at its last point,
        # and when the last heap sum began and how long it took (walks get a time budget)
        self._files_at_point: dict[int, int] = {}
        self._heap_sum: dict[int, tuple[float, float]] = {}
        self.meta = Meta()

    # --- set-up -------------------------------------------------------------------------
    def _preflight(self) -> None:
        cfg = self.config
        if bool(cfg.pids) == bool(cfg.command):
            raise RecordError("give either -p PID or -- COMMAND (not both, not neither)")
        features.preflight()
        check_targets(cfg.pids)
        if cfg.command and shutil.which(cfg.command[0]) is None:
            raise RecordError(f"cannot run {cfg.command[0]}: no such executable")

    def _write_meta(self, complete: bool = False, last: bool = False) -> None:
        """meta.json as things are now (the writer serializes it at once); `last`: the one
        written after a failure, whatever an earlier write met."""
        probes, meta = self._probes, self.meta
        counters = self._counters
        if probes is not None and not probes.closed:
            counters = self._counters = probes.counter_values()
        meta.probes = Probes(
            ProbeState(
                attached=probes is not None,
                cflags=probes.cflags if probes else [],
                uring=probes.uring_status if probes else "not loaded",
                wait_hooks=probes.wait_hooks if probes else None,
                events=EventCounts(self._posts, self._completions),
                kernel_counts=counters,
            )
        )
        meta.drops = {c.name.lower(): counters.get(c.name.lower(), 0) for c in schema.DROP_COUNTERS}
        meta.rows = dict(self._writer.rows)
        meta.complete = complete
        if last:
            self._writer.write_last_meta(meta)
        else:
            self._writer.write_meta(meta)

    # --- the sink the loop feeds ------------------------------------------------------------
    @property
    def buffered(self) -> int:
        return self._buffered

    def take(self, batch: np.ndarray) -> None:
        if batch.size == 0:
            return
        self._batches.append(batch)
        self._buffered += batch.size
        for pid in np.unique(batch["pid"]).tolist():
            self._note_process(int(pid), int(batch["ts_ns"][0]))

    def flush(self, elapsed: float) -> None:
        self._flush()
        self._write_meta()
        if self.progress and self._probes is not None:
            self.progress(self._status(elapsed, self._probes))

    def sample(self) -> None:
        """Between flushes: a memory point for each target whose open files changed."""
        probes = self._probes
        if self._sockets is None or probes is None or probes.paused:
            return
        changed = [p for p in self._live_targets() if self._files_at_point.get(p) != len(_fds(p))]
        if changed:
            self._memory_points(probes, changed)

    def targets_exited(self) -> bool:
        if self._child is not None:
            return self._child.poll() is not None
        return not any(alive(p) for p in self.config.pids)

    def switch_tracing(self) -> None:
        """--alternate: tracing off, or on again (with the reads already waiting found by the
        /proc scan, as on attaching); when the switch began and ended goes to meta.json."""
        probes = self._probes
        assert probes is not None
        began = _now_ns()
        if probes.paused:
            probes.resume()
            for pid in self._live_targets():
                self._scan_blocked(probes, pid)
        else:
            # what the traced stretch produced is written now, not during the untraced one
            self.take(probes.drain())
            self._flush()
            probes.pause()
        assert self.meta.alternations is not None
        self.meta.alternations.append(Switch(began, _now_ns(), not probes.paused))

    # --- what the recorder writes besides the events -----------------------------------------
    def _note_process(self, pid: int, ts: int) -> None:
        if pid in self._known:
            return
        self._note_name(pid, ts)

    def _note_name(self, pid: int, ts: int) -> None:
        comm = _proc_text(pid, "comm")
        self._known[pid] = comm
        self._processes.append(
            {
                "pid": pid,
                "comm": comm,
                "cmdline": _proc_text(pid, "cmdline")[:4096],
                "first_seen_ns": ts,
            }
        )

    def _renamed(self) -> None:
        """A target that exec'd since it was noted is noted again, under its new name."""
        now = _now_ns()
        for pid in self._live_targets():
            comm = _proc_text(pid, "comm")
            if comm and self._known.get(pid) not in (None, comm):
                self._note_name(pid, now)

    def _flush(self) -> None:
        probes = self._probes
        # --alternate: while switched off, nothing is sampled either
        sampling = probes is None or not probes.paused
        if probes is not None and probes.options.min_wait_ns and sampling:
            # --min-wait: calls still waiting are recorded by this sweep, not at entry
            waiting = probes.sweep_waiting(_now_ns())
            if waiting:
                self.take(schema.wire_records(waiting))
        if self._batches:
            records = np.concatenate(self._batches)
            self._batches, self._buffered = [], 0
            by_kind = split_by_kind(records)
            empty = records[:0]
            self._rings.note(by_kind.get(schema.Kind.BUFFER_GROUP, empty))
            allocs = by_kind.get(schema.Kind.ALLOC, empty)
            if allocs.size:
                self._stack_ids.update(
                    ("alloc", p, k) for p, k in zip(allocs["pid"].tolist(), allocs["key"].tolist())
                )
            posts = by_kind.get(schema.Kind.POST, empty)
            completions = by_kind.get(schema.Kind.COMPLETE, empty)
            posted_from = posts[posts["first_id"] != 0]
            self._stack_ids.update(
                ("post", p, k)
                for p, k in zip(posted_from["pid"].tolist(), posted_from["first_id"].tolist())
            )
            writes = by_kind.get(schema.Kind.WRITE_POST, empty)
            if writes.size and len(self._write_buffers) < MAX_WRITE_BUFFERS:
                self._write_buffers.update(zip(writes["pid"].tolist(), writes["addr"].tolist()))
            if self._buffers is not None:
                self._buffers.note(posts, completions)
                if probes is not None and not probes.options.alloc_probes and sampling:
                    self._walk_heaps(probes, "flush")
            write_records(self._writer, by_kind)
            self._posts += posts.size
            self._completions += completions.size
        if self._sockets is not None and sampling:
            write_rows(
                self._writer, schema.SOCKETS, self._sockets.sample(self._live_targets(), _now_ns())
            )
            if probes is not None:
                self._memory_points(probes, self._live_targets())
        if sampling:
            write_rows(self._writer, schema.BUFFER_RINGS, self._rings.snapshot(_now_ns()))
            self._renamed()
        write_rows(self._writer, schema.PROCESSES, self._processes)
        self._processes = []

    def _scan_blocked(self, probes: LoadedProbes, pid: int) -> int:
        """Seed the in-flight table and the trace with reads blocked before tracing began."""
        found = []
        for read in blocked.blocked_reads(pid, probes.options.max_iov):
            ts = _now_ns()
            flags = read.flags | schema.PostFlag.SCANNED
            if not probes.track_inflight(
                read.tid, read.fd, read.addr, read.length, read.op, flags, read.nvec, ts, pid
            ):
                continue  # the probes saw this read enter: they already have it
            if blocked.syscall_of(pid, read.tid) != read.call:
                # It returned while we looked: undo, unless the probes already replaced it.
                if (probes.inflight_flags(read.tid) or 0) & schema.PostFlag.SCANNED:
                    probes.forget_inflight(read.tid)
                continue
            found.append(
                {
                    "ts_ns": ts,
                    "key": read.tid,
                    "addr": read.addr,
                    "value": read.length,
                    "pid": pid,
                    "tid": read.tid,
                    "fd": read.fd,
                    "flags": flags,
                    "nvec": read.nvec,
                    "op": read.op,
                    "kind": schema.Kind.POST,
                    "source": schema.Source.SYSCALL,
                }
            )
        if found:
            self.take(schema.wire_records(found))
        return len(found)

    # --- the recording ------------------------------------------------------------------------
    def run(self) -> RecordSummary:
        cfg = self.config
        self._preflight()
        btf = BTF.load()  # parsed once: the checks and the probes both need it
        self.meta = Meta(
            idlebuf_version=VERSION,
            host=features.host_facts(),
            features={c.name: c.ok for c in features.run_checks(btf)},
            clock=Clock(_now_ns(), time.time_ns()),
            targets=Targets(list(cfg.pids), list(cfg.command)),
            alternate_s=cfg.alternate,
            alternations=[] if cfg.alternate else None,
        )
        self._writer = TraceWriter(cfg.output, cfg.force)
        # Signals are caught from here on: one that arrives while the probes compile ends
        # the session as soon as they are loaded, with the trace finalized.
        try:
            with _Stop() as stop:
                return self._record(stop, btf)
        except RecordError:
            if not self._started:  # it never started: leave nothing behind
                self._writer.discard()
            raise
        except Exception as exc:
            # A bug must not cost the user what was recorded: keep what is buffered and say
            # in meta.json why the trace is incomplete.
            self._salvage(exc)
            raise
        finally:
            self._writer.close()

    def _salvage(self, exc: Exception) -> None:
        # the original error is the one to report, not one met while salvaging
        with contextlib.suppress(Exception):
            self._flush()
        self.meta.error = str(exc)[:500] if isinstance(exc, IdlebufError) else repr(exc)[:500]
        with contextlib.suppress(Exception):
            self._write_meta(last=True)

    def _record(self, stop: _Stop, btf: BTF) -> RecordSummary:
        cfg = self.config
        self._write_meta()
        options = cfg.probe_options
        if cfg.command:
            options = ProbeOptions(**{**options.__dict__, "follow_children": True})
        probes = LoadedProbes(options, btf)
        started = self.clock.monotonic()
        self.meta.tracing_since_ns = _now_ns()
        if options.min_wait_ns:
            self.meta.min_wait_ns = options.min_wait_ns
        try:
            self._probes = probes
            if cfg.command:
                self._child = launch_paused(cfg.command, lambda pid: self._attach(probes, pid))
                self._note_process(self._child.pid, _now_ns())
            else:
                for pid in cfg.pids:
                    self._attach(probes, pid)
                    self._note_process(pid, _now_ns())
                self._state_at_attach(probes, btf, cfg.pids)
                self._sample_status(probes, "attach")  # a launched command is seen from exec
            self._write_meta()
            self._started = True
            if self.meta.alternations is not None:  # the first traced stretch
                self.meta.alternations.append(Switch(self.meta.tracing_since_ns, _now_ns(), True))
            stop_reason = session.run(
                probes, self, lambda: stop.reason, cfg.pacing(), self.clock, started
            )
            # A final drain after the loop: what the kernel emitted up to the stop.
            self.take(probes.drain())
            self._sample_status(probes, "end")
            self._flush()
            if self._buffers is not None:  # while the targets still run
                self._measure_buffers(probes)
            exit_code = finish_child(self._child, probes.target_pids())
            elapsed = self.clock.monotonic() - started
            self.meta.stop_reason = stop_reason
            self.meta.elapsed_s = round(elapsed, 3)
            self.meta.end_monotonic_ns = _now_ns()
            self._write_meta(complete=True)
            self._writer.sync()
            return RecordSummary(
                cfg.output,
                self._posts,
                self._completions,
                dict(self.meta.drops),
                elapsed,
                stop_reason,
                exit_code,
            )
        finally:
            if self._child is not None and self._child.poll() is None:
                self._child.signal(signal.SIGKILL)
                self._child.wait()
            with contextlib.suppress(Exception):  # for a meta.json written after a failure
                self._counters = probes.counter_values()
            probes.close()
            if self._sockets is not None:
                self._sockets.close()
            for walker in self._walkers.values():
                if walker is not None:
                    walker.close()

    def _state_at_attach(self, probes: LoadedProbes, btf: BTF, pids: list[int]) -> None:
        """What the targets held before tracing began: threads blocked in socket reads
        (/proc), io_uring requests and buffer groups (the kernel's rings), goroutines parked
        in reads (a Go runtime's memory), anonymous mappings (/proc/PID/maps)."""
        kernel, files, why = None, [], None
        try:
            kernel = probes.kernel_state
            files = kernel.open_files()
        except ProbeError as exc:
            kernel, why = None, f"the kernel's state could not be read: {exc}"
        layout = None
        if probes.uring_status != "traced":
            why = f"io_uring is not traced: {probes.uring_status}"
        elif kernel is not None:
            try:
                layout = uring_state.Layout.from_btf(btf)
            except BTFError as exc:
                why = f"this kernel's io_uring rings are not understood: {exc}"
        for pid in pids:
            began = time.perf_counter()
            found = ProcessAtAttach(pid=pid, blocked_syscalls=self._scan_blocked(probes, pid))
            rings = uring_state.at_attach(pid, kernel, layout, files, why, probes.uring_entry)
            if rings.posts:
                self.take(np.array(rings.posts, dtype=schema.WIRE_EVENT.dtype))
            if rings.groups:
                self.take(schema.wire_records(rings.groups))
            for ring, group, addr, entries in rings.kernel_rings:
                assert kernel is not None
                self._rings.watch_kernel(pid, ring, group, addr, entries, kernel.read)
            found.rings = rings.rings
            found.go = self._goroutines(pid)
            mappings = process.anonymous_mappings(pid)
            found.mappings = len(mappings)
            self._take_mappings(pid, mappings)
            found.walk_ms = round((time.perf_counter() - began) * 1000, 1)
            self.meta.at_attach.append(found)
        self.meta.uring_before_attach = [
            f.pid for f in self.meta.at_attach if any(r.how != "walked" for r in f.rings)
        ]

    def _goroutines(self, pid: int) -> GoAtAttach | None:
        """A Go target's goroutines parked in socket reads, as parked posts."""
        scan = goroutines.parked_reads(pid, lambda fd: blocked.is_socket(pid, fd))
        if not scan.reads and scan.unknown_why is None and not scan.io_waiting:
            return None  # not Go, or no goroutine waiting on IO
        ts = _now_ns()
        rows = [
            {
                "ts_ns": ts,
                "key": r.goid,
                "addr": r.addr,
                "value": r.length,
                "pid": pid,
                "fd": r.fd,
                "flags": schema.PostFlag.SCANNED,
                "op": schema.SYSCALLS["read"],
                "kind": schema.Kind.POST,
                "source": schema.Source.PARKED,
            }
            for r in scan.reads
        ]
        if rows:
            self.take(schema.wire_records(rows))
        sockets = 0
        if scan.unknown_why:
            sockets = sum(1 for fd in _fds(pid) if blocked.is_socket(pid, fd))
        return GoAtAttach(
            parked_reads=len(rows),
            io_waiting=scan.io_waiting,
            skipped=scan.skipped,
            why=scan.unknown_why,
            sockets=sockets,
        )

    def _take_mappings(self, pid: int, mappings: list[process.Mapping]) -> None:
        if not mappings:
            return
        ts = _now_ns()
        self.take(
            schema.wire_records(
                [
                    {
                        "ts_ns": ts,
                        "pid": pid,
                        "addr": m.addr,
                        "value": m.length,
                        "op": schema.MapFn.AT_ATTACH,
                        "fd": -1,
                        "kind": schema.Kind.MAP,
                    }
                    for m in mappings
                ]
            )
        )

    def _sample_status(self, probes: LoadedProbes, what: str) -> None:
        """Resident memory of every live target from /proc/PID/status, with its address
        space's id (as kmem:rss_stat names it) from the kernel."""
        mm: dict[int, int] = {}
        with contextlib.suppress(ProbeError):
            mm = {f.pid: f.mm for f in probes.kernel_state.open_files()}
        rows = []
        for pid in self._live_targets():
            counts = process.status(pid)
            if counts is not None:
                rows.append(
                    {
                        "ts_ns": _now_ns(),
                        "pid": pid,
                        "mm_id": mm.get(pid, 0),
                        "what": what,
                        **counts,
                    }
                )
        write_rows(self._writer, schema.PROC_STATUS, rows)

    def _memory_points(self, probes: LoadedProbes, pids: list[int]) -> None:
        """Sockets held, heap in use and resident memory of each of `pids` now: the points
        analysis.cost fits memory against connections with."""
        rows = []
        for pid in pids:
            files = _fds(pid)
            before = len(socket_inodes([pid]))
            heap: tuple[int, int] | str = "the allocator is probed: allocations give the heap"
            if not probes.options.alloc_probes:
                heap = self._heap_in_use(probes, pid)
            counts = process.status(pid)
            after = _fds(pid)
            if counts is None:
                continue  # gone
            self._files_at_point[pid] = len(after)
            rows.append(
                {
                    "ts_ns": _now_ns(),
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

    def _heap_in_use(self, probes: LoadedProbes, pid: int) -> tuple[int, int] | str:
        """The heap in use (bytes, blocks), or why not; a walk waits until five times the
        last one's duration has passed since that began, so walking takes at most a fifth
        of the recorder's time however big the heap."""
        walker = self._walker(probes, pid)
        if walker is None:
            assert self.meta.memory is not None
            if any(a.pid == pid for a in self.meta.memory.allocators if a.method == "probes"):
                return "the allocator is probed: allocations give the heap"
            return "the process is gone"
        began = time.perf_counter()
        last = self._heap_sum.get(pid)
        if last is not None and began - last[0] < 5 * last[1]:
            return f"not walked: the last walk took {last[1] * 1000:.0f} ms (time budget)"
        found = walker.in_use()
        self._heap_sum[pid] = (began, time.perf_counter() - began)
        return found

    def _measure_buffers(self, probes: LoadedProbes) -> None:
        """Residency of the buffers that matter and the allocation stacks, symbolized:
        both need the processes alive, so they are taken as the recording ends."""
        assert self._buffers is not None
        write_rows(self._writer, schema.RESIDENCY, residency.measure(self._buffers.ranges()))
        # with the probes too: the walk is then a cross-check of what they saw
        self._walk_heaps(probes, "end")
        stacks = []
        for kind, pid, stack_id in sorted(self._stack_ids):
            if stack_id:
                frames, symbols = probes.stack(stack_id, pid, kind)
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

    def _live_targets(self) -> list[int]:
        """The targets now: those given or launched, and the children followed in the kernel."""
        pids = set(self._target_pids)
        if self._probes is not None and self._probes.options.follow_children:
            pids |= {p for p in self._probes.target_pids() if is_process(p)}
        return sorted(p for p in pids if alive(p))

    def _attach(self, probes: LoadedProbes, pid: int) -> None:
        """Make `pid` a target; with the memory side, probe its allocator if asked to
        (--alloc-probes), else look its buffers' allocations up when needed."""
        probes.add_target(pid)
        self._target_pids.append(pid)
        options = probes.options
        if not options.memory:
            return
        if self._sockets is None:
            self._sockets = SocketSampler()
            self._buffers = BufferTracker()
        if self.meta.memory is None:
            self.meta.memory = MemoryOptions(
                options.min_alloc, options.sample_every, alloc_probes=options.alloc_probes
            )
            self.meta.kernel_objects, self.meta.kernel_objects_why = kernel_objects.read_caches()
        if options.alloc_probes:
            self.meta.memory.allocators.append(probes.attach_allocator(pid))

    def _walker(self, probes: LoadedProbes, pid: int) -> HeapWalker | None:
        """The heap walker of `pid`, made at its first use; a process whose allocator has no
        walker (jemalloc...) gets its allocator probed from then on instead."""
        if pid in self._walkers:
            return self._walkers[pid]
        walker: HeapWalker | None = None
        with contextlib.suppress(MemoryReadError):  # gone
            walker = HeapWalker(pid)
        assert self.meta.memory is not None
        if walker is not None and not walker.walks:
            walker.close()
            walker = None
            if not probes.options.alloc_probes:
                self.meta.memory.allocators.append(probes.attach_allocator(pid))
        elif walker is not None and not probes.options.alloc_probes:
            self.meta.memory.allocators.append(Allocator(pid=pid, method=walker.method))
        self._walkers[pid] = walker
        return walker

    def _walk_heaps(self, probes: LoadedProbes, what: str) -> None:
        """Look up the allocation of each buffer that matters (posted, parked, last data):
        at every flush those not looked up yet, at the end all of them again."""
        assert self._buffers is not None
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
            walker = self._walker(probes, pid)
            if walker is None:
                continue
            now = _now_ns()
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
        assert self.meta.memory is not None
        took, walks = (time.perf_counter() - began) * 1000, self.meta.memory.walks
        if what == "end":
            walks.end_buffers, walks.end_ms = len(rows), round(took, 2)
        elif rows:
            walks.flushes += 1
            walks.buffers += len(rows)
            walks.total_ms = round(walks.total_ms + took, 2)
            walks.max_ms = max(walks.max_ms, round(took, 2))

    def _status(self, elapsed: float, probes: LoadedProbes) -> str:
        drops = sum(v for k, v in probes.counter_values().items() if k.endswith("_full"))
        return (
            f"{elapsed:6.1f}s  posts {self._posts:,}  completions {self._completions:,}  "
            f"drops {drops:,}"
        )
