"""io_uring state at attach: requests posted, and provided buffers registered, before tracing
began.

io_uring keeps no list of requests for user space, but an idle RECV or READ on a socket is
armed for poll and hangs in its ring's cancel table (`io_ring_ctx.cancel_table`, buckets of
`io_kiocb.hash_node` lists). The walk reads that table and each ring's provided-buffer lists
(`io_ring_ctx.io_bl_xa`) through kernel reads (probes.attach.kernel), with offsets from BTF;
each request is decoded by the submit probe's own code and entered in the in-flight table, so
a completion after the attach retires it. A request that completes while the walk runs is
dropped, as the /proc scan drops a syscall that returned while it looked.

Where the walk cannot run, the ring's /proc/PID/fdinfo gives a count of its poll-armed
requests by opcode, with no buffer: a lower bound, and the report says so.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from probes.attach.kernel import KernelState, OpenFile
from probes.btf import BTF
from probes.format.errors import BTFError, ProbeError
from probes.format.meta import RingAtAttach
from probes.format.schema import URING_OP_NAMES, GroupKind, Kind, PostFlag

MAX_REQUESTS = 1 << 20
MAX_BUCKET_BITS = 16
MAX_GROUPS = 4096
MAX_RING_ENTRIES = 1 << 15
_RING_ENTRY = struct.Struct("<QIHH")  # struct io_uring_buf {addr, len, bid, resv}
_POLL_ENTRY = re.compile(r"op=(\d+)")
RING_LINK = "anon_inode:[io_uring]"


@dataclass(frozen=True)
class Layout:
    """Offsets of the structures the walk reads, from BTF."""

    cancel_table: int
    hash_bits: int
    bucket_size: int
    hash_node: int
    bl_xa_head: int
    xa_node_shift: int
    xa_node_slots: int
    bl_size: int
    bl_nbufs: int
    bl_bgid: int
    bl_nr_entries: int
    bl_head: int
    bl_flags: int | None  # None: older kernels say it with is_buf_ring / is_mapped
    bl_is_ring: int | None
    buf_ring_flag: int
    buffer_addr: int
    buffer_len: int
    buffer_bid: int

    @classmethod
    def from_btf(cls, btf: BTF) -> Layout:
        def optional(struct_name: str, member: str) -> int | None:
            try:
                return btf.offsetof(struct_name, member)
            except BTFError:
                return None

        flag = 1
        with contextlib.suppress(BTFError):
            flag = btf.enumerator("IOBL_BUF_RING")
        return cls(
            cancel_table=btf.offsetof("io_ring_ctx", "cancel_table"),
            hash_bits=btf.offsetof("io_hash_table", "hash_bits"),
            bucket_size=btf.sizeof("io_hash_bucket"),
            hash_node=btf.offsetof("io_kiocb", "hash_node"),
            bl_xa_head=btf.offsetof("io_ring_ctx", "io_bl_xa") + btf.offsetof("xarray", "xa_head"),
            xa_node_shift=btf.offsetof("xa_node", "shift"),
            xa_node_slots=btf.offsetof("xa_node", "slots"),
            bl_size=btf.sizeof("io_buffer_list"),
            bl_nbufs=btf.offsetof("io_buffer_list", "nbufs"),
            bl_bgid=btf.offsetof("io_buffer_list", "bgid"),
            bl_nr_entries=btf.offsetof("io_buffer_list", "nr_entries"),
            bl_head=btf.offsetof("io_buffer_list", "head"),
            bl_flags=optional("io_buffer_list", "flags"),
            bl_is_ring=optional("io_buffer_list", "is_buf_ring")
            or optional("io_buffer_list", "is_mapped"),
            buf_ring_flag=flag,
            buffer_addr=btf.offsetof("io_buffer", "addr"),
            buffer_len=btf.offsetof("io_buffer", "len"),
            buffer_bid=btf.offsetof("io_buffer", "bid"),
        )


@dataclass
class RingState:
    """What the walk found in one process's rings, ready for the trace."""

    rings: list[RingAtAttach] = field(default_factory=list)
    posts: list[Any] = field(default_factory=list)  # POST wire records (flagged SCANNED)
    groups: list[dict[str, int]] = field(default_factory=list)  # BUFFER_GROUP wire rows
    kernel_rings: list[tuple[int, int, int, int]] = field(default_factory=list)
    # ^ (ring, group, kernel address of its struct io_uring_buf_ring, entries)


def ring_fds(pid: int) -> list[int]:
    """The fds of `pid` that are io_uring instances."""
    out = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == RING_LINK:
                out.append(int(name))
        except (OSError, ValueError):
            continue
    return sorted(out)


def fdinfo(pid: int, fd: int) -> str:
    """The ring's /proc/PID/fdinfo text, without the lines about the fd itself."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    return "\n".join(line for line in lines if not line.startswith(("pos:", "flags:", "mnt_id:")))


def poll_list(info: str) -> Counter[str]:
    """A ring's poll-armed requests by opcode name, from its fdinfo (no buffers)."""
    _, _, polls = info.partition("PollList:")
    return Counter(
        URING_OP_NAMES.get(int(m.group(1)), f"op_{m.group(1)}")
        for m in _POLL_ENTRY.finditer(polls.split("CqOverflowList:")[0])
    )


def at_attach(
    pid: int,
    kernel: KernelState | None,
    layout: Layout | None,
    files: list[OpenFile],
    why_not: str | None,
    still_ours: Callable[[int], bool | None],
) -> RingState:
    """Every ring of `pid`: walked when `kernel` and `layout` are there, else counted from
    fdinfo with `why_not`. `still_ours(req)` tells, after the walk, whether the in-flight
    table still holds the walk's entry for a request (True), another one (False: a new
    submission took the address), or none (None: it completed after being seeded)."""
    state = RingState()
    by_fd = {f.fd: f for f in files if f.pid == pid}
    fd_of_file = {f.file: f.fd for f in files if f.pid == pid}
    seen: set[int | str] = set()  # a ring is open on several fds when its fd was dup'ed
    for fd in ring_fds(pid):
        info = fdinfo(pid, fd)
        opened = by_fd.get(fd)
        same = opened.private_data if opened else info
        if same in seen:
            continue
        seen.add(same)
        counted = poll_list(info)
        if kernel is None or layout is None or opened is None:
            why = why_not or "the ring's kernel state could not be reached"
            state.rings.append(_counted(fd, counted, why))
            continue
        try:
            found = _walk(kernel, layout, pid, opened.private_data, fd_of_file, still_ours)
        except (ProbeError, WalkError) as exc:
            state.rings.append(_counted(fd, counted, str(exc)))
            continue
        posts, groups, kernel_rings = found
        state.posts += posts
        state.groups += groups
        state.kernel_rings += kernel_rings
        state.rings.append(
            RingAtAttach(
                fd=fd,
                ring=opened.private_data,
                how="walked",
                requests=len(posts),
                by_op=dict(Counter(URING_OP_NAMES.get(int(p["op"]), "?") for p in posts)),
                groups=len({g["group"] for g in groups}),
            )
        )
    return state


def _counted(fd: int, counted: Counter[str], why: str) -> RingAtAttach:
    return RingAtAttach(
        fd=fd, how="fdinfo", requests=sum(counted.values()), by_op=dict(counted), why=why
    )


class WalkError(Exception):
    """The ring's structures did not read as expected (it changed, or a layout is off)."""


def _walk(
    kernel: KernelState,
    layout: Layout,
    pid: int,
    ring: int,
    fd_of_file: dict[int, int],
    still_ours: Callable[[int], bool | None],
) -> tuple[list[Any], list[dict[str, int]], list[tuple[int, int, int, int]]]:
    before = _requests(kernel, layout, ring)
    seeded = kernel.seed_uring(sorted(before), ring, pid)
    after = _requests(kernel, layout, ring)  # what completed meanwhile is not posted
    posts = []
    for event, file in seeded:
        req = int(event["key"])
        if req not in after and still_ours(req) is True:
            continue  # completed before it was seeded: it never reached the trace
        if file in fd_of_file:
            event["fd"] = fd_of_file[file]
        posts.append(event)
    groups, kernel_rings = _buffer_groups(kernel, layout, pid, ring)
    return posts, groups, kernel_rings


def _requests(kernel: KernelState, layout: Layout, ring: int) -> set[int]:
    """The requests hanging in the ring's cancel table."""
    header = kernel.read(ring + layout.cancel_table, 16)
    if header is None:
        raise WalkError(f"the ring at {ring:#x} could not be read")
    hbs = struct.unpack_from("<Q", header)[0]
    bits = struct.unpack_from("<I", header, layout.hash_bits)[0]
    if not hbs or bits > MAX_BUCKET_BITS:
        raise WalkError(f"the ring's cancel table reads as {bits} hash bits")
    heads = kernel.words([hbs + i * layout.bucket_size for i in range(1 << bits)])
    if any(h is None for h in heads):
        raise WalkError("the ring's cancel table could not be read")
    found: set[int] = set()
    frontier = [h for h in heads if h]
    while frontier:
        nodes = [n for n in frontier if n - layout.hash_node not in found]
        found.update(n - layout.hash_node for n in nodes)
        if len(found) > MAX_REQUESTS:
            raise WalkError(f"more than {MAX_REQUESTS:,} requests: the walk stopped")
        frontier = [n for n in kernel.words(nodes) if n]  # hlist_node.next is first
    return found


def _xarray(kernel: KernelState, layout: Layout, head: int) -> list[int]:
    """The entries of an xarray whose head is `head` (pointers; internal entries skipped)."""
    out: list[int] = []
    nodes = []
    if head & 3 == 2 and head > 4096:
        nodes.append(head - 2)
    elif head and head & 3 == 0:
        return [head]
    while nodes and len(out) < MAX_GROUPS:
        node = nodes.pop()
        raw = kernel.read(node + layout.xa_node_slots, 64 * 8)
        if raw is None:
            raise WalkError("a provided-buffer list could not be read")
        for slot in struct.unpack("<64Q", raw):
            if slot & 3 == 2 and slot > 4096:
                nodes.append(slot - 2)
            elif slot and slot & 3 == 0:
                out.append(slot)
    return out


def _buffer_groups(
    kernel: KernelState, layout: Layout, pid: int, ring: int
) -> tuple[list[dict[str, int]], list[tuple[int, int, int, int]]]:
    """The ring's provided-buffer groups: BUFFER_GROUP rows, and the registered rings the
    recorder keeps reading (from kernel memory: their user address is not kept)."""
    head = kernel.words([ring + layout.bl_xa_head])[0]
    if head is None:
        raise WalkError("the ring's provided-buffer lists could not be read")
    groups: list[dict[str, int]] = []
    rings: list[tuple[int, int, int, int]] = []
    for bl in _xarray(kernel, layout, head):
        raw = kernel.read(bl, layout.bl_size)
        if raw is None:
            continue
        bgid = struct.unpack_from("<H", raw, layout.bl_bgid)[0]
        entries = struct.unpack_from("<H", raw, layout.bl_nr_entries)[0]
        if layout.bl_flags is not None:
            is_ring = bool(struct.unpack_from("<H", raw, layout.bl_flags)[0] & layout.buf_ring_flag)
        else:
            is_ring = bool(raw[layout.bl_is_ring or 0])
        first = struct.unpack_from("<Q", raw, 0)[0]  # buf_ring, or buf_list.next
        row = {
            "kind": Kind.BUFFER_GROUP,
            "pid": pid,
            "ring": ring,
            "group": bgid,
            "flags": int(PostFlag.SCANNED),
        }
        if is_ring:
            groups.append({**row, "op": GroupKind.RING, "value": entries})
            rings.append((ring, bgid, first, min(entries, MAX_RING_ENTRIES)))
            continue
        for buffer in _list(kernel, first, bl):
            data = kernel.read(buffer, layout.buffer_bid + 2)
            if data is None:
                continue
            groups.append(
                {
                    **row,
                    "op": GroupKind.PROVIDE,
                    "addr": struct.unpack_from("<Q", data, layout.buffer_addr)[0],
                    "value": struct.unpack_from("<I", data, layout.buffer_len)[0],
                    "nvec": 1,
                    "first_id": struct.unpack_from("<H", data, layout.buffer_bid)[0],
                }
            )
    return groups, rings


def _list(kernel: KernelState, first: int, head: int) -> list[int]:
    """A kernel list_head's entries (each struct begins with its list_head)."""
    out: list[int] = []
    node = first
    while node and node != head and len(out) < MAX_RING_ENTRIES:
        out.append(node)
        nxt = kernel.words([node])[0]
        if nxt is None:
            break
        node = nxt
    return out
