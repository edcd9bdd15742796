"""The Perfetto reporter: time series as a Perfetto trace (protobuf), which ui.perfetto.dev
opens directly.

Each model (or recording) is a process track, named after it, holding one counter track per
figure: posted reads, pinned bytes, IO-buffer heap, tracked heap, RSS, socket memory. Models
recorded one after another are aligned at zero so their tracks can be compared by eye. A
figure not measured at an instant (RSS before its first sample) has no sample there.
"""

from __future__ import annotations

from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import (
    CounterDescriptor,
    Trace,
    TracePacket,
    TrackEvent,
)

from analysis.results import TimelinePoint

SEQUENCE = 1
COUNTERS = [
    ("posted_reads", "posted reads", CounterDescriptor.UNIT_COUNT),
    ("pinned_bytes", "pinned bytes", CounterDescriptor.UNIT_SIZE_BYTES),
    ("io_buffer_heap_bytes", "IO-buffer heap", CounterDescriptor.UNIT_SIZE_BYTES),
    ("heap_live_bytes", "heap (tracked allocations)", CounterDescriptor.UNIT_SIZE_BYTES),
    ("rss_bytes", "RSS", CounterDescriptor.UNIT_SIZE_BYTES),
    ("socket_kernel_bytes", "socket memory", CounterDescriptor.UNIT_SIZE_BYTES),
    ("idle_connections", "idle connections", CounterDescriptor.UNIT_COUNT),
    ("pending_writes", "pending writes", CounterDescriptor.UNIT_COUNT),
    ("pending_write_bytes", "pending write bytes", CounterDescriptor.UNIT_SIZE_BYTES),
]


def timeline_trace(timelines: dict[str, list[TimelinePoint]], pids: dict[str, int]) -> Trace:
    """One process per series name (with its recorded pid where known), counters under it."""
    trace = Trace()
    used: set[int] = set()
    uuid = 1

    def packet() -> TracePacket:
        p = trace.packet.add()
        p.trusted_packet_sequence_id = SEQUENCE
        if len(trace.packet) == 1:
            p.sequence_flags = TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
        return p

    for name, points in timelines.items():
        pid = pids.get(name) or 1
        while pid in used:  # two recordings may have had the same pid
            pid += 1 << 22
        used.add(pid)
        process_uuid, uuid = uuid, uuid + 1
        d = packet().track_descriptor
        d.uuid = process_uuid
        d.process.pid = pid
        d.process.process_name = name
        for column, title, unit in COUNTERS:
            if not points:
                continue
            track, uuid = uuid, uuid + 1
            d = packet().track_descriptor
            d.uuid, d.parent_uuid, d.name = track, process_uuid, title
            d.counter.unit = unit
            for point in points:
                value = point.figure(column)
                if value is None:  # not measured then: no sample, rather than a false 0
                    continue
                p = packet()
                p.timestamp = round(point.t_s * 1e9)
                p.track_event.type = TrackEvent.TYPE_COUNTER
                p.track_event.track_uuid = track
                p.track_event.counter_value = int(value)
    return trace
