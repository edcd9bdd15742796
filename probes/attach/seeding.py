"""Seeding a recording with what its targets held before tracing began: the walks of this
package put together, for each target, as wire records (the reads already posted, the buffer
groups, the anonymous mappings) and as meta.json's account of what was found and how.

Reads found here are entered in the probes' in-flight table as well, so a completion after
the attach retires them as if the probes had seen them posted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from probes.attach import blocked, goroutines, process
from probes.attach import uring as uring_state
from probes.format import schema
from probes.format.errors import BTFError, ProbeError
from probes.format.meta import GoAtAttach, ProcessAtAttach

if TYPE_CHECKING:
    from probes.btf import BTF
    from probes.buffer_rings import BufferRingWatcher
    from probes.loader import Probes

Take = Callable[[np.ndarray], None]  # where the records go: the recorder's sink
NowNs = Callable[[], int]  # CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns


def blocked_reads(probes: Probes, pid: int, now_ns: NowNs) -> np.ndarray:
    """Reads `pid`'s threads were blocked in when tracing began (/proc), entered in the
    in-flight table, as POST records; those the probes saw enter are theirs already."""
    found = []
    for read in blocked.blocked_reads(pid, probes.options.max_iov):
        ts = now_ns()
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
    return schema.wire_records(found)


def seed(
    probes: Probes,
    btf: BTF,
    pids: list[int],
    take: Take,
    rings: BufferRingWatcher,
    now_ns: NowNs,
) -> list[ProcessAtAttach]:
    """What the targets held before tracing began: threads blocked in socket reads
    (/proc), io_uring requests and buffer groups (the kernel's rings, whose registered
    rings `rings` then watches), goroutines parked in reads (a Go runtime's memory),
    anonymous mappings (/proc/PID/maps). Records go to `take`; one entry per target."""
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
    out = []
    for pid in pids:
        began = time.perf_counter()
        reads = blocked_reads(probes, pid, now_ns)
        if reads.size:
            take(reads)
        found = ProcessAtAttach(pid=pid, blocked_syscalls=reads.size)
        found_rings = uring_state.at_attach(pid, kernel, layout, files, why, probes.uring_entry)
        if found_rings.posts:
            take(np.array(found_rings.posts, dtype=schema.WIRE_EVENT.dtype))
        if found_rings.groups:
            take(schema.wire_records(found_rings.groups))
        for ring, group, addr, entries in found_rings.kernel_rings:
            assert kernel is not None
            rings.watch_kernel(pid, ring, group, addr, entries, kernel.read)
        found.rings = found_rings.rings
        parked, found.go = parked_reads(pid, now_ns)
        if parked.size:
            take(parked)
        mappings = process.anonymous_mappings(pid)
        found.mappings = len(mappings)
        if mappings:
            take(mapping_records(pid, mappings, now_ns()))
        found.walk_ms = round((time.perf_counter() - began) * 1000, 1)
        out.append(found)
    return out


def parked_reads(pid: int, now_ns: NowNs) -> tuple[np.ndarray, GoAtAttach | None]:
    """A Go target's goroutines parked in socket reads, as parked POST records, and what
    the scan found; None for a process that is not Go or has no goroutine waiting on IO."""
    scan = goroutines.parked_reads(pid, lambda fd: blocked.is_socket(pid, fd))
    if not scan.reads and scan.unknown_why is None and not scan.io_waiting:
        return schema.wire_records([]), None
    ts = now_ns()
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
    sockets = 0
    if scan.unknown_why:  # how many connections the unknown concerns
        sockets = sum(1 for fd in _fds(pid) if blocked.is_socket(pid, fd))
    return schema.wire_records(rows), GoAtAttach(
        parked_reads=len(rows),
        io_waiting=scan.io_waiting,
        skipped=scan.skipped,
        why=scan.unknown_why,
        sockets=sockets,
    )


def mapping_records(pid: int, mappings: list[process.Mapping], ts: int) -> np.ndarray:
    """Anonymous mappings found at attach, as MAP records (op AT_ATTACH)."""
    return schema.wire_records(
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


def _fds(pid: int) -> list[int]:
    try:
        return [int(n) for n in os.listdir(f"/proc/{pid}/fd")]
    except (OSError, ValueError):
        return []
