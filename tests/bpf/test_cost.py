"""The whole cost of an idle connection, on real servers with known per-connection costs.

- Our readiness server with a session struct of 2,053 bytes (a prime) per connection, 1,009
  connections opened in 13 steps: the heap fitted against the connections gives glibc's chunk
  for a 2,053-byte request - 2,064 bytes (the request plus its 8-byte header, rounded up to
  16) - whether the heap was walked or every allocation probed; the kernel model matches the
  objects /proc/slabinfo gained for the connections' sockets, inodes, files and dentries.
- Redis (Debian's redis-server, jemalloc): the fitted bytes per client against Redis's own
  accounting of its allocator's memory (INFO used_memory), within 10%.
"""

from __future__ import annotations

import contextlib
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    Recording,
    python_module,
    report_json,
    spawn_idlebuf,
    start_loadgen,
    stop,
    wait_for_trace_started,
    wait_until,
)

pytestmark = pytest.mark.bpf

CONNECTIONS, SESSION = 1009, 2053
GLIBC_CHUNK = (SESSION + 8 + 15) // 16 * 16  # 2,064: what malloc(2,053) takes from the heap
RAMP_S = 5.0  # the load generator opens the connections in 13 steps over this long
REDIS_STEPS, REDIS_SETTLE_S = 5, 4.0
# objects one connection's socket takes, on each side of loopback, from unmerged caches
SOCKET_CACHES = ("TCP", "sock_inode_cache", "filp", "dentry")


def slab_objects(settled: object = max) -> dict[str, int]:
    """Of three readings 0.2 s apart, per cache the `settled` one (max before the
    connections, min after them): a file another process holds for a moment is not one of
    theirs."""
    readings = []
    for _ in range(3):
        readings.append(_slab_objects())
        time.sleep(0.2)
    return {k: settled(r[k] for r in readings) for k in readings[0]}  # type: ignore[operator]


def _slab_objects() -> dict[str, int]:
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


def per_idle(report: dict, pid: int) -> dict:
    (proc,) = [p for p in report["processes"] if p["pid"] == pid]
    return proc["memory"]["per_idle_connection"]


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
        before = slab_objects()
        load = start_loadgen(rec.port, CONNECTIONS, 0, 0, 1, "--ramp", str(RAMP_S), "--hold", "60")
        try:
            rec.wait_for(lambda t: t["sessions"] == CONNECTIONS, 60)
            time.sleep(1.5)  # a flush with every connection open, settled
            after = slab_objects(min)
            rec.finish()
        finally:
            stop(load)
    cost = per_idle(report_json(trace), rec.pid)
    fit = cost["fit"]
    assert fit is not None, cost["reason"]
    assert fit["confident"], cost["reason"]
    assert fit["distinct_counts"] >= 5 and fit["points"] >= 5
    # R²: the line through every point; a start-up buffer the interpreter frees once
    # connections arrive leaves one point off it at times (the robust slope ignores it)
    assert fit["r2"] >= 0.95
    # the allocator's rounding: a 2,053-byte request takes a 2,064-byte chunk (0.5% leeway
    # for the interpreter's own allocations)
    assert abs(fit["bytes_per_connection"] - GLIBC_CHUNK) <= 0.005 * GLIBC_CHUNK, fit
    assert cost["io_buffer_bytes"] == 0  # a readiness server with a shared pool
    assert cost["other_user_bytes"] == pytest.approx(fit["bytes_per_connection"])
    parts = {p["cache"]: p for p in cost["kernel_parts"]}
    assert {*SOCKET_CACHES, "eventpoll_epi", "eventpoll_pwq"} <= set(parts)
    assert all(parts[c]["objects"] == 1 for c in parts)  # each idle connection: one of each
    assert cost["kernel_bytes"] == pytest.approx(sum(p["bytes"] for p in parts.values()), abs=1)
    assert cost["total_bytes"] == pytest.approx(
        cost["io_buffer_bytes"] + cost["other_user_bytes"] + cost["kernel_bytes"], abs=0.5
    )
    # the model against the objects the slab caches gained: both ends of each connection
    # (the load generator's sockets are the same objects) within 5%
    for cache in SOCKET_CACHES:
        gained = after[cache] - before[cache]
        expected = 2 * CONNECTIONS * parts[cache]["objects"]
        assert abs(gained - expected) <= 0.05 * expected, (cache, gained, expected)


def _redis(port: int, *command: str) -> bytes:
    """One command's reply: a simple string's line, or a bulk string's payload."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"*{len(command)}\r\n".encode())
        for part in command:
            s.sendall(f"${len(part)}\r\n{part}\r\n".encode())
        reply = b""
        while True:
            chunk = s.recv(65536)
            assert chunk, reply
            reply += chunk
            if b"\r\n" not in reply:
                continue
            head, _, body = reply.partition(b"\r\n")
            if not head.startswith(b"$"):
                assert not head.startswith(b"-"), head
                return head
            if len(body) >= int(head[1:]):
                return body[: int(head[1:])]


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
    info = _redis(port, "INFO", "memory").decode()
    (line,) = [x for x in info.splitlines() if x.startswith("used_memory:")]
    return int(line.split(":")[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_redis_clients_against_its_own_accounting(tmp_path: Path) -> None:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (scripts/bootstrap installs it)")
    port = free_port()
    redis = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--maxclients", str(CONNECTIONS + 100), "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    clients: list[socket.socket] = []
    recorder = None
    try:
        wait_until(lambda: _answers(port), 30, "redis-server to listen")
        trace = tmp_path / "trace"
        recorder = spawn_idlebuf(
            "record", "-p", str(redis.pid), "-o", str(trace), "--memory", "--min-alloc", "0"
        )
        wait_for_trace_started(trace)
        time.sleep(1.2)  # a first memory point with no client
        base = used_memory(port)
        # A new client reads into a 16 KiB query buffer, which Redis's cron frees once the
        # client has been idle for 2 s: each step waits for that, then for a memory point.
        for step in range(REDIS_STEPS):
            clients += connect_at_once(port, CONNECTIONS * (step + 1) // REDIS_STEPS - len(clients))
            time.sleep(REDIS_SETTLE_S)
        ours = used_memory(port)
        recorder.send_signal(signal.SIGINT)
        _, err = recorder.communicate(timeout=60)
        assert recorder.returncode == 0, err.decode()
    finally:
        for c in clients:
            c.close()
        if recorder is not None:
            stop(recorder)
        stop(redis)
    reference = (ours - base) / CONNECTIONS  # Redis's own figure: its allocator's bytes
    cost = per_idle(report_json(trace), redis.pid)
    fit = cost["fit"]
    assert fit is not None and fit["confident"], cost["reason"]
    assert "jemalloc" in fit["source"]
    print(f"redis: its own accounting {reference:,.0f} B per client, idlebuf {fit}")
    assert abs(fit["bytes_per_connection"] - reference) <= 0.10 * reference
    assert cost["kernel_bytes"] > 2048  # a TCP socket, its inode, file, dentry, epoll item
    assert cost["total_bytes"] is not None


def _answers(port: int) -> bool:
    try:
        return _redis(port, "PING").startswith(b"+PONG")
    except OSError:
        return False


HEAP_CHILD = """
import ctypes, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
print("before", flush=True)
sys.stdin.readline()
keep = [libc.malloc(100) for _ in range({n})]
print("after", flush=True)
sys.stdin.readline()
"""


def test_glibc_heap_in_use_counts_every_block() -> None:
    """The heap sum behind the walked fit: 30,011 blocks of 100 bytes are 30,011 more chunks
    in use, of 112 bytes each, and a walk with too small a limit refuses rather than guess."""
    from probes.allocators import HeapWalker
    from probes.allocators.base import Mappings
    from probes.allocators.glibc import HeapTooBig

    n = 30011
    child = subprocess.Popen(
        [sys.executable, "-c", HEAP_CHILD.format(n=n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == b"before"
        walker = HeapWalker(child.pid)
        before = walker.in_use()
        child.stdin.write(b"\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == b"after"
        after = walker.in_use()
        assert isinstance(before, tuple) and isinstance(after, tuple), (before, after)
        # the list holding the addresses grows too: one block of its own (8 bytes a slot,
        # over-allocated by an eighth), re-allocated as it grows
        blocks, size = after[1] - before[1], after[0] - before[0]
        assert n <= blocks <= n + 3, blocks
        assert n * 112 <= size <= n * 112 + 10 * n + 8192, size
        with pytest.raises(HeapTooBig):
            walker.glibc.in_use(Mappings(child.pid).all, limit=n // 2)
        walker.close()
    finally:
        child.kill()
        child.wait()
