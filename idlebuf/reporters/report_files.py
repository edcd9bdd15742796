"""The files a comparison is reported in beside its traces: the HTML page and the Perfetto
timeline."""

from __future__ import annotations

from pathlib import Path

from idlebuf.experiments.comparison import Comparison
from idlebuf.output import write_file
from idlebuf.reporters.html import comparison_html
from idlebuf.reporters.perfetto import timeline_trace

REPORT_FILES = ("report.html", "timeline.pftrace")


def write_reports(comparison: Comparison, directory: Path, title: str) -> dict[str, str]:
    """A comparison's HTML page and Perfetto timeline, written into `directory` (replacing
    them: callers check first, with output.check_free and REPORT_FILES): their paths as
    {"report", "timeline"}."""
    report = write_file(directory / "report.html", comparison_html(comparison, title), force=True)
    timeline = write_file(
        directory / "timeline.pftrace",
        timeline_trace(comparison.timelines, comparison.pids()).SerializeToString(),
        force=True,
    )
    return {"report": str(report), "timeline": str(timeline)}
