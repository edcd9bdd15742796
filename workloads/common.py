"""Small helpers shared by the workloads (they import nothing else of idlebuf)."""

from __future__ import annotations

import json
import resource
import sys
from typing import Any


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one: servers here hold thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def emit(record: dict[str, Any]) -> None:
    """One JSON object per line on stdout: how workloads report their ground truth."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
