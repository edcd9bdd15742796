"""`record -p PID --tree` without probes: the tree walk on real processes, meta.json's
targets, and the option's bad input."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from probes.attach import tree
from probes.format.meta import Meta, Targets
from tests.helpers import idlebuf


def test_the_walk_finds_every_descendant_once_parents_first(tmp_path: Path) -> None:
    # a shell with 3 children, one of which (a shell) has 2 of its own
    script = "sleep 60 & sleep 60 & sh -c 'sleep 60 & sleep 60 & wait' & wait"
    root = subprocess.Popen(["sh", "-c", script])
    order: list[int] = []
    try:
        deadline = time.monotonic() + 10
        found: list[int] = []
        while len(found) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
            found = []
            order = tree.walk([root.pid, root.pid], found.append)
        assert order == found and len(order) == 6 == len(set(order)), order
        assert order[0] == root.pid
        for pid in order[1:]:  # each after its parent
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert parent in order[: order.index(pid)]
    finally:
        for pid in reversed(order[1:]):  # the processes this test started, by their ids
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        root.kill()
        root.wait()


def test_the_walk_of_a_gone_process_is_itself() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert tree.walk([gone.pid], lambda _: None) == [gone.pid]


def test_targets_of_a_recording_made_before_tree_read_with_none() -> None:
    data = Meta(targets=Targets([42], [])).to_json()
    del data["targets"]["tree"], data["targets"]["descendants"]
    meta = Meta.from_json(data)
    assert meta.targets == Targets([42], [], tree=[], descendants=[])
    again = Meta.from_json(Meta(targets=Targets([42], [], [42], [43, 44])).to_json())
    assert again.targets.tree == [42] and again.targets.descendants == [43, 44]


def test_tree_needs_a_pid() -> None:
    done = idlebuf("record", "-o", "/nonexistent/trace", "--tree", "--duration", "1")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--tree" in done.stderr, done.stderr
