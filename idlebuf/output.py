"""Files idlebuf writes beside traces (reports, timelines): whole or not at all, and owned by
the user who ran sudo rather than by root."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from probes.format.errors import OutputError
from probes.format.writer import invoking_user


def give_away(path: Path) -> None:
    owner = invoking_user()
    if owner:
        os.chown(path, *owner, follow_symlinks=False)


def output_dir(path: Path | None, prefix: str) -> Path:
    """`path` (created if needed), or a new private directory under the temp dir."""
    try:
        if path is None:
            path = Path(tempfile.mkdtemp(prefix=prefix))
        else:
            path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {path or prefix}: {exc.strerror}") from None
    give_away(path)
    return path


def write_file(path: Path, data: str | bytes) -> Path:
    """Write through a temporary name and rename, so a reader never sees half a file."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        give_away(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    return path
