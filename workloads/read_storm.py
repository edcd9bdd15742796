"""A storm of socket reads: --count non-blocking recv() calls that return EAGAIN, as fast as
Python can issue them (each is a post and a completion for the recorder). Prints the rate."""

from __future__ import annotations

import argparse
import socket
import time

from workloads.common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_003)
    args = parser.parse_args()
    a, _b = socket.socketpair()
    a.setblocking(False)
    buf = bytearray(4096)
    started = time.perf_counter()
    for _ in range(args.count):
        try:  # noqa: SIM105 - this loop is the load; suppress() costs more per call
            a.recv_into(buf)
        except BlockingIOError:
            pass
    elapsed = time.perf_counter() - started
    emit(
        {
            "event": "done",
            "reads": args.count,
            "seconds": round(elapsed, 3),
            "reads_per_s": round(args.count / elapsed),
        }
    )


if __name__ == "__main__":
    main()
