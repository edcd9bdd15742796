"""Files idlebuf writes beside traces (reports, timelines, saved comparisons), by the rules the
trace writer follows: whole or not at all (a temporary name, then a rename), never over an
existing file without --force, never through a symbolic link, owner-only (0700 directories,
0600 files), and owned by the user who ran sudo rather than by root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from probes.format.errors import OutputError
from probes.format.writer import invoking_user

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def give_away(fd: int) -> None:
    owner = invoking_user()
    if owner:
        os.fchown(fd, *owner)


def output_dir(path: Path | None, prefix: str) -> Path:
    """`path` (created owner-only if needed; an existing one must be a real directory, not a
    link to one), or a new private directory under the temp dir."""
    created = True
    try:
        if path is None:
            path = Path(tempfile.mkdtemp(prefix=prefix))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                created = False  # the user's directory: its owner and mode stay as they are
        fd = os.open(path, _DIR)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OutputError(
                f"{path} is not a directory (or is a symbolic link): refused"
            ) from None
        raise OutputError(f"cannot create {path or prefix}: {exc.strerror}") from None
    try:
        if created:
            give_away(fd)
    finally:
        os.close(fd)
    return path


def check_free(directory: Path, names: Iterable[str], force: bool) -> None:
    """OutputError before any work if one of `names` exists in `directory` and `force` is
    not given."""
    if force:
        return
    for name in names:
        if os.path.lexists(directory / name):
            raise OutputError(f"{directory / name} exists; use --force to replace it")


def write_file(path: Path, data: str | bytes, force: bool = False) -> Path:
    """Write `path` through a temporary name and a rename, so a reader never sees half a
    file; an existing `path` is replaced only with `force` (and never followed if a link)."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        dir_fd = os.open(path.parent, _DIR)
    except OSError as exc:
        raise OutputError(f"cannot write into {path.parent}: {exc.strerror}") from None
    tmp = f".{path.name}.tmp"
    try:
        try:
            st = os.lstat(path.name, dir_fd=dir_fd)
        except FileNotFoundError:
            st = None
        if st is not None and not force:
            raise OutputError(f"{path} exists; use --force to replace it")
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{path} is a directory: refused")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            give_away(fd)
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            os.rename(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        os.close(dir_fd)
    return path
