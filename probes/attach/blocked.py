"""Finds threads already blocked in socket reads when tracing starts, from /proc.

Syscall tracepoints only see reads that enter after they are attached, so a thread that blocked
in recv() an hour ago would be invisible. /proc/PID/task/TID/syscall shows the syscall a blocked
thread is in with its raw arguments; vectored reads' iovecs are read from /proc/PID/mem.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from probes.format.schema import SYSCALLS, PostFlag

_VECTORED = {SYSCALLS["readv"], SYSCALLS["preadv2"]}
_MSGHDR = {SYSCALLS["recvmsg"], SYSCALLS["recvmmsg"]}
_IOV = struct.Struct("<QQ")


@dataclass(frozen=True)
class BlockedRead:
    pid: int
    tid: int
    fd: int
    op: int
    addr: int
    length: int
    nvec: int
    flags: int
    call: tuple[int, ...]  # (nr, arg1..arg6) as /proc showed it


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:  # the thread or process went away
        return None


def is_socket(pid: int, fd: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    except OSError:
        return False


def _sum_iov(mem: int, iov_addr: int, count: int, max_iov: int) -> tuple[int, int, int]:
    """(first buffer, total length, flags) of an iovec array in the target's memory."""
    flags = int(PostFlag.VECTORED)
    if count > max_iov:
        count, flags = max_iov, flags | int(PostFlag.IOV_TRUNCATED)
    raw = os.pread(mem, _IOV.size * count, iov_addr)
    vecs = [_IOV.unpack_from(raw, i * _IOV.size) for i in range(len(raw) // _IOV.size)]
    first = vecs[0][0] if vecs else 0
    return first, sum(n for _, n in vecs), flags


def syscall_of(pid: int, tid: int) -> tuple[int, ...] | None:
    """(nr, arg1..arg6) of the syscall a thread is blocked in, or None if it is running."""
    text = _read(f"/proc/{pid}/task/{tid}/syscall")
    if not text or not text[0].isdigit():
        return None
    fields = text.split()
    return (int(fields[0]),) + tuple(int(a, 16) for a in fields[1:7])


def blocked_reads(pid: int, max_iov: int = 8) -> Iterator[BlockedRead]:
    """Threads of `pid` currently inside a read-type syscall on a socket."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    mem: int | None = None
    try:
        for tid in tids:
            call = syscall_of(pid, tid)
            if call is None or call[0] not in SYSCALLS.values():
                continue
            nr, fd = call[0], call[1]
            if not is_socket(pid, fd):
                continue
            addr, length, nvec, flags = call[2], call[3], 0, 0
            try:
                if nr in _VECTORED or nr in _MSGHDR:
                    if mem is None:
                        mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
                    iov, nvec = call[2], call[3]
                    if nr in _MSGHDR:  # struct user_msghdr: msg_iov at 16, msg_iovlen at 24
                        iov, nvec = struct.unpack_from("<QQ", os.pread(mem, 16, call[2] + 16))
                    addr, length, flags = _sum_iov(mem, iov, nvec, max_iov)
            except (OSError, struct.error):
                continue
            yield BlockedRead(pid, tid, fd, nr, addr, length, nvec, int(flags), call)
    finally:
        if mem is not None:
            os.close(mem)


def has_io_uring(pid: int) -> bool:
    """Whether the process has an io_uring instance open (requests it submitted before tracing
    began cannot be seen: io_uring exposes no list of them)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]":
                return True
        except OSError:
            continue
    return False
