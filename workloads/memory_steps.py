"""Grows its resident memory in steps and reports /proc/self/status at each step.

Each step touches another --step-bytes of anonymous memory, waits, then prints
{"event": "rss", "ts_ns": CLOCK_MONOTONIC, "anon", "file", "shmem"} (bytes) so that a
recorder's RSS time series can be compared with what the kernel's status file said then.
"""

from __future__ import annotations

import argparse
import mmap
import time

from workloads.common import emit

_FIELDS = {"RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}


def status_rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            name = line.split(maxsplit=1)[0]
            if name in _FIELDS:
                out[_FIELDS[name]] = int(line.split()[1]) * 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--step-bytes", type=int, default=3 * 1024 * 1024 + 4096 * 5)
    parser.add_argument("--pause", type=float, default=0.2)
    args = parser.parse_args()
    time.sleep(args.pause)
    held = []
    for _ in range(args.steps):
        region = mmap.mmap(-1, args.step_bytes)
        for off in range(0, args.step_bytes, mmap.PAGESIZE):
            region[off] = 1  # fault the page in
        held.append(region)
        time.sleep(args.pause)
        emit({"event": "rss", "ts_ns": time.monotonic_ns(), **status_rss()})
        time.sleep(args.pause)
    emit({"event": "done"})


if __name__ == "__main__":
    main()
