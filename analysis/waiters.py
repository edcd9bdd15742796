"""What carries an idle connection's wait, and what it costs: the waiter part of the whole
cost.

- A thread blocked on the connection alone (probes.attach.waiters, read from /proc at attach,
  while recording - paced, only changes written - and at the end): its kernel stack
  (THREAD_SIZE on the recording's kernel, meta.json's kernel_stack_bytes), its task_struct
  and struct pid (their share of a slab, as the kernel model counts objects), its user
  stack's resident pages.
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
# ... and for every process, once; vm_area_struct once per mapping
PROCESS_OBJECTS = ("mm_struct", "signal_cache", "sighand_cache", "files_cache", "fs_cache")


@dataclass
class Waiting:
    """What carries the idle connections' waits in one process."""

    threads: int = 0  # threads blocked on one idle connection each
    stack_bytes: int = 0  # their user stacks' resident bytes
    provenance: str = "at_end"  # where the threads were seen: at_end, live, at_attach
    uring_requests: int = 0  # io_uring reads posted or POLL_ADDs armed on them
    parked: int = 0  # reads parked on them: a green thread's or goroutine's, not measured
    # processes that exist for one of them each (a forked child holding it alone)
    goroutines: int = 0  # goroutines parked in their reads (Go, walked at the end)
    goroutine_stack_bytes: int = 0
    g_bytes: int = 0
    processes: int = 0
    private_bytes: int = 0
    page_table_bytes: int = 0
    mappings: int = 0
    anon_mappings: int = 0  # their mappings holding anonymous pages
    process_threads: int = 0
    read: bool = True  # False: the recording did not look (made before waiters were read)
    why: str = ""  # the recording looked, and what its threads wait in could not be read


# the kinds of scan, latest last: a process's waiters are those of its latest kind of scan
SCANS = ("attach", "live", "end")
PROVENANCE = {"attach": "at_attach", "live": "live", "end": "at_end"}


def latest_waiters(rows: pd.DataFrame) -> pd.DataFrame:
    """The waiters of each process as of its latest scan: the one at the end where it has
    one, else its live scans (while recording: a recorder killed, a process gone before
    the end), else the one at attach. A scan writes each waiter's row when it is new or
    changed and a row with fd -1 when it waits no more (older traces: whole scans), so a
    waiter's latest row of that kind of scan is its state then, and fd -1 rows are left
    out. A process per connection is its main thread's waiter (the kernel's part of its
    threads is the process's): that thread's row is left out."""
    if rows.empty:
        return rows
    rank = rows["what"].map({what: i for i, what in enumerate(SCANS)}).fillna(0)
    rows = rows[rank == rank.groupby(rows["pid"]).transform("max")]
    rows = rows.sort_values("ts_ns", kind="stable").drop_duplicates(
        ["pid", "kind", "tid"], keep="last"
    )
    # (a process whose threads could not be read says so in a row of its own, fd -1 too)
    why = rows["why"] if "why" in rows else pd.Series("", index=rows.index)
    rows = rows[(rows["fd"] >= 0) | ((rows["kind"] == "unreadable") & (why != ""))]
    processes = rows.loc[rows["kind"] == "process", ["pid", "tid"]].drop_duplicates()
    threads = rows[["pid", "tid"]].merge(processes, how="left", indicator=True)["_merge"]
    main_thread = (rows["kind"] == "thread").to_numpy() & (threads == "both").to_numpy()
    return rows[~main_thread]


def waiting_of(waiters: pd.DataFrame, idle: pd.DataFrame) -> dict[int, Waiting]:
    """Per pid, the threads (latest_waiters rows) blocked on one of its idle connections
    (`idle`: their pid and fd)."""
    if waiters.empty or idle.empty:
        return {}
    mine = waiters.merge(idle[["pid", "fd"]].drop_duplicates(), on=["pid", "fd"])
    out: dict[int, Waiting] = {}
    unreadable = waiters[(waiters["kind"] == "unreadable") & waiters["pid"].isin(idle["pid"])]
    for row in unreadable.to_dict("records"):  # one a process (latest_waiters)
        seen = PROVENANCE.get(str(row["what"]), "at_attach")
        why = str(row.get("why") or "what its threads wait in could not be read")
        out[int(row["pid"])] = Waiting(provenance=seen, why=why)
    for pid in sorted(set(mine["pid"].tolist())):
        rows = mine[mine["pid"] == pid]
        seen = PROVENANCE.get(str(rows["what"].iloc[0]), "at_attach")  # one kind of scan
        threads = rows[rows["kind"] == "thread"]
        processes = rows[rows["kind"] == "process"]
        routines = rows[rows["kind"] == "goroutine"]
        out[int(pid)] = Waiting(
            len(threads),
            int(threads["stack_bytes"].sum()),
            seen,
            processes=len(processes),
            private_bytes=int(processes["private_bytes"].sum()),
            page_table_bytes=int(processes["page_table_bytes"].sum()),
            mappings=int(processes["mappings"].sum()),
            anon_mappings=int(processes["anon_mappings"].sum()),
            process_threads=int(processes["threads"].sum()),
            goroutines=len(routines),
            goroutine_stack_bytes=int(routines["stack_bytes"].sum()),
            g_bytes=int(routines["g_bytes"].sum()),
            why=out[int(pid)].why if int(pid) in out else "",
        )
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
    if waiting.why:  # any of its threads may be a connection's waiter
        why = waiting.why
    if waiting.parked > waiting.goroutines:
        why = (
            f"{waiting.parked - waiting.goroutines:,} idle connections wait in reads parked "
            "by a runtime (green threads, goroutines): what carries them is the runtime's, "
            "not measured"
        )
    if waiting.goroutines:  # their stacks (Go's stacks are the goroutine's alone) and g
        per = waiting.goroutine_stack_bytes / idle
        parts.append(WaiterPart("goroutine", "stack", round(per, 1), waiting.provenance))
        parts.append(
            WaiterPart("goroutine", "g", round(waiting.g_bytes / idle, 1), waiting.provenance)
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
    if waiting.processes:
        why = _process_parts(meta, waiting, idle, parts) or why
    if waiting.uring_requests:
        geometry = meta.kernel_objects.get("io_kiocb")
        if geometry is None:
            why = why or "an io_uring request's io_kiocb: the recording did not read its cache"
        else:
            per = waiting.uring_requests * geometry.object_cost / idle
            parts.append(WaiterPart("uring_request", "io_kiocb", round(per, 1), "live"))
    total = None if why else round(sum(p.bytes for p in parts), 1)
    return parts, total, why


def _process_parts(meta: Meta, waiting: Waiting, idle: int, parts: list[WaiterPart]) -> str | None:
    """The kernel's part of the processes that exist for one connection each: a kernel
    stack, task_struct and pid per thread, an mm_struct, signal and sighand structs, a file
    table and fs struct per process, a vm_area_struct per mapping, an anon_vma and two
    anon_vma_chain links per mapping holding anonymous pages, and the page tables (the
    maple tree's nodes, ~5 KB a PostgreSQL backend, are left out);
    their private memory is the connection's owned state, counted there. Why a part is not
    known, or None."""
    seen = waiting.provenance
    why = None
    counts = {cache: waiting.process_threads for cache in THREAD_OBJECTS}
    counts |= {cache: waiting.processes for cache in PROCESS_OBJECTS}
    counts["vm_area_struct"] = waiting.mappings
    if waiting.anon_mappings:  # (recordings before they were counted: left out)
        # a forked child gives each mapping that holds anonymous pages an anon_vma of its
        # own, linked to it and to its parent's by an anon_vma_chain each (PostgreSQL 15's
        # backend: 101 such mappings; /proc/slabinfo grew by 91 anon_vma and 183 chains)
        counts["anon_vma"] = waiting.anon_mappings
        counts["anon_vma_chain"] = 2 * waiting.anon_mappings
    if meta.kernel_stack_bytes is None:
        why = f"a process's kernel stack: {meta.kernel_stack_why or 'not read'}"
    else:
        per = waiting.process_threads * meta.kernel_stack_bytes / idle
        parts.append(WaiterPart("process", "kernel stack", round(per, 1), seen))
    for cache, count in counts.items():
        geometry = meta.kernel_objects.get(cache)
        if geometry is None:
            why = why or f"a process's {cache}: the recording did not read its slab cache"
            continue
        parts.append(
            WaiterPart("process", cache, round(count * geometry.object_cost / idle, 1), seen)
        )
    per = waiting.page_table_bytes / idle
    parts.append(WaiterPart("process", "page tables", round(per, 1), seen))
    return why


def merged_parts(weighted: list[tuple[list[WaiterPart], int]], idle: int) -> list[WaiterPart]:
    """Waiter parts of several processes (each with its idle connections) as parts per idle
    connection of them all."""
    sums: dict[tuple[str, str, str], float] = {}
    for parts, n in weighted:
        for p in parts:
            key = (p.waiter, p.part, p.provenance)
            sums[key] = sums.get(key, 0.0) + p.bytes * n
    return [WaiterPart(w, part, round(b / idle, 1), seen) for (w, part, seen), b in sums.items()]
