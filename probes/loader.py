"""Compile and attach the BPF programs; the only module that imports bcc (lazily).

Options reach the C code as -D constants; kernel structure offsets come from BTF.
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

from probes import layout
from probes.btf import BTF, BTFError
from probes.ringbuf import RingBufferConsumer

# Kernel structure members the read probes read (fd_is_socket() walks them):
# constant name -> (struct, member).
KERNEL_OFFSETS = {
    "OFF_TASK_FILES": ("task_struct", "files"),
    "OFF_FILES_FDT": ("files_struct", "fdt"),
    "OFF_FDT_MAX_FDS": ("fdtable", "max_fds"),
    "OFF_FDT_FD": ("fdtable", "fd"),
    "OFF_FILE_INODE": ("file", "f_inode"),
    "OFF_INODE_MODE": ("inode", "i_mode"),
}

# io_uring request layout, as (constant, struct, member path within the struct); op-specific
# structures live in io_kiocb's `cmd` area, so their offsets add io_kiocb.cmd.
URING_OFFSETS = {
    "URING_OFF_CQE_FD": [("io_kiocb", "cqe"), ("io_cqe", "fd")],
    "URING_OFF_ASYNC": [("io_kiocb", "async_data")],
    "URING_OFF_BUF_INDEX": [("io_kiocb", "buf_index")],
    "URING_OFF_SR_BUF": [("io_kiocb", "cmd"), ("io_sr_msg", "buf")],
    "URING_OFF_SR_LEN": [("io_kiocb", "cmd"), ("io_sr_msg", "len")],
    "URING_OFF_SR_FLAGS": [("io_kiocb", "cmd"), ("io_sr_msg", "flags")],
    "URING_OFF_RW_ADDR": [("io_kiocb", "cmd"), ("io_rw", "addr")],
    "URING_OFF_RW_LEN": [("io_kiocb", "cmd"), ("io_rw", "len")],
    "URING_OFF_PB_ADDR": [("io_kiocb", "cmd"), ("io_provide_buf", "addr")],
    "URING_OFF_PB_LEN": [("io_kiocb", "cmd"), ("io_provide_buf", "len")],
    "URING_OFF_PB_BGID": [("io_kiocb", "cmd"), ("io_provide_buf", "bgid")],
    "URING_OFF_PB_NBUFS": [("io_kiocb", "cmd"), ("io_provide_buf", "nbufs")],
    "URING_OFF_PB_BID": [("io_kiocb", "cmd"), ("io_provide_buf", "bid")],
    "URING_OFF_ARW_ITER": [("io_async_rw", "iter")],
    "URING_OFF_AMSG_ITER": [("io_async_msghdr", "msg"), ("msghdr", "msg_iter")],
    "ITER_OFF_TYPE": [("iov_iter", "iter_type")],
    "ITER_OFF_IOV": [("iov_iter", "__iov")],
    "ITER_OFF_COUNT": [("iov_iter", "count")],
    "ITER_OFF_NR_SEGS": [("iov_iter", "nr_segs")],
}
# request flag bits (anonymous enum in io_uring_types.h), passed as masks
URING_FLAG_BITS = {
    "REQ_F_FIXED_FILE_MASK": "REQ_F_FIXED_FILE_BIT",
    "REQ_F_BUFFER_SELECT_MASK": "REQ_F_BUFFER_SELECT_BIT",
    "REQ_F_APOLL_MULTISHOT_MASK": "REQ_F_APOLL_MULTISHOT_BIT",
}
URING_TRACEPOINTS = (
    "io_uring/io_uring_submit_req",
    "io_uring/io_uring_complete",
    "io_uring/io_uring_register",
)
# --min-wait sees calls wait through the scheduler and the socket layer, not syscall
# tracepoints, where the kernel has these and thread pidfds (6.9+: the recorder reads and
# seeds each thread's call through one).
BLOCK_TRACEPOINTS = ("sock/sock_recv_length", "sock/sock_send_length")

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


class ProbeError(Exception):
    """A probe could not be compiled or attached; the message says why in one line."""


@dataclass(frozen=True)
class ReadProbeOptions:
    follow_children: bool = False
    max_targets: int = 4096
    max_inflight: int = 65536
    ringbuf_pages: int = 4096  # 16 MiB: ~200k records of slack before a burst drops events
    max_iov: int = 8
    memory: bool = False  # allocation probes (uprobes on the allocator) and resident memory
    min_alloc: int = 1024  # allocations smaller than this are not tracked
    sample_every: int = 1  # track one allocation address in N (by a hash of the address)
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


def kernel_offsets(btf: BTF) -> dict[str, int]:
    try:
        return {c: btf.offsetof(s, m) for c, (s, m) in KERNEL_OFFSETS.items()}
    except BTFError as exc:
        raise ProbeError(f"kernel BTF lacks what the socket check needs: {exc}") from None


def uring_constants(btf: BTF) -> dict[str, int]:
    """Offsets and constants the io_uring probes need; BTFError says what this kernel lacks."""
    out = {name: sum(btf.offsetof(s, m) for s, m in path) for name, path in URING_OFFSETS.items()}
    for mask, bit in URING_FLAG_BITS.items():
        out[mask] = 1 << btf.enumerator(bit)
    out["ITER_UBUF_VAL"] = btf.enum_value("iter_type", "ITER_UBUF")
    out["ITER_IOVEC_VAL"] = btf.enum_value("iter_type", "ITER_IOVEC")
    for name, value in layout.URING_READ_OPS.items():
        if btf.enum_value("io_uring_op", f"IORING_OP_{name}") != value:
            raise BTFError(f"IORING_OP_{name} is not {value} on this kernel")
    return out


def pid_max() -> int:
    """The largest process id plus one (the size of the target bitmap)."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 1 << 22  # PID_MAX_LIMIT on 64-bit


def read_probe_source(memory: bool = False) -> str:
    files = ["reads.bpf.c"] + (["alloc.bpf.c"] if memory else [])
    return layout.c_header() + "".join(
        resources.files("probes").joinpath(f).read_text() for f in files
    )


def wait_hooks(options: ReadProbeOptions) -> str | None:
    """How --min-wait sees calls wait here: "scheduler" (no syscall tracepoint; a call that
    does not wait costs a lookup at its return), "syscalls" (older kernels), None without
    --min-wait. ProbeError if the scheduler hooks are asked for where they cannot run."""
    from probes import features  # noqa: PLC0415

    if not options.min_wait_ns:
        return None
    if options.wait_hooks == "syscalls":
        return "syscalls"
    missing = [t.replace("/", ":") for t in BLOCK_TRACEPOINTS if not features.tracepoint_present(t)]
    if features.kernel_version() < (6, 9):
        missing.append("thread pidfds (Linux 6.9)")
    if not missing:
        return "scheduler"
    if options.wait_hooks == "scheduler":
        raise ProbeError("the scheduler wait hooks need " + ", ".join(missing))
    return "syscalls"


def read_probe_cflags(
    options: ReadProbeOptions,
    offsets: dict[str, int],
    uring: dict[str, int] | None = None,
    hooks: str | None = None,
) -> list[str]:
    consts = dict(offsets)
    consts.update(uring or {})
    consts.update(
        WITH_URING=int(uring is not None),
        MAX_TARGETS=options.max_targets,
        TARGET_WORDS=(pid_max() + 63) // 64,
        MAX_INFLIGHT=options.max_inflight,
        RINGBUF_PAGES=options.ringbuf_pages,
        FOLLOW_CHILDREN=int(options.follow_children),
        MAX_IOV=options.max_iov,
        MIN_ALLOC=options.min_alloc,
        SAMPLE_EVERY=options.sample_every,
        MAX_ALLOCS=options.max_allocs,
        MAX_STACKS=options.max_stacks,
        MIN_WAIT_NS=options.min_wait_ns,
        WITH_WRITES=int(options.writes),
        BLOCK_HOOKS=int(hooks == "scheduler"),
    )
    return [f"-D{k}={v}" for k, v in sorted(consts.items())]


def uring_support(btf: BTF) -> tuple[dict[str, int] | None, str]:
    """(constants, why) - constants is None when io_uring cannot be traced here."""
    from probes import features  # noqa: PLC0415

    missing = [t for t in URING_TRACEPOINTS if not features.tracepoint_present(t)]
    if missing:
        return None, "no tracepoint " + ", ".join(m.replace("/", ":") for m in missing)
    try:
        return uring_constants(btf), "traced"
    except BTFError as exc:
        return None, f"this kernel's io_uring layout is not understood: {exc}"


def render_read_probe(options: ReadProbeOptions, btf: BTF | None = None) -> str:
    """The final C text bcc compiles, with its -D constants as #defines (for debugging)."""
    btf = btf or BTF.load()
    cflags = read_probe_cflags(
        options, kernel_offsets(btf), uring_support(btf)[0], wait_hooks(options)
    )
    defines = [f"#define {flag[2:].replace('=', ' ', 1)}" for flag in cflags]
    source = read_probe_source(options.memory)
    return "\n".join(["/* cflags: " + " ".join(cflags) + " */", *defines, source])


class ReadProbes:
    """The loaded posted-read programs and their maps."""

    def __init__(self, options: ReadProbeOptions, btf: BTF | None = None) -> None:
        try:
            from bcc import BPF  # noqa: PLC0415 - bcc is optional outside recording
        except ImportError:
            raise ProbeError(
                "bcc is not importable: run scripts/bootstrap (bcc comes from the "
                "distribution's python3-bpfcc, not from pip)"
            ) from None
        self.options = options
        self._swept: set[tuple[int, int]] = set()  # (tid, start) of calls the sweep recorded
        btf = btf or BTF.load()
        uring, self.uring_status = uring_support(btf)
        self.wait_hooks = wait_hooks(options)
        self.cflags = read_probe_cflags(options, kernel_offsets(btf), uring, self.wait_hooks)
        try:
            self.bpf: Any = BPF(text=read_probe_source(options.memory), cflags=self.cflags)
        except Exception as exc:  # bcc raises bare Exception on compile/load failure
            raise ProbeError(f"cannot load the read probes: {exc}") from None
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
            events.map_fd, events.max_entries, layout.READ_EVENT.dtype
        )

    def add_target(self, pid: int) -> None:
        self.targets[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
        bits = self.bpf["target_bits"]
        word = bits.Key(pid >> 6)
        bits[word] = bits.Leaf(bits[word].value | 1 << (pid & 63))

    def attach_allocator(self, pid: int) -> dict[str, object]:
        """Attach the allocation probes to the allocator `pid` uses (filtered to its memory).

        Returns what was attached; functions the library lacks are listed, not fatal.
        """
        library = allocator_of(pid)
        if library is None:
            return {"pid": pid, "library": None, "missing": list(ALLOC_ENTRY)}
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
        return {"pid": pid, "library": library, "missing": missing}

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
                leaf.flags & layout.PostFlag.SCANNED
                or call in self._swept
                or now_ns - leaf.ts_ns < self.options.min_wait_ns
            ):
                continue
            self._swept.add(call)
            if self.wait_hooks == "scheduler" and not _is_socket(int(leaf.pid), int(leaf.fd)):
                continue  # the scheduler hooks leave the socket check to the return
            leaf.flags |= layout.PostFlag.SWEPT
            write = bool(leaf.flags & layout.PostFlag.WRITE)
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
                    "kind": layout.Kind.WRITE_POST if write else layout.Kind.POST,
                    "source": layout.Source.SYSCALL,
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

    def stack(self, stack_id: int, pid: int) -> tuple[list[int], list[str]]:
        """The frames of an allocation stack (ids as in ALLOC records: id + 1) and their
        symbols, resolved against the process while it still runs."""
        try:
            frames = [int(a) for a in self.bpf["alloc_stacks"].walk(stack_id - 1)]
        except KeyError:
            return [], []
        symbols = [
            self.bpf.sym(a, pid, show_module=True, show_offset=True).decode(errors="replace")
            for a in frames
        ]
        return frames, symbols

    def counter_values(self) -> dict[str, int]:
        return {c.name.lower(): int(sum(self.counters[c.value])) for c in layout.Counter}

    def drain(self) -> np.ndarray:
        return self.consumer.drain()

    def wait(self, timeout_s: float) -> None:
        self.consumer.wait(timeout_s)

    def close(self) -> None:
        self.consumer.close()
        self.bpf.cleanup()
