"""Writes a trace directory (DESIGN.md) safely and incrementally.

Safety: the directory is created owner-only (0700, files 0600) with mkdir, which never follows
a symlink planted at the output path, and every file is then opened relative to that directory's
descriptor with O_NOFOLLOW. Under sudo the trace is handed to the invoking user, so it can be
analysed later without root.

Durability: each flush writes one Parquet part (written to a hidden temporary name, then renamed),
and meta.json is rewritten atomically, so a recorder killed at any instant leaves a readable
prefix of the trace, marked incomplete.

Integrity: meta.json lists every part written before it (name, rows, SHA-256), with the rows
per table, so a reader can tell a trace as written from a damaged or altered one; parts
written after the last meta.json (a recorder killed between the two) are not listed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from probes.format import schema
from probes.format.errors import OutputError
from probes.format.meta import Meta, Part
from probes.format.reader import META

RESERVE = ".reserve"  # room kept for the last meta.json, removed when the trace is closed
RESERVE_BYTES = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def invoking_user() -> tuple[int, int] | None:
    """The user who ran sudo, who should own the trace."""
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if os.geteuid() == 0 and uid and gid and uid.isdigit() and gid.isdigit():
        return int(uid), int(gid)
    return None


def _is_trace_dir(path: Path) -> bool:
    try:
        with open(path / META, encoding="utf-8") as f:
            return json.load(f).get("format") == schema.FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


class TraceWriter:
    def __init__(self, path: Path, force: bool = False) -> None:
        self.path = path
        self._owner = invoking_user()
        self._parts: dict[str, int] = {}
        self._table_fds: dict[str, int] = {}
        self.rows: dict[str, int] = {name: 0 for name in schema.TABLES}
        self._written: dict[str, list[Part]] = {}  # parts on disk, by table (writer thread)
        self._meta: dict[str, object] | None = None  # the last meta.json submitted
        self._parts_since_meta = False
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=16)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="trace-writer", daemon=True)
        self._fd = -1
        parent = path.parent if str(path.parent) else Path(".")
        try:
            parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise OutputError(f"cannot use {parent} for the output: {exc.strerror}") from None
        try:
            self._fd = self._create(parent_fd, path, force)
        finally:
            os.close(parent_fd)
        self._reserved = self._reserve()
        self._thread.start()

    def _create(self, parent_fd: int, path: Path, force: bool) -> int:
        name = path.name
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            if not force:
                raise OutputError(f"{path} exists; use --force to replace it") from None
            st = os.lstat(name, dir_fd=parent_fd)
            if not stat.S_ISDIR(st.st_mode) or not _is_trace_dir(path):
                raise OutputError(
                    f"{path} exists and is not an idlebuf trace; refusing to replace it"
                ) from None
            shutil.rmtree(path)
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except OSError as exc:
            raise OutputError(f"cannot create {path}: {exc.strerror}") from None
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        os.fchmod(fd, 0o700)  # mkdir's mode is filtered by the umask
        self._chown(fd)
        return fd

    def _reserve(self) -> bool:
        """Set aside room for the last meta.json: a disk that fills during the recording
        must still take the one that lists what was written and says why it ended."""
        try:
            st = os.statvfs(self._fd)
            size = min(RESERVE_BYTES, st.f_bavail * st.f_frsize // 4)
            fd = os.open(RESERVE, _NEW_FILE, 0o600, dir_fd=self._fd)
        except OSError:
            return False
        try:
            os.posix_fallocate(fd, 0, max(size, 1))
            return True
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(RESERVE, dir_fd=self._fd)
            return False
        finally:
            os.close(fd)

    def _release(self) -> bool:
        """Give the reserved room back (for meta.json, or at the end): whether there was."""
        if not self._reserved:
            return False
        self._reserved = False
        with contextlib.suppress(OSError):
            os.unlink(RESERVE, dir_fd=self._fd)
        return True

    def _chown(self, fd: int) -> None:
        if self._owner:
            os.fchown(fd, *self._owner)

    def _write_file(self, dir_fd: int, name: str, data: bytes) -> None:
        """Write a file under a temporary name, then rename it into place; a temporary file
        that could not be completed (disk full) is removed."""
        tmp = f".{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        fd = os.open(tmp, _NEW_FILE, 0o600, dir_fd=dir_fd)
        try:
            self._chown(fd)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise

    def _write_part(self, table: str, name: str, rows: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(rows, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        self._write_file(self._table_dir(table), name, data)
        first = last = None
        if "ts_ns" in rows.schema.names and rows.num_rows:
            bounds = pc.min_max(rows["ts_ns"])
            first, last = int(bounds["min"].as_py()), int(bounds["max"].as_py())
        self._written.setdefault(table, []).append(
            Part(name, rows.num_rows, hashlib.sha256(data).hexdigest(), first, last)
        )

    # Files are written by one background thread, in submission order, so the recorder keeps
    # draining the ring buffer while Parquet compresses (pyarrow releases the GIL). A full
    # queue makes the recorder wait: the kernel then counts drops instead of memory growing.
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job()
            except OSError as exc:  # disk full, I/O error: said in one line by the caller
                self._error = OutputError(f"cannot write the trace in {self.path}: {exc.strerror}")
            except BaseException as exc:  # noqa: BLE001 - re-raised in the recorder's thread
                self._error = exc
            finally:
                self._jobs.task_done()

    def _submit(self, job: Callable[[], None]) -> None:
        self._check()
        self._jobs.put(job)

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def sync(self) -> None:
        """Wait until everything submitted is on disk."""
        self._jobs.join()
        self._check()

    def write_meta(self, meta: Meta) -> None:
        """meta.json, with the parts written before it (it is written after them)."""
        fields = meta.to_json()  # as it is now: the caller goes on changing it
        self._meta = fields
        self._submit(lambda: self._write_meta(fields))

    def write_last_meta(self, meta: Meta) -> None:
        """After a failure: meta.json saying why, listing every part that did reach the disk
        (an earlier write's error, already reported, does not stop this one)."""
        self._jobs.join()
        self._error = None
        self.write_meta(meta)
        self.sync()

    def _write_meta(self, fields: dict[str, object]) -> None:
        parts = {t: list(p) for t, p in self._written.items()}
        fields = {
            **fields,
            "parts": {t: [vars(p) for p in ps] for t, ps in parts.items()},
            "rows": {t: sum(p.rows for p in parts.get(t, [])) for t in schema.TABLES},
        }
        body = json.dumps(fields, indent=2, sort_keys=True).encode() + b"\n"
        try:
            self._write_file(self._fd, META, body)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not self._release():
                raise
            self._write_file(self._fd, META, body)
        self._parts_since_meta = False

    def append(self, table: schema.Table, rows: pa.Table) -> None:
        """Write one row group of `table` as the next part file."""
        if rows.num_rows == 0:
            return
        rows = table.conform(rows)
        part = self._parts.get(table.name, 0)
        self._parts[table.name] = part + 1
        self.rows[table.name] += rows.num_rows
        self._parts_since_meta = True
        self._submit(lambda: self._write_part(table.name, f"part-{part:06d}.parquet", rows))

    def _table_dir(self, name: str) -> int:
        dir_fd = self._table_fds.get(name)
        if dir_fd is None:
            os.mkdir(name, 0o700, dir_fd=self._fd)
            dir_fd = os.open(name, _DIR_FLAGS, dir_fd=self._fd)
            os.fchmod(dir_fd, 0o700)
            self._chown(dir_fd)
            self._table_fds[name] = dir_fd
        return dir_fd

    def discard(self) -> None:
        """Close and remove the trace: nothing was recorded (the recording could not start),
        so a retry needs no --force."""
        self._meta = None
        self.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.path)

    def close(self) -> None:
        """Wait for what was submitted; meta.json is written again if parts came after it,
        so that it lists them."""
        if self._meta is not None and self._parts_since_meta and self._error is None:
            fields = self._meta
            with contextlib.suppress(Exception):
                self._submit(lambda: self._write_meta(fields))
        if self._thread.is_alive():
            self._jobs.join()
            self._jobs.put(None)
            self._thread.join()
        self._release()
        for fd in self._table_fds.values():
            os.close(fd)
        self._table_fds.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
