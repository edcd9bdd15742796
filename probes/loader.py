"""Compile and attach the BPF programs; the only module that imports bcc (lazily).

Options reach the C code as -D constants; kernel structure offsets come from BTF.
"""

from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from probes import layout
from probes.btf import BTF, BTFError
from probes.ringbuf import RingBufferConsumer

# The kernel structure members fd_is_socket() walks: constant name -> (struct, member).
SOCKET_CHECK_OFFSETS = {
    "OFF_TASK_FILES": ("task_struct", "files"),
    "OFF_FILES_FDT": ("files_struct", "fdt"),
    "OFF_FDT_MAX_FDS": ("fdtable", "max_fds"),
    "OFF_FDT_FD": ("fdtable", "fd"),
    "OFF_FILE_INODE": ("file", "f_inode"),
    "OFF_INODE_MODE": ("inode", "i_mode"),
}

BPF_NOEXIST = 1


class ProbeError(Exception):
    """A probe could not be compiled or attached; the message says why in one line."""


@dataclass(frozen=True)
class ReadProbeOptions:
    follow_children: bool = False
    max_targets: int = 4096
    max_inflight: int = 65536
    ringbuf_pages: int = 4096  # 16 MiB: ~290k records of slack before a burst drops events
    max_iov: int = 8


def kernel_offsets(btf: BTF) -> dict[str, int]:
    try:
        return {c: btf.offsetof(s, m) for c, (s, m) in SOCKET_CHECK_OFFSETS.items()}
    except BTFError as exc:
        raise ProbeError(f"kernel BTF lacks what the socket check needs: {exc}") from None


def read_probe_source() -> str:
    return layout.c_header() + resources.files("probes").joinpath("reads.bpf.c").read_text()


def read_probe_cflags(options: ReadProbeOptions, offsets: dict[str, int]) -> list[str]:
    consts = dict(offsets)
    consts.update(
        MAX_TARGETS=options.max_targets,
        MAX_INFLIGHT=options.max_inflight,
        RINGBUF_PAGES=options.ringbuf_pages,
        FOLLOW_CHILDREN=int(options.follow_children),
        MAX_IOV=options.max_iov,
    )
    return [f"-D{k}={v}" for k, v in sorted(consts.items())]


def render_read_probe(options: ReadProbeOptions, btf: BTF | None = None) -> str:
    """The final C text bcc compiles, with its -D constants as #defines (for debugging)."""
    cflags = read_probe_cflags(options, kernel_offsets(btf or BTF.load()))
    defines = [f"#define {flag[2:].replace('=', ' ', 1)}" for flag in cflags]
    return "\n".join(["/* cflags: " + " ".join(cflags) + " */", *defines, read_probe_source()])


class ReadProbes:
    """The loaded posted-read programs and their maps."""

    def __init__(self, options: ReadProbeOptions, btf: BTF | None = None) -> None:
        try:
            from bcc import BPF  # noqa: PLC0415 - bcc is optional outside recording
        except ImportError:
            raise ProbeError(
                "bcc is not importable: run scripts/bootstrap (bcc comes from the "
                "distribution's python3-bpfcc, not from pip)"
            ) from None
        self.options = options
        offsets = kernel_offsets(btf or BTF.load())
        self.cflags = read_probe_cflags(options, offsets)
        try:
            self.bpf: Any = BPF(text=read_probe_source(), cflags=self.cflags)
        except Exception as exc:  # bcc raises bare Exception on compile/load failure
            raise ProbeError(f"cannot load the read probes: {exc}") from None
        self.targets = self.bpf["targets"]
        self.inflight = self.bpf["inflight"]
        self.counters = self.bpf["counters"]
        events = self.bpf["events"]
        self.consumer = RingBufferConsumer(
            events.map_fd, events.max_entries, layout.READ_EVENT.dtype
        )

    def add_target(self, pid: int) -> None:
        self.targets[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)

    def target_pids(self) -> list[int]:
        return [int(k.value) for k in self.targets]

    def track_inflight(
        self, tid: int, fd: int, addr: int, length: int, op: int, flags: int, nvec: int, ts: int
    ) -> bool:
        """Seed the in-flight table with a read found blocked by the /proc scan.

        Returns False when the probes already track this thread (they saw it enter).
        """
        from bcc import lib  # noqa: PLC0415

        key = self.inflight.Key(tid)
        leaf = self.inflight.Leaf()
        leaf.ts_ns, leaf.addr, leaf.len, leaf.fd = ts, addr, length, fd
        leaf.flags, leaf.nvec, leaf.op = flags, nvec, op
        rc = lib.bpf_update_elem(
            self.inflight.map_fd, ctypes.byref(key), ctypes.byref(leaf), BPF_NOEXIST
        )
        return rc == 0

    def inflight_flags(self, tid: int) -> int | None:
        leaf = self.inflight.get(self.inflight.Key(tid))
        return None if leaf is None else int(leaf.flags)

    def forget_inflight(self, tid: int) -> None:
        with contextlib.suppress(KeyError):
            del self.inflight[self.inflight.Key(tid)]

    def counter_values(self) -> dict[str, int]:
        return {c.name.lower(): int(sum(self.counters[c.value])) for c in layout.Counter}

    def drain(self) -> np.ndarray:
        return self.consumer.drain()

    def wait(self, timeout_s: float) -> None:
        self.consumer.wait(timeout_s)

    def close(self) -> None:
        self.consumer.close()
        self.bpf.cleanup()
