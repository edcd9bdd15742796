"""The kernel's own objects behind one connection, as a stated model: the slab caches a
socket takes objects from, with their sizes read from this kernel (/sys/kernel/slab).

What one connection costs in slab memory is the objects it holds: its socket (the protocol's
cache: TCP, TCPv6, UDP, UDPv6, UNIX, UNIX-STREAM), the socket's inode (sock_inode_cache), its
open file (filp) and dentry (dentry); when it is in an epoll set, an epoll item
(eventpoll_epi) and its wait-queue entry (eventpoll_pwq); per io_uring request in flight, the
request (io_kiocb). An object costs its slab's bytes divided by the objects a slab holds (its
share of the slab, metadata and padding included). What the model leaves out is listed in the
README (kmalloc'ed parts, request sockets, bind buckets, TIME_WAIT sockets, page tables).

The recorder reads the caches once, at attach, into meta.json (`kernel_objects`); the
analysis (analysis.cost) applies the model to the connections the trace holds.
"""

from __future__ import annotations

import os
from pathlib import Path

from probes.format.meta import SlabCache

SLAB = Path("/sys/kernel/slab")
PAGE = os.sysconf("SC_PAGE_SIZE")

# every cache the model may use (a cache this kernel lacks is left out, with why)
CACHES = (
    "TCP",
    "TCPv6",
    "UDP",
    "UDPv6",
    "UNIX",
    "UNIX-STREAM",
    "sock_inode_cache",
    "filp",
    "dentry",
    "eventpoll_epi",
    "eventpoll_pwq",
    "io_kiocb",
    # what every thread (or process) adds: the waiter of a connection
    "task_struct",
    "pid",
    "mm_struct",
    "vm_area_struct",
    "anon_vma",
    "anon_vma_chain",
    "signal_cache",
    "sighand_cache",
    "files_cache",
    "fs_cache",
)


def _number(path: Path) -> int:
    return int(path.read_text().split()[0])


def read_cache(name: str, root: Path = SLAB) -> SlabCache:
    """One cache's geometry; OSError/ValueError when this kernel does not expose it."""
    where = root / name
    order = _number(where / "order")
    per_slab = _number(where / "objs_per_slab")
    if per_slab <= 0:
        raise ValueError(f"{name}: objs_per_slab is {per_slab}")
    merged = where.resolve().name
    return SlabCache(
        object_size=_number(where / "object_size"),
        slab_size=_number(where / "slab_size"),
        objects_per_slab=per_slab,
        slab_bytes=PAGE << order,
        merged_into=merged if merged != name else None,
    )


def read_caches(root: Path = SLAB) -> tuple[dict[str, SlabCache], str | None]:
    """The model's caches on this kernel, and why some (or all) could not be read."""
    found: dict[str, SlabCache] = {}
    missing = []
    for name in CACHES:
        try:
            found[name] = read_cache(name, root)
        except (OSError, ValueError):
            missing.append(name)
    if not found:
        return {}, f"{root} cannot be read (a kernel without SLUB's sysfs?)"
    why = None
    if missing:
        why = f"caches this kernel does not expose: {', '.join(missing)}"
    return found, why
