"""Small helpers shared by the workloads (they import nothing else of idlebuf)."""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import resource
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any, Protocol


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one: servers here hold thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def resident_bytes() -> int:
    """This process's resident set size, as /proc prints it (the exact counter sum)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_SO_MEMINFO = 55  # SOL_SOCKET option: the socket's sk_meminfo counters (SK_MEMINFO_*)
_RMEM_ALLOC, _FWD_ALLOC, _WMEM_QUEUED = 0, 4, 5


def socket_kernel_bytes(fds: Iterable[int]) -> int:
    """Kernel memory of these sockets as each reports it (getsockopt SO_MEMINFO): received
    data held, sent data queued and memory reserved ahead (rmem_alloc + wmem_queued +
    fwd_alloc), the same counters `ss -m` shows."""
    total = 0
    info = (ctypes.c_uint32 * 9)()
    for fd in fds:
        size = ctypes.c_uint32(ctypes.sizeof(info))
        if _libc.getsockopt(fd, socket.SOL_SOCKET, _SO_MEMINFO, info, ctypes.byref(size)) == 0:
            total += info[_RMEM_ALLOC] + info[_WMEM_QUEUED] + info[_FWD_ALLOC]
    return total


def emit(record: dict[str, Any]) -> None:
    """One JSON object per line on stdout: how workloads report their ground truth (which
    always carries the server's RSS at that moment)."""
    if record.get("event") == "ground_truth":
        record = {**record, "rss_bytes": resident_bytes()}
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def server_parser(doc: str) -> argparse.ArgumentParser:
    """The options every server shares: where to listen and how big a buffer is."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--buffer-size", type=int, default=16384)
    return parser


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(4096)
    return listener


class GroundTruth(Protocol):
    def ground_truth(self) -> dict[str, Any]: ...

    def run(self, listener: socket.socket, stopping: list[bool]) -> None: ...


def serve(server: GroundTruth, listener: socket.socket, **announce: Any) -> None:
    """Run an event-loop server until SIGTERM/SIGINT; its ground truth on SIGUSR1 and at exit.

    `stopping[0]` turns true on a stop signal; the server's loop checks it at least once a
    second."""
    stopping = [False]

    def on_stop(*_: object) -> None:
        stopping[0] = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, lambda *_: emit(server.ground_truth()))
    listening(listener, **announce)
    server.run(listener, stopping)
    emit(server.ground_truth())


def accept_pending(listener: socket.socket, blocking: bool) -> Iterator[socket.socket]:
    """Every connection waiting on a non-blocking listener, set (non-)blocking."""
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(blocking)
        yield sock


def epoll_loop(
    epoll: select.epoll,
    listener: socket.socket,
    stopping: list[bool],
    accept: Callable[[], None],
    ready: Callable[[int], None],
) -> None:
    """A readiness server's loop: `accept()` when the listener is readable, `ready(fd)` for
    any other fd epoll reports, until `stopping[0]`."""
    listener.setblocking(False)
    epoll.register(listener.fileno(), select.EPOLLIN)
    while not stopping[0]:
        try:
            events = epoll.poll(1.0)
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == listener.fileno():
                accept()
            else:
                ready(fd)


def address_of(buf: bytearray) -> int:
    """Where a bytearray's bytes are: the address a read syscall is given."""
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


def listening(listener: socket.socket, **extra: Any) -> None:
    """Announce the server is ready: {"event": "listening", "pid", "host", "port", ...}."""
    host, port = listener.getsockname()[:2]
    emit(
        {
            "event": "listening",
            "pid": os.getpid(),
            "host": host,
            "port": port,
            "rss_bytes": resident_bytes(),  # where RSS growth is counted from
            **extra,
        }
    )


_libc = ctypes.CDLL(None, use_errno=True)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]
_libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]


def malloc(size: int) -> int:
    addr = _libc.malloc(size)
    if not addr:
        raise MemoryError(size)
    return int(addr)


def free(addr: int) -> None:
    _libc.free(addr)


class Buffers:
    """Where each connection's read buffer comes from (--alloc), as a real server would do it:

    bytearray       Python's allocator (malloc underneath for buffers this size)
    malloc          one malloc() per connection
    posix_memalign  one posix_memalign(4096) per connection
    pool            slices of one malloc()ed region sized for --pool-slots connections
    mmap            one anonymous mmap() per connection (memory the program maps itself)
    """

    def __init__(self, how: str, size: int, pool_slots: int) -> None:
        self.how, self.size = how, size
        self.lock = threading.Lock()
        self.allocations: dict[int, int] = {}  # address -> size, of what this server allocated
        self.free_slots: list[int] = []
        self.mappings: dict[int, mmap.mmap] = {}
        if how == "pool":
            self.pool = self._malloc(size * pool_slots)
            self.free_slots = [self.pool + i * size for i in reversed(range(pool_slots))]

    def _malloc(self, size: int) -> int:
        addr = malloc(size)
        with self.lock:
            self.allocations[addr] = size
        return addr

    def take(self) -> tuple[Any, int]:
        """(a writable buffer object, its address)."""
        if self.how == "bytearray":
            buf = bytearray(self.size)
            return buf, address_of(buf)
        if self.how == "mmap":
            region = mmap.mmap(-1, self.size)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
            with self.lock:
                self.allocations[addr] = self.size
                self.mappings[addr] = region
            return (ctypes.c_char * self.size).from_address(addr), addr
        if self.how == "malloc":
            addr = self._malloc(self.size)
        elif self.how == "posix_memalign":
            out = ctypes.c_void_p()
            if _libc.posix_memalign(ctypes.byref(out), 4096, self.size):
                raise MemoryError(self.size)
            addr = int(out.value or 0)
            with self.lock:
                self.allocations[addr] = self.size
        else:
            with self.lock:
                addr = self.free_slots.pop()
        return (ctypes.c_char * self.size).from_address(addr), addr

    def give_back(self, addr: int) -> None:
        if self.how == "pool":
            with self.lock:
                self.free_slots.append(addr)
        elif self.how == "mmap":
            with self.lock:
                self.allocations.pop(addr, None)
                self.mappings.pop(addr, None)  # unmapped when collected (views may remain)
        elif self.how != "bytearray":
            with self.lock:
                self.allocations.pop(addr, None)
            _libc.free(addr)


class FdTable(MutableMapping[int, Any]):
    """fd -> value over a list sized once for the fd limit: adding connections never resizes
    a hash table in the heap, so the heap grows by exactly what a server allocates per
    connection (the cost tests fit that growth to the byte)."""

    def __init__(self, size: int | None = None) -> None:
        self._slots: list[Any] = [None] * (size or resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self._count = 0

    def __getitem__(self, fd: int) -> Any:
        value = self._slots[fd] if 0 <= fd < len(self._slots) else None
        if value is None:
            raise KeyError(fd)
        return value

    def __setitem__(self, fd: int, value: Any) -> None:
        if self._slots[fd] is None:
            self._count += 1
        self._slots[fd] = value

    def __delitem__(self, fd: int) -> None:
        self[fd]  # KeyError if absent
        self._slots[fd] = None
        self._count -= 1

    def __iter__(self) -> Iterator[int]:
        return (fd for fd, v in enumerate(self._slots) if v is not None)

    def __len__(self) -> int:
        return self._count
