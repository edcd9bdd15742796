"""Resident memory from kmem:rss_stat against /proc/PID/status read by the process itself.

The workload grows in 7 steps of 3 MiB + 5 pages and reads its own status after each. The
tracepoint reports the kernel's fast per-CPU counter (percpu_counter_read), which lags the exact
sum /proc shows by less than the counter's batch on each CPU: that is the tolerance, about 2
pages in practice and 256 KiB at most on this 2-CPU machine (the steps are 3 MiB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from probes.format.reader import open_trace
from probes.format.schema import RssMember
from tests.helpers import ROOT

pytestmark = pytest.mark.bpf

STEPS = 7
PAGE = 4096
CPUS = os.cpu_count() or 1
# lib/percpu_counter.c: percpu_counter_batch = max(32, 2 * num_online_cpus()), per CPU
TOLERANCE = max(32, 2 * CPUS) * CPUS * PAGE


def test_rss_agrees_with_proc_status(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "idlebuf",
            "record",
            "-o",
            str(trace),
            "--memory",
            "--",
            sys.executable,
            "-m",
            "workloads.memory_steps",
            "--steps",
            str(STEPS),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    samples = [json.loads(line) for line in done.stdout.splitlines()]
    samples = [s for s in samples if s["event"] == "rss"]
    assert len(samples) == STEPS

    t = open_trace(trace)
    pid = int(t["processes"]["pid"].iloc[0])
    rss = t["rss"][t["rss"]["pid"] == pid].sort_values("ts_ns")
    rss = rss[rss["mm_id"] == rss["mm_id"].iloc[-1]]  # after exec
    members = {"anon": RssMember.ANON, "file": RssMember.FILE, "shmem": RssMember.SHMEM}
    for sample in samples:
        for name, member in members.items():
            before = rss[(rss["member"] == member) & (rss["ts_ns"] <= sample["ts_ns"])]
            traced = int(before["bytes"].iloc[-1]) if len(before) else 0
            assert abs(traced - sample[name]) < TOLERANCE, (name, sample, traced)
    assert samples[-1]["shmem"] - samples[0]["shmem"] >= (STEPS - 1) * 3 * 1024 * 1024
