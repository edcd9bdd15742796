"""The streamed relate step on traces the real probes wrote: three servers (a thread blocked
per connection, green threads parked after EAGAIN, readiness keeping each connection's last
buffer), recorded with --memory under 53 connections of which 5 exchange 3 messages. Their
streamed figures equal the in-memory report's, also with the trace cut into parts of 41 rows
and related in windows of 97 events, and they are the servers' own numbers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from analysis.stream import relate
from tests.helpers import Recording, python_module, read_event, start_loadgen, stop, wait_until
from tests.unit.test_stream import cut, in_memory, same

pytestmark = pytest.mark.bpf

CONNECTIONS, ACTIVE, MESSAGES, SIZE, BUFFER = 53, 5, 3, 1000, 8191
SERVERS = {
    "threads": ("workloads.threaded_server", "--buffer-size", str(BUFFER)),
    "green": ("workloads.green_server", "--buffer-size", str(BUFFER)),
    "readiness": ("workloads.epoll_server", "--buffers", "retain", "--buffer-size", str(BUFFER)),
}


@pytest.mark.parametrize("server", list(SERVERS))
def test_real_traces_stream_to_the_in_memory_figures(tmp_path: Path, server: str) -> None:
    trace = tmp_path / "trace"
    with Recording(trace, python_module(*SERVERS[server]), record_args=("--memory",)) as rec:
        pid = rec.pid
        load = start_loadgen(rec.port, CONNECTIONS, ACTIVE, MESSAGES, SIZE, "--hold", "60")
        try:
            done = read_event(load.stdout, "done", 60)  # type: ignore[arg-type]
            if server == "green":
                truth: dict = {}
                wait_until(
                    lambda: truth.update(rec.truth()) or truth["parked"] == CONNECTIONS,
                    30,
                    "every green thread parked",
                )
            time.sleep(1.3)  # past the idle threshold
            rec.finish()
        finally:
            stop(load)
    assert done["requests"] == ACTIVE * MESSAGES

    expected = in_memory(trace, 0.5)
    streamed = relate(trace, timeline_s=0.5)
    same(streamed, expected)
    same(relate(cut(trace, tmp_path / "parts", 41), timeline_s=0.5, window_rows=97), expected)

    p = streamed.process(pid)
    assert p.reads_completed == ACTIVE * MESSAGES
    assert p.bytes_received == ACTIVE * MESSAGES * SIZE
    assert p.connections is not None and p.connections.open == CONNECTIONS
    if server == "readiness":  # nothing posted; the 5 that spoke keep their last buffer
        assert p.posted_reads.now == 0
        assert p.retained is not None and p.retained.buffers == ACTIVE
        assert p.retained.bytes == ACTIVE * BUFFER
    else:  # a read posted (or parked) on every connection, into its own buffer
        assert p.posted_reads.now == CONNECTIONS
        assert p.pinned_bytes.now == CONNECTIONS * BUFFER
        assert p.by_source == {"parked" if server == "green" else "syscall": CONNECTIONS}
        assert p.connections.idle == CONNECTIONS  # nothing for over a second
        assert p.idle_io_buffer_bytes is not None and p.idle_io_buffer_bytes >= CONNECTIONS * BUFFER
