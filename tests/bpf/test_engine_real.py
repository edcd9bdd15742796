"""The analysis engine on traces the real probes wrote: four servers (a thread blocked per
connection, green threads parked after EAGAIN, readiness keeping each connection's last
buffer, io_uring with a RECV posted per connection), recorded with --memory under 53
connections of which 5 exchange 3 messages. Every figure of the report, the time series
and the per-connection table included, is the same whether the trace is one window or is
cut into parts of 41 rows and read in windows of 97 events; and the figures are what each
server says of itself (its ground truth, asked for at the end of the recording)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from analysis.engine import analyze
from tests.helpers import Recording, python_module, read_event, start_loadgen, stop, wait_until
from tests.unit.test_engine import cut

pytestmark = pytest.mark.bpf

CONNECTIONS, ACTIVE, MESSAGES, SIZE, BUFFER = 53, 5, 3, 1000, 8191
SERVERS = {
    "threads": ("workloads.threaded_server", "--buffer-size", str(BUFFER)),
    "green": ("workloads.green_server", "--buffer-size", str(BUFFER)),
    "readiness": ("workloads.epoll_server", "--buffers", "retain", "--buffer-size", str(BUFFER)),
    "uring": ("workloads.uring_server", "--op", "recv", "--buffer-size", str(BUFFER)),
}
SOURCE = {"threads": "syscall", "green": "parked", "uring": "uring"}


def _recorded(tmp_path: Path, server: str) -> tuple[Path, dict[str, Any]]:
    """A recording of `server` under the load, and what the server said of itself at its
    end (every connection idle by then)."""
    trace = tmp_path / "trace"
    with Recording(trace, python_module(*SERVERS[server]), record_args=("--memory",)) as rec:
        load = start_loadgen(rec.port, CONNECTIONS, ACTIVE, MESSAGES, SIZE, "--hold", "60")
        try:
            done = read_event(load.stdout, "done", 60)  # type: ignore[arg-type]
            assert done["requests"] == ACTIVE * MESSAGES
            if server != "readiness":  # a read posted (or parked) on every connection
                truth: dict[str, Any] = {}
                wait_until(
                    lambda: truth.update(rec.truth()) or truth["posted_reads"] == CONNECTIONS,
                    30,
                    "a read posted on every connection",
                )
            # past the idle threshold (1 s) as of the last drain, from the first socket
            # sample showing the connections that never spoke (taken at each flush,
            # every second): they are quiet since then, as far as anyone can tell
            time.sleep(2.5)
            truth = rec.truth()
            rec.finish()
        finally:
            stop(load)
    return trace, truth


@pytest.mark.parametrize("server", list(SERVERS))
def test_real_traces_give_the_same_report_in_windows_and_the_servers_figures(
    tmp_path: Path, server: str
) -> None:
    trace, truth = _recorded(tmp_path, server)
    whole = analyze(trace, timeline_s=0.5)
    expected = whole.to_json(connections=True)
    assert analyze(trace, timeline_s=0.5, window_rows=97).to_json(connections=True) == expected
    parts = cut(trace, tmp_path / "parts", 41)
    assert analyze(parts, timeline_s=0.5, window_rows=97).to_json(connections=True) == expected

    p = whole.process(truth["pid"])
    memory = p.memory
    assert memory is not None
    assert p.reads_completed == truth["reads_completed"] == ACTIVE * MESSAGES
    assert p.bytes_received == truth["bytes_received"] == ACTIVE * MESSAGES * SIZE
    assert memory.connections.open == truth["connections_open"] == CONNECTIONS
    assert memory.connections.idle == CONNECTIONS  # nothing for over a second
    assert p.posted_reads.now == truth["posted_reads"]
    assert p.pinned_bytes.now == truth["pinned_bytes"]
    buffers = sum(b["len"] for b in truth["buffers"])
    if server == "readiness":  # nothing posted; the 5 that spoke keep their last buffer
        assert p.posted_reads.now == 0
        assert memory.retained.buffers == len(truth["buffers"]) == ACTIVE
        assert memory.retained.bytes == truth["held_bytes"] == buffers
    else:  # each connection's own buffer, in an allocation of its own
        assert p.posted_reads.now == CONNECTIONS
        assert {k: v.posted_reads for k, v in p.by_source.items() if v.posted_reads} == {
            SOURCE[server]: CONNECTIONS
        }
        assert memory.io_buffer_heap.idle_bytes == buffers == CONNECTIONS * BUFFER
        assert memory.io_buffer_heap.allocations == CONNECTIONS
    # the time series ends where the report does
    last = whole.timeline_of(truth["pid"])[-1]
    assert last.posted_reads == p.posted_reads.now
    assert last.idle_connections == CONNECTIONS
