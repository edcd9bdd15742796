"""Shared fixtures. Under CI (the CI variable set) a skipped BPF test fails the run: the suite
must prove the probes work on the machine, not skip them. That holds for a skip anywhere in
tests/bpf - a test's own pytest.skip, a bpf marker's skip, and a module skipped whole at
collection (importorskip, a module-level skipif)."""

from __future__ import annotations

import os

import pytest


def _bpf_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (run scripts/bootstrap)"
    if not os.path.isdir("/sys/kernel/tracing/events"):
        return "tracefs is not mounted (run scripts/bootstrap)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _bpf_unavailable()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("bpf"):
            item.add_marker(pytest.mark.skip(reason=f"BPF test: {reason}"))


def _bpf_path(nodeid: str) -> bool:
    return nodeid.replace("\\", "/").startswith("tests/bpf/") or "/tests/bpf/" in nodeid


def _fail_under_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"BPF test skipped under CI, which must prove the probes work: {report.longrepr}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    bpf = item.get_closest_marker("bpf") or _bpf_path(item.nodeid)
    if os.environ.get("CI") and report.skipped and bpf:
        _fail_under_ci(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and _bpf_path(collector.nodeid):
        _fail_under_ci(report)
