"""Under CI a skipped BPF test is a failure, however it was skipped (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"

SKIPPED_MODULES = {
    "importorskip": "import pytest\npytest.importorskip('no_such_module_23')\n"
    "def test_x():\n    pass\n",
    "module skipif": "import pytest\npytestmark = pytest.mark.skipif(True, reason='r')\n"
    "def test_x():\n    pass\n",
    "a test's own skip": "import pytest\ndef test_x():\n    pytest.skip('r')\n",
}


@pytest.mark.parametrize("how", SKIPPED_MODULES)
def test_a_skip_in_tests_bpf_fails_under_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    (pytester.path / "tests" / "bpf").mkdir(parents=True)
    (pytester.path / "tests" / "bpf" / "test_probe.py").write_text(SKIPPED_MODULES[how])
    (pytester.path / "tests" / "unit").mkdir()
    (pytester.path / "tests" / "unit" / "test_plain.py").write_text(SKIPPED_MODULES[how])
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest("-p", "no:cacheprovider", "tests")
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped") == 1, result.stdout.str()  # tests/unit: a skip is a skip
    assert outcomes.get("failed", 0) + outcomes.get("errors", outcomes.get("error", 0)) == 1
    assert "BPF test skipped under CI" in result.stdout.str()
    monkeypatch.delenv("CI")
    assert pytester.runpytest("-p", "no:cacheprovider", "tests").parseoutcomes() == {"skipped": 2}
