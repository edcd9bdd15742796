"""What carries an idle connection's wait, and what it costs: the waiter part of the whole
cost.

- A thread blocked on the connection alone (probes.attach.waiters, read from /proc at attach
  and at the end): its kernel stack (THREAD_SIZE on the recording's kernel, meta.json's
  kernel_stack_bytes), its task_struct and struct pid (their share of a slab, as the kernel
  model counts objects), its user stack's resident pages.
- An io_uring request posted (or a POLL_ADD armed) on it: its io_kiocb.
A connection whose wait is carried by a pool or an event loop has no waiter of its own: that
waiter is the process's. A recording made before waiters were read says so (unknown).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from analysis.results import WaiterPart
from probes.format.meta import Meta

THREAD_OBJECTS = ("task_struct", "pid")  # what the kernel allocates for every thread


@dataclass
class Waiting:
    """What carries the idle connections' waits in one process."""

    threads: int = 0  # threads blocked on one idle connection each
    stack_bytes: int = 0  # their user stacks' resident bytes
    provenance: str = "at_end"  # where the threads were seen
    uring_requests: int = 0  # io_uring reads posted or POLL_ADDs armed on them
    parked: int = 0  # reads parked on them: a green thread's or goroutine's, not measured
    read: bool = True  # False: the recording did not look (made before waiters were read)


def latest_waiters(rows: pd.DataFrame) -> pd.DataFrame:
    """Each thread's latest row (the scan at the end over the one at attach); a thread the
    end's scan found waiting no more is not a waiter (the end is "now")."""
    if rows.empty:
        return rows
    ended = rows[rows["what"] == "end"]
    if not ended.empty:  # the end's scan: every waiter then, and only them
        pids = set(ended["pid"].tolist())
        attach = rows[(rows["what"] != "end") & ~rows["pid"].isin(pids)]
        rows = pd.concat([ended, attach], ignore_index=True)
    return rows.sort_values("ts_ns", kind="stable").drop_duplicates(["pid", "tid"], keep="last")


def waiting_of(waiters: pd.DataFrame, idle: pd.DataFrame) -> dict[int, Waiting]:
    """Per pid, the threads (latest_waiters rows) blocked on one of its idle connections
    (`idle`: their pid and fd)."""
    if waiters.empty or idle.empty:
        return {}
    mine = waiters.merge(idle[["pid", "fd"]].drop_duplicates(), on=["pid", "fd"])
    out = {}
    for pid in sorted(set(mine["pid"].tolist())):
        rows = mine[mine["pid"] == pid]
        seen = "at_end" if (rows["what"] == "end").all() else "at_attach"
        out[int(pid)] = Waiting(len(rows), int(rows["stack_bytes"].sum()), seen)
    return out


def waiter_parts(
    meta: Meta, waiting: Waiting, idle: int
) -> tuple[list[WaiterPart], float | None, str | None]:
    """(the parts per idle connection, their sum - None when a part is unknown - and why)."""
    if not idle:
        return [], 0.0, None
    parts: list[WaiterPart] = []
    why = None
    if not waiting.read:
        why = "the recording did not read what waits on each connection (made before idlebuf did)"
    if waiting.parked:
        why = (
            f"{waiting.parked:,} idle connections wait in reads parked by a runtime (green "
            "threads, goroutines): what carries them is the runtime's, not measured"
        )
    threads = waiting.threads
    if threads:
        if meta.kernel_stack_bytes is None:
            why = f"a thread's kernel stack: {meta.kernel_stack_why or 'not read'}"
        else:
            per = threads * meta.kernel_stack_bytes / idle
            parts.append(WaiterPart("thread", "kernel stack", round(per, 1), waiting.provenance))
        for cache in THREAD_OBJECTS:
            geometry = meta.kernel_objects.get(cache)
            if geometry is None:
                why = why or f"a thread's {cache}: the recording did not read its slab cache"
                continue
            per = threads * geometry.object_cost / idle
            parts.append(WaiterPart("thread", cache, round(per, 1), waiting.provenance))
        per = waiting.stack_bytes / idle
        parts.append(WaiterPart("thread", "user stack", round(per, 1), waiting.provenance))
    if waiting.uring_requests:
        geometry = meta.kernel_objects.get("io_kiocb")
        if geometry is None:
            why = why or "an io_uring request's io_kiocb: the recording did not read its cache"
        else:
            per = waiting.uring_requests * geometry.object_cost / idle
            parts.append(WaiterPart("uring_request", "io_kiocb", round(per, 1), "live"))
    total = None if why else round(sum(p.bytes for p in parts), 1)
    return parts, total, why
