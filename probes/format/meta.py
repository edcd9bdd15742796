"""meta.json, typed: every key a trace's metadata can hold, defined once.

The recorder fills a `Meta` and writes `meta.to_json()`; readers get one back from
`Meta.from_json()`, which checks every field's type (finite numbers, no booleans for integers)
and fills what an older recording did not write with its default. A trace is data that may
have been damaged or made by hand: a field of the wrong type is a TraceError naming the
field, never a crash further on. So is a time that cannot be: a start after its end, a
recording longer than MAX_SPAN_NS, a part listed outside the recording's span.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from probes.format import schema
from probes.format.errors import TraceError

# No recording lasts a month (the recorder keeps everything it reads): a longer span is
# damage, and would size every time series and idle duration by it.
MAX_SPAN_NS = 30 * 86_400 * 1_000_000_000


@dataclass
class Host:
    hostname: str = ""
    kernel: str = ""
    machine: str = ""
    cpus: str = ""


@dataclass
class Clock:
    """The recording's clock base: CLOCK_MONOTONIC (every ts_ns) and wall time at start."""

    monotonic_ns: int = 0
    realtime_ns: int = 0


@dataclass
class Targets:
    pids: list[int] = field(default_factory=list)  # given with -p
    command: list[str] = field(default_factory=list)  # launched (-- COMMAND ARGS)
    # given with -p and --tree: their descendants are targets too, those found at attach
    # (`descendants`) and those forked while recording (absent before --tree: none)
    tree: list[int] = field(default_factory=list)
    descendants: list[int] = field(default_factory=list)


@dataclass
class Allocator:
    """How a target's allocations were found: by probing its allocator library (uprobes), or
    by walking its allocator's structures when a buffer's allocation was needed."""

    pid: int = 0
    library: str | None = None  # probed: the library (None: no known allocator mapped)
    missing: list[str] = field(default_factory=list)  # probed: functions it lacks
    # "probes" (every allocation traced), or "walk:glibc", "walk:go+glibc" (looked up); a
    # recording made before walkers existed probed everything
    method: str = "probes"


@dataclass
class HeapWalks:
    """What the allocator walkers cost the recorder (they cost the target nothing)."""

    flushes: int = 0  # flushes that looked new buffers up
    buffers: int = 0  # lookups made at flushes
    total_ms: float = 0.0
    max_ms: float = 0.0  # the longest flush walk
    end_buffers: int = 0  # lookups of the walk at the end (every buffer that matters)
    end_ms: float = 0.0


@dataclass
class MemoryOptions:
    """`record --memory`: how buffers' allocations were found, and what probes kept."""

    min_alloc: int = 1024  # with probes: smaller allocations are not tracked
    sample_every: int = 1  # with probes: one allocation address in N is tracked
    allocators: list[Allocator] = field(default_factory=list)
    alloc_probes: bool = True  # --alloc-probes (every recording before the walkers)
    walks: HeapWalks = field(default_factory=HeapWalks)


@dataclass
class EventCounts:
    posts: int = 0
    completions: int = 0


@dataclass
class ProbeState:
    """What the probes were and did (meta.json's probes.reads)."""

    attached: bool = False  # true once tracing has begun
    cflags: list[str] = field(default_factory=list)
    uring: str | None = None  # "traced", or why io_uring was not
    wait_hooks: str | None = None  # --min-wait: "scheduler" or "syscalls"
    events: EventCounts = field(default_factory=EventCounts)
    kernel_counts: dict[str, int] = field(default_factory=dict)  # schema.Counter, by name


@dataclass
class Probes:
    reads: ProbeState = field(default_factory=ProbeState)


@dataclass
class Switch:
    """`record --alternate`: one switch of tracing, from its start to its end."""

    from_ns: int = 0
    to_ns: int = 0
    tracing: bool = False  # the state after the switch


@dataclass
class RingAtAttach:
    """An io_uring instance a target had open when the recording began."""

    fd: int = -1
    ring: int = 0  # its struct io_ring_ctx (the trace's `ring`), 0 if unknown
    how: str = "walked"  # "walked": requests read from the kernel; "fdinfo": only counted
    requests: int = 0  # read requests found posted (walked) or poll-armed (fdinfo)
    by_op: dict[str, int] = field(default_factory=dict)
    groups: int = 0  # provided-buffer groups found
    why: str | None = None  # why it was only counted


@dataclass
class GoAtAttach:
    """A Go target's goroutines as the runtime showed them when the recording began."""

    parked_reads: int = 0  # goroutines parked in a socket read, with their buffers
    io_waiting: int = 0  # goroutines waiting on the netpoller, reading or not
    skipped: int = 0  # goroutines that could not be decoded (they moved while read)
    why: str | None = None  # why parked reads could not be looked for (a stripped binary)
    sockets: int = 0  # with `why`: the sockets whose readers stay unknown


@dataclass
class ProcessAtAttach:
    """What one process already held when tracing began (`record -p`)."""

    pid: int = 0
    blocked_syscalls: int = 0  # threads found blocked in socket reads (/proc scan)
    rings: list[RingAtAttach] = field(default_factory=list)
    go: GoAtAttach | None = None
    mappings: int = 0  # anonymous mappings found in /proc/PID/maps
    walk_ms: float = 0.0  # how long finding all this took


@dataclass
class SlabCache:
    """A slab cache's geometry on the recording's kernel (/sys/kernel/slab/NAME): an object
    costs slab_bytes / objects_per_slab."""

    object_size: int = 0
    slab_size: int = 0  # an object with its metadata and padding
    objects_per_slab: int = 1
    slab_bytes: int = 0
    merged_into: str | None = None  # the cache it shares slabs with (slab merging)

    @property
    def object_cost(self) -> float:
        return self.slab_bytes / self.objects_per_slab


@dataclass
class Part:
    """One part file of a table as the writer wrote it: a reader checks it is that file."""

    name: str = ""
    rows: int = 0
    sha256: str = ""
    # its first and last ts_ns (tables that have one): a reader plans its windows from them
    first_ns: int | None = None
    last_ns: int | None = None


@dataclass
class Meta:
    format: str = schema.FORMAT_NAME
    format_version: int = schema.FORMAT_VERSION
    idlebuf_version: str = ""
    host: Host = field(default_factory=Host)
    features: dict[str, bool] = field(default_factory=dict)  # doctor's checks at start
    clock: Clock = field(default_factory=Clock)
    targets: Targets = field(default_factory=Targets)
    tracing_since_ns: int | None = None
    uring_before_attach: list[int] = field(default_factory=list)  # pids with rings already
    at_attach: list[ProcessAtAttach] = field(default_factory=list)  # state found at attach
    min_wait_ns: int | None = None
    memory: MemoryOptions | None = None  # recorded with --memory
    # with --memory: the slab caches one connection takes objects from (probes.kernel_objects)
    kernel_objects: dict[str, SlabCache] = field(default_factory=dict)
    kernel_objects_why: str | None = None  # why some (or all) could not be read
    # with --memory: a thread's kernel stack on this kernel (probes.attach.waiters), or why not
    kernel_stack_bytes: int | None = None
    kernel_stack_why: str | None = None
    probes: Probes = field(default_factory=Probes)
    drops: dict[str, int] = field(default_factory=dict)  # schema.DROP_COUNTERS, by name
    alternate_s: float | None = None
    alternations: list[Switch] | None = None
    rows: dict[str, int] = field(default_factory=dict)  # rows written per table
    # every part written when meta.json was, per table, in order (traces written since
    # this field exists; the reader verifies each one)
    parts: dict[str, list[Part]] | None = None
    complete: bool = False
    stop_reason: str | None = None
    elapsed_s: float | None = None
    end_monotonic_ns: int | None = None
    # when the events stopped being taken: the walks at the end (waiters, heaps, owned
    # state) come after it, and a connection is idle or not as of this time
    traced_until_ns: int | None = None
    error: str | None = None  # why a recording ended early

    def to_json(self) -> dict[str, Any]:
        """The meta.json object; fields that are None are left out."""
        return _to_json(self)

    @classmethod
    def from_json(cls, data: object, where: str = "meta.json") -> Meta:
        """A Meta from a parsed meta.json; TraceError (naming `where` and the field) when a
        field has the wrong type, is not finite, or is out of its range."""
        meta = _from_json(cls, data, where)
        meta._check_ranges(where)
        meta._check_times(where)
        return meta

    def time_bounds(self) -> tuple[int, int]:
        """(first, last): the CLOCK_MONOTONIC ns any event of this recording can have, 0
        aside (state found at attach whose time is unknown). From its clock base (the
        recorder takes it before any probe is loaded; 0 in a trace made by a program) to its
        end; a recording killed before its end lasts at most MAX_SPAN_NS from its earliest
        known time, or from its clock base when meta.json gives no time at all."""
        if self.end_monotonic_ns is not None:
            return self.clock.monotonic_ns, self.end_monotonic_ns
        known = [stamp for _, stamp in self.start_times()]
        return self.clock.monotonic_ns, min(known, default=self.clock.monotonic_ns) + MAX_SPAN_NS

    def start_times(self) -> list[tuple[str, int]]:
        """The times meta.json gives for the recording's beginning, with their fields' names:
        the clock base, when tracing began, each part's first event (0s are unknowns)."""
        starts = [
            ("clock.monotonic_ns", self.clock.monotonic_ns),
            ("tracing_since_ns", self.tracing_since_ns or 0),
        ]
        for table, parts in (self.parts or {}).items():
            starts += [(f"parts.{table} {p.name}: first_ns", p.first_ns or 0) for p in parts]
        return [(name, stamp) for name, stamp in starts if stamp]

    def _check_times(self, where: str) -> None:
        """Times that cannot be: a start after the end, a span longer than MAX_SPAN_NS, a
        part whose events are listed outside the recording's span."""
        base, since, end = self.clock.monotonic_ns, self.tracing_since_ns, self.end_monotonic_ns
        order = [("clock.monotonic_ns", base or None), ("tracing_since_ns", since)]
        order.append(("traced_until_ns", self.traced_until_ns))
        order.append(("end_monotonic_ns", end))
        present = [(name, stamp) for name, stamp in order if stamp is not None]
        for (early, a), (late, b) in zip(present, present[1:]):
            if a > b:
                raise TraceError(f"{where}: {early} ({a}) is after {late} ({b})")
        ends = [("end_monotonic_ns", end)] if end is not None else []
        for table, parts in (self.parts or {}).items():
            for p in parts:
                if p.first_ns is not None and p.last_ns is not None and p.first_ns > p.last_ns:
                    raise TraceError(
                        f"{where}: parts.{table} {p.name}: first_ns ({p.first_ns}) is after "
                        f"last_ns ({p.last_ns})"
                    )
                if end is None and p.last_ns is not None:
                    ends.append((f"parts.{table} {p.name}: last_ns", p.last_ns))
        starts = self.start_times()
        if starts and ends:
            early, first = min(starts, key=lambda s: s[1])
            late, last = max(ends, key=lambda e: e[1])
            if last - first > MAX_SPAN_NS:
                raise TraceError(
                    f"{where}: {late} ({last}) is {(last - first) / 86_400e9:,.0f} days after "
                    f"{early} ({first}): no recording lasts more than "
                    f"{MAX_SPAN_NS // 86_400_000_000_000} days"
                )
        low, high = self.time_bounds()
        for table, parts in (self.parts or {}).items():
            for p in parts:
                for name, stamp in (("first_ns", p.first_ns), ("last_ns", p.last_ns)):
                    if stamp and not low <= stamp <= high:
                        raise TraceError(
                            f"{where}: parts.{table} {p.name}: {name} ({stamp}) is outside "
                            f"the recording ({_span_words(self)})"
                        )

    def _check_ranges(self, where: str) -> None:
        counts = {
            **{f"drops.{k}": v for k, v in self.drops.items()},
            **{f"rows.{k}": v for k, v in self.rows.items()},
            **{
                f"probes.reads.kernel_counts.{k}": v
                for k, v in self.probes.reads.kernel_counts.items()
            },
            "probes.reads.events.posts": self.probes.reads.events.posts,
            "probes.reads.events.completions": self.probes.reads.events.completions,
        }
        stamps = {
            "tracing_since_ns": self.tracing_since_ns,
            "end_monotonic_ns": self.end_monotonic_ns,
            "traced_until_ns": self.traced_until_ns,
            "clock.monotonic_ns": self.clock.monotonic_ns,
            "min_wait_ns": self.min_wait_ns,
        }
        for name, value in {**counts, **stamps}.items():
            if value is not None and not 0 <= value < 1 << 63:
                raise TraceError(f"{where}: {name} should be a count from 0, not {value}")
        for name, seconds in (("elapsed_s", self.elapsed_s), ("alternate_s", self.alternate_s)):
            if seconds is not None and seconds < 0:
                raise TraceError(f"{where}: {name} should not be negative ({seconds})")
        if self.memory is not None:
            every = self.memory.sample_every
            if every < 1:
                raise TraceError(f"{where}: memory.sample_every should be 1 or more, not {every}")
            if self.memory.min_alloc < 0:
                raise TraceError(f"{where}: memory.min_alloc should not be negative")
        for name, cache in self.kernel_objects.items():
            if cache.objects_per_slab < 1 or cache.slab_bytes < 0:
                raise TraceError(f"{where}: kernel_objects.{name} has no objects per slab")
        for table, parts in (self.parts or {}).items():
            for part in parts:
                if part.rows < 0 or "/" in part.name or not part.name.startswith("part-"):
                    raise TraceError(f"{where}: parts.{table} lists {part.name!r}")
                for stamp in (part.first_ns, part.last_ns):
                    if stamp is not None and not 0 <= stamp < 1 << 63:
                        raise TraceError(f"{where}: parts.{table} {part.name}: ts {stamp}")


def _span_words(meta: Meta) -> str:
    """The recording's span as meta.json gives it, in words naming the fields."""
    low = f"clock.monotonic_ns {meta.clock.monotonic_ns}" if meta.clock.monotonic_ns else "0"
    if meta.end_monotonic_ns is not None:
        return f"{low} to end_monotonic_ns {meta.end_monotonic_ns}"
    return f"{low} to {MAX_SPAN_NS // 86_400_000_000_000} days after its start"


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _to_json(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


T = TypeVar("T")


def _from_json(cls: type[T], data: object, where: str, top: bool = True) -> T:
    """`cls` from a JSON object; `where` names it in errors: the file, or (not `top`) the
    file and the field holding it, to which its own fields' names are added with dots."""
    if not isinstance(data, dict):
        raise TraceError(f"{where} should be an object, not {_kind(data)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            name = f"{where}: {f.name}" if top else f"{where}.{f.name}"
            values[f.name] = _convert(data[f.name], hints[f.name], name)
    return cls(**values)


def _convert(value: object, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where)
    if dataclasses.is_dataclass(hint):
        return _from_json(hint, value, where, top=False)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise TraceError(f"{where} should be a list, not {_kind(value)}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TraceError(f"{where} should be an object, not {_kind(value)}")
        return {str(k): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise TraceError(f"{where} should be true or false, not {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TraceError(f"{where} should be an integer, not {_kind(value)}")
        if not -(1 << 63) <= value < 1 << 64:
            raise TraceError(f"{where} is out of range ({value})")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TraceError(f"{where} should be a number, not {_kind(value)}")
        if not math.isfinite(value):
            raise TraceError(f"{where} should be a finite number, not {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TraceError(f"{where} should be a string, not {_kind(value)}")
        return value
    raise TypeError(f"meta field type {hint!r} is not handled")  # a bug in this module


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else f"the number {value!r}"
    )
