"""Redis (Debian's 7.0, jemalloc, one event loop) attached late to clients that sit idle,
against its own accounting and the kernel's.

97 clients connect; 5 of them send 13 commands each; then every one sits idle while Redis's
cron frees the query and reply buffers of idle clients. The truth, per idle client:
- allocated: Redis's own count (INFO memory used_memory, jemalloc's usable sizes) as the
  clients arrived, and CLIENT LIST's tot-mem of each (its query buffer, output buffers and
  the client struct, as Redis counts it);
- resident: its RSS growth (/proc/PID/status VmRSS);
- the kernel's part: what the kernel charged the server's own memory cgroup per client
  plus each accepted socket's TCP object (charged to no cgroup).

Nothing owns a Redis client structurally: its event loop waits for every client (no waiter
of its own), it registers the fd alone with epoll, and global structures reach each client's
objects. With the connections held still while recorded there is nothing to fit either:
the honest answer is a lower bound (its known parts: the kernel's objects) with the reason,
for each of the 97. The fit when clients come and go while recorded is test_cost's
(test_redis_clients_against_its_own_accounting, within 10% of used_memory).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from tests.helpers import idlebuf, report_json
from tests.real_servers import (
    redis,
    redis_clients,
    redis_command,
    redis_info,
    slab_object_size,
    status,
)

pytestmark = pytest.mark.bpf

CONNECTIONS, ACTIVE, COMMANDS = 97, 5, 13
IDLE_FREED_S = 4.0  # Redis frees an idle client's query buffer after 2 s (its cron: 10 Hz)


def test_idle_clients_attached_late(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    clients: list[socket.socket] = []
    with redis(CONNECTIONS + 20) as server:
        before = {
            "used_memory": int(redis_info(server.port, "memory")["used_memory"]),
            "rss": status(server.pid, "VmRSS"),
            "kernel": server.group.kernel(),
        }
        try:
            clients = [
                socket.create_connection(("127.0.0.1", server.port)) for _ in range(CONNECTIONS)
            ]
            for client in clients[:ACTIVE]:
                for i in range(COMMANDS):
                    assert redis_command(server.port, "SET", f"k{i}", "v", s=client) == b"+OK"
            time.sleep(IDLE_FREED_S)
            after = {
                "used_memory": int(redis_info(server.port, "memory")["used_memory"]),
                "rss": status(server.pid, "VmRSS"),
                "kernel": server.group.kernel(),
            }
            listed = [c for c in redis_clients(server.port) if c.get("cmd") != "client|list"]
            done = idlebuf(
                "record", "-o", str(trace), "-p", str(server.pid), "--memory",
                "--min-alloc", "0", "--duration", "3",
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
        finally:
            for c in clients:
                c.close()
    truth = {k: (after[k] - before[k]) / CONNECTIONS for k in after}
    truth["kernel"] += slab_object_size("TCP")  # an accepted socket: charged to no cgroup
    assert len(listed) == CONNECTIONS
    truth["tot_mem"] = sum(int(c["tot-mem"]) for c in listed) / CONNECTIONS
    assert all(int(c["qbuf"]) == 0 for c in listed)  # freed by the cron: idle
    (process,) = [p for p in report_json(trace)["processes"] if p["pid"] == server.pid]
    memory = process["memory"]
    cost = memory["per_idle_connection"]
    print(f"redis: truth per client {truth}")
    print(f"idlebuf: {json.dumps(cost)}")
    assert memory["connections"] == {"open": CONNECTIONS, "idle": CONNECTIONS}
    # Redis reads on readiness into a query buffer it freed: no buffer, no waiter of its own
    assert cost["buffer_bytes"] == 0 and cost["io_buffer_bytes"] == 0
    assert cost["waiter_parts"] == [] and cost["waiter_bytes"] == 0
    # the kernel's part: the socket's objects and the event loop's epoll item and wait entry
    caches = {p["cache"]: p["objects"] for p in cost["kernel_parts"]}
    assert caches.get("eventpoll_epi") == 1 and caches.get("eventpoll_pwq") == 1
    assert abs(cost["kernel_bytes"] - truth["kernel"]) <= 0.15 * truth["kernel"], truth
    # the rest is not known: nothing owns a client, and nothing changed to fit - a lower
    # bound, with why, for each of the 97 (item 3's walk finds no owner here either: the
    # epoll data is the fd alone)
    assert cost["owned_bytes"] is None and cost["total_bytes"] is None
    (unknown,) = cost["whole_unknown"]
    assert unknown["connections"] == CONNECTIONS
    assert unknown["why"].startswith("other user memory: connections did not change enough")
    resident = truth["rss"] + truth["kernel"]
    allocated = truth["used_memory"] + truth["kernel"]
    assert cost["total_at_least_bytes"] == cost["kernel_bytes"]
    assert cost["total_at_least_bytes"] <= min(resident, allocated)
