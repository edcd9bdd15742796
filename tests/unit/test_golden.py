"""Diff tests: whole outputs of `idlebuf report` from tiny synthetic traces, pinned in
tests/golden/. A change in any figure, key or line shows up here; when the change is meant,
regenerate with IDLEBUF_UPDATE_GOLDEN=1 and review the diff."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import idlebuf
from tests.synthetic import late_trace, mixed_trace, server_trace, walked_trace

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
UPDATE = bool(os.environ.get("IDLEBUF_UPDATE_GOLDEN"))


def trace(base: Path, which: str) -> Path:
    if which == "mixed":
        return mixed_trace(base / which)
    if which == "late":
        return late_trace(base / which)
    if which == "walked":
        return walked_trace(base / which)
    return server_trace(base / which, 4243, 23, 3, 4099, queued=False)


def check(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    expected = path.read_text()
    if name.endswith(".json"):
        assert json.loads(text) == json.loads(expected), f"{name} differs from the golden file"
    else:
        assert text == expected, f"{name} differs from the golden file"


@pytest.mark.parametrize("which", ["mixed", "readiness", "late", "walked"])
def test_report_json_matches_the_golden_file(tmp_path: Path, which: str) -> None:
    path = trace(tmp_path, which)
    done = idlebuf("report", "--json", "--connections", "--timeline", "0.5", str(path))
    assert done.returncode == 0, done.stderr
    check(f"report-{which}.json", done.stdout)


@pytest.mark.parametrize("which", ["mixed", "late", "walked"])
def test_report_text_matches_the_golden_file(tmp_path: Path, which: str) -> None:
    path = trace(tmp_path, which)
    done = idlebuf("report", str(path))
    assert done.returncode == 0, done.stderr
    check(f"report-{which}.txt", done.stdout.replace(str(path), "TRACE"))
