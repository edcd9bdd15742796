"""The recording loop: drain the kernel's events, flush them in bounded groups, switch tracing
off and on (--alternate), and stop when a stop condition holds.

It knows nothing of BPF or files: it drives an `Events` source (the loaded probes) and a
`Sink` (the recorder) with an injected `Clock`, so it runs, and is tested, on fakes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class Events(Protocol):
    """Where events come from: the kernel's ring buffer."""

    def wait(self, timeout_s: float) -> None: ...

    def drain(self) -> np.ndarray: ...


class Sink(Protocol):
    """What the loop feeds: the recorder."""

    @property
    def buffered(self) -> int: ...  # events taken and not flushed yet

    def take(self, batch: np.ndarray) -> None: ...

    def flush(self, elapsed: float) -> None: ...  # write what is buffered (and progress)

    def switch_tracing(self) -> None: ...  # --alternate: off, or on again

    def sample(self) -> None: ...  # between flushes: note what changed (memory points)

    def targets_exited(self) -> bool: ...


@dataclass(frozen=True)
class Pacing:
    duration: float | None = None  # stop after this many seconds
    flush_rows: int = 100_000  # a row group is written at least this often...
    flush_interval: float = 1.0  # ...and at least every this many seconds
    sample_interval: float = 0.25  # between flushes, the sink samples this often
    alternate: float | None = None  # switch tracing off and on every this many seconds
    # Under a steady stream every drain would take a few records: below this many, pause a
    # little and let them pile up (the ring holds ~200k) so that decoding works on batches.
    small_batch: int = 16384
    batch_pause: float = 0.003
    # After the targets exit: stop once no event came for exit_quiet seconds, or after
    # exit_grace at most (the kernel cancels an exited process's io_uring requests from a
    # worker, a little later).
    exit_quiet: float = 0.3
    exit_grace: float = 3.0


def run(
    events: Events,
    sink: Sink,
    stop_requested: Callable[[], str | None],
    pacing: Pacing,
    clock: Clock,
    started: float | None = None,
) -> str:
    """Drain and flush until a stop condition holds; returns why it stopped: the signal's
    name, "duration" or "all targets exited". The duration counts from `started` (when
    tracing began; default: now)."""
    last_flush = last_event = last_sample = clock.monotonic()
    started = last_flush if started is None else started
    exited_at: float | None = None
    next_switch = last_flush + pacing.alternate if pacing.alternate else None
    while True:
        events.wait(0.05 if exited_at else 0.1)
        batch = events.drain()
        sink.take(batch)
        now = clock.monotonic()
        if batch.size:
            last_event = now
        if 0 < batch.size < pacing.small_batch:
            clock.sleep(pacing.batch_pause)
        if sink.buffered >= pacing.flush_rows or now - last_flush >= pacing.flush_interval:
            sink.flush(now - started)
            last_flush = last_sample = now
        elif now - last_sample >= pacing.sample_interval:
            sink.sample()
            last_sample = now
        if next_switch is not None and now >= next_switch:
            sink.switch_tracing()
            next_switch = clock.monotonic() + (pacing.alternate or 0)
        reason = stop_requested()
        if reason:
            return reason
        if pacing.duration is not None and now - started >= pacing.duration:
            return "duration"
        if exited_at is None and sink.targets_exited():
            exited_at = now
        if exited_at is not None and (
            now - last_event >= pacing.exit_quiet or now - exited_at >= pacing.exit_grace
        ):
            return "all targets exited"
