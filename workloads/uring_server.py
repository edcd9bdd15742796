"""Queued model, io_uring: one read request with its own buffer posted per connection.

Or, with --buffer-ring N, the mitigation: one multishot RECV per connection that takes a buffer
from a registered provided-buffer ring of N buffers only when data arrives.

Speaks the load generator's echo protocol. Prints {"event": "listening", ...} when ready and its
ground truth as JSON on SIGUSR1 and at exit: connections, the requests it holds posted (with
their buffer addresses and lengths), reads completed, bytes received, and the buffer ring.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from workloads import uring
from workloads.common import emit, raise_fd_limit

OPS = {
    "recv": uring.OP_RECV,
    "read": uring.OP_READ,
    "readv": uring.OP_READV,
    "recvmsg": uring.OP_RECVMSG,
}
GROUP = 7
IORING_REGISTER_EVENTFD = 4


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_int),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


@dataclass
class Conn:
    sock: socket.socket
    buf: bytearray
    addr: int
    posted: bool = False
    keep: list[Any] = field(default_factory=list)  # iovecs/msghdr the kernel reads


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.op = OPS[args.op]
        self.op_name = args.op
        self.buffer_size = args.buffer_size
        self.repost = not args.no_repost
        self.ring = uring.Ring(entries=4096, sqpoll=args.sqpoll)
        self.sqpoll = args.sqpoll
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        efd = ctypes.c_int32(self.efd)
        uring._check(
            uring._libc.syscall(
                uring.SYS_IO_URING_REGISTER,
                self.ring.fd,
                IORING_REGISTER_EVENTFD,
                ctypes.byref(efd),
                1,
            )
        )
        self.pbuf = (
            self.ring.register_buffer_ring(GROUP, args.buffer_ring, args.buffer_size)
            if args.buffer_ring
            else None
        )
        self.conns: dict[int, Conn] = {}
        self.unsubmitted: list[Conn] = []
        self.accepted = 0
        self.reads_completed = 0
        self.bytes_received = 0

    def post(self, conn: Conn) -> None:
        fd = conn.sock.fileno()
        if self.pbuf:
            self.ring.prep(
                uring.OP_RECV,
                fd,
                user_data=fd,
                flags=uring.IOSQE_BUFFER_SELECT,
                ioprio=uring.IORING_RECV_MULTISHOT,
                buf_group=GROUP,
            )
        elif self.op in (uring.OP_RECV, uring.OP_READ):
            self.ring.prep(
                self.op,
                fd,
                conn.addr,
                len(conn.buf),
                user_data=fd,
                off=(1 << 64) - 1 if self.op == uring.OP_READ else 0,
            )
        else:  # two iovecs: the buffer's halves
            half = len(conn.buf) // 2
            iov = (ctypes.c_uint64 * 4)(conn.addr, half, conn.addr + half, len(conn.buf) - half)
            conn.keep = [iov]
            if self.op == uring.OP_READV:
                self.ring.prep(
                    self.op, fd, ctypes.addressof(iov), 2, user_data=fd, off=(1 << 64) - 1
                )
            else:
                msg = _MsgHdr(None, 0, ctypes.addressof(iov), 2, None, 0, 0)
                conn.keep.append(msg)
                self.ring.prep(self.op, fd, ctypes.addressof(msg), 1, user_data=fd)
        self.unsubmitted.append(conn)

    def submit(self) -> None:
        """Hand queued requests to the kernel; only then do they count as posted."""
        self.ring.submit()
        if self.sqpoll:  # the kernel thread takes the SQEs in its own time
            deadline = time.monotonic() + 5
            while not self.ring.sq_empty() and time.monotonic() < deadline:
                time.sleep(0.001)
        for conn in self.unsubmitted:
            conn.posted = True
        self.unsubmitted.clear()

    def accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(True)
            buf = bytearray(0 if self.pbuf else self.buffer_size)
            addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf)) if buf else 0
            conn = Conn(sock, buf, addr)
            self.conns[sock.fileno()] = conn
            self.accepted += 1
            self.post(conn)

    def complete(self, cqe: uring.Completion) -> None:
        conn = self.conns.get(cqe.user_data)
        if conn is None:
            return
        final = not cqe.more
        if final:
            conn.posted = False
        if cqe.res > 0:
            self.reads_completed += 1
            self.bytes_received += cqe.res
            if self.pbuf and cqe.buffer_id is not None:
                start = cqe.buffer_id * self.pbuf.size
                data = bytes(self.pbuf.memory[start : start + cqe.res])
                self.pbuf.consumed += 1
                self.pbuf.give_back(cqe.buffer_id)
            else:
                data = bytes(conn.buf[: cqe.res])
            conn.sock.sendall(data)
            if final and (self.repost or self.pbuf):
                self.post(conn)
        elif cqe.res == -errno.ENOBUFS:
            if final:  # the ring ran dry; a real server would add buffers, we re-arm
                self.post(conn)
        elif final:  # end of stream (0) or an error: the connection is done
            del self.conns[cqe.user_data]
            conn.sock.close()

    def ground_truth(self) -> dict[str, Any]:
        posted = [c for c in self.conns.values() if c.posted]
        truth: dict[str, Any] = {
            "event": "ground_truth",
            "model": "queued-uring" if not self.pbuf else "uring-buffer-ring",
            "pid": os.getpid(),
            "op": "recv-multishot" if self.pbuf else self.op_name,
            "sqpoll": self.sqpoll,
            "connections_accepted": self.accepted,
            "connections_open": len(self.conns),
            "posted_reads": len(posted),
            "buffer_size": self.buffer_size,
            "buffers": [
                {"fd": fd, "addr": c.addr, "len": len(c.buf)}
                for fd, c in sorted(self.conns.items())
                if c.posted
            ],
            "pinned_bytes": sum(len(c.buf) for c in posted),
            "reads_completed": self.reads_completed,
            "bytes_received": self.bytes_received,
        }
        if self.pbuf:
            truth["buffer_ring"] = {
                "group": GROUP,
                "entries": self.pbuf.entries,
                "buffers": self.pbuf.count,
                "buffer_size": self.pbuf.size,
                "bytes": self.pbuf.count * self.pbuf.size,
                "consumed": self.pbuf.consumed,
                "ring_addr": self.pbuf.ring_addr,
            }
        return truth

    def run(self, listener: socket.socket, stopping: list[bool]) -> None:
        while not stopping[0]:
            self.submit()
            try:
                ready, _, _ = select.select([listener.fileno(), self.efd], [], [], 1.0)
            except InterruptedError:
                continue
            if listener.fileno() in ready:
                self.accept(listener)
            if self.efd in ready:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.efd)
            for cqe in self.ring.completions():
                self.complete(cqe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--buffer-size", type=int, default=16384)
    parser.add_argument(
        "--op",
        choices=sorted(OPS),
        default="recv",
        help="the read request posted per connection (default recv)",
    )
    parser.add_argument("--sqpoll", action="store_true", help="a kernel thread polls the SQ")
    parser.add_argument(
        "--no-repost", action="store_true", help="do not post a new read after one completes"
    )
    parser.add_argument(
        "--buffer-ring",
        type=int,
        metavar="N",
        default=0,
        help="multishot RECV with a provided-buffer ring of N buffers",
    )
    args = parser.parse_args()

    raise_fd_limit()
    server = Server(args)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(4096)
    listener.setblocking(False)
    stopping = [False]

    def on_stop(*_: object) -> None:
        stopping[0] = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, lambda *_: emit(server.ground_truth()))
    emit(
        {
            "event": "listening",
            "pid": os.getpid(),
            "host": args.host,
            "port": listener.getsockname()[1],
            "buffer_size": args.buffer_size,
            "ring_fd": server.ring.fd,
        }
    )
    server.run(listener, stopping)
    emit(server.ground_truth())


if __name__ == "__main__":
    main()
