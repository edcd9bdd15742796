"""What carries each connection's wait, read from /proc: the threads blocked on one
connection alone, and what each costs.

A thread is a connection's waiter when it is blocked in a read on that socket, or in
poll/ppoll/select/pselect6 watching that socket alone, or in epoll_wait on an epoll set that
holds that socket alone (MariaDB's threads wait in poll() on their own socket, then read with
MSG_DONTWAIT: queued in substance, though no read is posted). A thread that waits for many
connections (a pool, an event loop) is the process's, not any one connection's.

Its cost: its user stack as resident pages (the mapping that holds its stack pointer, counted
through /proc/PID/pagemap - never the reservation), plus what the kernel gives every thread
(a kernel stack, a task_struct: the analysis applies the kernel's figures from meta.json).
Only sizes reach the trace, never memory contents; /proc/PID/mem is read, never written, and
the process is never stopped.
"""

from __future__ import annotations

import bisect
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from probes.attach.blocked import is_socket
from probes.format.schema import SYSCALLS
from probes.residency import resident_bytes

# x86_64 numbers of the calls a thread waits in for readiness (the read-type calls are
# schema.SYSCALLS)
POLL, PPOLL, SELECT, PSELECT6 = 7, 271, 23, 270
EPOLL_WAIT, EPOLL_PWAIT, EPOLL_PWAIT2 = 232, 281, 441
_POLLFD = struct.Struct("<ihh")


@dataclass(frozen=True)
class Waiter:
    """A thread blocked on one connection (`fd`), and its user stack."""

    pid: int
    tid: int
    fd: int
    call: int  # the syscall it is blocked in
    stack_bytes: int  # resident bytes of its stack mapping
    stack_size: int  # the mapping's size (the reservation)


def blocked_call(pid: int, tid: int) -> tuple[int, list[int], int] | None:
    """(nr, arguments, stack pointer) of the call a thread is blocked in; None if running
    (or if that cannot be read)."""
    try:
        return _blocked_call(pid, tid)
    except PermissionError:
        return None


def _blocked_call(pid: int, tid: int) -> tuple[int, list[int], int] | None:
    """blocked_call(), but PermissionError when the thread's call may not be read (it
    needs ptrace access to the process: Yama's ptrace_scope 3 refuses even root)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall", encoding="ascii") as f:
            fields = f.read().split()
    except PermissionError:
        raise
    except OSError:
        return None
    if len(fields) < 9 or not fields[0].isdigit():
        return None
    return int(fields[0]), [int(a, 16) for a in fields[1:7]], int(fields[7], 16)


def _epoll_targets(pid: int, epfd: int) -> list[int]:
    """The fds an epoll set watches (/proc/PID/fdinfo/EPFD's tfd lines)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{epfd}", encoding="ascii", errors="replace") as f:
            return [int(line.split()[1]) for line in f if line.startswith("tfd:")]
    except (OSError, ValueError, IndexError):
        return []


def watched_alone(pid: int, nr: int, args: list[int], mem: Callable[[int, int], bytes]) -> int:
    """The one fd a blocked call waits on, or -1 (none, or several)."""
    if nr in SYSCALLS.values():
        return args[0]
    if nr in (POLL, PPOLL):
        if args[1] != 1:
            return -1
        fd, _events, _revents = _POLLFD.unpack(mem(args[0], _POLLFD.size))
        return fd
    if nr in (SELECT, PSELECT6):
        nfds = args[0]
        if not 0 < nfds <= 1024 or args[2] or args[3]:  # writes or exceptions watched too
            return -1
        words = (nfds + 63) // 64
        bits = int.from_bytes(mem(args[1], 8 * words), "little") if args[1] else 0
        if bits == 0 or bits & (bits - 1):  # none, or several
            return -1
        return bits.bit_length() - 1
    if nr in (EPOLL_WAIT, EPOLL_PWAIT, EPOLL_PWAIT2):
        targets = _epoll_targets(pid, args[0])
        return targets[0] if len(targets) == 1 else -1
    return -1


class _Stacks:
    """A process's mappings, to find the one holding a thread's stack pointer."""

    def __init__(self, pid: int) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
                    self.starts.append(lo)
                    self.ends.append(hi)
        except (OSError, ValueError):
            pass

    def holding(self, addr: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and addr < self.ends[i]:
            return self.starts[i], self.ends[i]
        return None


def _pread(fd: int, addr: int, length: int) -> bytes:
    return os.pread(fd, length, addr)


def thread_waiters(pid: int) -> list[Waiter]:
    """The threads of `pid` blocked on one connection each, with their stacks' resident
    bytes. Threads that exit meanwhile, or whose memory cannot be read, are left out."""
    return waiters_of(pid)[0]


def waiters_of(pid: int) -> tuple[list[Waiter], str]:
    """thread_waiters(`pid`), and why what its threads wait in cannot be read ("" when it
    can): then none are given, as any thread may be a connection's waiter. A thread that
    exits meanwhile is left out; so is one whose stack's residency cannot be read."""
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return [], ""
    out: list[Waiter] = []
    stacks: _Stacks | None = None
    mem_fd = pagemap_fd = -1

    def mem(addr: int, length: int) -> bytes:
        nonlocal mem_fd
        if mem_fd < 0:  # opened once a thread waits in a call whose arguments are in memory
            mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        return _pread(mem_fd, addr, length)

    try:
        for tid in tids:
            try:
                blocked = _blocked_call(pid, tid)
            except PermissionError as exc:
                return [], _unreadable(f"/proc/{pid}/task/{tid}/syscall", exc)
            if blocked is None:
                continue
            nr, args, sp = blocked
            try:
                fd = watched_alone(pid, nr, args, mem)
            except PermissionError as exc:
                return [], _unreadable(f"/proc/{pid}/mem", exc)
            except (OSError, struct.error):
                continue
            if fd < 0 or not is_socket(pid, fd):
                continue
            if stacks is None:
                stacks = _Stacks(pid)
                pagemap_fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            found = stacks.holding(sp)
            resident = size = 0
            if found is not None:
                size = found[1] - found[0]
                try:
                    resident = resident_bytes(pagemap_fd, found[0], size)
                except OSError:
                    continue
            out.append(Waiter(pid, tid, fd, nr, resident, size))
    except OSError:  # the process went away
        return out, ""
    finally:
        for fd_ in (mem_fd, pagemap_fd):
            if fd_ >= 0:
                os.close(fd_)
    return out, ""


def _unreadable(path: str, exc: OSError) -> str:
    return f"what its threads wait in cannot be read ({path}: {exc.strerror})"


def kernel_stack_bytes() -> tuple[int | None, str | None]:
    """A thread's kernel stack on this kernel (THREAD_SIZE, not exposed as such): the
    kernel's stack memory (/proc/meminfo KernelStack) over its threads (/proc/loadavg),
    to the nearest power of two; None with why when they cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            stacks = next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("KernelStack:")
            )
        with open("/proc/loadavg", encoding="ascii") as f:
            threads = int(f.read().split()[3].split("/")[1])
    except (OSError, ValueError, IndexError, StopIteration):
        return None, "/proc/meminfo's KernelStack or /proc/loadavg cannot be read"
    if threads <= 0 or stacks <= 0:
        return None, "the kernel reported no stack memory"
    return 1 << round(math.log2(stacks / threads)), None


@dataclass(frozen=True)
class ProcessWaiter:
    """A process that exists for one connection (a forked child holding it alone: a
    PostgreSQL backend, a pre-fork server's worker): its private memory - pages only it
    maps; those it still shares with its parent are the parent's - its page tables, its
    mappings and threads (the kernel's objects for them are the analysis's)."""

    pid: int
    fd: int
    private_bytes: int
    page_table_bytes: int
    mappings: int
    threads: int
    # mappings holding anonymous pages: each has an anon_vma of its own and, in a forked
    # child, two anon_vma_chain links (to its own anon_vma and to its parent's)
    anon_mappings: int = 0


_LISTEN_TCP = "0A"
_ACCEPTCON = 0x10000  # a Unix socket that listens (net/unix: __SO_ACCEPTCON)


def connection_fds(pid: int) -> list[int]:
    """The fds of `pid` that are connections: TCP sockets not listening, connected Unix
    stream sockets (the process's own network namespace's tables)."""
    inodes: dict[int, int] = {}
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[int(link[8:-1])] = int(fd)
    except OSError:
        return []
    connected: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}", encoding="ascii") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] != _LISTEN_TCP:
                        connected.add(int(fields[9]))
        except (OSError, ValueError):
            continue
    try:
        with open(f"/proc/{pid}/net/unix", encoding="ascii", errors="replace") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                # Num RefCount Protocol Flags Type St Inode [Path]: a stream, connected
                stream = len(fields) > 6 and fields[4] == "0001" and fields[5] == "03"
                if stream and not int(fields[3], 16) & _ACCEPTCON:
                    connected.add(int(fields[6]))
    except (OSError, ValueError):
        pass
    return sorted(fd for inode, fd in inodes.items() if inode in connected)


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def process_waiter(pid: int, targets: set[int]) -> ProcessWaiter | None:
    """`pid`'s cost as the waiter of its one connection, when it is a child of another
    target holding a single connection (a process per connection); None otherwise."""
    if _parent(pid) not in targets:
        return None
    fds = connection_fds(pid)
    if len(fds) != 1:
        return None
    private = anon = mappings = 0
    try:
        # smaps, not smaps_rollup: the mappings holding anonymous pages are counted too
        with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as f:
            for line in f:
                key = line.split(None, 1)[0]
                if key in ("Private_Clean:", "Private_Dirty:"):
                    private += int(line.split()[1]) * 1024
                elif key == "Anonymous:":
                    anon += int(line.split()[1]) > 0
                elif not key.endswith(":"):  # a mapping's first line: START-END PERMS ...
                    mappings += 1
        status: dict[str, int] = {}
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmPTE", "Threads"):
                    status[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return ProcessWaiter(
        pid,
        fds[0],
        private,
        status.get("VmPTE", 0) * 1024,
        mappings,
        status.get("Threads", 1),
        anon,
    )
