"""Shared fixtures. Under CI (the CI variable set) a skipped BPF test fails the run: the suite
must prove the probes work on the machine, not skip them."""

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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and item.get_closest_marker("bpf"):
        report.outcome = "failed"
        report.longrepr = (
            f"BPF test skipped under CI, which must prove the probes work: {report.longrepr}"
        )
