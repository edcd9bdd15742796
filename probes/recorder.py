"""A recording: attach the probes to target processes and stream their events to a trace
directory, with the state found at attach and the measurements taken at the end.

Targets are live processes (`pids`, all their threads, including threads created later;
with `tree`, every descendant too: those found at attach (probes.attach.tree) and those
forked while recording) or a command the recorder launches (probes.launch) and traces from
its first instruction, children included. The loop (probes.session) stops on the duration,
on SIGINT/SIGTERM or when every target has exited; the trace is finalized in every case,
and a bug keeps what was recorded. What the targets held before tracing began comes from
probes.attach.seeding; the memory side (`--memory`) is probes.memory_side's.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Union

import numpy as np

from probes import features, session
from probes.attach import process, seeding, tree
from probes.batches import split_by_kind, write_records, write_rows
from probes.btf import BTF
from probes.buffer_rings import BufferRingWatcher
from probes.format import schema
from probes.format.errors import IdlebufError, ProbeError, RecordError
from probes.format.meta import Clock, EventCounts, Meta, Probes, ProbeState, Switch, Targets
from probes.format.writer import TraceWriter
from probes.launch import Child, alive, check_targets, finish_child, is_process, launch_paused
from probes.launch import proc_text as _proc_text
from probes.loader import ProbeOptions
from probes.loader import Probes as LoadedProbes
from probes.memory_side import MemorySide

__all__ = ["RecordConfig", "RecordError", "RecordSummary", "Recorder"]

VERSION = "0.1.0"
# what signal.signal() returns: the handler that was in place
_Handler = Union[Callable[[int, Union[FrameType, None]], object], int, signal.Handlers, None]


@dataclass
class RecordConfig:
    output: Path
    pids: list[int] = field(default_factory=list)
    # with pids: every descendant of each is a target too (at attach and forked later)
    tree: bool = False
    command: list[str] = field(default_factory=list)
    duration: float | None = None
    force: bool = False
    flush_rows: int = 100_000  # a row group is written at least this often...
    flush_interval: float = 1.0  # ...and at least every this many seconds
    # switch tracing off and on every this many seconds (measuring what tracing costs)
    alternate: float | None = None
    probe_options: ProbeOptions = field(default_factory=ProbeOptions)

    def pacing(self) -> session.Pacing:
        return session.Pacing(
            duration=self.duration,
            flush_rows=self.flush_rows,
            flush_interval=self.flush_interval,
            alternate=self.alternate,
        )


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


class _Stop:
    """Turns SIGINT, SIGTERM and SIGHUP (a closed terminal) into a flag the loop checks, so
    the trace is always finalized."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, _Handler] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        self.reason = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Recorder:
    """One recording. Towards the loop (probes.session) it is the Sink: it takes drained
    batches, flushes them as table parts, switches tracing and says when targets exited."""

    def __init__(
        self,
        config: RecordConfig,
        progress: Callable[[str], None] | None = None,
        clock: session.Clock | None = None,
    ) -> None:
        self.config = config
        self.progress = progress
        self.clock = clock or session.SystemClock()
        self._batches: list[np.ndarray] = []
        self._buffered = 0
        self._known: dict[int, str] = {}  # pid -> comm as last noted
        self._processes: list[dict[str, str | int]] = []  # rows of the processes table
        self._posts = 0
        self._completions = 0
        self._rings = BufferRingWatcher()
        self._memory: MemorySide | None = None  # record --memory, from the first attach
        self._target_pids: list[int] = []
        self._probes: LoadedProbes | None = None
        self._child: Child | None = None
        self._started = False  # the targets are attached: from now on the trace is kept
        self._counters: dict[str, int] = {}  # the kernel's counters, as last read
        self.meta = Meta()

    # --- set-up -------------------------------------------------------------------------
    def _preflight(self) -> None:
        cfg = self.config
        if bool(cfg.pids) == bool(cfg.command):
            raise RecordError("give either -p PID or -- COMMAND (not both, not neither)")
        if cfg.tree and not cfg.pids:
            raise RecordError("--tree applies to -p PID targets only")
        features.preflight()
        check_targets(cfg.pids)
        if cfg.command and shutil.which(cfg.command[0]) is None:
            raise RecordError(f"cannot run {cfg.command[0]}: no such executable")

    def _write_meta(self, complete: bool = False, last: bool = False) -> None:
        """meta.json as things are now (the writer serializes it at once); `last`: the one
        written after a failure, whatever an earlier write met."""
        probes, meta = self._probes, self.meta
        counters = self._counters
        if probes is not None and not probes.closed:
            counters = self._counters = probes.counter_values()
        meta.probes = Probes(
            ProbeState(
                attached=probes is not None,
                cflags=probes.cflags if probes else [],
                uring=probes.uring_status if probes else "not loaded",
                wait_hooks=probes.wait_hooks if probes else None,
                events=EventCounts(self._posts, self._completions),
                kernel_counts=counters,
            )
        )
        meta.drops = {c.name.lower(): counters.get(c.name.lower(), 0) for c in schema.DROP_COUNTERS}
        meta.rows = dict(self._writer.rows)
        meta.complete = complete
        if last:
            self._writer.write_last_meta(meta)
        else:
            self._writer.write_meta(meta)

    # --- the sink the loop feeds ------------------------------------------------------------
    @property
    def buffered(self) -> int:
        return self._buffered

    def take(self, batch: np.ndarray) -> None:
        if batch.size == 0:
            return
        self._batches.append(batch)
        self._buffered += batch.size
        for pid in np.unique(batch["pid"]).tolist():
            self._note_process(int(pid), int(batch["ts_ns"][0]))

    def flush(self, elapsed: float) -> None:
        self._flush()
        self._write_meta()
        if self.progress and self._probes is not None:
            self.progress(self._status(elapsed, self._probes))

    def sample(self) -> None:
        """Between flushes: a memory point for each target whose open files changed."""
        probes = self._probes
        if self._memory is None or probes is None or probes.paused:
            return
        self._memory.sample(self._live_targets())

    def targets_exited(self) -> bool:
        if self._child is not None:
            return self._child.poll() is not None
        if self.config.tree:  # a tree whose root exits goes on with the rest
            return not self._live_targets()
        return not any(alive(p) for p in self.config.pids)

    def switch_tracing(self) -> None:
        """--alternate: tracing off, or on again (with the reads already waiting found by the
        /proc scan, as on attaching); when the switch began and ended goes to meta.json."""
        probes = self._probes
        assert probes is not None
        began = _now_ns()
        if probes.paused:
            probes.resume()
            for pid in self._live_targets():
                self.take(seeding.blocked_reads(probes, pid, _now_ns))
        else:
            # what the traced stretch produced is written now, not during the untraced one
            self.take(probes.drain())
            self._flush()
            probes.pause()
        assert self.meta.alternations is not None
        self.meta.alternations.append(Switch(began, _now_ns(), not probes.paused))

    # --- what the recorder writes besides the events -----------------------------------------
    def _note_process(self, pid: int, ts: int) -> None:
        if pid in self._known:
            return
        self._note_name(pid, ts)

    def _note_name(self, pid: int, ts: int) -> None:
        comm = _proc_text(pid, "comm")
        self._known[pid] = comm
        self._processes.append(
            {
                "pid": pid,
                "comm": comm,
                "cmdline": _proc_text(pid, "cmdline")[:4096],
                "first_seen_ns": ts,
            }
        )

    def _renamed(self) -> None:
        """A target that exec'd since it was noted is noted again, under its new name."""
        now = _now_ns()
        for pid in self._live_targets():
            comm = _proc_text(pid, "comm")
            if comm and self._known.get(pid) not in (None, comm):
                self._note_name(pid, now)

    def _flush(self) -> None:
        probes = self._probes
        # --alternate: while switched off, nothing is sampled either
        sampling = probes is None or not probes.paused
        if probes is not None and probes.options.min_wait_ns and sampling:
            # --min-wait: calls still waiting are recorded by this sweep, not at entry
            waiting = probes.sweep_waiting(_now_ns())
            if waiting:
                self.take(schema.wire_records(waiting))
        if self._batches:
            records = np.concatenate(self._batches)
            self._batches, self._buffered = [], 0
            by_kind = split_by_kind(records)
            empty = records[:0]
            self._rings.note(by_kind.get(schema.Kind.BUFFER_GROUP, empty))
            if self._memory is not None:
                self._memory.note(by_kind, sampling)
            write_records(self._writer, by_kind)
            self._posts += by_kind.get(schema.Kind.POST, empty).size
            self._completions += by_kind.get(schema.Kind.COMPLETE, empty).size
        if self._memory is not None and sampling:
            self._memory.flush(self._live_targets())
        if sampling:
            write_rows(self._writer, schema.BUFFER_RINGS, self._rings.snapshot(_now_ns()))
            self._renamed()
        write_rows(self._writer, schema.PROCESSES, self._processes)
        self._processes = []

    # --- the recording ------------------------------------------------------------------------
    def run(self) -> RecordSummary:
        cfg = self.config
        self._preflight()
        btf = BTF.load()  # parsed once: the checks and the probes both need it
        self.meta = Meta(
            idlebuf_version=VERSION,
            host=features.host_facts(),
            features={c.name: c.ok for c in features.run_checks(btf)},
            clock=Clock(_now_ns(), time.time_ns()),
            targets=Targets(
                list(cfg.pids), list(cfg.command), tree=list(cfg.pids) if cfg.tree else []
            ),
            alternate_s=cfg.alternate,
            alternations=[] if cfg.alternate else None,
        )
        self._writer = TraceWriter(cfg.output, cfg.force)
        # Signals are caught from here on: one that arrives while the probes compile ends
        # the session as soon as they are loaded, with the trace finalized.
        try:
            with _Stop() as stop:
                return self._record(stop, btf)
        except RecordError:
            if not self._started:  # it never started: leave nothing behind
                self._writer.discard()
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
        self.meta.error = str(exc)[:500] if isinstance(exc, IdlebufError) else repr(exc)[:500]
        with contextlib.suppress(Exception):
            self._write_meta(last=True)

    def _record(self, stop: _Stop, btf: BTF) -> RecordSummary:
        cfg = self.config
        self._write_meta()
        options = cfg.probe_options
        if cfg.command or cfg.tree:
            options = ProbeOptions(**{**options.__dict__, "follow_children": True})
        probes = LoadedProbes(options, btf)
        started = self.clock.monotonic()
        self.meta.tracing_since_ns = _now_ns()
        if options.min_wait_ns:
            self.meta.min_wait_ns = options.min_wait_ns
        try:
            self._probes = probes
            if cfg.command:
                self._child = launch_paused(cfg.command, lambda pid: self._attach(probes, [pid]))
                self._note_process(self._child.pid, _now_ns())
            else:
                pids = self._given_targets(probes)
                self._attach(probes, pids)
                for pid in pids:
                    self._note_process(pid, _now_ns())
                self.meta.at_attach += seeding.seed(
                    probes, btf, pids, self.take, self._rings, _now_ns
                )
                self.meta.uring_before_attach = [
                    f.pid for f in self.meta.at_attach if any(r.how != "walked" for r in f.rings)
                ]
                self._sample_status(probes, "attach")  # a launched command is seen from exec
            self._write_meta()
            self._started = True
            if self.meta.alternations is not None:  # the first traced stretch
                self.meta.alternations.append(Switch(self.meta.tracing_since_ns, _now_ns(), True))
            # --duration counts from here: the walks at attach (seconds on a big server) do
            # not eat into the time recorded after them
            stop_reason = session.run(
                probes, self, lambda: stop.reason, cfg.pacing(), self.clock, self.clock.monotonic()
            )
            # A final drain after the loop: what the kernel emitted up to the stop.
            self.take(probes.drain())
            self.meta.traced_until_ns = _now_ns()
            self._sample_status(probes, "end")
            self._flush()
            if self._memory is not None:  # while the targets still run
                self._memory.end(self._live_targets())
            exit_code = finish_child(self._child, probes.target_pids())
            elapsed = self.clock.monotonic() - started
            self.meta.stop_reason = stop_reason
            self.meta.elapsed_s = round(elapsed, 3)
            self.meta.end_monotonic_ns = _now_ns()
            self._write_meta(complete=True)
            self._writer.sync()
            return RecordSummary(
                cfg.output,
                self._posts,
                self._completions,
                dict(self.meta.drops),
                elapsed,
                stop_reason,
                exit_code,
            )
        finally:
            if self._child is not None and self._child.poll() is None:
                self._child.signal(signal.SIGKILL)
                self._child.wait()
            with contextlib.suppress(Exception):  # for a meta.json written after a failure
                self._counters = probes.counter_values()
            probes.close()
            if self._memory is not None:
                self._memory.close()

    def _sample_status(self, probes: LoadedProbes, what: str) -> None:
        """Resident memory of every live target from /proc/PID/status, with its address
        space's id (as kmem:rss_stat names it) from the kernel."""
        mm: dict[int, int] = {}
        with contextlib.suppress(ProbeError):
            mm = {f.pid: f.mm for f in probes.kernel_state.open_files()}
        rows = []
        for pid in self._live_targets():
            counts = process.status(pid)
            if counts is not None:
                rows.append(
                    {
                        "ts_ns": _now_ns(),
                        "pid": pid,
                        "mm_id": mm.get(pid, 0),
                        "what": what,
                        **counts,
                    }
                )
        write_rows(self._writer, schema.PROC_STATUS, rows)

    def _live_targets(self) -> list[int]:
        """The targets now: those given or launched, and the children followed in the kernel."""
        pids = set(self._target_pids)
        if self._probes is not None and self._probes.options.follow_children:
            pids |= {p for p in self._probes.target_pids() if is_process(p)}
        return sorted(p for p in pids if alive(p))

    def _given_targets(self, probes: LoadedProbes) -> list[int]:
        """The -p processes, each once; with --tree, and all their descendants now, each
        made a target in the kernel as it is found (so that what it forks from then on is
        followed there), parents first."""
        cfg = self.config
        if not cfg.tree:
            return list(dict.fromkeys(cfg.pids))
        pids = tree.walk(cfg.pids, probes.add_target)
        given = set(cfg.pids)
        self.meta.targets.descendants = [p for p in pids if p not in given]
        return pids

    def _attach(self, probes: LoadedProbes, pids: list[int]) -> None:
        """Make `pids` targets; with the memory side, probe their allocators if asked to
        (--alloc-probes), else look their buffers' allocations up when needed."""
        for pid in pids:
            probes.add_target(pid)
            self._target_pids.append(pid)
        if not probes.options.memory:
            return
        if self._memory is None:
            self._memory = MemorySide(probes, self._writer, self.meta, _now_ns)
        self._memory.attach(pids)

    def _status(self, elapsed: float, probes: LoadedProbes) -> str:
        drops = sum(v for k, v in probes.counter_values().items() if k.endswith("_full"))
        return (
            f"{elapsed:6.1f}s  posts {self._posts:,}  completions {self._completions:,}  "
            f"drops {drops:,}"
        )
