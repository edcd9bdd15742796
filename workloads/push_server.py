"""The write side: a server streaming lazily produced data to many slow readers.

--model queued: a thread per connection produces a chunk into its own buffer and blocks in
send() until the reader takes it; a reader that stops reading leaves the thread blocked with
the chunk pending, so every idle connection holds a chunk.
--model readiness: epoll for EPOLLOUT; a chunk is produced into one shared buffer only when a
socket is writable, and sent without blocking; idle connections hold nothing.

Connections' send buffers are kept small (--sndbuf) so a stalled reader stalls the writer
quickly. Prints {"event": "listening", ...} when ready and its ground truth on SIGUSR1 and at
exit: the writes pending now with their buffer addresses and lengths.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import threading
from typing import Any

from workloads.common import (
    accept_pending,
    address_of,
    epoll_loop,
    listen,
    raise_fd_limit,
    serve,
    server_parser,
    socket_kernel_bytes,
)

_QUIET = {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT}


def produce(buf: bytearray, n: int) -> None:
    """Make the next chunk of the stream (cheaply: a counter byte)."""
    buf[:] = bytes([n & 0xFF]) * len(buf)


class Queued:
    def __init__(self, chunk: int, sndbuf: int) -> None:
        self.chunk, self.sndbuf = chunk, sndbuf
        self.lock = threading.Lock()
        self.pending: dict[int, tuple[int, int]] = {}  # fd -> (addr, len) of the send() now
        self.fds: set[int] = set()
        self.accepted = 0
        self.bytes_sent = 0

    def stream(self, conn: socket.socket) -> None:
        # signals go to the main thread: a signal would cut a blocked send() short
        signal.pthread_sigmask(signal.SIG_BLOCK, _QUIET)
        fd = conn.fileno()
        buf = bytearray(self.chunk)
        n = 0
        try:
            while True:
                produce(buf, n)
                view = memoryview(buf)
                while view:
                    with self.lock:
                        self.pending[fd] = (address_of(buf) + self.chunk - len(view), len(view))
                    sent = conn.send(view)
                    with self.lock:
                        self.pending.pop(fd, None)
                        self.bytes_sent += sent
                    view = view[sent:]
                n += 1
        except OSError:
            pass
        finally:
            with self.lock:
                self.pending.pop(fd, None)
                self.fds.discard(fd)
            conn.close()

    def run(self, listener: socket.socket, stopping: list[bool]) -> None:
        listener.setblocking(False)  # accept_pending takes connections until none is waiting
        while not stopping[0]:
            try:
                ready, _, _ = select.select([listener], [], [], 1.0)
            except InterruptedError:
                continue
            if ready:
                for conn in accept_pending(listener, blocking=True):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
                    with self.lock:
                        self.accepted += 1
                        self.fds.add(conn.fileno())
                    threading.Thread(target=self.stream, args=(conn,), daemon=True).start()

    def ground_truth(self) -> dict[str, Any]:
        with self.lock:
            pending = sorted(self.pending.items())
            return {
                "event": "ground_truth",
                "model": "push-queued",
                "pid": os.getpid(),
                "connections_accepted": self.accepted,
                "connections_open": len(self.fds),
                "chunk": self.chunk,
                "pending_writes": len(pending),
                "pending_write_bytes": sum(n for _, (_, n) in pending),
                "writes": [{"fd": fd, "addr": a, "len": n} for fd, (a, n) in pending],
                "bytes_sent": self.bytes_sent,
                "socket_kernel_bytes": socket_kernel_bytes(self.fds),
            }


class Readiness:
    def __init__(self, chunk: int, sndbuf: int) -> None:
        self.chunk, self.sndbuf = chunk, sndbuf
        self.buf = bytearray(chunk)  # the one buffer a chunk is produced into
        self.epoll = select.epoll()
        self.socks: dict[int, socket.socket] = {}
        self.accepted = 0
        self.bytes_sent = 0
        self.produced = 0

    def writable(self, fd: int) -> None:
        produce(self.buf, self.produced)
        self.produced += 1
        try:
            self.bytes_sent += self.socks[fd].send(self.buf)
        except BlockingIOError:
            pass
        except OSError:
            self.epoll.unregister(fd)
            self.socks.pop(fd).close()

    def run(self, listener: socket.socket, stopping: list[bool]) -> None:
        epoll_loop(self.epoll, listener, stopping, lambda: self.accept(listener), self.writable)

    def accept(self, listener: socket.socket) -> None:
        for conn in accept_pending(listener, blocking=False):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
            self.accepted += 1
            self.socks[conn.fileno()] = conn
            self.epoll.register(conn.fileno(), select.EPOLLOUT)

    def ground_truth(self) -> dict[str, Any]:
        return {
            "event": "ground_truth",
            "model": "push-readiness",
            "pid": os.getpid(),
            "connections_accepted": self.accepted,
            "connections_open": len(self.socks),
            "chunk": self.chunk,
            "pending_writes": 0,  # it writes only what fits, without blocking
            "pending_write_bytes": 0,
            "writes": [],
            "buffer": {"addr": address_of(self.buf), "len": self.chunk},
            "bytes_sent": self.bytes_sent,
            "socket_kernel_bytes": socket_kernel_bytes(self.socks),
        }


def main() -> None:
    parser: argparse.ArgumentParser = server_parser(__doc__ or "")
    parser.add_argument("--model", choices=["queued", "readiness"], default="queued")
    parser.add_argument(
        "--chunk", type=int, help="bytes produced at a time (default: --buffer-size)"
    )
    parser.add_argument(
        "--sndbuf", type=int, default=16384, help="SO_SNDBUF of each connection (bytes)"
    )
    args = parser.parse_args()
    raise_fd_limit()
    chunk = args.chunk or args.buffer_size
    server = (Queued if args.model == "queued" else Readiness)(chunk, args.sndbuf)
    serve(server, listen(args.host, args.port), model=f"push-{args.model}")


if __name__ == "__main__":
    main()
