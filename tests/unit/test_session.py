"""The recording loop on fakes (no BPF): when it flushes, switches tracing and stops."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from probes import session
from probes.format.schema import WIRE_EVENT


@dataclass
class FakeClock:
    now: float = 100.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeEvents:
    """Waits advance the clock by their timeout; `rate` events arrive per second of it,
    until `until` (seconds of fake time)."""

    clock: FakeClock
    rate: float = 0.0
    until: float = float("inf")
    pending: float = 0.0

    def wait(self, timeout_s: float) -> None:
        self.clock.now += timeout_s
        if self.clock.now <= self.until:
            self.pending += self.rate * timeout_s

    def drain(self) -> np.ndarray:
        n, self.pending = int(self.pending), self.pending - int(self.pending)
        return np.zeros(n, dtype=WIRE_EVENT.dtype)


@dataclass
class FakeSink:
    clock: FakeClock
    exit_at: float = float("inf")
    taken: int = 0
    buffered: int = 0
    flushes: list[float] = field(default_factory=list)  # fake times of flushes
    switches: list[float] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)

    def take(self, batch: np.ndarray) -> None:
        self.taken += batch.size
        self.buffered += batch.size

    def flush(self, elapsed: float) -> None:
        self.flushes.append(self.clock.now)
        self.buffered = 0

    def switch_tracing(self) -> None:
        self.switches.append(self.clock.now)

    def sample(self) -> None:
        self.samples.append(self.clock.now)

    def targets_exited(self) -> bool:
        return self.clock.now >= self.exit_at


def run(events: FakeEvents, sink: FakeSink, pacing: session.Pacing, stop=lambda: None) -> str:
    return session.run(events, sink, stop, pacing, events.clock)


def test_duration_stops_the_loop_and_time_flushes_it() -> None:
    clock = FakeClock()
    sink = FakeSink(clock)
    reason = run(FakeEvents(clock), sink, session.Pacing(duration=2.3, flush_interval=1.0))
    assert reason == "duration"
    assert 102.3 <= clock.now < 102.5  # within one wait of the duration
    assert len(sink.flushes) == 2  # once a second: at 1 s and 2 s


def test_between_flushes_the_sink_samples_at_its_interval() -> None:
    clock = FakeClock()
    sink = FakeSink(clock)
    pacing = session.Pacing(duration=2.3, flush_interval=1.0, sample_interval=0.25)
    run(FakeEvents(clock), sink, pacing)
    assert len(sink.flushes) == 2
    # 0.1 s waits: samples at 0.3, 0.6, 0.9 s after each flush (and the start), never at one
    assert len(sink.samples) in (6, 7)  # the last depends on where 0.1 s steps round
    assert not set(sink.samples) & set(sink.flushes)
    gaps = [b - a for a, b in zip(sink.samples, sink.samples[1:])]
    assert min(gaps) >= 0.25 - 1e-9


def test_a_full_batch_is_flushed_before_its_time() -> None:
    clock = FakeClock()
    sink = FakeSink(clock)
    events = FakeEvents(clock, rate=50_000)  # 5,000 events per 0.1 s wait
    pacing = session.Pacing(duration=0.95, flush_rows=20_011, flush_interval=60, small_batch=0)
    run(events, sink, pacing)
    assert sink.taken == 50_000
    # a flush after every 5th wait (25,000 >= 20,011), none by time
    assert len(sink.flushes) == 2


def test_targets_exit_ends_it_once_the_kernel_is_quiet() -> None:
    clock = FakeClock()
    sink = FakeSink(clock, exit_at=101.0)
    events = FakeEvents(clock, rate=1000, until=101.5)  # cancellations go on for 0.5 s
    assert run(events, sink, session.Pacing()) == "all targets exited"
    assert 101.75 <= clock.now < 101.9  # 0.3 s after the last events, by 101.5


def test_targets_exit_ends_it_after_the_grace_however_busy() -> None:
    clock = FakeClock()
    sink = FakeSink(clock, exit_at=101.0)
    events = FakeEvents(clock, rate=1000)  # never quiet
    assert run(events, sink, session.Pacing(exit_grace=3.0)) == "all targets exited"
    assert 104.0 <= clock.now < 104.2


def test_a_signal_stops_it_at_once() -> None:
    clock = FakeClock()
    sink = FakeSink(clock)
    stops = iter([None, None, "SIGINT"])
    reason = run(FakeEvents(clock), sink, session.Pacing(), stop=lambda: next(stops))
    assert reason == "SIGINT" and clock.now < 100.5


def test_alternate_switches_every_period() -> None:
    clock = FakeClock()
    sink = FakeSink(clock)
    run(FakeEvents(clock), sink, session.Pacing(duration=7.05, alternate=2.0))
    assert len(sink.switches) == 3
    gaps = np.diff([100.0, *sink.switches])
    assert all(2.0 <= g < 2.2 for g in gaps), gaps


def test_small_batches_pause_to_gather() -> None:
    clock = FakeClock()
    sink = FakeSink(clock)
    events = FakeEvents(clock, rate=100)  # 10 events per wait: a small batch each time
    run(events, sink, session.Pacing(duration=1.0, batch_pause=0.05))
    # each 0.1 s wait is followed by a 0.05 s pause, so about 1/0.15 rounds
    assert 6 <= sink.taken // 10 <= 8
