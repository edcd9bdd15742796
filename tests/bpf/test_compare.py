"""`idlebuf demo` at small scale, end to end: 53 connections, 7 active, every IO model.

Each model's recorded figures are checked against what its server said about itself (posted
reads and pinned bytes exactly; RSS and its growth against the server's own /proc reads as
it started listening and as it exited; kernel socket memory against SO_MEMINFO) and against
the construction: queued models hold all 53 buffers, the readiness models what a pool or the
7 active connections need, the provided-buffer ring its 2 x 7 = 14 buffers; every connection
is idle at the end, so the per-idle-connection cost is what the server holds per connection;
the kernel's part is the objects each model's connection holds at /proc/slabinfo's sizes; the
whole cost is unknown (3 seconds give the heap fit too few points), and says so.
The HTML report and the Perfetto timeline it writes are read back.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from probes.format.reader import open_trace
from tests.bpf.test_cost import object_bytes
from tests.helpers import idlebuf
from tests.readers import read_report, read_timeline

pytestmark = pytest.mark.bpf

CONNECTIONS, ACTIVE, BUFFER, POOL = 53, 7, 16384, 4
RING = 2 * ACTIVE  # the demo sizes the ring for twice the active connections (at least 8)
MODELS = [
    "readiness-pool",
    "readiness-retain",
    "queued-threads",
    "queued-green",
    "queued-uring",
    "uring-buffer-ring",
    "uring-poll-first",
]
# Both sides read /proc/PID/statm or status, moments apart (the server's exit path encodes
# its JSON in between): a fixed bound, whatever the machine's CPU count.
RSS_TOLERANCE = 256 << 10
# The sockets are quiet at the end: what they hold is at most a page of forward allocation
# on the connections that carried data. (Sockets holding data are checked byte for byte
# against ss in test_socket_memory.)
SOCKET_TOLERANCE = 4096 * ACTIVE
# The kernel's objects each idle connection holds, by how its server waits: a TCP socket, its
# inode, file and dentry; an epoll item and its wait entry where the server waits in epoll
# (the readiness loop, the green threads' hub).
SOCKET = ("TCP", "sock_inode_cache", "filp", "dentry")
EPOLL = ("eventpoll_epi", "eventpoll_pwq")
KERNEL_OBJECTS = {
    "readiness-pool": SOCKET + EPOLL,
    "readiness-retain": SOCKET + EPOLL,
    "queued-threads": SOCKET,
    "queued-green": SOCKET + EPOLL,
    "queued-uring": SOCKET,
    "uring-buffer-ring": SOCKET,
    "uring-poll-first": SOCKET,
}
# What carries each idle connection's wait: nothing of its own under readiness (the event
# loop is the process's); a thread of its own (queued-threads); an io_uring request in flight
# (its io_kiocb) where a RECV, or (poll-first) a POLL_ADD, is posted on it; a green thread
# parked in its read (the runtime's: not measured, unknown with why).
URING_WAITERS = ("queued-uring", "uring-buffer-ring", "uring-poll-first")
PARKED = re.compile(r"waiter: \d+ idle connections wait in reads parked by a runtime .*")
# why the heap fit (and so the other user memory and the whole cost) is unknown: the demo
# opens its connections together and records 3 s, a few memory points where a fit needs 6
# settled ones at 3 distinct counts
FIT_TOO_SHORT = re.compile(
    r"other user memory: (low confidence: [0-5] points are too few to bound the slope "
    r"\(.*; 6 settled points are needed\)|connections did not change enough: .*)"
)


def kernel_per_connection(name: str, queue_bytes: int) -> int:
    """The kernel part of model `name`'s idle connection, as the row gives it (whole bytes):
    each object at its slab's bytes over the objects a slab holds (to the tenth of a byte,
    as the report's parts), plus its sockets' queue memory per connection."""
    slab = sum(round(object_bytes(cache), 1) for cache in KERNEL_OBJECTS[name])
    return round(round(slab + queue_bytes / CONNECTIONS, 1))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo")
    done = idlebuf(
        "demo",
        "--json",
        "--connections",
        str(CONNECTIONS),
        "--active",
        str(ACTIVE / CONNECTIONS),
        "--duration",
        "3",  # the connections that never send are idle (1 s without data) at the end
        "-o",
        str(out),
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_model_against_its_own_ground_truth(demo: dict[str, Any]) -> None:
    rows = {r["model"]: r for r in demo["rows"]}
    assert list(rows) == MODELS
    for name, row in rows.items():
        truth = row["ground_truth"]
        assert truth is not None, name
        assert truth["connections_open"] == CONNECTIONS == row["connections"], name
        assert row["active"] == ACTIVE, name
        assert (row["posted_reads"], row["pinned_bytes"]) == (
            truth["posted_reads"],
            truth["pinned_bytes"],
        ), name
        assert abs(row["rss_bytes"] - truth["rss_bytes"]) <= RSS_TOLERANCE, name
        grown = truth["rss_bytes"] - truth["rss_at_listening"]
        assert grown > 0 and abs(row["rss_growth"] - grown) <= RSS_TOLERANCE, (name, grown)
        assert abs(row["socket_kernel_bytes"] - truth["socket_kernel_bytes"]) <= SOCKET_TOLERANCE
        # every connection is idle at the end: a connection's cost is what the server holds
        # for it (posted, or kept after its data) plus its socket's kernel memory
        held = truth["pinned_bytes"] + truth.get("held_bytes", 0) + truth["socket_kernel_bytes"]
        if name not in ("readiness-pool", "uring-poll-first"):
            assert abs(row["per_idle_connection_bytes"] - held / CONNECTIONS) <= 1 + (
                SOCKET_TOLERANCE / CONNECTIONS
            ), name
        assert 0 <= row["io_buffer_memory_resident"] <= row["io_buffer_memory"], name
        # the kernel's objects behind each idle connection
        if name == "uring-poll-first":  # every connection waits in a POLL_ADD of its own
            assert truth["polling"] == CONNECTIONS, name
        kernel = kernel_per_connection(name, truth["socket_kernel_bytes"])
        assert row["kernel_per_connection_bytes"] == kernel, name
        # the whole cost: the fit of other user memory is refused for the reason the demo's
        # length gives; a thread per connection's owned state is walked from each thread's
        # stack instead (CPython's heap included), so its whole cost is known - the others'
        # sum is unknown, their known parts there, never a 0 for the rest
        assert row["other_user_per_idle_connection_bytes"] is None, name
        whole = row["whole_per_idle_connection_bytes"]
        if name == "queued-threads":
            assert row["whole_unknown"] == [], (name, row["whole_unknown"])
            thread = 16384 + object_bytes("task_struct") + object_bytes("pid")
            assert whole is not None and whole > CHUNK + thread + kernel, (name, whole)
            waiter_why = []
        else:
            assert whole is None, name
            *waiter_why, why = row["whole_unknown"]
            assert FIT_TOO_SHORT.fullmatch(why), (name, why)
        assert row["io_buffer_per_idle_connection_bytes"] is not None, name
        # what carries each idle connection's wait
        waiter = row["waiter_per_idle_connection_bytes"]
        if name == "queued-green":
            assert waiter is None and len(waiter_why) == 1, name
            assert PARKED.fullmatch(waiter_why[0]), (name, waiter_why)
            continue
        assert waiter_why == [], (name, waiter_why)
        if name in URING_WAITERS:
            assert waiter == round(object_bytes("io_kiocb")), name
        elif name == "queued-threads":  # a thread: at least its kernel stack and task_struct
            thread = 16384 + object_bytes("task_struct") + object_bytes("pid")
            assert thread <= waiter <= thread + (64 << 10), (name, waiter)  # + its stack
        else:
            assert waiter == 0, name


# what holds a BUFFER-byte buffer the servers malloc: glibc's chunk (request + 8, to 16)
CHUNK = (BUFFER + 8 + 15) // 16 * 16


def test_queued_models_hold_a_buffer_per_connection(demo: dict[str, Any]) -> None:
    rows = {r["model"]: r for r in demo["rows"]}
    for name in ("queued-threads", "queued-green", "queued-uring"):
        row = rows[name]
        assert (row["posted_reads"], row["pinned_bytes"]) == (CONNECTIONS, CONNECTIONS * BUFFER)
        assert row["io_buffer_memory"] == CONNECTIONS * BUFFER
        assert row["per_idle_connection_bytes"] == BUFFER
        # the buffer part of the whole cost: the allocation holding the buffer
        assert row["io_buffer_per_idle_connection_bytes"] == CHUNK
        assert row["ratio_to_readiness"] >= CONNECTIONS / POOL  # the pool holds at most 4
    pool, retain = rows["readiness-pool"], rows["readiness-retain"]
    # readiness pins nothing and holds at most the active connections' buffers
    assert pool["pinned_bytes"] == 0 and 0 < pool["io_buffer_memory"] <= POOL * BUFFER
    assert pool["per_idle_connection_bytes"] <= POOL * BUFFER / CONNECTIONS
    assert retain["pinned_bytes"] == 0 and retain["io_buffer_memory"] == ACTIVE * BUFFER
    assert retain["io_buffer_memory"] == retain["ground_truth"]["held_bytes"]
    # every connection idle: the retained buffers' chunks spread over all of them
    assert retain["ground_truth"]["held_bytes"] == ACTIVE * BUFFER
    assert retain["io_buffer_per_idle_connection_bytes"] == round(ACTIVE * CHUNK / CONNECTIONS)
    ring, poll = rows["uring-buffer-ring"], rows["uring-poll-first"]
    assert ring["posted_reads"] == CONNECTIONS and ring["pinned_bytes"] == 0
    assert ring["ground_truth"]["buffer_group"]["buffers"] == RING
    group = ring["ground_truth"]["buffer_group"]
    assert ring["io_buffer_memory"] == RING * BUFFER == group["bytes"]
    assert ring["per_idle_connection_bytes"] == 0  # the ring is shared, no connection's own
    assert ring["io_buffer_per_idle_connection_bytes"] == 0
    assert poll["posted_reads"] == 0 and 0 < poll["io_buffer_memory"] <= POOL * BUFFER
    # the ratio is each model's IO-buffer memory over the readiness baseline's
    for name, row in rows.items():
        assert row["ratio_to_readiness"] == round(
            row["io_buffer_memory"] / pool["io_buffer_memory"], 1
        ), name


def test_report_and_timeline_show_every_model(demo: dict[str, Any]) -> None:
    report = read_report(Path(demo["report"]))
    assert [r[0] for r in report.table[1:]] == MODELS
    assert report.models == MODELS
    posted = next(lines for title, lines in report.charts.items() if title == "Posted reads")
    assert list(posted) == MODELS
    timeline = read_timeline(Path(demo["timeline"]))
    assert list(timeline) == MODELS
    rows = {r["model"]: r for r in demo["rows"]}
    for name, process in timeline.items():
        assert process.pid == rows[name]["pid"]
        assert process.counters["posted reads"][-1][1] == rows[name]["posted_reads"]


def test_push_side_by_side(tmp_path: Path) -> None:
    """The write side at 23 connections, 3 reading: the queued server ends with every
    connection's thread blocked in send() on its own chunk, the readiness server with none."""
    connections, active = 23, 3
    done = idlebuf(
        "demo",
        "--push",
        "--json",
        *("--connections", str(connections), "--active", str(active / connections)),
        *("--duration", "2", "-o", str(tmp_path / "push")),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["push-readiness", "push-queued"]
    timeline = read_timeline(Path(result["timeline"]))
    assert timeline["push-queued"].counters["pending writes"][-1][1] == connections
    report = read_report(Path(result["report"]))
    assert set(report.charts["Bytes held by pending writes"]) == set(rows)
    for name, row in rows.items():
        truth = row["ground_truth"]
        assert (row["pending_writes"], row["pending_write_bytes"]) == (
            truth["pending_writes"],
            truth["pending_write_bytes"],
        ), name
    queued, ready = rows["push-queued"], rows["push-readiness"]
    assert queued["pending_writes"] == connections
    # a chunk per connection (bytearray asks malloc for a byte more), against one
    assert connections * BUFFER <= queued["write_buffer_heap"] <= connections * (BUFFER + 64)
    assert BUFFER <= ready["write_buffer_heap"] <= BUFFER + 64
    assert ready["pending_writes"] == 0 and queued["ratio_to_readiness"] >= 10


def test_load_from_its_own_network_namespace(tmp_path: Path) -> None:
    """--netns: the load generator connects from a namespace behind a veth pair, a separate
    host; the server sees 23 connections from that host and holds a read on each."""
    connections = 23
    out = tmp_path / "netns"
    done = idlebuf(
        "demo",
        "--netns",
        "--json",
        *("--models", "queued-threads", "--connections", str(connections)),
        *("--active", str(3 / connections), "--duration", "2", "-o", str(out)),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["rows"]
    assert row["posted_reads"] == connections == row["ground_truth"]["posted_reads"]
    sockets = open_trace(out / "queued-threads")["sockets"]
    peers = sockets[(sockets["pid"] == row["pid"]) & (sockets["state"] == "ESTABLISHED")]
    assert set(peers["remote"].str.rsplit(":", n=1).str[0]) == {"10.231.0.2"}
    assert (
        "idlebuf-"
        not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )  # the namespace is gone
