"""Queued model, io_uring: one read request with its own buffer posted per connection.

Or, with --buffer-ring N or --provide N, the mitigation: each connection's request takes a
buffer from a provided-buffer group (a registered ring, or the older PROVIDE_BUFFERS) only when
data arrives. With a ring, RECV is multishot: one request serves every message.

Or, with --poll-first N, the other mitigation: each connection posts a POLL_ADD (no buffer);
when it fires, a RECV into one of N pooled buffers is posted, and the buffer returns to the pool
at its completion.

Speaks the load generator's echo protocol. Prints {"event": "listening", ...} when ready and its
ground truth as JSON on SIGUSR1 and at exit: connections, the requests it holds posted (with
their buffer addresses and lengths), reads completed, bytes received, and the buffer group.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from workloads import uring
from workloads.common import (
    accept_pending,
    address_of,
    listen,
    raise_fd_limit,
    serve,
    server_parser,
    socket_kernel_bytes,
)

OPS = {
    "recv": uring.OP_RECV,
    "read": uring.OP_READ,
    "readv": uring.OP_READV,
    "recvmsg": uring.OP_RECVMSG,
    "read_fixed": uring.OP_READ_FIXED,
    "read_multishot": uring.OP_READ_MULTISHOT,
}
GROUP = 7
POLLIN = 0x1
POLL_TAG = 1 << 62  # user_data of a connection's poll request: fd | POLL_TAG
NO_OFFSET = (1 << 64) - 1  # -1: read at the file position (sockets have none)


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
    addr: int  # its own buffer (0 with a buffer group)
    size: int
    posted: bool = False
    polling: bool = False
    memory: list[Any] = field(default_factory=list)  # keeps its own buffer alive
    request: list[Any] = field(default_factory=list)  # iovecs/msghdr the kernel reads later


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.op_name = args.op
        self.op = OPS[args.op]
        self.buffer_size = args.buffer_size
        self.repost = not args.no_repost
        self.sqpoll = args.sqpoll
        self.bundle = args.bundle
        self.ring = uring.Ring(entries=4096, sqpoll=args.sqpoll)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ring.register_eventfd(self.efd)
        self.group: uring.BufferRing | uring.ProvidedBuffers | None = None
        if args.buffer_ring:
            self.group = self.ring.register_buffer_ring(GROUP, args.buffer_ring, args.buffer_size)
        elif args.provide:
            self.group = uring.ProvidedBuffers(self.ring, GROUP, args.provide, args.buffer_size)
        if self.op == uring.OP_READ_MULTISHOT and self.group is None:
            raise SystemExit("read_multishot needs --buffer-ring or --provide")
        # --poll-first: a pool of buffers, lent to a connection only while its RECV runs
        self.pool = [bytearray(args.buffer_size) for _ in range(args.poll_first)]
        self.free_pool = list(range(args.poll_first))
        self.waiting: list[Conn] = []  # readable connections waiting for a pooled buffer
        self.fixed: bytearray | None = None
        self.free_slots: list[int] = []
        if self.op == uring.OP_READ_FIXED:  # one registered region, a slot per connection
            self.fixed = bytearray(args.fixed_slots * args.buffer_size)
            self.fixed_base = self.ring.register_buffer(self.fixed)
            self.free_slots = list(range(args.fixed_slots - 1, -1, -1))
        self.conns: dict[int, Conn] = {}
        self.unsubmitted: list[Conn] = []
        self.accepted = 0
        self.reads_completed = 0
        self.bytes_received = 0

    # --- requests ---------------------------------------------------------------------
    def post(self, conn: Conn) -> None:
        fd = conn.sock.fileno()
        if self.pool:
            conn.polling = True
            self.ring.prep(uring.OP_POLL_ADD, fd, user_data=fd | POLL_TAG, op_flags=POLLIN)
            self.unsubmitted.append(conn)
            return
        if self.group is not None:
            multishot = self.op == uring.OP_READ_MULTISHOT or isinstance(
                self.group, uring.BufferRing
            )
            op = uring.OP_READ_MULTISHOT if self.op == uring.OP_READ_MULTISHOT else uring.OP_RECV
            self.ring.prep(
                op,
                fd,
                user_data=fd,
                flags=uring.IOSQE_BUFFER_SELECT,
                buf_group=GROUP,
                ioprio=(uring.IORING_RECV_MULTISHOT if multishot and op == uring.OP_RECV else 0)
                | (uring.IORING_RECVSEND_BUNDLE if self.bundle else 0),
            )
        elif self.op in (uring.OP_RECV, uring.OP_READ, uring.OP_READ_FIXED):
            off = 0 if self.op == uring.OP_RECV else NO_OFFSET
            self.ring.prep(self.op, fd, conn.addr, conn.size, user_data=fd, off=off)
        else:  # two iovecs: the buffer's halves
            half = conn.size // 2
            iov = (ctypes.c_uint64 * 4)(conn.addr, half, conn.addr + half, conn.size - half)
            conn.request = [iov]
            if self.op == uring.OP_READV:
                self.ring.prep(self.op, fd, ctypes.addressof(iov), 2, user_data=fd, off=NO_OFFSET)
            else:
                msg = _MsgHdr(None, 0, ctypes.addressof(iov), 2, None, 0, 0)
                conn.request.append(msg)
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
            conn.posted = not conn.polling  # a poll request holds no buffer
        self.unsubmitted.clear()

    def readable(self, conn: Conn) -> None:
        """Poll-first: data is waiting; read it into a pooled buffer (or wait for one)."""
        conn.polling = False
        if not self.free_pool:
            self.waiting.append(conn)
            return
        slot = self.free_pool.pop()
        conn.addr, conn.size, conn.memory = address_of(self.pool[slot]), self.buffer_size, [slot]
        fd = conn.sock.fileno()
        self.ring.prep(uring.OP_RECV, fd, conn.addr, conn.size, user_data=fd)
        self.unsubmitted.append(conn)

    def give_back(self, conn: Conn) -> None:
        """Poll-first: the RECV is done; its buffer returns to the pool."""
        self.free_pool.append(conn.memory[0])
        conn.addr, conn.size, conn.memory = 0, 0, []
        if self.waiting:
            self.readable(self.waiting.pop(0))

    def own_buffer(self) -> tuple[int, int, list[Any]]:
        """(address, size, memory to keep alive) of a new connection's buffer."""
        if self.group is not None or self.pool:
            return 0, 0, []
        if self.fixed is not None:
            slot = self.free_slots.pop()
            return self.fixed_base + slot * self.buffer_size, self.buffer_size, [slot]
        buf = bytearray(self.buffer_size)
        return address_of(buf), len(buf), [buf]

    def accept(self, listener: socket.socket) -> None:
        for sock in accept_pending(listener, blocking=True):
            addr, size, memory = self.own_buffer()
            conn = Conn(sock, addr, size, memory=memory)
            self.conns[sock.fileno()] = conn
            self.accepted += 1
            self.post(conn)

    def close(self, fd: int) -> None:
        conn = self.conns.pop(fd)
        if self.fixed is not None:
            self.free_slots.append((conn.addr - self.fixed_base) // self.buffer_size)
        conn.sock.close()

    def complete(self, cqe: uring.Completion) -> None:
        conn = self.conns.get(cqe.user_data & ~POLL_TAG)
        if conn is None:
            return  # PROVIDE_BUFFERS, or a connection already closed
        if cqe.user_data & POLL_TAG:
            if cqe.res > 0:
                self.readable(conn)
            else:  # cancelled or failed: the connection is done
                self.close(conn.sock.fileno())
            return
        final = not cqe.more
        if final:
            conn.posted = False
        if self.pool:
            data = ctypes.string_at(conn.addr, cqe.res) if cqe.res > 0 else b""
            self.give_back(conn)
            if cqe.res > 0:
                self.reads_completed += 1
                self.bytes_received += cqe.res
                conn.sock.sendall(data)
                self.post(conn)
            else:
                self.close(cqe.user_data)
            return
        if cqe.res > 0:
            self.reads_completed += 1
            self.bytes_received += cqe.res
            if self.group is not None and cqe.buffer_id is not None:
                bids = self.group.taken(cqe.buffer_id, cqe.res)
                size, left, pieces = self.group.size, cqe.res, []
                for bid in bids:  # a bundle's data runs on through its buffers in order
                    pieces.append(self.group.memory[bid * size : bid * size + min(left, size)])
                    left -= size
                data = b"".join(pieces)
                self.group.consumed += len(bids)
                self.group.give_back(*bids)
            else:
                data = ctypes.string_at(conn.addr, cqe.res)
            conn.sock.sendall(data)
            if final and (self.repost or self.group is not None):
                self.post(conn)
        elif cqe.res == -errno.ENOBUFS:
            if final:  # the group ran dry; a real server would add buffers, this one re-arms
                self.post(conn)
        elif final:  # end of stream (0) or an error: the connection is done
            self.close(cqe.user_data)

    # --- reporting and the loop -------------------------------------------------------
    def ground_truth(self) -> dict[str, Any]:
        posted = [c for c in self.conns.values() if c.posted]
        model = "queued-uring"
        if self.group is not None:
            model = "uring-provided-buffers"
        elif self.pool:
            model = "uring-poll-first"
        truth: dict[str, Any] = {
            "event": "ground_truth",
            "model": model,
            "pid": os.getpid(),
            "op": self.op_name,
            "sqpoll": self.sqpoll,
            "connections_accepted": self.accepted,
            "connections_open": len(self.conns),
            "posted_reads": len(posted),
            "buffer_size": self.buffer_size,
            "buffers": [
                {"fd": fd, "addr": c.addr, "len": c.size}
                for fd, c in sorted(self.conns.items())
                if c.posted
            ],
            "pinned_bytes": sum(c.size for c in posted),
            "socket_kernel_bytes": socket_kernel_bytes(self.conns),
            "reads_completed": self.reads_completed,
            "bytes_received": self.bytes_received,
        }
        if self.pool:
            truth["polling"] = sum(c.polling for c in self.conns.values())
            truth["pool"] = {
                "buffers": len(self.pool),
                "bytes": len(self.pool) * self.buffer_size,
                "addresses": [address_of(b) for b in self.pool],
            }
        if self.group is not None:
            truth["buffer_group"] = {
                "how": "ring" if isinstance(self.group, uring.BufferRing) else "provide",
                "group": GROUP,
                "buffers": self.group.count,
                "buffer_size": self.group.size,
                "bytes": self.group.count * self.group.size,
                "consumed": self.group.consumed,
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
    parser = server_parser(__doc__ or "")
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
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--buffer-ring",
        type=int,
        metavar="N",
        default=0,
        help="take buffers from a registered provided-buffer ring of N buffers (multishot)",
    )
    group.add_argument(
        "--poll-first",
        type=int,
        metavar="N",
        default=0,
        help="post a POLL_ADD per connection; read into one of N pooled buffers when it fires",
    )
    group.add_argument(
        "--provide",
        type=int,
        metavar="N",
        default=0,
        help="take buffers from a group of N given with IORING_OP_PROVIDE_BUFFERS",
    )
    parser.add_argument(
        "--bundle",
        action="store_true",
        help="recv bundles: one completion may fill several provided buffers",
    )
    parser.add_argument(
        "--fixed-slots",
        type=int,
        default=1024,
        help="connections that fit in the registered buffer (--op read_fixed)",
    )
    args = parser.parse_args()

    raise_fd_limit()
    server = Server(args)
    listener = listen(args.host, args.port)
    listener.setblocking(False)
    serve(server, listener, buffer_size=args.buffer_size)


if __name__ == "__main__":
    main()
