"""probes.attach.reach: the heap as a graph, and the rule that gives each allocation its
owner (the fewest hops from a root; a connection wins a tie with global data; two
connections at the same depth share), on synthetic graphs with known answers."""

from __future__ import annotations

import random
from collections import deque

import numpy as np
import pytest

from probes.attach import reach

C = 3  # connections in the hand-made graphs: labels 0..2, 3 shared, 4 global
SHARED, GLOBAL = C, C + 1


def graph(n: int, edges: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    src = np.array([a for a, _ in edges], np.int64)
    dst = np.array([b for _, b in edges], np.int64)
    return reach.csr(n, src, dst)


def labels_of(
    n: int, edges: list[tuple[int, int]], seeds: list[list[int]], global_seeds: list[int]
) -> list[int]:
    indptr, indices = graph(n, edges)
    done = reach.assign(
        indptr,
        indices,
        [np.array(s, np.int64) for s in seeds],
        np.array(global_seeds, np.int64),
    )
    assert done.done
    return done.labels.tolist()


def test_a_connection_wins_a_tie_with_global_data_and_keeps_what_follows() -> None:
    # 0: a connection's struct, pointed to by its thread's stack and by a global list
    # (node 3, reached from global data): depth 1 from both -> the connection's; 1 and 2
    # hang from it. 3, the list node, is the program's.
    labels = labels_of(4, [(0, 1), (1, 2), (3, 0)], [[0], [], []], [3, 0])
    assert labels == [0, 0, 0, GLOBAL]


def test_global_data_closer_than_the_connection_keeps_the_allocation() -> None:
    # 2 is reached at depth 1 from global data, at depth 2 from connection 0 (via 1)
    labels = labels_of(3, [(0, 1), (1, 2)], [[0], [], []], [2])
    assert labels == [0, 0, GLOBAL]


def test_two_connections_at_the_same_depth_share_and_so_does_what_follows() -> None:
    # 2 is reached at depth 2 by connections 0 (via 0) and 1 (via 1): shared, and so is 3,
    # which hangs from it alone; 4 hangs from 3 (depth 4) and from connection 2's 5
    # (depth 2): connection 2's
    edges = [(0, 2), (1, 2), (2, 3), (3, 4), (5, 4)]
    labels = labels_of(6, edges, [[0], [1], [5]], [])
    assert labels == [0, 1, SHARED, SHARED, 2, 2]


def test_shared_at_a_tie_with_global_stays_shared_and_unreached_stays_unreached() -> None:
    labels = labels_of(5, [(0, 2), (1, 2), (3, 4)], [[0], [1], []], [])
    assert labels == [0, 1, SHARED, reach.UNREACHED, reach.UNREACHED]
    labels = labels_of(4, [(0, 2), (1, 2), (3, 2)], [[0], [1], []], [3])
    assert labels[2] == SHARED  # depth 2 from 0, 1 and global: the connections share


def test_a_long_chain_is_walked_level_by_level() -> None:
    """A global linked list of 20,000 nodes (20,000 levels, stepped in Python) into which a
    connection points half-way: the connection owns from there on."""
    n = 20_000
    edges = [(i, i + 1) for i in range(n - 1)]
    labels = labels_of(n, edges, [[n // 2], [], []], [0])
    assert labels[: n // 2] == [GLOBAL] * (n // 2)
    assert labels[n // 2 :] == [0] * (n - n // 2)


def reference(
    n: int, edges: list[tuple[int, int]], seeds: list[list[int]], global_seeds: list[int]
) -> list[int]:
    """The rule in plain Python: depths from each source by BFS, then per node the
    sources at the smallest depth - propagated level by level from labelled parents."""
    conns = len(seeds)
    out = [reach.UNREACHED] * n
    adjacency: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        if a != b:
            adjacency[a].append(b)
    claims: dict[int, set[int]] = {}
    for c, s in enumerate(seeds):
        for v in s:
            claims.setdefault(v, set()).add(c)
    for v in global_seeds:
        claims.setdefault(v, set()).add(conns + 1)
    while claims:
        level = {}
        for v, labs in claims.items():
            mine = {x for x in labs if x < conns}
            if mine:
                level[v] = next(iter(mine)) if len(mine) == 1 else conns
            else:
                level[v] = conns if conns in labs else conns + 1
        for v, lab in level.items():
            out[v] = lab
        claims = {}
        queue = deque(level.items())
        while queue:
            v, lab = queue.popleft()
            for w in adjacency[v]:
                if out[w] == reach.UNREACHED and w not in level:
                    claims.setdefault(w, set()).add(lab)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_numpy_and_python_levels_agree_with_the_rule_on_random_heaps(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    n, conns = 3000, 40
    edges = [(rng.randrange(n), rng.randrange(n)) for _ in range(4 * n)]
    edges = [(a, b) for a, b in edges if a != b]
    seeds = [[rng.randrange(n) for _ in range(rng.randrange(0, 4))] for _ in range(conns)]
    global_seeds = [rng.randrange(n) for _ in range(20)]
    want = reference(n, edges, seeds, global_seeds)
    indptr, indices = graph(n, edges)
    for small in (0, 48, 10**9):  # always numpy, mixed, always Python
        monkeypatch.setattr(reach, "SMALL_FRONTIER", small)
        got = reach.assign(
            indptr,
            indices,
            [np.array(s, np.int64) for s in seeds],
            np.array(global_seeds, np.int64),
        )
        assert got.done and got.labels.tolist() == want, small


def test_the_time_budget_cuts_the_walk_and_says_so() -> None:
    n = 1000
    indptr, indices = graph(n, [(i, i + 1) for i in range(n - 1)])
    ticks = iter(range(10**6))
    got = reach.assign(
        indptr,
        indices,
        [],
        np.array([0], np.int64),
        deadline=300,
        clock=lambda: 1000 * next(ticks),
    )
    assert not got.done
    assert 0 < int((got.labels == 1).sum()) < n  # with no connections, global is label 1


def test_edges_and_targets_from_a_snapshot_of_words() -> None:
    """Three allocations at 0x1010.., 0x1040.., 0x1100..: words pointing into user areas
    (interior pointers too) are edges; words outside every allocation hold none; an
    allocation pointing into itself is no edge."""
    nodes = reach.Nodes(
        np.array([0x1010, 0x1040, 0x1100], np.uint64),
        np.array([0x1030, 0x1068, 0x1200], np.uint64),
        np.array([32, 48, 272], np.int64),
    )
    base = 0x1000
    words = np.zeros(0x40, np.uint64)  # [0x1000, 0x1200)
    words[(0x1010 - base) // 8] = 0x1044  # node 0 -> node 1 (interior)
    words[(0x1018 - base) // 8] = 0x1010  # node 0 -> itself: none
    words[(0x1040 - base) // 8] = 0x1108  # node 1 -> node 2
    words[(0x1070 - base) // 8] = 0x1010  # between allocations: none
    words[(0x1100 - base) // 8] = 0x1030  # node 2 -> just past node 0's end: none
    words[(0x1108 - base) // 8] = 0x102F  # node 2 -> node 0's last byte
    src, dst = reach.edges(base, words, nodes)
    assert list(zip(src.tolist(), dst.tolist())) == [(0, 1), (1, 2), (2, 0)]
    roots = np.array([0x1011, 0x5, 0x1100, 0x1101, 0xFFFF_FFFF], np.uint64)
    assert reach.targets(roots, nodes).tolist() == [0, 2]
    size, count = reach.totals(np.array([0, 3, 4], np.int32), nodes, C)
    assert size.tolist() == [32, 0, 0, 48, 272, 0] and count.tolist() == [1, 0, 0, 1, 1, 0]


def test_connection_slots_and_the_memory_left_for_global_roots() -> None:
    from probes.attach.owned import _minus, _slots

    # three connections' epoll pointers into one array of 48-byte slots (one slot empty)
    base = 0x10_0010
    slots = _slots({0: [base], 1: [base + 48], 2: [base + 144]})
    assert slots == {base: 48, base + 48: 48, base + 144: 48}
    assert _slots({0: [base], 1: [base]}) == {}  # the same pointer: no slot size
    holes = [(0x2000, 0x3000), (0x5000, 0x6000)]
    assert _minus(0x1000, 0x7000, holes) == [(0x1000, 0x2000), (0x3000, 0x5000), (0x6000, 0x7000)]
    assert _minus(0x2000, 0x3000, holes) == []
