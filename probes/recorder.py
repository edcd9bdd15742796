"""A recording session: attach the probes to target processes, stream records to a trace directory.

Targets are live processes (`pids`, all their threads, including threads created later) or a
command the recorder launches and traces from its first instruction, children included. The
session stops on its duration, on SIGINT/SIGTERM or when every target has exited, and always
finalizes the trace; records are flushed in bounded groups while it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from probes import features, layout, residency, scan
from probes.btf import BTF, BTFError
from probes.buffer_rings import BufferRingWatcher
from probes.loader import ProbeError, ReadProbeOptions, ReadProbes
from probes.residency import BufferTracker
from probes.socket_memory import SocketSampler
from probes.trace_writer import TraceWriter

VERSION = "0.1.0"
SMALL_BATCH = 16384
BATCH_PAUSE_S = 0.003
EXIT_QUIET_S = 0.3  # after the targets exit: stop once no event came for this long...
EXIT_GRACE_S = 3.0  # ...or after this long at most


class RecordError(Exception):
    """The recording cannot start; the message says why in one line."""


@dataclass
class RecordConfig:
    output: Path
    pids: list[int] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    duration: float | None = None
    force: bool = False
    flush_rows: int = 100_000  # a row group is written at least this often...
    flush_interval: float = 1.0  # ...and at least every this many seconds
    # switch tracing off and on every this many seconds (measuring what tracing costs)
    alternate: float | None = None
    probe_options: ReadProbeOptions = field(default_factory=ReadProbeOptions)


@dataclass
class RecordSummary:
    output: Path
    posts: int
    completions: int
    drops: dict[str, int]
    elapsed: float
    stop_reason: str
    exit_code: int | None = None  # the launched command's, if any


def _now_ns() -> int:
    return time.monotonic_ns()  # the clock of bpf_ktime_get_ns


def _proc_text(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def check_targets(pids: list[int]) -> None:
    for pid in pids:
        if pid <= 0 or not _alive(pid):
            raise RecordError(f"no process with PID {pid}")


class _Stop:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so the trace is always finalized."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        self.reason = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def split_by_kind(records: np.ndarray) -> dict[int, np.ndarray]:
    """The records of each kind, in their original order: one stable sort of the batch as
    raw bytes (moving structured records field by field is several times slower), then a
    contiguous slice per kind."""
    kinds = records["kind"]
    order = np.argsort(kinds, kind="stable")
    raw = records.view(np.dtype((np.void, records.dtype.itemsize)))
    ordered = raw[order].view(records.dtype)
    sorted_kinds = kinds[order]
    present = np.unique(sorted_kinds)
    starts = np.searchsorted(sorted_kinds, present, side="left")
    ends = np.searchsorted(sorted_kinds, present, side="right")
    return {int(k): ordered[a:b] for k, a, b in zip(present.tolist(), starts, ends)}


def write_records(writer: TraceWriter, by_kind: dict[int, np.ndarray]) -> None:
    """Each kind's wire records as rows of its table (split_by_kind's output)."""
    for kind, records in by_kind.items():
        table = layout.TABLE_OF_KIND[layout.Kind(kind)]
        writer.append(table, pa.table({c.name: records[c.wire] for c in table.columns if c.wire}))


def check_machine() -> None:
    """RecordError, in one sentence, if this machine or user cannot record."""
    if not features.has_tracing_privileges():
        raise RecordError("recording needs root (or CAP_BPF+CAP_PERFMON+CAP_SYS_PTRACE)")
    if features.tracefs() is None:
        raise RecordError("tracefs is not mounted: run scripts/bootstrap (or mount it)")
    for name in features.REQUIRED_TRACEPOINTS:
        if not features.tracepoint_present(name):
            raise RecordError(f"this kernel has no tracepoint {name.replace('/', ':')}")
    if features.kernel_version() < (5, 8):
        raise RecordError(f"kernel {features.platform.release()} is too old: idlebuf needs 5.8+")


class Recorder:
    def __init__(
        self,
        config: RecordConfig,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.progress = progress
        self._batches: list[np.ndarray] = []
        self._buffered = 0
        self._known_pids: set[int] = set()
        self._processes: list[dict[str, Any]] = []
        self._posts = 0
        self._completions = 0
        self._rings = BufferRingWatcher()
        self._sockets: SocketSampler | None = None
        self._buffers: BufferTracker | None = None
        self._stack_ids: set[tuple[int, int]] = set()  # (pid, stack id + 1) of allocations
        self._target_pids: list[int] = []
        self._probes: ReadProbes | None = None
        self._alternations: list[dict[str, Any]] = []  # --alternate: when tracing switched

    # --- set-up -------------------------------------------------------------------------
    def _preflight(self) -> None:
        cfg = self.config
        if bool(cfg.pids) == bool(cfg.command):
            raise RecordError("give either -p PID or -- COMMAND (not both, not neither)")
        check_machine()
        check_targets(cfg.pids)

    def _meta(self, complete: bool, probes: ReadProbes | None, extra: dict[str, Any]) -> dict:
        counters = probes.counter_values() if probes else {}
        drops = {c.name.lower(): counters.get(c.name.lower(), 0) for c in layout.DROP_COUNTERS}
        return {
            **self._static_meta,
            "probes": {
                "reads": {
                    "attached": probes is not None,
                    "cflags": probes.cflags if probes else [],
                    "uring": probes.uring_status if probes else "not loaded",
                    "wait_hooks": probes.wait_hooks if probes else None,
                    "events": {"posts": self._posts, "completions": self._completions},
                    "kernel_counts": counters,
                }
            },
            "drops": drops,
            **(
                {"alternate_s": self.config.alternate, "alternations": self._alternations}
                if self.config.alternate
                else {}
            ),
            "rows": self._writer.rows,
            "complete": complete,
            **extra,
        }

    # --- the stream -----------------------------------------------------------------------
    def _take(self, batch: np.ndarray) -> None:
        if batch.size == 0:
            return
        self._batches.append(batch)
        self._buffered += batch.size
        for pid in np.unique(batch["pid"]).tolist():
            self._note_process(int(pid), int(batch["ts_ns"][0]))

    def _note_process(self, pid: int, ts: int) -> None:
        if pid in self._known_pids:
            return
        self._known_pids.add(pid)
        comm = _proc_text(pid, "comm")
        self._processes.append(
            {
                "pid": pid,
                "comm": comm,
                "cmdline": _proc_text(pid, "cmdline")[:4096],
                "first_seen_ns": ts,
            }
        )

    def _flush(self) -> None:
        probes = self._probes
        # --alternate: while switched off, nothing is sampled either
        sampling = probes is None or not probes.paused
        if probes is not None and probes.options.min_wait_ns and sampling:
            # --min-wait: calls still waiting are recorded by this sweep, not at entry
            waiting = probes.sweep_waiting(_now_ns())
            if waiting:
                self._take(layout.wire_records(waiting))
        if self._batches:
            records = np.concatenate(self._batches)
            self._batches, self._buffered = [], 0
            by_kind = split_by_kind(records)
            empty = records[:0]
            self._rings.note(by_kind.get(layout.Kind.BUFFER_GROUP, empty))
            allocs = by_kind.get(layout.Kind.ALLOC, empty)
            if allocs.size:
                self._stack_ids.update(zip(allocs["pid"].tolist(), allocs["key"].tolist()))
            posts = by_kind.get(layout.Kind.POST, empty)
            completions = by_kind.get(layout.Kind.COMPLETE, empty)
            if self._buffers is not None:
                self._buffers.note(posts, completions)
            write_records(self._writer, by_kind)
            self._posts += posts.size
            self._completions += completions.size
        if self._sockets is not None and sampling:
            rows = self._sockets.sample(self._live_targets(), _now_ns())
            if rows:
                self._writer.append(
                    layout.SOCKETS, pa.Table.from_pylist(rows, schema=layout.SOCKETS.arrow_schema())
                )
        rings = self._rings.snapshot(_now_ns()) if sampling else []
        if rings:
            self._writer.append(
                layout.BUFFER_RINGS,
                pa.Table.from_pylist(rings, schema=layout.BUFFER_RINGS.arrow_schema()),
            )
        if self._processes:
            self._writer.append(
                layout.PROCESSES,
                pa.Table.from_pylist(self._processes, schema=layout.PROCESSES.arrow_schema()),
            )
            self._processes = []

    def _scan_blocked(self, probes: ReadProbes, pid: int) -> None:
        """Seed the in-flight table and the trace with reads blocked before tracing began."""
        found = []
        for read in scan.blocked_reads(pid, probes.options.max_iov):
            ts = _now_ns()
            flags = read.flags | layout.PostFlag.SCANNED
            if not probes.track_inflight(
                read.tid, read.fd, read.addr, read.length, read.op, flags, read.nvec, ts, pid
            ):
                continue  # the probes saw this read enter: they already have it
            if scan.syscall_of(pid, read.tid) != read.call:
                # It returned while we looked: undo, unless the probes already replaced it.
                if (probes.inflight_flags(read.tid) or 0) & layout.PostFlag.SCANNED:
                    probes.forget_inflight(read.tid)
                continue
            found.append(
                {
                    "ts_ns": ts,
                    "key": read.tid,
                    "addr": read.addr,
                    "value": read.length,
                    "pid": pid,
                    "tid": read.tid,
                    "fd": read.fd,
                    "flags": flags,
                    "nvec": read.nvec,
                    "op": read.op,
                    "kind": layout.Kind.POST,
                    "source": layout.Source.SYSCALL,
                }
            )
        if found:
            self._take(layout.wire_records(found))

    # --- the session ------------------------------------------------------------------------
    def run(self) -> RecordSummary:
        cfg = self.config
        self._preflight()
        try:
            self._btf = BTF.load()  # parsed once: the checks and the probes both need it
        except BTFError as exc:
            raise RecordError(f"kernel BTF is needed for structure offsets: {exc}") from None
        self._static_meta: dict[str, Any] = {
            "format": layout.FORMAT_NAME,
            "format_version": layout.FORMAT_VERSION,
            "idlebuf_version": VERSION,
            "host": features.host_facts(),
            "features": {c.name: c.ok for c in features.run_checks(self._btf)},
            "clock": {"monotonic_ns": _now_ns(), "realtime_ns": time.time_ns()},
            "targets": {"pids": cfg.pids, "command": cfg.command},
        }
        self._writer = TraceWriter(cfg.output, cfg.force)
        # Signals are caught from here on: one that arrives while the probes compile ends
        # the session as soon as they are loaded, with the trace finalized.
        try:
            with _Stop() as stop:
                return self._run(stop)
        except RecordError:
            raise
        except Exception as exc:
            # A bug must not cost the user what was recorded: keep what is buffered and say
            # in meta.json why the trace is incomplete.
            self._salvage(exc)
            raise
        finally:
            self._writer.close()

    def _salvage(self, exc: Exception) -> None:
        # the original error is the one to report, not one met while salvaging
        with contextlib.suppress(Exception):
            self._flush()
        with contextlib.suppress(Exception):
            self._writer.write_meta(self._meta(False, None, {"error": repr(exc)[:500]}))
            self._writer.sync()

    def _run(self, stop: _Stop) -> RecordSummary:
        cfg = self.config
        self._writer.write_meta(self._meta(False, None, {}))
        options = cfg.probe_options
        if cfg.command:
            options = ReadProbeOptions(**{**options.__dict__, "follow_children": True})
        try:
            probes = ReadProbes(options, self._btf)
        except ProbeError as exc:
            raise RecordError(str(exc)) from None

        child: Child | None = None
        started = time.monotonic()
        self._static_meta["tracing_since_ns"] = _now_ns()
        try:
            if cfg.command:
                child = _launch_paused(cfg.command, lambda pid: self._attach(probes, pid))
                self._note_process(child.pid, _now_ns())
            else:
                for pid in cfg.pids:
                    self._attach(probes, pid)
                    self._note_process(pid, _now_ns())
                for pid in cfg.pids:
                    self._scan_blocked(probes, pid)
                self._static_meta["uring_before_attach"] = [
                    pid for pid in cfg.pids if scan.has_io_uring(pid)
                ]
            self._writer.write_meta(self._meta(False, probes, {}))
            stop_reason = self._stream(probes, stop, child, started)
            # A final drain after the loop: what the kernel emitted up to the stop.
            self._take(probes.drain())
            self._flush()
            if self._buffers is not None:  # while the targets still run
                self._measure_buffers(probes)
            exit_code = _finish_child(child, probes)
            elapsed = time.monotonic() - started
            meta = self._meta(
                True,
                probes,
                {
                    "stop_reason": stop_reason,
                    "elapsed_s": round(elapsed, 3),
                    "end_monotonic_ns": _now_ns(),
                },
            )
            self._writer.write_meta(meta)
            self._writer.sync()
            return RecordSummary(
                cfg.output,
                self._posts,
                self._completions,
                meta["drops"],
                elapsed,
                stop_reason,
                exit_code,
            )
        finally:
            if child is not None and child.poll() is None:
                child.signal(signal.SIGKILL)
                child.wait()
            probes.close()
            if self._sockets is not None:
                self._sockets.close()

    def _measure_buffers(self, probes: ReadProbes) -> None:
        """Residency of the buffers that matter and the allocation stacks, symbolized:
        both need the processes alive, so they are taken as the recording ends."""
        assert self._buffers is not None
        rows = residency.measure(self._buffers.ranges())
        if rows:
            schema = layout.RESIDENCY.arrow_schema()
            self._writer.append(layout.RESIDENCY, pa.Table.from_pylist(rows, schema=schema))
        stacks = []
        for pid, stack_id in sorted(self._stack_ids):
            if stack_id:
                frames, symbols = probes.stack(stack_id, pid)
                stacks.append(
                    {"pid": pid, "stack_id": stack_id, "frames": frames, "symbols": symbols}
                )
        if stacks:
            schema = layout.STACKS.arrow_schema()
            self._writer.append(layout.STACKS, pa.Table.from_pylist(stacks, schema=schema))

    def _live_targets(self) -> list[int]:
        """The targets now: those given or launched, and the children followed in the kernel."""
        pids = set(self._target_pids)
        if self._probes is not None and self._probes.options.follow_children:
            pids |= {p for p in self._probes.target_pids() if _is_process(p)}
        return sorted(p for p in pids if _alive(p))

    def _attach(self, probes: ReadProbes, pid: int) -> None:
        """Make `pid` a target; with the memory side, probe the allocator it uses."""
        probes.add_target(pid)
        self._probes = probes
        self._target_pids.append(pid)
        if probes.options.min_wait_ns:
            self._static_meta["min_wait_ns"] = probes.options.min_wait_ns
        if probes.options.memory:
            if self._sockets is None:
                self._sockets = SocketSampler()
                self._buffers = BufferTracker()
            memory = self._static_meta.setdefault(
                "memory",
                {
                    "min_alloc": probes.options.min_alloc,
                    "sample_every": probes.options.sample_every,
                    "allocators": [],
                },
            )
            memory["allocators"].append(probes.attach_allocator(pid))

    def _stream(self, probes: ReadProbes, stop: _Stop, child: Child | None, started: float) -> str:
        """Drain and flush until a stop condition holds; returns why it stopped."""
        cfg = self.config
        last_flush = time.monotonic()
        exited_at: float | None = None
        last_event = last_flush
        next_switch = None
        if cfg.alternate:
            at = self._static_meta["tracing_since_ns"]
            self._alternations.append({"from_ns": at, "to_ns": _now_ns(), "tracing": True})
            next_switch = last_flush + cfg.alternate
        while True:
            probes.wait(0.05 if exited_at else 0.1)
            batch = probes.drain()
            self._take(batch)
            now = time.monotonic()
            if batch.size:
                last_event = now
            if 0 < batch.size < SMALL_BATCH:
                # Under a steady stream every drain would take a few records: let them pile up
                # (the ring holds ~200k) so that decoding works on large batches.
                time.sleep(BATCH_PAUSE_S)
            if self._buffered >= cfg.flush_rows or now - last_flush >= cfg.flush_interval:
                self._flush()
                self._writer.write_meta(self._meta(False, probes, {}))
                last_flush = now
                if self.progress:
                    self.progress(self._status(now - started, probes))
            if next_switch is not None and now >= next_switch:
                self._switch_tracing(probes)
                next_switch = time.monotonic() + (cfg.alternate or 0)
            if stop.reason:
                return stop.reason
            if cfg.duration is not None and now - started >= cfg.duration:
                return "duration"
            if exited_at is None and (
                child.poll() is not None if child else not any(_alive(p) for p in cfg.pids)
            ):
                exited_at = now
            # The kernel cancels an exited process's io_uring requests from a worker, a little
            # later: keep draining until it has been quiet for a moment.
            if exited_at is not None and (
                now - last_event >= EXIT_QUIET_S or now - exited_at >= EXIT_GRACE_S
            ):
                return "all targets exited"

    def _switch_tracing(self, probes: ReadProbes) -> None:
        """--alternate: tracing off, or on again (with the reads already waiting found by the
        /proc scan, as on attaching); when the switch began and ended goes to meta.json."""
        began = _now_ns()
        if probes.paused:
            probes.resume()
            for pid in self._live_targets():
                self._scan_blocked(probes, pid)
        else:
            # what the traced stretch produced is written now, not during the untraced one
            self._take(probes.drain())
            self._flush()
            probes.pause()
        self._alternations.append(
            {"from_ns": began, "to_ns": _now_ns(), "tracing": not probes.paused}
        )

    def _status(self, elapsed: float, probes: ReadProbes) -> str:
        drops = sum(v for k, v in probes.counter_values().items() if k.endswith("_full"))
        return (
            f"{elapsed:6.1f}s  posts {self._posts:,}  completions {self._completions:,}  "
            f"drops {drops:,}"
        )


class Child:
    """A command the recorder launched (a forked process, so it can be held before exec)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
        return self.returncode

    def signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


def _launch_paused(command: list[str], attach: Callable[[int], None]) -> Child:
    """Start `command` held before exec, `attach` the probes to it, then let it exec.

    The forked child waits on a pipe until its pid is in the target table, so the probes see
    the command from its first instruction. A second, close-on-exec pipe reports exec failure.
    """
    gate_r, gate_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: wait for the gate, then become the command
        try:
            os.close(gate_w)
            os.close(err_r)
            os.read(gate_r, 1)
            os.close(gate_r)
            os.execvp(command[0], command)
        except OSError as exc:
            os.write(err_w, (exc.strerror or "exec failed").encode())
        finally:
            os._exit(127)
    os.close(gate_r)
    os.close(err_w)
    child = Child(pid)
    try:
        attach(pid)
    finally:
        os.write(gate_w, b"g")
        os.close(gate_w)
    with os.fdopen(err_r, "rb") as err:
        failure = err.read().decode(errors="replace")
    if failure:
        child.wait()
        raise RecordError(f"cannot run {command[0]}: {failure}")
    return child


def _finish_child(child: Child | None, probes: ReadProbes, grace: float = 3.0) -> int | None:
    """Stop a launched command that is still running, and the children it started."""
    if child is None:
        return None
    others = [p for p in probes.target_pids() if p != child.pid and _is_process(p)]
    if child.poll() is None or any(_alive(p) for p in others):
        child.signal(signal.SIGTERM)
        for pid in others:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        child.wait(grace)
        while any(_alive(p) for p in others) and time.monotonic() < deadline:
            time.sleep(0.02)
        child.signal(signal.SIGKILL)
        for pid in others:
            if _alive(pid):
                _kill(pid, signal.SIGKILL)
        child.wait()
    return child.returncode


def _is_process(pid: int) -> bool:
    """A thread-group leader (the target table also holds thread ids of followed children)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            return any(line.split() == ["Tgid:", str(pid)] for line in f)
    except OSError:
        return False


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
