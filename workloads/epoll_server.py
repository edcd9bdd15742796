"""Readiness model: one epoll loop; a connection gets a read buffer only when it is readable.

--buffers pool (default): the buffer comes from a small shared pool and goes back after the
echo, so idle connections hold nothing. --buffers retain: a connection takes its own buffer on
first data and keeps it afterwards (a common real-world pattern that wastes memory the same way
the queued model does, only after the first message). --session-size N: each connection also
gets a session struct of N bytes (one malloc) for as long as it is open, besides any buffer.

Level-triggered, one read per readiness event. Speaks the load generator's echo protocol.
Prints {"event": "listening", ...} when ready and its ground truth as JSON on SIGUSR1 and at
exit: connections, buffers held (address and size), pool size, reads completed, bytes received.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
from collections.abc import MutableMapping
from typing import Any

from workloads.common import (
    Buffers,
    FdTable,
    accept_pending,
    epoll_loop,
    free,
    listen,
    malloc,
    raise_fd_limit,
    serve,
    server_parser,
    socket_kernel_bytes,
)


class Server:
    def __init__(self, mode: str, buffers: Buffers, pool_size: int, session_size: int = 0) -> None:
        self.mode = mode
        self.alloc = buffers
        self.epoll = select.epoll()
        # fd tables that never resize: the heap grows only by what each connection takes
        self.socks: MutableMapping[int, socket.socket] = FdTable()
        self.held: MutableMapping[int, tuple[Any, int]] = FdTable()  # retain mode
        self.session_size = session_size
        self.sessions: MutableMapping[int, int] = FdTable()  # fd -> its session's address
        self.pool = [buffers.take() for _ in range(pool_size)] if mode == "pool" else []
        self.pool_size = pool_size
        self.accepted = 0
        self.reads_completed = 0
        self.bytes_received = 0

    def readable(self, fd: int) -> None:
        sock = self.socks[fd]
        if self.mode == "pool":
            buf, addr = self.pool.pop()
        else:
            if fd not in self.held:
                self.held[fd] = self.alloc.take()
            buf, addr = self.held[fd]
        try:
            n = sock.recv_into(buf)
            if n > 0:
                self.reads_completed += 1
                self.bytes_received += n
                sock.sendall(ctypes.string_at(addr, n))
        except BlockingIOError:
            n = -1
        except OSError:
            n = 0
        finally:
            if self.mode == "pool":
                self.pool.append((buf, addr))
        if n == 0:
            self.close(fd)

    def close(self, fd: int) -> None:
        self.epoll.unregister(fd)
        self.socks.pop(fd).close()
        held = self.held.pop(fd, None)
        if held:
            self.alloc.give_back(held[1])
        session = self.sessions.pop(fd, None)
        if session:
            free(session)

    def ground_truth(self) -> dict[str, Any]:
        return {
            "event": "ground_truth",
            "model": f"readiness-{self.mode}",
            "pid": os.getpid(),
            "connections_accepted": self.accepted,
            "connections_open": len(self.socks),
            "buffer_size": self.alloc.size,
            "pool_size": self.pool_size,
            "buffers": [
                {"fd": fd, "addr": addr, "len": self.alloc.size}
                for fd, (_, addr) in sorted(self.held.items())
            ],
            "posted_reads": 0,  # it reads only what is already there
            "pinned_bytes": 0,
            "socket_kernel_bytes": socket_kernel_bytes(self.socks),
            "held_bytes": len(self.held) * self.alloc.size,
            "session_size": self.session_size,
            "sessions": len(self.sessions),
            "allocations": [
                {"addr": a, "size": n} for a, n in sorted(self.alloc.allocations.items())
            ],
            "reads_completed": self.reads_completed,
            "bytes_received": self.bytes_received,
        }

    def run(self, listener: socket.socket, stopping: list[bool]) -> None:
        epoll_loop(self.epoll, listener, stopping, lambda: self.accept(listener), self.ready)

    def ready(self, fd: int) -> None:
        if fd in self.socks:
            self.readable(fd)

    def accept(self, listener: socket.socket) -> None:
        for sock in accept_pending(listener, blocking=False):
            self.accepted += 1
            self.socks[sock.fileno()] = sock
            if self.session_size:
                self.sessions[sock.fileno()] = malloc(self.session_size)
            self.epoll.register(sock.fileno(), select.EPOLLIN)


def main() -> None:
    parser = server_parser(__doc__ or "")
    parser.add_argument("--buffers", choices=["pool", "retain"], default="pool")
    parser.add_argument("--pool-size", type=int, default=4, help="buffers in the shared pool")
    parser.add_argument(
        "--alloc",
        choices=["bytearray", "malloc"],
        default="malloc",
        help="how each buffer is allocated",
    )
    parser.add_argument(
        "--session-size",
        type=int,
        default=0,
        metavar="BYTES",
        help="malloc a session struct of this size per connection (default: none)",
    )
    args = parser.parse_args()
    if args.session_size < 0:
        parser.error("--session-size cannot be negative")
    raise_fd_limit()
    server = Server(
        args.buffers, Buffers(args.alloc, args.buffer_size, 0), args.pool_size, args.session_size
    )
    listener = listen(args.host, args.port)
    serve(server, listener, buffer_size=args.buffer_size)


if __name__ == "__main__":
    main()
