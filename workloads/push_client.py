"""Slow readers for the push server: N connections, of which `--active` read.

Every connection has a small receive buffer (--rcvbuf, set before connecting). The active ones
read at most --rate bytes per second each for --duration seconds, then stop; the others never
read. Connections are held open for --hold seconds (or until SIGTERM/SIGINT) and closed.
Prints {"event": "connected", ...} when all are open and {"event": "done", ...} when the
reading stops, with the bytes read.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import threading
import time

from workloads.common import emit, raise_fd_limit


def read_slowly(sock: socket.socket, rate: float, deadline: float, got: list[int]) -> None:
    step = 0.05
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            started = time.monotonic()
            budget = max(1, int(rate * step))
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                got[0] += len(sock.recv(budget))
            time.sleep(max(0.0, step - (time.monotonic() - started)))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--active", type=int, default=50)
    parser.add_argument("--rcvbuf", type=int, default=16384)
    parser.add_argument("--rate", type=float, default=65536, help="bytes/s per active reader")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--hold", type=float, default=60.0)
    parser.add_argument("--netns", metavar="NAME", help="connect from this network namespace")
    args = parser.parse_args()
    raise_fd_limit()
    if args.netns:
        from workloads.netns import enter

        enter(args.netns)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    socks = []
    for _ in range(args.connections):
        s = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
        s.connect((args.host, args.port))
        socks.append(s)
    emit({"event": "connected", "connections": len(socks), "active": args.active})
    deadline = time.monotonic() + args.duration
    counts = [[0] for _ in range(args.active)]
    readers = [
        threading.Thread(target=read_slowly, args=(s, args.rate, deadline, c), daemon=True)
        for s, c in zip(socks, counts)
    ]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    emit({"event": "done", "active": args.active, "bytes_read": sum(c[0] for c in counts)})
    stop.wait(args.hold)
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
