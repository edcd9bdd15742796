"""Queued model, threads: one thread per connection, blocked in recv() into its own buffer.

Speaks the load generator's echo protocol: whatever a connection sends is sent back. Prints
{"event": "listening", ...} when ready and its ground truth as JSON on SIGUSR1 and at exit
(SIGTERM/SIGINT): connections, buffers (address and size), reads completed, bytes received.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from workloads.common import (
    Buffers,
    emit,
    listen,
    listening,
    malloc,
    raise_fd_limit,
    server_parser,
    socket_kernel_bytes,
)


def reader(how: str, conn: socket.socket, buf: Any) -> Callable[[], int]:
    """A function that blocks in the chosen read syscall, filling `buf` (split in two iovecs
    for the vectored ones) and returning the byte count."""
    view = memoryview(buf)
    half = len(buf) // 2
    if how == "recv":  # recvfrom(fd, buf, len)
        return lambda: conn.recv_into(buf)
    if how == "read":  # read(fd, buf, len)
        raw = io.FileIO(conn.fileno(), closefd=False)
        return lambda: raw.readinto(buf) or 0
    if how == "readv":  # readv(fd, [2 iovecs])
        return lambda: os.readv(conn.fileno(), [view[:half], view[half:]])
    if how == "recvmsg":  # recvmsg(fd, {2 iovecs})
        return lambda: conn.recvmsg_into([view[:half], view[half:]])[0]
    raise ValueError(how)


class Server:
    def __init__(self, buffers: Buffers, read_with: str = "recv") -> None:
        self.buffer_size = buffers.size
        self.alloc = buffers
        self.others: list[tuple[int, int]] = []  # (address, size) of non-buffer allocations
        self.read_with = read_with
        self.stalled: threading.Event | None = None
        self.held: list[socket.socket] = []
        self.lock = threading.Lock()
        self.buffers: dict[int, int] = {}  # fd -> buffer address, for open connections
        self.accepted = 0
        self.reads_completed = 0
        self.bytes_received = 0

    def serve_connection(self, conn: socket.socket) -> None:
        if self.stalled is not None:  # hold the connection, never read: data waits in the kernel
            with self.lock:
                self.held.append(conn)
            self.stalled.wait()
            return
        buf, addr = self.alloc.take()
        fd = conn.fileno()
        with self.lock:
            self.buffers[fd] = addr
        view = memoryview(buf)
        read = reader(self.read_with, conn, buf)
        try:
            while True:
                n = read()
                if n == 0:
                    break
                with self.lock:
                    self.reads_completed += 1
                    self.bytes_received += n
                conn.sendall(view[:n])
        except OSError:
            pass
        finally:
            with self.lock:
                self.buffers.pop(fd, None)
            view.release()
            conn.close()
            self.alloc.give_back(addr)

    def ground_truth(self) -> dict:
        with self.lock:
            return {
                "event": "ground_truth",
                "model": "queued-threads",
                "pid": os.getpid(),
                "connections_accepted": self.accepted,
                "connections_open": len(self.buffers),
                "buffer_size": self.buffer_size,
                "read_with": self.read_with,
                "alloc": self.alloc.how,
                "other_allocations": [{"addr": a, "size": n} for a, n in self.others],
                "allocations": [
                    {"addr": a, "size": n} for a, n in sorted(self.alloc.allocations.items())
                ],
                "buffers": [
                    {"fd": fd, "addr": a, "len": self.buffer_size}
                    for fd, a in sorted(self.buffers.items())
                ],
                "posted_reads": len(self.buffers),  # every connection's thread is in recv()
                "pinned_bytes": len(self.buffers) * self.buffer_size,
                "socket_kernel_bytes": socket_kernel_bytes(self.buffers),
                "reads_completed": self.reads_completed,
                "bytes_received": self.bytes_received,
                # Python's own count of what it allocated (PYTHONTRACEMALLOC=1), else None
                "python_traced_bytes": (
                    tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None
                ),
            }


def start_noise(file_reads: int) -> None:
    """Reads that must NOT count: a thread blocked on a pipe and reads of a regular file."""
    pipe_r, _pipe_w = os.pipe()
    threading.Thread(target=os.read, args=(pipe_r, 4096), daemon=True).start()

    def read_file() -> None:
        with tempfile.TemporaryFile() as f:
            f.write(b"x" * 4096)
            for _ in range(file_reads):
                os.pread(f.fileno(), 4096, 0)
                f.seek(0)
                f.read(4096)
                time.sleep(0.001)

    threading.Thread(target=read_file, daemon=True).start()


def main() -> None:
    parser = server_parser(__doc__ or "")
    parser.add_argument(
        "--read-with",
        choices=["recv", "read", "readv", "recvmsg"],
        default="recv",
        help="the blocking syscall each thread reads with (default recv)",
    )
    parser.add_argument(
        "--alloc",
        choices=["bytearray", "malloc", "posix_memalign", "pool", "mmap"],
        default="bytearray",
        help="where read buffers come from (see Buffers)",
    )
    parser.add_argument("--pool-slots", type=int, default=1024, help="with --alloc pool")
    parser.add_argument(
        "--other-allocs",
        type=int,
        default=0,
        metavar="N",
        help="also malloc N blocks that are not IO buffers",
    )
    parser.add_argument("--other-size", type=int, default=50021, help="bytes per other block")
    parser.add_argument(
        "--no-read",
        action="store_true",
        help="accept connections but never read them (data stays in the socket buffers)",
    )
    parser.add_argument(
        "--noise", action="store_true", help="also block a thread on a pipe and read a regular file"
    )
    args = parser.parse_args()

    raise_fd_limit()
    threading.stack_size(256 * 1024)
    server = Server(Buffers(args.alloc, args.buffer_size, args.pool_slots), args.read_with)
    if args.no_read:
        server.stalled = threading.Event()
    # other heap memory, which must not be taken for IO buffers
    server.others = [(malloc(args.other_size), args.other_size) for _ in range(args.other_allocs)]
    listener = listen(args.host, args.port)

    stopping = threading.Event()

    def on_stop(_signum: int, _frame: object) -> None:
        stopping.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, lambda *_: emit(server.ground_truth()))
    if args.noise:
        start_noise(file_reads=997)
    listening(listener, buffer_size=args.buffer_size)
    while not stopping.is_set():
        try:
            conn, _ = listener.accept()
        except OSError:
            break
        server.accepted += 1
        threading.Thread(target=server.serve_connection, args=(conn,), daemon=True).start()
    emit(server.ground_truth())


if __name__ == "__main__":
    main()
