"""The whole cost of an idle connection, on real servers with known per-connection costs.

- Our readiness server with a session struct of 2,053 bytes (a prime) per connection, 1,009
  connections opened in 13 steps: the heap fitted against the connections gives glibc's chunk
  for a 2,053-byte request - exactly 2,064 bytes (the request plus its 8-byte header, rounded
  up to 16) - whether the heap was walked or every allocation probed; the kernel model is
  each cache's bytes per object as /proc/slabinfo gives them, plus the queue memory the
  server reads for its sockets (SO_MEMINFO), and matches the objects /proc/slabinfo gains
  for a connection's sockets, inodes, files and dentries (measured on bursts of connections
  to another such server, each a second long, the median of seven: a count over the
  recording's 20 s took in whatever else the machine opened meanwhile).
- Redis (Debian's redis-server, jemalloc): the fitted bytes per client against Redis's own
  accounting of its allocator's memory (INFO used_memory), within 10%; its kernel part from
  /proc/slabinfo and `ss -m`.
- The glibc heap sum behind the walked fit, against glibc's own accounting (mallinfo2) in
  the walked process.
"""

from __future__ import annotations

import contextlib
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import real_servers
from tests.helpers import (
    Recording,
    python_module,
    read_event,
    report_json,
    spawn_idlebuf,
    spawn_workload,
    start_loadgen,
    stop,
    wait_for_trace_started,
    wait_until,
)

pytestmark = pytest.mark.bpf

CONNECTIONS, SESSION = 1009, 2053
GLIBC_CHUNK = (SESSION + 8 + 15) // 16 * 16  # 2,064: what malloc(2,053) takes from the heap
# the load generator opens the connections in 13 steps over this long: 1.25 s a step, so
# that the memory points (taken at the recorder's flushes, at least every second) catch
# every step settled even on a loaded machine (over 5 s, 5 settled points were seen)
RAMP_S = 16.0
REDIS_STEPS, REDIS_SETTLE_S = 5, 4.0
# objects one connection's socket takes, on each side of loopback, from unmerged caches
SOCKET_CACHES = ("TCP", "sock_inode_cache", "filp", "dentry")
# ...and, as a member of an epoll set, its epoll item and wait-queue entry: one of each per
# idle connection (an idle connection holds no io_uring request)
EPOLL_CACHES = ("eventpoll_epi", "eventpoll_pwq")
PAGE = 4096


def object_bytes(cache: str) -> float:
    """What one object of `cache` costs on this kernel: its slab's bytes over the objects
    a slab holds, from /proc/slabinfo (pagesperslab, objperslab); a cache the kernel merged
    into another is not listed there, so from /sys/kernel/slab/CACHE (order, objs_per_slab)."""
    for line in Path("/proc/slabinfo").read_text().splitlines()[2:]:
        fields = line.split()
        if fields[0] == cache:
            return int(fields[5]) * PAGE / int(fields[4])
    where = Path("/sys/kernel/slab") / cache
    order = int((where / "order").read_text())
    return (PAGE << order) / int((where / "objs_per_slab").read_text())


def kernel_model(caches: tuple[str, ...], queue_bytes: float) -> tuple[dict[str, float], float]:
    """Each cache's bytes per idle connection (one object of each, to the tenth of a byte as
    the report gives them) and the kernel part: their sum plus the queue memory."""
    parts = {c: round(object_bytes(c), 1) for c in caches}
    return parts, round(sum(parts.values()) + queue_bytes, 1)


def slab_objects() -> dict[str, int]:
    """Active objects of each cache in /proc/slabinfo, after emptying the per-CPU slabs of
    the caches compared (so that the counts are exact, not a CPU's cache ahead). Dentries:
    those in use (/proc/sys/fs/dentry-state), as a connection's are (its open file pins
    it): the dentry cache also holds unused ones, which come and go with any file lookup -
    the recorder's own reads of /proc/PID/fd leave one per fd."""
    for cache in SOCKET_CACHES:
        with contextlib.suppress(OSError):
            Path(f"/sys/kernel/slab/{cache}/shrink").write_text("1")
    out = {}
    for line in Path("/proc/slabinfo").read_text().splitlines()[2:]:
        fields = line.split()
        out[fields[0]] = int(fields[1])
    total, unused = Path("/proc/sys/fs/dentry-state").read_text().split()[:2]
    out["dentry"] = int(total) - int(unused)
    return out


def memory_of(report: dict, pid: int) -> dict:
    (proc,) = [p for p in report["processes"] if p["pid"] == pid]
    return proc["memory"]


def per_idle(report: dict, pid: int) -> dict:
    return memory_of(report, pid)["per_idle_connection"]


@pytest.mark.parametrize("method", ["walkers", "probes"])
def test_session_struct_is_fitted_to_its_chunk(tmp_path: Path, method: str) -> None:
    trace = tmp_path / "trace"
    record = ("--memory", *(("--alloc-probes", "--min-alloc", "0") if method == "probes" else ()))
    with Recording(
        trace,
        python_module("workloads.epoll_server", "--session-size", str(SESSION)),
        record_args=record,
    ) as rec:
        wait_for_trace_started(trace)
        time.sleep(2.0)  # the interpreter done starting: points with no connection yet
        load = start_loadgen(rec.port, CONNECTIONS, 0, 0, 1, "--ramp", str(RAMP_S), "--hold", "60")
        try:
            rec.wait_for(lambda t: t["sessions"] == CONNECTIONS, 60)
            time.sleep(1.5)  # a flush with every connection open, settled
            truth = rec.truth()
            rec.finish()
        finally:
            stop(load)
    assert (truth["session_size"], truth["sessions"]) == (SESSION, CONNECTIONS)
    assert (truth["held_bytes"], truth["connections_open"]) == (0, CONNECTIONS)
    cost = per_idle(report_json(trace), rec.pid)
    fit = cost["fit"]
    assert fit is not None, cost["reason"]
    assert fit["confident"], cost["reason"]
    # one settled point per count the samples caught: of the 15 there are (no socket before
    # the server listens, its listener alone, then 13 steps) a sampler running late can miss
    # one, never invent one
    assert 10 <= fit["distinct_counts"] == fit["points"] <= 15, fit
    # the slope's 95% interval within half of glibc's 16-byte rounding step (seen: 0.4 to
    # 2.3 B). Not R², the line through every point: a start-up buffer the interpreter frees
    # once connections arrive leaves one point far off it at times (R² 0.897 seen, the
    # slope exactly 2,064 all the same).
    assert fit["ci95_bytes"] is not None and fit["ci95_bytes"] < 16 / 2, fit
    # The chunk exactly, to the allocator's rounding: a 2,053-byte request takes a 2,064-byte
    # chunk and nothing else the server keeps grows with its connections (its fd tables
    # never resize), so the heap grows by whole 16-byte steps, 2,064 per connection. The
    # interpreter's own allocations move a few points by a chunk or two (the first
    # connections' start-up, a step's 80 bytes; seen: 2,064.0 and 2,064.3), which the median
    # of the slopes shrugs off to a fraction of a byte: the fit is 2,064 to within half of
    # glibc's 16-byte rounding step, i.e. it names the 2,064-byte chunk and no other
    # (2,048 and 2,080 are the neighbours). The 0.5% this replaces let 2,054-2,074 pass.
    per_connection = fit["bytes_per_connection"]
    assert abs(per_connection - GLIBC_CHUNK) < 16 / 2, fit
    assert round(per_connection / 16) * 16 == GLIBC_CHUNK == 2064
    # a readiness server with a shared pool: the idle connections hold no buffer, and all
    # the heap they take is their sessions'
    assert cost["io_buffer_bytes"] == 0
    assert cost["other_user_bytes"] == per_connection
    parts = {p["cache"]: p for p in cost["kernel_parts"]}
    assert set(parts) == {*SOCKET_CACHES, *EPOLL_CACHES}
    assert all(parts[c]["objects"] == 1 for c in parts)  # each idle connection: one of each
    # every connection is idle: the queue memory per idle connection is the server's own
    # reading of its sockets over the connections
    expected, kernel = kernel_model(
        (*SOCKET_CACHES, *EPOLL_CACHES), truth["socket_kernel_bytes"] / CONNECTIONS
    )
    assert {c: (p["object_bytes"], p["bytes"]) for c, p in parts.items()} == {
        c: (b, b) for c, b in expected.items()
    }
    assert cost["kernel_bytes"] == kernel
    assert cost["total_bytes"] == round(per_connection + kernel, 1)
    # the model against the objects the slab caches gain: both ends of each connection
    # (the clients' sockets are the same objects) within 5%
    gains = slab_gains("workloads.epoll_server", "--session-size", str(SESSION))
    for cache in SOCKET_CACHES:
        gained = statistics.median(g[cache] for g in gains)
        expected = 2 * CONNECTIONS * parts[cache]["objects"]
        assert abs(gained - expected) <= 0.05 * expected, (cache, gained, expected, gains)


BURSTS = 7


def slab_gains(*server: str) -> list[dict[str, int]]:
    """What the slab caches gain (slab_objects) as CONNECTIONS clients connect at once to
    the workload `server` (module and arguments: one that reports its "sessions" on
    SIGUSR1), until it has accepted them all: once a burst, BURSTS bursts of a second or
    so, the clients closed and the server rid of them in between. A count over a short
    window, repeated: another process opening or closing files during one burst moves
    that burst's count, not the median's. (One reading each side: the largest of a few
    before and the smallest of a few after were biased low by the objects of a process
    that opens and closes connections over and over.)"""
    proc = spawn_workload(*server)
    assert proc.stdout is not None
    out = proc.stdout

    def sessions() -> int:
        proc.send_signal(signal.SIGUSR1)
        return int(read_event(out, "ground_truth", 10)["sessions"])

    gains: list[dict[str, int]] = []
    try:
        port = read_event(out, "listening", 60)["port"]
        for _ in range(BURSTS):
            before = slab_objects()
            clients = connect_at_once(port, CONNECTIONS)
            try:
                wait_until(lambda: sessions() == CONNECTIONS, 30, "the server to accept them")
                after = slab_objects()
            finally:
                for c in clients:
                    c.close()
            gains.append({c: after[c] - before[c] for c in SOCKET_CACHES})
            wait_until(lambda: sessions() == 0, 30, "the server to close them")
    finally:
        stop(proc)
    return gains


def connect_at_once(port: int, n: int) -> list[socket.socket]:
    """`n` clients connected together (non-blocking connects, then waiting for all), so
    that the server sees a step of connections, not a slow climb a sample may catch
    half-way (202 blocking connects from Python take a quarter of a second)."""
    socks = []
    with selectors.DefaultSelector() as sel:
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            sel.register(s, selectors.EVENT_WRITE)
            socks.append(s)
        pending, deadline = n, time.monotonic() + 30
        while pending:
            assert time.monotonic() < deadline, f"{pending} of {n} clients did not connect"
            for key, _ in sel.select(timeout=1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                sel.unregister(sock)
                pending -= 1
    return socks


def used_memory(port: int) -> int:
    info = real_servers.redis_command(port, "INFO", "memory").decode()
    (line,) = [x for x in info.splitlines() if x.startswith("used_memory:")]
    return int(line.split(":")[1])


def test_redis_clients_against_its_own_accounting(tmp_path: Path) -> None:
    """Redis as its own user (tests.real_servers), its clients ramping while recorded."""
    clients: list[socket.socket] = []
    recorder = None
    queues: list[int] = []
    trace = tmp_path / "trace"
    with real_servers.redis(CONNECTIONS + 100) as redis:
        port = redis.port
        try:
            recorder = spawn_idlebuf(
                "record", "-p", str(redis.pid), "-o", str(trace), "--memory", "--min-alloc", "0"
            )
            wait_for_trace_started(trace)
            time.sleep(1.2)  # a first memory point with no client
            base = used_memory(port)
            # A new client reads into a 16 KiB query buffer, which Redis's cron frees once
            # the client has been idle for 2 s: each step waits for that, then for a memory
            # point.
            for step in range(REDIS_STEPS):
                more = CONNECTIONS * (step + 1) // REDIS_STEPS - len(clients)
                clients += connect_at_once(port, more)
                time.sleep(REDIS_SETTLE_S)
            ours = used_memory(port)
            queues = socket_queues(port)
            recorder.send_signal(signal.SIGINT)
            _, err = recorder.communicate(timeout=60)
            assert recorder.returncode == 0, err.decode()
        finally:
            for c in clients:
                c.close()
            if recorder is not None:
                stop(recorder)
    reference = (ours - base) / CONNECTIONS  # Redis's own figure: its allocator's bytes
    memory = memory_of(report_json(trace), redis.pid)
    cost = memory["per_idle_connection"]
    fit = cost["fit"]
    assert fit is not None and fit["confident"], cost["reason"]
    assert "jemalloc" in fit["source"]
    print(f"redis: its own accounting {reference:,.0f} B per client, idlebuf {fit}")
    assert abs(fit["bytes_per_connection"] - reference) <= 0.10 * reference
    # at the end Redis holds our clients and no other: the two INFO connections read their
    # command, then EOF, and were closed (seconds apart from any socket sample)
    assert memory["connections"] == {"open": CONNECTIONS, "idle": CONNECTIONS}
    assert cost["whole_unknown"] == []
    # its clients never sent a byte: Redis holds no IO buffer for them (it reads on
    # readiness, into a query buffer it frees after 2 s idle), and the rest is theirs
    assert cost["io_buffer_bytes"] == 0
    assert cost["other_user_bytes"] == fit["bytes_per_connection"]
    # the kernel: a TCP socket, its inode, file and dentry, its epoll item and wait entry,
    # each at its share of a slab, plus the queue memory ss showed on the clients' sockets
    assert len(queues) == CONNECTIONS
    parts = {p["cache"]: p for p in cost["kernel_parts"]}
    assert set(parts) == {*SOCKET_CACHES, *EPOLL_CACHES}
    assert all(p["objects"] == 1 for p in parts.values())
    expected, kernel = kernel_model((*SOCKET_CACHES, *EPOLL_CACHES), sum(queues) / len(queues))
    assert {c: p["bytes"] for c, p in parts.items()} == expected
    assert cost["kernel_bytes"] == kernel
    assert cost["total_bytes"] == round(cost["other_user_bytes"] + kernel, 1)


SKMEM = re.compile(r"skmem:\(r(\d+),rb\d+,t\d+,tb\d+,f(\d+),w(\d+),")


def socket_queues(port: int) -> list[int]:
    """The kernel's queue memory (rmem_alloc + fwd_alloc + wmem_queued) of each connected
    socket on the server's side of `port`, as `ss -tm` shows it."""
    out = subprocess.run(
        ["ss", "-tmnH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [sum(int(v) for v in m.groups()) for m in SKMEM.finditer(out)]


# The child reports glibc's own accounting of its heap (mallinfo2: the bytes of the chunks
# in use in every arena, plus those of blocks of their own mapping) before and after it makes
# the blocks. `list_first`: the list that keeps the blocks is made before them (a block of its
# own mapping, which the kernel then merges with the interpreter's next arena mapped below
# it), else it grows as they are made.
HEAP_CHILD = """
import ctypes, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
class Mallinfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc.mallinfo2.restype = Mallinfo2
def in_use():
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd
keep = [None] * {n} if {list_first} else []
print("before", in_use(), flush=True)
sys.stdin.readline()
if {list_first}:
    for i in range({n}):
        keep[i] = libc.malloc(100)
else:
    keep = [libc.malloc(100) for _ in range({n})]
print("after", in_use(), flush=True)
sys.stdin.readline()
"""


def _reported(child: subprocess.Popen[bytes], what: bytes) -> int:
    """The child's line `what N`, once it waits for its next line (blocked reading stdin,
    done freeing what it used to print it): glibc's figure for a heap that holds still."""
    assert child.stdout is not None
    word, figure = child.stdout.readline().split()
    assert word == what
    wait_until(
        lambda: Path(f"/proc/{child.pid}/syscall").read_text().split()[:2] == ["0", "0x0"],
        10,
        "the child to wait on stdin",
    )
    return int(figure)


@pytest.mark.parametrize("list_first", [False, True], ids=["list-grown", "list-first"])
def test_glibc_heap_in_use_counts_every_block(list_first: bool) -> None:
    """The heap sum behind the walked fit: 30,011 blocks of 100 bytes are 30,011 more chunks
    in use (less those the tcache held), and the walk's sum grows by exactly what glibc's own
    accounting says, wherever the kernel put the blocks of their own mapping; a walk with
    too small a limit refuses rather than guess."""
    from probes.allocators import HeapWalker
    from probes.allocators.base import Mappings
    from probes.allocators.glibc import HeapTooBig

    n = 30011
    child = subprocess.Popen(
        [sys.executable, "-c", HEAP_CHILD.format(n=n, list_first=list_first)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        glibc_before = _reported(child, b"before")
        walker = HeapWalker(child.pid)
        before = walker.in_use()
        child.stdin.write(b"\n")
        child.stdin.flush()
        glibc_after = _reported(child, b"after")
        after = walker.in_use()
        assert isinstance(before, tuple) and isinstance(after, tuple), (before, after)
        blocks, size = after[1] - before[1], after[0] - before[0]
        # the bytes exactly as glibc counts them: the 30,011 chunks of 112 bytes and the
        # list's block (8 bytes a slot: a mapping of its own), less the few small objects
        # the interpreter may free meanwhile (48 bytes less, seen once)
        assert glibc_after - glibc_before >= n * 112 - 4096
        assert size == glibc_after - glibc_before, (size, glibc_after - glibc_before)
        # the blocks: glibc does not count its chunks in use; the interpreter's own (the
        # list's block, re-allocated as it grows) are a few at most. A malloc served from
        # the tcache (at most 7 chunks a size) takes a chunk that was counted in use
        # already, by glibc's figure as by the walk: the list-first child's first malloc
        # took the one 112-byte chunk cached there
        assert n - 7 <= blocks <= n + 3, blocks
        with pytest.raises(HeapTooBig):
            walker.glibc.in_use(Mappings(child.pid).all, limit=n // 2)
        walker.close()
    finally:
        child.kill()
        child.wait()
