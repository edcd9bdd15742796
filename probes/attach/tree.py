"""A process tree at attach (`record -p PID --tree`): every descendant of a process, from
/proc, made a target as it is found.

Each process is handed to `found` before its own children are listed, so that a child it
forks after that is the kernel's to follow (probes/bpf/children.bpf.c: a fork by a target
makes a target) and one forked before is listed here: none falls between the two.
/proc/PID/task/TID/children (each thread's children: CONFIG_PROC_CHILDREN) is read where the
kernel has it, else every process's parent from /proc/PID/stat.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable


def _children_files(pid: int) -> list[int] | None:
    """`pid`'s children through its threads' `children` files; None where the kernel has
    none (an empty list: it has no children, or it is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread exited meanwhile
            return None  # no CONFIG_PROC_CHILDREN
        except (OSError, ValueError):
            continue
    return out


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        # comm may hold spaces and parentheses: the fields after its last ')'
        return int(stat[stat.rindex(")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from each one's parent in /proc/PID/stat."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            parent = _parent_of(int(name))
            if parent is not None:
                out.setdefault(parent, []).append(int(name))
    return out


def walk(roots: Iterable[int], found: Callable[[int], None]) -> list[int]:
    """`roots` and all their descendants now, each once, parents before their children;
    `found` is called with each as soon as it is known (roots included)."""
    seen: set[int] = set()
    order: list[int] = []
    by_parent: dict[int, list[int]] | None = None
    queue = list(dict.fromkeys(roots))
    while queue:
        pid = queue.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        order.append(pid)
        found(pid)
        kids = _children_files(pid) if by_parent is None else None
        if kids is None:
            if by_parent is None:  # read once: the kernel lists no children per thread
                by_parent = _children_by_parent()
            kids = by_parent.get(pid, [])
        queue += [k for k in kids if k not in seen]
    return order
