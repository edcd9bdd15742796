"""probes.allocators.pymalloc on a real CPython process: its pools found from their headers
alone, every block in use counted (against the interpreter's own count), each object's block
at its address and of its size class, its threads' frame chunks found.

The child is this test's own (readable without root: /proc/PID/mem of a child), and sleeps
while it is read, so that its counts hold."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from probes.allocators import pymalloc
from probes.allocators.base import Mappings
from probes.attach.owned import _minus, _Reader
from probes.process_memory import ProcessMemory

OBJECTS, SAMPLES, THREADS = 23_003, 17, 7

CHILD = f"""
import json, sys, threading, time
keep = [str(i) * 3 for i in range({OBJECTS})]  # small str objects, in pymalloc's pools
samples = [b"x" * (29 * i) for i in range({SAMPLES})]  # bytes: not GC-tracked, id is the block
ready, gate = threading.Barrier({THREADS} + 1), threading.Event()
def deep(n):  # a thread whose Python frames fill more than one 16 KiB chunk
    if n:
        return deep(n - 1)
    ready.wait()
    gate.wait()
threads = [threading.Thread(target=deep, args=(140 * i,)) for i in range({THREADS})]
for t in threads:
    t.start()
ready.wait()
samples_at = [[id(s), sys.getsizeof(s)] for s in samples]
import os, tempfile
with tempfile.TemporaryFile("w+") as out:  # its own count: written on the C stderr
    saved = os.dup(2)
    os.dup2(out.fileno(), 2)
    sys._debugmallocstats()
    os.dup2(saved, 2)
    out.seek(0)
    stats = out.read()
used = next(line for line in stats.splitlines() if "bytes in allocated blocks" in line)
print(json.dumps({{"bytes": int(used.split("=")[1].replace(",", "")), "samples": samples_at}}),
      flush=True)
time.sleep(60)
"""


@pytest.fixture(scope="module")
def child() -> Iterator[tuple[int, dict]]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.pid, json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def blocks_of(pid: int) -> pymalloc.Blocks:
    """What pymalloc.find makes of the child's anonymous memory (the thread stacks and the
    heaps included: the walker leaves them out, but the signature must not match there)."""
    segments = []
    with ProcessMemory(pid) as mem:
        reader = _Reader(mem)
        for m in Mappings(pid).all:
            if m.perms[:2] == "rw" and m.anonymous:
                for lo, hi in _minus(m.start, m.end, []):
                    segments += reader.sparse(lo, hi)
    return pymalloc.find(segments)


def test_every_block_in_use_is_found(child: tuple[int, dict]) -> None:
    pid, truth = child
    found = blocks_of(pid)
    pools = sum(1 for lo, hi in found.extents if hi - lo == pymalloc.POOL_SIZES[0])
    chunks = {lo for lo, _ in found.chunks}
    lo, size = np.concatenate(found.lo), np.concatenate(found.bytes)
    in_pools = int(size[~np.isin(lo, np.fromiter(chunks, np.uint64, len(chunks)))].sum())
    assert found.raced == 0
    assert pools > OBJECTS * 64 // pymalloc.POOL_SIZES[0]  # 23,003 strs of 64 bytes at least
    # the interpreter's own count, "bytes in allocated blocks" (sys._debugmallocstats), to
    # the few objects the child made after counting (the line it parsed, its number...)
    assert 0 <= in_pools - truth["bytes"] <= 1024, (in_pools, truth["bytes"])


def test_each_object_is_a_block_of_its_size_class(child: tuple[int, dict]) -> None:
    pid, truth = child
    found = blocks_of(pid)
    lo, size = np.concatenate(found.lo), np.concatenate(found.bytes)
    at = dict(zip(lo.tolist(), size.tolist()))
    for addr, nbytes in truth["samples"]:
        if nbytes <= 512:  # pymalloc's; bigger ones are glibc's
            assert at.get(addr) == -(-nbytes // 16) * 16, (addr, nbytes)
        else:
            assert addr not in at


def test_the_threads_frame_chunks_are_found(child: tuple[int, dict]) -> None:
    pid, _ = child
    found = blocks_of(pid)
    lengths = sorted(length for _, length in found.chunks)
    # one chunk for the main thread's frames, and for each of the 7 threads at least one;
    # the deep ones (140 * i frames of ~100 bytes) several of 16 KiB
    assert len(lengths) >= THREADS + 1 + 4
    assert all(length % pymalloc.STACK_CHUNK == 0 for length in lengths)
    assert found.stack_chunks == len(lengths)
