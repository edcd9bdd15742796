"""The waiters of each process as of its latest scan (analysis.waiters.latest_waiters): the
end's, else the live scans' (written as changes, with fd -1 for a waiter gone), else the
attach's; and the provenance waiting_of gives them."""

from __future__ import annotations

import pandas as pd

from analysis.waiters import latest_waiters, waiting_of


def row(ts: int, pid: int, tid: int, fd: int, what: str, kind: str = "thread") -> dict:
    return {"ts_ns": ts, "pid": pid, "tid": tid, "fd": fd, "kind": kind, "what": what,
            "call": 45, "stack_bytes": 4096 if fd >= 0 else 0, "stack_size": 8192,
            "private_bytes": 0, "page_table_bytes": 0, "mappings": 0, "threads": 1,
            "g_bytes": 0, "anon_mappings": 0}  # fmt: skip


def waiters(rows: list[dict]) -> set[tuple[int, int, int]]:
    found = latest_waiters(pd.DataFrame(rows))
    return set(zip(found["pid"].tolist(), found["tid"].tolist(), found["fd"].tolist()))


ATTACH = [row(10, 7, 100 + i, 10 + i, "attach") for i in range(3)]  # 3 threads at attach


def test_live_changes_over_the_attach_scan() -> None:
    live = [
        # the first live rows: the whole scan (one thread gone: fd -1)
        row(20, 7, 100, 10, "live"),
        row(20, 7, 101, 11, "live"),
        row(20, 7, 102, -1, "live"),
        # a later scan: two threads new, thread 101 now waits on another connection
        row(30, 7, 103, 13, "live"),
        row(30, 7, 104, 14, "live"),
        row(30, 7, 101, 17, "live"),
        # the last: thread 100 waits no more
        row(40, 7, 100, -1, "live"),
    ]
    assert waiters(ATTACH + live) == {(7, 101, 17), (7, 103, 13), (7, 104, 14)}
    # a live scan that found none of them any more: nothing waits (not the attach's three)
    gone = [row(20, 7, 100 + i, -1, "live") for i in range(3)]
    assert waiters(ATTACH + gone) == set()


def test_the_end_scan_over_the_live_ones_and_a_process_gone_keeps_its_latest() -> None:
    live = [row(20, 7, 105, 15, "live"), row(20, 8, 200, 20, "live")]
    end = [row(50, 7, 100, 10, "end"), row(50, 7, 105, -1, "end")]
    # pid 7: its end scan only; pid 8 (gone before the end): its live scan
    assert waiters(ATTACH + live + end) == {(7, 100, 10), (8, 200, 20)}
    # an end scan that found none of the waiters its last scan had: none
    assert waiters(ATTACH + [row(50, 7, 100 + i, -1, "end") for i in range(3)]) == set()
    idle = pd.DataFrame({"pid": [7, 8], "fd": [10, 20]})
    found = latest_waiters(pd.DataFrame(ATTACH + live + end))
    seen = {pid: w.provenance for pid, w in waiting_of(found, idle).items()}
    assert seen == {7: "at_end", 8: "live"}
    assert waiting_of(latest_waiters(pd.DataFrame(ATTACH)), idle)[7].provenance == "at_attach"


def test_a_process_per_connection_is_its_main_thread_s_waiter() -> None:
    rows = [
        row(10, 9, 9, 5, "attach", "process"),
        row(10, 9, 9, 5, "attach"),  # its main thread, blocked on the same connection
        row(20, 9, 9, 5, "live"),  # written again by a live scan (its stack changed)
        row(20, 9, 9, 5, "live", "process"),
    ]
    found = latest_waiters(pd.DataFrame(rows))
    assert found["kind"].tolist() == ["process"] and found["what"].tolist() == ["live"]
    assert latest_waiters(pd.DataFrame(rows[:2]))["kind"].tolist() == ["process"]  # as before
