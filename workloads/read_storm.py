"""A storm of socket reads for the recorder's ceiling, as fast as Python can issue them.

--mode eagain: non-blocking recv() calls that return EAGAIN (a post and a completion each);
--mode pingpong: send one byte on a socket pair and read it back (a write's two events and a
read's two), with no exception per call, so more syscalls per second.
--procs N runs N such loops in parallel processes. Prints the rate of each and of all."""

from __future__ import annotations

import argparse
import os
import socket
import time

from workloads.common import emit


def storm(count: int, mode: str) -> float:
    a, b = socket.socketpair()
    a.setblocking(False)
    buf = bytearray(4096)
    started = time.perf_counter()
    if mode == "eagain":
        for _ in range(count):
            try:  # noqa: SIM105 - this loop is the load; suppress() costs more per call
                a.recv_into(buf)
            except BlockingIOError:
                pass
    else:
        send, recv_into, one = b.send, a.recv_into, b"x"
        for _ in range(count):
            send(one)
            recv_into(buf)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_003, help="loop turns per process")
    parser.add_argument("--mode", choices=["eagain", "pingpong"], default="eagain")
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args()
    syscalls = 1 if args.mode == "eagain" else 2
    children = []
    for _ in range(args.procs - 1):
        pid = os.fork()
        if pid == 0:
            elapsed = storm(args.count, args.mode)
            emit({"event": "storm", "pid": os.getpid(), "seconds": round(elapsed, 3)})
            os._exit(0)
        children.append(pid)
    started = time.perf_counter()
    storm(args.count, args.mode)
    for pid in children:
        os.waitpid(pid, 0)
    elapsed = time.perf_counter() - started
    total = args.count * args.procs
    emit(
        {
            "event": "done",
            "mode": args.mode,
            "procs": args.procs,
            "reads": total,
            "syscalls": total * syscalls,
            "seconds": round(elapsed, 3),
            "reads_per_s": round(total / elapsed),
            "syscalls_per_s": round(total * syscalls / elapsed),
        }
    )


if __name__ == "__main__":
    main()
