"""Reading kernel state the targets already hold, through the programs of attach.bpf.c.

- `open_files()` runs the task_file iterator: every open file of the targets, with its
  struct file, private data and the task's address space.
- `read()` copies kernel memory through `peek_kernel`, a raw-tracepoint program the recorder
  runs itself (BPF_PROG_TEST_RUN): nothing is attached, and only reads are possible, so the
  recorder can walk kernel lists in Python with offsets from BTF.
- `seed_uring()` decodes io_uring requests found by such a walk with the submit probe's own
  logic and enters them in the probes' in-flight table.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from probes.format.errors import ProbeError
from probes.format.schema import WIRE_EVENT

PEEK_SLOTS = 64  # attach.bpf.c
PEEK_BYTES = 64
NR_BPF = 321  # x86_64
BPF_PROG_TEST_RUN = 10
_OPEN_FILE = struct.Struct("<QQQIiII")
_SEEDED = np.dtype([("e", WIRE_EVENT.dtype), ("file", "<u8")])
_PEEK_RESULT = np.dtype([("failed", "<u8"), ("bytes", "u1", (PEEK_SLOTS, PEEK_BYTES))])


def _checked(table: Any, dtype: np.dtype) -> None:
    """bcc's ctypes view of a map value must be the whole value: a lookup copies the kernel's
    value into it (a shorter view would be overrun)."""
    if ctypes.sizeof(table.Leaf) != dtype.itemsize:
        raise ProbeError(
            f"{table.Leaf.__name__}: {ctypes.sizeof(table.Leaf)} bytes, not "
            f"{dtype.itemsize} (bcc misread the map's value type)"
        )


class _TestRun(ctypes.Structure):
    """The test part of union bpf_attr (include/uapi/linux/bpf.h)."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class OpenFile:
    pid: int
    fd: int
    file: int  # struct file *
    private_data: int
    mm: int  # the task's struct mm_struct * (kmem:rss_stat's mm id)
    socket: bool


class KernelState:
    """The attach programs of loaded probes (`bpf`: their bcc BPF object)."""

    def __init__(self, bpf: Any) -> None:
        from bcc import BPF  # noqa: PLC0415 - only the loader's callers get here

        self._bpf = bpf
        self._BPF = BPF
        self._peek_fd = self._load("peek_kernel")
        self._seed_fd: int | None = None
        self._in = bpf["peek_in"]
        self._out = bpf["peek_out"]
        _checked(self._out, _PEEK_RESULT)

    def _load(self, name: str) -> int:
        try:
            return int(self._bpf.load_func(name, self._BPF.RAW_TRACEPOINT).fd)
        except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception
            raise ProbeError(f"cannot load {name}: {exc}") from None

    def _run(self, prog_fd: int, *args: int) -> None:
        ctx = (ctypes.c_uint64 * max(1, len(args)))(*args)
        attr = _TestRun(prog_fd=prog_fd, ctx_size_in=8 * len(args), ctx_in=ctypes.addressof(ctx))
        rc = _libc.syscall(
            ctypes.c_long(NR_BPF),
            ctypes.c_long(BPF_PROG_TEST_RUN),
            ctypes.byref(attr),
            ctypes.c_uint(ctypes.sizeof(attr)),
        )
        if rc != 0:
            raise ProbeError(f"cannot run a BPF program: {os.strerror(ctypes.get_errno())}")

    def _fill(self, addrs: Sequence[int]) -> None:
        batch = self._in.Leaf()
        for i, a in enumerate(addrs):
            batch.addr[i] = a
        self._in[ctypes.c_int(0)] = batch

    def read_chunks(self, addrs: Sequence[int]) -> list[bytes | None]:
        """PEEK_BYTES of kernel memory at each address (None where it cannot be read)."""
        out: list[bytes | None] = []
        for start in range(0, len(addrs), PEEK_SLOTS):
            batch = list(addrs[start : start + PEEK_SLOTS])
            self._fill(batch)
            self._run(self._peek_fd, len(batch))
            result = np.frombuffer(bytes(self._out[ctypes.c_int(0)]), dtype=_PEEK_RESULT)[0]
            failed = int(result["failed"])
            for i in range(len(batch)):
                out.append(None if failed >> i & 1 else result["bytes"][i].tobytes())
        return out

    def read(self, addr: int, size: int) -> bytes | None:
        """`size` bytes at `addr`, or None if any part cannot be read."""
        chunks = self.read_chunks(range(addr, addr + size, PEEK_BYTES))
        if any(c is None for c in chunks):
            return None
        return b"".join(c for c in chunks if c is not None)[:size]

    def words(self, addrs: Sequence[int]) -> list[int | None]:
        """The 8-byte word at each address."""
        return [
            None if c is None else int(struct.unpack_from("<Q", c)[0])
            for c in self.read_chunks(addrs)
        ]

    def open_files(self) -> list[OpenFile]:
        """Every open file of the targets, from the task_file iterator."""
        from bcc import lib  # noqa: PLC0415

        try:
            prog = self._bpf.load_func("bpf_iter__task_file", self._BPF.TRACING)
        except Exception as exc:  # noqa: BLE001
            raise ProbeError(f"cannot load the task_file iterator: {exc}") from None
        lib.bcc_iter_attach.restype = ctypes.c_int
        lib.bcc_iter_create.restype = ctypes.c_int
        link = lib.bcc_iter_attach(prog.fd, None, 0)
        if link < 0:
            raise ProbeError(f"cannot attach the task_file iterator: {os.strerror(-link)}")
        try:
            fd = lib.bcc_iter_create(link)
            if fd < 0:
                raise ProbeError(f"cannot run the task_file iterator: {os.strerror(-fd)}")
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        finally:
            os.close(link)
        return list(_open_files(data))

    def seed_uring(self, requests: Sequence[int], ring: int, pid: int) -> list[tuple[Any, int]]:
        """Decode `requests` of `ring` (owned by `pid`) and enter the reads among them in the
        in-flight table: (POST wire record, struct file *) for each one entered (requests the
        probes already track, or that do not read, are left out)."""
        if self._seed_fd is None:
            self._seed_fd = self._load("seed_uring")
        seeded = self._bpf["seed_out"]
        _checked(seeded, _SEEDED)
        out = []
        for req in requests:
            self._run(self._seed_fd, req, ring, pid)
            row = np.frombuffer(bytes(seeded[ctypes.c_int(0)]), dtype=_SEEDED)[0]
            if row["e"]["kind"]:
                out.append((row["e"].copy(), int(row["file"])))
        return out


def _open_files(data: bytes) -> Iterator[OpenFile]:
    for off in range(0, len(data) - _OPEN_FILE.size + 1, _OPEN_FILE.size):
        file, private, mm, pid, fd, socket, _ = _OPEN_FILE.unpack_from(data, off)
        yield OpenFile(pid, fd, file, private, mm, bool(socket))
