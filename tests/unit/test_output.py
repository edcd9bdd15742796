"""What idlebuf writes beside traces (reports, saved comparisons): never over an existing file
without --force, never through a link, owner-only, whole or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from idlebuf.output import check_free, output_dir, write_file
from probes.format.errors import OutputError
from tests.helpers import idlebuf
from tests.synthetic import mixed_trace


def test_a_file_is_replaced_only_with_force(tmp_path: Path) -> None:
    path = write_file(tmp_path / "report.html", "first")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(OutputError, match="exists; use --force"):
        write_file(path, "second")
    assert path.read_text() == "first"
    write_file(path, "second", force=True)
    assert path.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary left


def test_a_link_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "report.html"
    link.symlink_to(victim)
    with pytest.raises(OutputError, match="exists"):
        write_file(link, "x")
    write_file(link, "x", force=True)
    assert victim.read_text() == "keep me"
    assert not link.is_symlink() and link.read_text() == "x"


def test_a_directory_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "report.html").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        write_file(tmp_path / "report.html", "x", force=True)


def test_output_dir_refuses_a_link_and_keeps_an_existing_directory(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        output_dir(tmp_path / "link", "x-")
    assert output_dir(target, "x-") == target
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # the user's directory, untouched
    made = output_dir(tmp_path / "a" / "b", "x-")
    assert made.is_dir() and stat.S_IMODE(made.stat().st_mode) == 0o700


def test_check_free_names_the_file_in_the_way(tmp_path: Path) -> None:
    check_free(tmp_path, ["report.html"], force=False)
    os.symlink("/nonexistent", tmp_path / "report.html")  # a dangling link is in the way too
    with pytest.raises(OutputError, match="report.html exists"):
        check_free(tmp_path, ["timeline.pftrace", "report.html"], force=False)
    check_free(tmp_path, ["report.html"], force=True)


def test_compare_keeps_an_earlier_run_unless_forced(tmp_path: Path) -> None:
    trace = mixed_trace(tmp_path / "t")
    out = tmp_path / "out"
    assert idlebuf("compare", str(trace), "-o", str(out)).returncode == 0
    first = (out / "report.html").read_bytes()
    (out / "report.html").write_text("the user's edits")
    again = idlebuf("compare", str(trace), "-o", str(out))
    assert again.returncode == 4, again.stderr
    assert again.stderr.count("\n") == 1 and "--force" in again.stderr
    assert (out / "report.html").read_text() == "the user's edits"
    assert idlebuf("compare", str(trace), "-o", str(out), "--force").returncode == 0
    assert (out / "report.html").read_bytes() == first
