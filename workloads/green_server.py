"""Queued model, green threads: written the way Go's runtime serves a connection.

Each connection is a lightweight thread (a generator here, a goroutine in Go) that owns its
read buffer and calls read on a non-blocking socket; when the read returns EAGAIN the thread
parks until the socket is readable (one epoll for all, like Go's netpoller) and retries with the
same buffer. The kernel holds no read, but the buffer stays pinned by the parked thread.

Speaks the load generator's echo protocol. Prints {"event": "listening", ...} when ready and its
ground truth as JSON on SIGUSR1 and at exit: connections, parked threads with their buffers,
reads completed, bytes received.
"""

from __future__ import annotations

import os
import selectors
import socket
from collections.abc import Generator
from typing import Any

from workloads.common import (
    accept_pending,
    address_of,
    listen,
    raise_fd_limit,
    serve,
    server_parser,
    socket_kernel_bytes,
)

# What a green thread yields: wait until its socket is readable (or writable).
Wait = Generator[int, None, None]


class Server:
    def __init__(self, buffer_size: int) -> None:
        self.buffer_size = buffer_size
        self.selector = selectors.DefaultSelector()
        self.threads: dict[int, Wait] = {}
        self.buffers: dict[int, int] = {}  # fd -> address of its thread's buffer
        self.parked: set[int] = set()  # fds whose thread waits for readability
        self.accepted = 0
        self.reads_completed = 0
        self.bytes_received = 0

    def connection(self, sock: socket.socket) -> Wait:
        """The green thread serving one connection."""
        buf = bytearray(self.buffer_size)
        fd = sock.fileno()
        self.buffers[fd] = address_of(buf)
        view = memoryview(buf)
        try:
            while True:
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    yield selectors.EVENT_READ  # park; retry with the same buffer
                    continue
                if n == 0:
                    return
                self.reads_completed += 1
                self.bytes_received += n
                sent = 0
                while sent < n:
                    try:
                        sent += sock.send(view[sent:n])
                    except BlockingIOError:
                        yield selectors.EVENT_WRITE
        finally:
            view.release()
            del self.buffers[fd]

    def step(self, sock: socket.socket) -> None:
        """Run a connection's thread until it parks or ends."""
        fd = sock.fileno()
        try:
            wanted = next(self.threads[fd])
        except (StopIteration, ConnectionError):
            self.selector.unregister(sock)
            self.threads.pop(fd)
            self.parked.discard(fd)
            sock.close()
            return
        self.selector.modify(sock, wanted, sock)
        if wanted == selectors.EVENT_READ:
            self.parked.add(fd)
        else:
            self.parked.discard(fd)

    def accept(self, listener: socket.socket) -> None:
        for sock in accept_pending(listener, blocking=False):
            self.accepted += 1
            self.threads[sock.fileno()] = self.connection(sock)
            self.selector.register(sock, selectors.EVENT_READ, sock)
            self.step(sock)

    def ground_truth(self) -> dict[str, Any]:
        return {
            "event": "ground_truth",
            "model": "queued-green-threads",
            "pid": os.getpid(),
            "connections_accepted": self.accepted,
            "connections_open": len(self.threads),
            "parked": len(self.parked),
            "buffer_size": self.buffer_size,
            "buffers": [
                {"fd": fd, "addr": self.buffers[fd], "len": self.buffer_size}
                for fd in sorted(self.parked)
            ],
            "posted_reads": len(self.parked),  # parked reads hold their buffers
            "pinned_bytes": len(self.parked) * self.buffer_size,
            "socket_kernel_bytes": socket_kernel_bytes(self.threads),
            "reads_completed": self.reads_completed,
            "bytes_received": self.bytes_received,
        }

    def run(self, listener: socket.socket, stopping: list[bool]) -> None:
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, None)
        while not stopping[0]:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data is None:
                    self.accept(listener)
                else:
                    self.step(key.data)


def main() -> None:
    args = server_parser(__doc__ or "").parse_args()
    raise_fd_limit()
    server = Server(args.buffer_size)
    listener = listen(args.host, args.port)
    serve(server, listener, buffer_size=args.buffer_size)


if __name__ == "__main__":
    main()
