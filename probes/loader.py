"""Compile and attach the BPF programs; the only module that imports bcc (lazily).

The C text is assembled from probes/bpf/ by what a recording enables (`program_files`): the
shared part, then one program per source. Options reach it as -D constants; kernel structure
offsets come from BTF (probes.offsets).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from probes import features
from probes.attach.kernel import KernelState
from probes.btf import BTF
from probes.format import schema
from probes.format.errors import ProbeError
from probes.format.meta import Allocator
from probes.offsets import kernel_offsets
from probes.ringbuf import RingBufferConsumer

BPF_NOEXIST = 1
PIDFD_THREAD = os.O_EXCL  # pidfd_open(2) of a thread, not a process (Linux 6.9)


@contextlib.contextmanager
def _thread_pidfd(tid: int) -> Iterator[ctypes.c_int | None]:
    """A pidfd of one thread, as a task-storage map key; None if it has exited (or the
    kernel predates thread pidfds)."""
    try:
        pidfd = os.pidfd_open(tid, PIDFD_THREAD)
    except OSError:
        yield None
        return
    try:
        yield ctypes.c_int(pidfd)
    finally:
        os.close(pidfd)


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _is_socket(pid: int, fd: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    except OSError:
        return False


@dataclass(frozen=True)
class ProbeOptions:
    follow_children: bool = False
    max_targets: int = 4096
    max_inflight: int = 65536
    ringbuf_pages: int = 4096  # 16 MiB: ~200k records of slack before a burst drops events
    max_iov: int = 8
    memory: bool = False  # the memory side: resident memory, buffers' allocations
    # with memory: probe every allocation (uprobes on the allocator, and mmap/brk) instead of
    # reading the allocator's structures when a buffer's allocation is needed
    alloc_probes: bool = False
    min_alloc: int = 1024  # allocations smaller than this are not tracked
    sample_every: int = 1  # track one allocation address in N (by a hash of the address)
    # with memory: what the walk for each connection's owned state may take per process
    owned_budget_s: float = 10.0
    max_allocs: int = 262144
    max_stacks: int = 16384
    # record only reads/writes that wait at least this long (0: every one); the rest are
    # counted in the kernel (Counter.QUICK), and readiness waits are not traced
    min_wait_ns: int = 0
    # with min_wait_ns, how waits are seen: "scheduler", "syscalls" or "auto" (wait_hooks())
    wait_hooks: str = "auto"
    writes: bool = True  # trace writes to sockets (pending write bytes) as well as reads


# Allocator entry points: symbol -> the BPF function run on entry (all share one on return).
ALLOC_ENTRY = {
    "malloc": "malloc_enter",
    "calloc": "calloc_enter",
    "realloc": "realloc_enter",
    "posix_memalign": "posix_memalign_enter",
    "aligned_alloc": "aligned_alloc_enter",
    "memalign": "memalign_enter",
    "valloc": "valloc_enter",
}
# Allocators that replace glibc's when a process maps them, most specific first.
ALLOCATOR_LIBRARIES = ("libjemalloc", "libtcmalloc", "libmimalloc", "libc.so", "libc-")


def allocator_of(pid: int) -> str | None:
    """The shared library whose malloc the process uses, from its memory maps."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    for lib in ALLOCATOR_LIBRARIES:
        for path in sorted(paths):
            if lib in path.rsplit("/", 1)[-1]:
                return path
    return None


def pid_max() -> int:
    """The largest process id plus one (the size of the target bitmap)."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 1 << 22  # PID_MAX_LIMIT on 64-bit


def program_files(options: ProbeOptions, hooks: str | None, uring: bool) -> list[str]:
    """The sources under probes/bpf/ a recording with `options` compiles, in order."""
    files = ["common.bpf.c", "sched_hooks.bpf.c" if hooks == "scheduler" else "syscalls.bpf.c"]
    if options.follow_children:
        files.append("children.bpf.c")
    if uring:
        files.append("uring.bpf.c")
    if not options.min_wait_ns:  # --min-wait records only calls that wait: no parked reads
        files.append("readiness.bpf.c")
    if options.memory:  # the uprobes are attached per target, only where they are needed
        files += ["rss.bpf.c", "alloc.bpf.c"]
    if options.memory and options.alloc_probes:
        files.append("maps.bpf.c")
    files.append("attach.bpf.c")  # run on demand only: nothing attached, nothing paid
    return files


def probe_source(files: list[str]) -> str:
    sources = resources.files("probes").joinpath("bpf")
    return schema.c_header() + "".join(sources.joinpath(f).read_text() for f in files)


def probe_cflags(
    options: ProbeOptions,
    offsets: dict[str, int],
    uring: dict[str, int] | None = None,
    hooks: str | None = None,
) -> list[str]:
    consts = dict(offsets)
    consts.update(uring or {})
    consts.update(
        MAX_TARGETS=options.max_targets,
        TARGET_WORDS=(pid_max() + 63) // 64,
        MAX_INFLIGHT=options.max_inflight,
        RINGBUF_PAGES=options.ringbuf_pages,
        MAX_IOV=options.max_iov,
        MIN_ALLOC=options.min_alloc,
        SAMPLE_EVERY=options.sample_every,
        MAX_ALLOCS=options.max_allocs,
        MAX_STACKS=options.max_stacks,
        MIN_WAIT_NS=options.min_wait_ns,
        WITH_WRITES=int(options.writes),
        POST_STACKS=int(options.memory),
        BLOCK_HOOKS=int(hooks == "scheduler"),
    )
    return [f"-D{k}={v}" for k, v in sorted(consts.items())]


@dataclass(frozen=True)
class Program:
    """What bcc compiles for a recording: the sources, their constants, and what they say
    about this kernel."""

    files: list[str]
    cflags: list[str]
    uring_status: str  # "traced", or why io_uring is not
    wait_hooks: str | None

    @classmethod
    def for_options(cls, options: ProbeOptions, btf: BTF) -> Program:
        uring, uring_status = features.uring_support(btf)
        hooks = features.wait_hooks(options.min_wait_ns, options.wait_hooks)
        cflags = probe_cflags(options, kernel_offsets(btf), uring, hooks)
        return cls(program_files(options, hooks, uring is not None), cflags, uring_status, hooks)

    def source(self) -> str:
        return probe_source(self.files)

    def rendered(self) -> str:
        """The final C text bcc compiles, with its -D constants as #defines (for debugging)."""
        defines = [f"#define {flag[2:].replace('=', ' ', 1)}" for flag in self.cflags]
        return "\n".join(
            [f"/* {' + '.join(self.files)}; cflags: {' '.join(self.cflags)} */", *defines]
            + [self.source()]
        )


class Probes:
    """The loaded programs and their maps: the ring buffer of events, the targets, the
    calls in flight, the kernel's counters."""

    def __init__(self, options: ProbeOptions, btf: BTF | None = None) -> None:
        try:
            from bcc import BPF  # noqa: PLC0415 - bcc is optional outside recording
        except ImportError:
            raise ProbeError(
                "bcc is not importable: run scripts/bootstrap (bcc comes from the "
                "distribution's python3-bpfcc, not from pip)"
            ) from None
        self.options = options
        self._swept: set[tuple[int, int]] = set()  # (tid, start) of calls the sweep recorded
        program = Program.for_options(options, btf or BTF.load())
        self.uring_status, self.wait_hooks = program.uring_status, program.wait_hooks
        self.cflags = program.cflags
        try:
            self.bpf: Any = BPF(text=program.source(), cflags=self.cflags)
        except Exception as exc:  # bcc raises bare Exception on compile/load failure
            raise ProbeError(f"cannot load the probes: {exc}") from None
        # what is attached, to detach and attach again (pause/resume): the hooks bcc attached
        # at load, and the allocator uprobes added per target
        self._hooks: list[tuple[bytes, bytes]] = [
            (b"tracepoint", tp) for tp in self.bpf.tracepoint_fds
        ] + [(b"raw", tp) for tp in self.bpf.raw_tracepoint_fds]
        self._uprobes: list[tuple[str, str, str, int, bool]] = []
        self.paused = False
        self.targets = self.bpf["targets"]
        self.inflight = self.bpf["inflight"]
        self.counters = self.bpf["counters"]
        events = self.bpf["events"]
        self.consumer = RingBufferConsumer(
            events.map_fd, events.max_entries, schema.WIRE_EVENT.dtype
        )

    def add_target(self, pid: int) -> None:
        self.targets[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
        bits = self.bpf["target_bits"]
        word = bits.Key(pid >> 6)
        bits[word] = bits.Leaf(bits[word].value | 1 << (pid & 63))

    def attach_allocator(self, pid: int) -> Allocator:
        """Attach the allocation probes to the allocator `pid` uses (filtered to its memory).

        Returns what was attached; functions the library lacks are listed, not fatal.
        """
        library = allocator_of(pid)
        if library is None:
            return Allocator(pid, None, list(ALLOC_ENTRY))
        missing = []
        for sym, fn in ALLOC_ENTRY.items():
            try:
                self._attach_uprobe(library, sym, fn, pid, False)
                self._attach_uprobe(library, sym, "alloc_exit", pid, True)
            except Exception:  # noqa: BLE001 - bcc raises bare Exception for a missing symbol
                missing.append(sym)
        try:
            self._attach_uprobe(library, "free", "free_enter", pid, False)
        except Exception:  # noqa: BLE001
            missing.append("free")
        return Allocator(pid, library, missing)

    def _attach_uprobe(self, library: str, sym: str, fn: str, pid: int, ret: bool) -> None:
        attach = self.bpf.attach_uretprobe if ret else self.bpf.attach_uprobe
        if not self.paused:
            attach(name=library, sym=sym, fn_name=fn, pid=pid)
        self._uprobes.append((library, sym, fn, pid, ret))

    def pause(self) -> None:
        """Detach every program: nothing is traced and nothing costs until resume(). Calls
        in flight are forgotten (their returns go unseen)."""
        if self.paused:
            return
        for kind, tp in self._hooks:
            if kind == b"raw":
                self.bpf.detach_raw_tracepoint(tp=tp)
            else:
                self.bpf.detach_tracepoint(tp=tp)
        for event in list(self.bpf.uprobe_fds):
            self.bpf.detach_uprobe_event(event)
        self.paused = True

    def resume(self) -> None:
        """Attach again what pause() detached, with an empty in-flight table: calls already
        waiting are the /proc scan's to find (the recorder's), as on a first attach."""
        if not self.paused:
            return
        self.inflight.clear()
        if self.options.min_wait_ns:  # and each thread's own storage
            for pid in self.target_pids():
                for tid in _threads(pid):
                    self._forget_thread_call(tid)
        for kind, tp in self._hooks:
            if kind == b"raw":
                self.bpf.attach_raw_tracepoint(tp=tp, fn_name=b"raw_tracepoint__" + tp)
            else:
                self.bpf.attach_tracepoint(tp=tp, fn_name=b"tracepoint__" + tp.replace(b":", b"__"))
        self.paused = False
        for library, sym, fn_name, pid, ret in self._uprobes:
            attach = self.bpf.attach_uretprobe if ret else self.bpf.attach_uprobe
            attach(name=library, sym=sym, fn_name=fn_name, pid=pid)

    def target_pids(self) -> list[int]:
        return [int(k.value) for k in self.targets]

    def track_inflight(
        self,
        tid: int,
        fd: int,
        addr: int,
        length: int,
        op: int,
        flags: int,
        nvec: int,
        ts: int,
        pid: int = 0,
    ) -> bool:
        """Seed the in-flight table with a read found blocked by the /proc scan (with the
        scheduler hooks: the thread's own storage, where the return hook looks).

        Returns False when the probes already track this thread (they saw it enter or block).
        """
        from bcc import lib  # noqa: PLC0415

        leaf = self.inflight.Leaf()
        leaf.ts_ns, leaf.addr, leaf.len, leaf.fd, leaf.pid = ts, addr, length, fd, pid
        leaf.flags, leaf.nvec, leaf.op = flags, nvec, op
        if self.wait_hooks != "scheduler":
            key = self.inflight.Key(tid)
            rc = lib.bpf_update_elem(
                self.inflight.map_fd, ctypes.byref(key), ctypes.byref(leaf), BPF_NOEXIST
            )
            return rc == 0
        with _thread_pidfd(tid) as key:
            if key is None or self._stored_call(key) is not None:
                return False
            return (
                lib.bpf_update_elem(self._calls_fd, ctypes.byref(key), ctypes.byref(leaf), 0) == 0
            )

    @functools.cached_property
    def _calls_fd(self) -> int:
        """The task-storage map of each thread's call (--min-wait), keyed by thread pidfd."""
        from bcc import lib  # noqa: PLC0415

        return int(lib.bpf_table_fd(self.bpf.module, b"calls"))

    def _stored_call(self, key: ctypes.c_int) -> Any | None:
        from bcc import lib  # noqa: PLC0415

        leaf = self.inflight.Leaf()
        if lib.bpf_lookup_elem(self._calls_fd, ctypes.byref(key), ctypes.byref(leaf)):
            return None
        return leaf if leaf.ts_ns else None

    def thread_call(self, tid: int) -> Any | None:
        """The call a thread waits in, from its own storage (--min-wait); None if none."""
        with _thread_pidfd(tid) as key:
            return None if key is None else self._stored_call(key)

    def sweep_waiting(self, now_ns: int) -> list[dict[str, int]]:
        """--min-wait: wire rows (as dicts, flagged SWEPT) for the calls in flight for at
        least the minimum wait and not swept before. Read-only: the kernel records such a
        call again at its return, with the same start time, and the analysis keeps one."""
        rows = []
        seen = set()
        for tid, leaf in self._calls_in_flight():
            call = (tid, int(leaf.ts_ns))
            seen.add(call)
            if (
                leaf.flags & schema.PostFlag.SCANNED
                or call in self._swept
                or now_ns - leaf.ts_ns < self.options.min_wait_ns
            ):
                continue
            self._swept.add(call)
            if self.wait_hooks == "scheduler" and not _is_socket(int(leaf.pid), int(leaf.fd)):
                continue  # the scheduler hooks leave the socket check to the return
            leaf.flags |= schema.PostFlag.SWEPT
            write = bool(leaf.flags & schema.PostFlag.WRITE)
            rows.append(
                {
                    "ts_ns": int(leaf.ts_ns),
                    "key": tid,
                    "addr": int(leaf.addr),
                    "value": int(leaf.len),
                    "pid": int(leaf.pid),
                    "tid": tid,
                    "fd": int(leaf.fd),
                    "flags": int(leaf.flags),
                    "nvec": int(leaf.nvec),
                    "op": int(leaf.op),
                    "kind": schema.Kind.WRITE_POST if write else schema.Kind.POST,
                    "source": schema.Source.SYSCALL,
                }
            )
        self._swept &= seen  # forget calls that have returned
        return rows

    def _calls_in_flight(self) -> Iterator[tuple[int, Any]]:
        """(tid, entry) of every traced call in flight: with --min-wait, each target thread's
        own storage (looked up by a thread pidfd; a thread that exits meanwhile is skipped);
        and the in-flight hash (calls the /proc scan seeded, or every call without it)."""

        for key, leaf in list(self.inflight.items()):
            yield int(key.value), leaf
        if not self.options.min_wait_ns:
            return
        for pid in self.target_pids():
            for tid in _threads(pid):
                leaf = self.thread_call(tid)
                if leaf is not None:
                    yield tid, leaf

    def inflight_flags(self, tid: int) -> int | None:
        if self.wait_hooks == "scheduler":
            leaf = self.thread_call(tid)
        else:
            leaf = self.inflight.get(self.inflight.Key(tid))
        return None if leaf is None else int(leaf.flags)

    def forget_inflight(self, tid: int) -> None:
        if self.wait_hooks != "scheduler":
            with contextlib.suppress(KeyError):
                del self.inflight[self.inflight.Key(tid)]
        else:
            self._forget_thread_call(tid)

    def _forget_thread_call(self, tid: int) -> None:
        from bcc import lib  # noqa: PLC0415

        with _thread_pidfd(tid) as key:
            if key is not None:
                lib.bpf_delete_elem(self._calls_fd, ctypes.byref(key))

    def stack(self, stack_id: int, pid: int, kind: str = "alloc") -> tuple[list[int], list[str]]:
        """The frames of a user stack (ids as in the records: id + 1) of allocations
        ("alloc") or of posted reads ("post"), and their symbols, resolved against the
        process while it still runs."""
        try:
            table = self.bpf["alloc_stacks" if kind == "alloc" else "post_stacks"]
            frames = [int(a) for a in table.walk(stack_id - 1)]
        except KeyError:
            return [], []
        symbols = [
            self.bpf.sym(a, pid, show_module=True, show_offset=True).decode(errors="replace")
            for a in frames
        ]
        return frames, symbols

    @functools.cached_property
    def kernel_state(self) -> KernelState:
        """The programs that read what the targets held before tracing (attach.bpf.c)."""
        return KernelState(self.bpf)

    def uring_entry(self, req: int) -> bool | None:
        """Whether the io_uring in-flight table holds `req` as the walk at attach entered it
        (True), as a submission the probes saw (False), or not at all (None)."""
        try:
            table = self.bpf["uring_inflight"]
        except KeyError:
            return None
        entry = table.get(table.Key(req))
        return None if entry is None else bool(entry.flags & schema.PostFlag.SCANNED)

    def counter_values(self) -> dict[str, int]:
        return {c.name.lower(): int(sum(self.counters[c.value])) for c in schema.Counter}

    def drain(self) -> np.ndarray:
        return self.consumer.drain()

    def wait(self, timeout_s: float) -> None:
        self.consumer.wait(timeout_s)

    closed = False

    def close(self) -> None:
        self.closed = True
        self.consumer.close()
        self.bpf.cleanup()
