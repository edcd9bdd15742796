"""Load generator: N connections, of which some are active with a bounded echo exchange.

Each active connection sends `--messages` messages of `--size` bytes one at a time, waiting for
each to be echoed in full before sending the next (at most `--rate` per second per connection).
With --wait-start the exchanges begin only when a line arrives on stdin. Then every connection
is held open for `--hold` seconds (or until SIGTERM/SIGINT or stdin closes, with --hold-stdin)
and closed. Prints its ground truth as JSON lines: "connected" when
all connections are open, "done" when every exchange finished.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import os
import select
import signal
import socket
import threading
import time
from typing import Any

from workloads.common import emit, raise_fd_limit


def exchange(*args: Any) -> None:
    """One active connection's exchanges; a server going away ends them quietly."""
    with contextlib.suppress(OSError):
        _exchange(*args)


def _exchange(
    sock: socket.socket,
    messages: int,
    size: int,
    rate: float,
    deadline: float,
    stats: dict,
    lock: threading.Lock,
    ended_early: threading.Event,
) -> None:
    payload = b"i" * size
    interval = 1.0 / rate if rate > 0 else 0.0
    for _ in range(messages):
        if time.monotonic() >= deadline or ended_early.is_set():
            break
        started = time.monotonic()
        sock.sendall(payload)
        got = 0
        while got < size:
            chunk = sock.recv(size - got)
            if not chunk:
                return
            got += len(chunk)
        ended = time.monotonic()
        with lock:
            stats["requests"] += 1
            stats["bytes_sent"] += size
            stats["bytes_received"] += got
            stats["latencies"].append(ended - started)
            stats["ends"].append(ended)
        pause = interval - (time.monotonic() - started)
        if pause > 0:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))


def percentile(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted values (nearest rank); 0 for none."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


RAMP_STEPS = 13  # --ramp: connections are opened in this many steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--netns",
        metavar="NAME",
        help="connect from this network namespace (see workloads/netns.py), a separate host",
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1000)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--active", type=int, help="number of active connections")
    group.add_argument(
        "--active-fraction",
        type=float,
        default=0.05,
        help="fraction of active connections (default 0.05)",
    )
    parser.add_argument("--messages", type=int, default=3, help="messages per active connection")
    parser.add_argument("--size", type=int, default=1000, help="bytes per message")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="messages per second per active connection (0: back to back)",
    )
    parser.add_argument(
        "--duration", type=float, default=60.0, help="stop exchanging after this many seconds"
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help="keep the connections open this long after the exchanges",
    )
    parser.add_argument(
        "--wait-start",
        action="store_true",
        help="after connecting, wait for a line on stdin before the exchanges",
    )
    parser.add_argument(
        "--hold-stdin",
        action="store_true",
        help="keep them open until stdin closes (bounded by --hold if given)",
    )
    parser.add_argument(
        "--until-stdin",
        action="store_true",
        help="end the exchanges early when a line arrives on stdin",
    )
    parser.add_argument(
        "--samples",
        metavar="FILE",
        help="write each exchange's end (CLOCK_MONOTONIC seconds) and latency (seconds) to FILE "
        "as pairs of native doubles, for throughput and latency over time windows",
    )
    parser.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help=f"open the connections in {RAMP_STEPS} steps spread over this long (default: at "
        "once), so that memory can be fitted against the number of connections",
    )
    args = parser.parse_args()
    if args.ramp < 0 or args.ramp != args.ramp or args.ramp > 3600:
        parser.error("--ramp takes a number of seconds from 0 to 3600")

    raise_fd_limit()
    if args.netns:
        from workloads.netns import enter

        enter(args.netns)
    active = (
        args.active if args.active is not None else round(args.connections * args.active_fraction)
    )
    active = max(0, min(active, args.connections))
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    conns = []
    steps = RAMP_STEPS if args.ramp else 1
    step_at = time.monotonic()
    for i in range(args.connections):
        if args.ramp and i and i % -(-args.connections // steps) == 0:
            step_at += args.ramp / steps
            time.sleep(max(0.0, step_at - time.monotonic()))
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect((args.host, args.port))
        conns.append(s)
    emit({"event": "connected", "pid": os.getpid(), "connections": len(conns), "active": active})

    if args.wait_start:
        os.read(0, 64)  # "go\n" from whoever drives the experiment (or EOF)
    stats: dict[str, Any] = {
        "requests": 0,
        "bytes_sent": 0,
        "bytes_received": 0,
        "latencies": [],
        "ends": [],
    }
    lock = threading.Lock()
    deadline = time.monotonic() + args.duration
    ended_early = threading.Event()
    if args.until_stdin:

        def end_on_stdin() -> None:
            os.read(0, 64)
            ended_early.set()

        threading.Thread(target=end_on_stdin, daemon=True).start()
    workers = [
        threading.Thread(
            target=exchange,
            args=(s, args.messages, args.size, args.rate, deadline, stats, lock, ended_early),
            daemon=True,
        )
        for s in conns[:active]
    ]
    started = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - started
    ends = stats.pop("ends")
    if args.samples:
        pairs = array.array("d", (v for pair in zip(ends, stats["latencies"]) for v in pair))
        with open(args.samples, "wb") as f:
            pairs.tofile(f)
    latencies = sorted(stats.pop("latencies"))
    emit(
        {
            "event": "done",
            "connections": len(conns),
            "active": active,
            "messages_per_active": args.messages,
            "size": args.size,
            **stats,
            "elapsed_s": elapsed,
            "requests_per_s": stats["requests"] / elapsed if elapsed > 0 else 0.0,
            "latency_us": {
                "p50": percentile(latencies, 0.50) * 1e6,
                "p99": percentile(latencies, 0.99) * 1e6,
                "max": (latencies[-1] if latencies else 0.0) * 1e6,
            },
        }
    )

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    hold_until = time.monotonic() + (args.hold if args.hold else (3600 if args.hold_stdin else 0))
    while not stop.is_set() and time.monotonic() < hold_until:
        if args.hold_stdin:
            ready, _, _ = select.select([0], [], [], 0.1)
            if ready and not os.read(0, 4096):
                break
        else:
            stop.wait(0.1)
    for s in conns:
        s.close()


if __name__ == "__main__":
    main()
