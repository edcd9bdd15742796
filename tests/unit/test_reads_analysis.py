"""Read lifetimes, timelines and summaries from small synthetic post/completion tables."""

from __future__ import annotations

import pandas as pd

from analysis.reads import posted_timeline, process_peaks, read_intervals, read_summary

RECVFROM = 45


def posts(rows: list[tuple]) -> pd.DataFrame:
    cols = ["ts_ns", "pid", "tid", "fd", "source", "op", "key", "addr", "len", "nvec", "flags"]
    return pd.DataFrame(
        [(ts, pid, tid, 5, 1, RECVFROM, tid, 0x1000 * tid, n, 0, 0) for ts, pid, tid, n in rows],
        columns=cols,
    )


def completions(rows: list[tuple]) -> pd.DataFrame:
    cols = ["ts_ns", "pid", "tid", "source", "key", "ret"]
    return pd.DataFrame([(ts, pid, tid, 1, tid, ret) for ts, pid, tid, ret in rows], columns=cols)


def test_completion_closes_the_post_before_it() -> None:
    p = posts([(10, 1, 11, 100), (30, 1, 11, 100), (15, 1, 12, 200)])
    c = completions([(20, 1, 11, 7)])
    iv = read_intervals(p, c)
    assert iv[["post_ns", "end_ns", "ret"]].fillna(-1).values.tolist() == [
        [10, 20, 7],
        [15, -1, -1],
        [30, -1, -1],
    ]


def test_post_after_post_supersedes() -> None:
    iv = read_intervals(posts([(10, 1, 11, 100), (20, 1, 11, 50)]), completions([]))
    assert iv["superseded"].tolist() == [True, False]
    assert iv["end_ns"].fillna(-1).tolist() == [20, -1]


def test_orphan_completion_is_ignored() -> None:
    iv = read_intervals(posts([(10, 1, 11, 100)]), completions([(5, 1, 11, 3)]))
    assert iv["end_ns"].isna().tolist() == [True]


def test_timeline_and_peaks() -> None:
    p = posts([(10, 1, 11, 100), (12, 1, 12, 200), (40, 1, 11, 100)])
    c = completions([(20, 1, 11, 9), (20, 1, 12, 4)])
    tl = posted_timeline(read_intervals(p, c))
    assert tl["posted_reads"].tolist() == [1, 2, 1, 0, 1]
    peaks = process_peaks(tl)
    assert peaks.loc[0, "posted_peak"] == 2 and peaks.loc[0, "pinned_peak"] == 300


def test_summary_counts_bytes_and_failures() -> None:
    p = posts([(10, 1, 11, 100), (12, 1, 12, 200), (13, 1, 13, 300)])
    c = completions([(20, 1, 11, 9), (21, 1, 12, -11)])
    s = read_summary(read_intervals(p, c)).iloc[0]
    assert (s.label, s.posted_reads, s.pinned_bytes) == ("recvfrom", 1, 300)
    assert (s.reads_completed, s.reads_failed, s.bytes_received) == (1, 1, 9)


def test_eagain_then_waiting_is_a_parked_read() -> None:
    from analysis.reads import parked_reads

    # tid 11 (fd 5): EAGAIN at 20, retried with the same buffer at 50, then EAGAIN again at 60
    # tid 12: EAGAIN at 25 into a buffer that the next read uses for another fd (a pool)
    p = posts([(10, 1, 11, 100), (50, 1, 11, 100), (15, 1, 12, 200)])
    p.loc[2, "fd"] = 6
    p = pd.concat([p, p.iloc[[2]].assign(ts_ns=70, tid=13, key=13, fd=7)], ignore_index=True)
    c = completions([(20, 1, 11, -11), (60, 1, 11, -11), (25, 1, 12, -11)])
    parked = parked_reads(read_intervals(p, c))
    assert parked[["fd", "post_ns", "end_ns", "len"]].fillna(-1).values.tolist() == [
        [5, 20, 50, 100],
        [5, 60, -1, 100],
    ]
    assert set(parked["source"]) == {3}


def test_parked_needs_a_readiness_wait_when_waits_are_known() -> None:
    from analysis.reads import parked_reads

    # fd 5: EAGAIN at 20, retried at 50; fd 6 (pid 2): EAGAIN at 20, never retried
    p = posts([(10, 1, 11, 100), (50, 1, 11, 100), (10, 2, 12, 100)])
    c = completions([(20, 1, 11, -11), (20, 2, 12, -11)])
    iv = read_intervals(p, c)
    waits = pd.DataFrame(
        [(30, 1, 11, 1, 9, 64)],  # pid 1 waits at 30; pid 2 never waits
        columns=["ts_ns", "pid", "tid", "call", "fd", "watched"],
    )
    parked = parked_reads(iv, waits)
    assert parked[["pid", "post_ns", "end_ns"]].values.tolist() == [[1, 20, 50]]
    late = waits.assign(ts_ns=60)  # a wait only after the retry: the read was not parked
    assert parked_reads(iv, late).empty


def test_parked_when_the_netpoller_was_already_waiting() -> None:
    """One thread waits in epoll for the whole process (Go's netpoller): a wait begun before
    the EAGAIN and still going covers it; one that ended before it does not."""
    from analysis.reads import parked_reads

    p = posts([(10, 1, 11, 100), (50, 1, 11, 100)])
    c = completions([(20, 1, 11, -11)])
    iv = read_intervals(p, c)
    cols = ["ts_ns", "pid", "tid", "call", "fd", "watched"]
    waits = pd.DataFrame([(5, 1, 99, 1, 9, 64)], columns=cols)  # thread 99, since 5
    ends = pd.DataFrame([(45, 1, 99, 1)], columns=["ts_ns", "pid", "tid", "ret"])
    parked = parked_reads(iv, waits, ends)
    assert parked[["pid", "post_ns", "end_ns"]].values.tolist() == [[1, 20, 50]]
    over = ends.assign(ts_ns=15)  # its wait ended before the EAGAIN: nobody waited after
    assert parked_reads(iv, waits, over).empty
    assert len(parked_reads(iv, waits, ends.iloc[0:0])) == 1  # still waiting at the end


def test_a_call_recorded_by_the_sweep_and_at_its_return_counts_once() -> None:
    """--min-wait: the recorder's sweep records a waiting call (SWEPT); the kernel records it
    again when it returns, with the same start. One read, completed; a swept call that is
    still waiting stays posted."""
    from probes.format.schema import PostFlag

    p = posts([(10, 1, 11, 100), (10, 1, 11, 100), (12, 1, 12, 200)])
    p.loc[[1, 2], "flags"] = int(PostFlag.SWEPT)  # row 0: the kernel's, at the return
    iv = read_intervals(p, completions([(40, 1, 11, 7)]))
    assert iv[["key", "post_ns", "end_ns", "ret"]].fillna(-1).values.tolist() == [
        [11, 10, 40, 7],
        [12, 12, -1, -1],
    ]
    assert not iv["superseded"].any()
