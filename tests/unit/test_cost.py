"""analysis.cost: fits of memory against connections, allocator rounding, the kernel model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import cost
from probes.format.meta import SlabCache


def points(sockets: list[int], heap: list[float], moving: list[bool] | None = None) -> pd.DataFrame:
    n = len(sockets)
    return pd.DataFrame(
        {
            "ts_ns": np.arange(n) * 250_000_000,
            "pid": 7,
            "sockets": sockets,
            "heap_bytes": heap,
            "heap_blocks": 0,
            "why": "",
            "vm_rss": heap,
            "rss_anon": heap,
            "moving": moving or [False] * n,
        }
    )


def test_an_exact_line_is_fitted_to_the_byte() -> None:
    x = np.array([1, 79, 157, 235, 313, 1009])
    fit, why = cost.fit_against_connections(x, 123_456 + 2_064 * x, "heap")
    assert why is None and fit is not None
    assert fit.bytes_per_connection == 2064
    assert fit.r2 == 1 and fit.points == 6 and fit.distinct_counts == 6 and fit.confident


@pytest.mark.parametrize(
    ("x", "words"),
    [
        ([1009, 1009, 1009, 1009], "1 distinct counts"),
        ([1000, 1000, 1009, 1009], "2 distinct counts"),
        ([1000, 1003, 1006, 1009], "spanning 9"),  # under 10% of 1,009
    ],
)
def test_too_little_change_is_refused_with_why(x: list[int], words: str) -> None:
    fit, why = cost.fit_against_connections(np.array(x), np.array(x) * 2064.0, "heap")
    assert fit is None
    assert why is not None and "did not change enough" in why and words in why


def test_a_cache_growing_meanwhile_gives_low_confidence_not_a_number() -> None:
    rng = np.random.default_rng(23)
    x = np.array([1, 101, 201, 301, 401, 501])
    noise = rng.uniform(0, 2_000_000, len(x))  # something else: up to 2 MB, at random
    fit, why = cost.fit_against_connections(x, 2064.0 * x + noise, "heap")
    assert fit is not None and not fit.confident
    assert why is not None and "low confidence" in why and "R²" in why
    assert fit.ci95_bytes is not None and fit.ci95_bytes > 0.1 * abs(fit.bytes_per_connection)


def test_connections_churning_faster_than_samples_are_low_confidence() -> None:
    x = np.array([1, 101, 201, 301])
    fit, why = cost.fit_against_connections(x, 2064.0 * x, "heap", moved=29)
    assert fit is not None and not fit.confident
    assert why is not None and "churned" in why and "29 of 33" in why


def test_settled_points_are_the_last_of_each_count_and_never_moving() -> None:
    p = points([1, 1, 50, 99, 99, 99, 150], [1, 2, 3, 4, 5, 6, 7], [False] * 6 + [True])
    kept = cost.settled(p)
    assert kept["sockets"].tolist() == [1, 50, 99]
    assert kept["heap_bytes"].tolist() == [2, 3, 6]


def test_a_count_seen_half_way_through_a_burst_is_not_settled() -> None:
    # Redis accepting steps of ~200 clients every 4 s (seen in a traced run): the sampler
    # caught 23, 250 and 506 clients on the way, each held a quarter of a second
    counts = [1, 23, 202, 202, 250, 404, 404, 506, 606, 606, 808, 808, 1010, 1010]
    at_s = [0, 0.94, 1.29, 4.8, 4.96, 5.21, 8.87, 8.99, 9.24, 12.0, 13.1, 16.2, 17.2, 21.6]
    p = points(counts, [float(n) for n in range(len(counts))])
    p["ts_ns"] = [int(t * 1e9) for t in at_s]
    kept = cost.settled(p)
    assert kept["sockets"].tolist() == [1, 202, 404, 606, 808, 1010]
    assert kept["heap_bytes"].tolist() == [0, 3, 6, 9, 11, 13]  # each step's last point


def test_allocator_rounding() -> None:
    requests = np.array([1, 24, 25, 2053, 16384])
    assert cost.glibc_chunk(requests).tolist() == [32, 32, 48, 2064, 16400]
    sizes = np.array([1, 8, 9, 100, 129, 300, 1025, 2053, 16385])
    assert cost.jemalloc_class(sizes).tolist() == [8, 8, 16, 112, 160, 320, 1280, 2560, 20480]


def test_live_bytes_at_each_instant() -> None:
    allocs = pd.DataFrame(
        {"size": [2053, 2053, 100], "alloc_ns": [10, 20, 30], "free_ns": [25, np.nan, np.nan]}
    )
    live = cost.live_bytes_at(allocs, np.array([5, 10, 20, 25, 30]), cost.glibc_chunk)
    assert live.tolist() == [0, 2064, 4128, 2064, 2064 + 112]


CACHES = {
    "TCP": SlabCache(2304, 2368, 13, 32768),
    "TCPv6": SlabCache(2432, 2496, 13, 32768),
    "UNIX-STREAM": SlabCache(1152, 1152, 14, 16384),
    "sock_inode_cache": SlabCache(768, 832, 19, 16384),
    "filp": SlabCache(184, 192, 21, 4096),
    "dentry": SlabCache(192, 192, 21, 4096),
    "eventpoll_epi": SlabCache(128, 128, 32, 4096),
    "eventpoll_pwq": SlabCache(64, 64, 64, 4096),
}


def test_kernel_model_per_connection() -> None:
    sockets = pd.DataFrame(
        {
            "family": ["tcp", "tcp", "unix"],
            "ipv6": [False, True, False],
            "sock_type": [1, 1, 1],
            "epoll": [1, 1, 0],
        }
    )
    parts, missing = cost.kernel_parts(sockets, CACHES, uring_requests=3)
    by = {p.cache: p for p in parts}
    assert by["TCP"].objects == pytest.approx(1 / 3, abs=1e-4)
    assert by["TCPv6"].objects == pytest.approx(1 / 3, abs=1e-4)
    assert by["UNIX-STREAM"].objects == pytest.approx(1 / 3, abs=1e-4)
    assert by["filp"].objects == 1 and by["dentry"].objects == 1
    assert by["eventpoll_epi"].objects == pytest.approx(2 / 3, abs=1e-4)
    assert by["TCP"].object_bytes == pytest.approx(32768 / 13, abs=0.1)
    assert missing == ["io_kiocb"]  # this kernel's caches did not include it: left out, said
