"""The owned-state walk on a big heap: how long finding what each connection keeps alive
takes (wall and CPU), and whether it is exact, on workloads/c/owned_state.c with a global
graph of small allocations filling the heap, and on the Go server with as much kept alive
on its heap (root: it reads another process's memory).

PYTHONPATH=. python -m idlebuf.bench.owned_walk --connections 1000 --heap-mb 200
"""

from __future__ import annotations

import argparse
import functools
import json
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from idlebuf.experiments.processes import read_event, stop
from probes.allocators.base import Mappings
from probes.allocators.go import GoHeap
from probes.attach import goroutines, owned, owned_go, waiters
from probes.attach.blocked import is_socket
from probes.golang import binary_of, load_bias
from probes.process_memory import ProcessMemory

SOURCE = Path(__file__).resolve().parents[2] / "workloads" / "c" / "owned_state.c"
GO_SERVER = SOURCE.parents[1] / "go_server" / "go_server"


@dataclass(frozen=True)
class OwnedWalkRun:
    mode: str
    connections: int
    heap_bytes: int  # in use, walked
    chunks: int
    took_s: float
    cpu_s: float
    exact: int  # connections whose owned bytes equal the program's count
    raced: int


def run(mode: str, connections: int, heap_mb: int, budget_s: float) -> OwnedWalkRun:
    with tempfile.TemporaryDirectory() as work:
        binary = Path(work) / "owned_state"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(SOURCE)], check=True)
        server = subprocess.Popen(
            [str(binary), "0", str(connections), mode, str(heap_mb)], stdout=subprocess.PIPE
        )
        clients: list[socket.socket] = []
        try:
            assert server.stdout is not None
            port = read_event(server.stdout, "listening", 600)["port"]
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
            truth = {}
            for _ in range(connections):
                event = read_event(server.stdout, "connection", 60)
                truth[event["fd"]] = event["owned"]
            read_event(server.stdout, "ground_truth", 60)
            pid = server.pid
            mappings = Mappings(pid).all
            roots, others = owned.roots_of(
                pid, waiters.thread_waiters(pid), waiters.connection_fds(pid), {}, mappings
            )
            with ProcessMemory(pid) as mem:
                walked = owned.walk(pid, mem, mappings, roots, others, budget_s)
        finally:
            for c in clients:
                c.close()
            stop(server)
    exact = sum(1 for c in walked.connections if truth.get(c.fd) == c.owned_bytes)
    return OwnedWalkRun(
        mode,
        connections,
        walked.heap_bytes,
        walked.chunks,
        round(walked.took_s, 2),
        round(walked.cpu_s, 2),
        exact,
        walked.raced,
    )


def run_go(connections: int, heap_mb: int, budget_s: float) -> OwnedWalkRun:
    """The walk of the Go heap (probes.attach.owned_go) on the project's Go server serving
    through bufio, with `heap_mb` of small objects kept alive. Go counts no bytes per
    connection: `exact` is the connections at the median figure (a stale stack word makes
    the others differ)."""
    server = subprocess.Popen(
        [str(GO_SERVER), "--bufio", "--buffer-size", "4096", "--ballast-mb", str(heap_mb)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    clients: list[socket.socket] = []
    try:
        assert server.stdout is not None
        port = read_event(server.stdout, "listening", 600)["port"]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
        pid, reads = server.pid, list[goroutines.ParkedRead]()
        deadline = time.monotonic() + 60
        while len(reads) < connections and time.monotonic() < deadline:
            time.sleep(0.2)
            reads = goroutines.parked_reads(pid, functools.partial(is_socket, pid)).reads
        binary = binary_of(pid)
        with ProcessMemory(pid) as mem:
            walked = owned_go.walk(
                pid, GoHeap(mem, binary, load_bias(pid, binary)), reads, budget_s
            )
    finally:
        for c in clients:
            c.close()
        stop(server)
    figures = sorted(c.owned_bytes for c in walked.connections)
    median = figures[len(figures) // 2] if figures else -1
    return OwnedWalkRun(
        "go",
        connections,
        walked.heap_bytes,
        walked.chunks,
        round(walked.took_s, 2),
        round(walked.cpu_s, 2),
        sum(1 for f in figures if f == median),
        walked.raced,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--heap-mb", type=int, default=200)
    parser.add_argument("--modes", default="threads,epoll,go")
    parser.add_argument("--budget", type=float, default=owned.DEFAULT_BUDGET_S)
    args = parser.parse_args(argv)
    for mode in args.modes.split(","):
        if mode == "go":
            result = run_go(args.connections, args.heap_mb, args.budget)
        else:
            result = run(mode, args.connections, args.heap_mb, args.budget)
        print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
