"""The JSON reporter: results as the JSON documents `--json` prints (keys in README.md)."""

from __future__ import annotations

import json
from typing import Any

from analysis.results import TraceSummary, to_json
from idlebuf.experiments.comparison import Comparison


def report_json(summary: TraceSummary, connections: bool = False) -> str:
    """`idlebuf report --json`: with `connections`, each process's per-connection table."""
    return json.dumps(summary.to_json(connections), indent=2)


def rows_json(comparison: Comparison, **extra: Any) -> str:
    """`idlebuf compare --json` and `demo --json`: the rows, and where the files went."""
    return json.dumps({"rows": to_json(comparison.rows), **extra}, indent=2)


def dumps(document: Any) -> str:
    return json.dumps(document, indent=2)
