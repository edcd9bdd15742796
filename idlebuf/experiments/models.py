"""The IO models idlebuf compares: the load, which workload runs each model, what drives
it, and what each does with buffers. A new model is one entry in `models()`."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from probes.format.errors import UsageError

POOL_BUFFERS = 4  # the readiness and poll-first servers' shared pools
NETNS_SERVER = "10.231.0.1"  # the server's side of the veth pair a --netns load is behind
# The connections open over this share of the recording, in steps: memory is then fitted
# against the connections held (the whole cost of an idle connection, analysis.cost).
RAMP = 0.4


@dataclass(frozen=True)
class Load:
    """What the load generator does to every model."""

    connections: int
    active: int
    buffer_size: int = 16384
    duration: float = 5.0  # seconds recorded per model
    rate: float = 20.0  # messages per second per active connection
    netns: str | None = None  # run the load generator in this network namespace


@dataclass(frozen=True)
class Client:
    """The program that drives a model's server."""

    module: str
    ramps: bool = False  # it takes --ramp SECONDS

    def args(self, load: Load, port: int) -> list[str]:
        """Its arguments under `load`. It opens the connections over the first RAMP of the
        recording (if it can ramp) and stops exchanging a second before the recording ends,
        so that the recording's "now" sees every read re-posted rather than a few caught
        between a completion and the next post."""
        ramp = RAMP * load.duration if self.ramps else 0.0
        return [
            *(("--netns", load.netns, "--host", NETNS_SERVER) if load.netns else ()),
            *("--port", str(port), "--connections", str(load.connections)),
            *("--active", str(load.active)),
            *(("--ramp", f"{ramp:g}") if ramp else ()),
            *self.pace(load),
            *("--duration", str(max(0.5, load.duration - 1 - ramp)), "--hold", "120"),
        ]

    def pace(self, load: Load) -> list[str]:
        raise NotImplementedError


@dataclass(frozen=True)
class EchoLoad(Client):
    """workloads.loadgen: active connections exchange messages at a steady rate."""

    module: str = "workloads.loadgen"
    ramps: bool = True

    def pace(self, load: Load) -> list[str]:
        messages = int(load.duration * load.rate) + 100
        return ["--messages", str(messages), "--rate", str(load.rate)]


@dataclass(frozen=True)
class SlowReaders(Client):
    """workloads.push_client: readers of a pushing server, most of which never read."""

    module: str = "workloads.push_client"

    def pace(self, load: Load) -> list[str]:
        return ["--rate", str(4 * load.buffer_size)]  # bytes/s per active reader


@dataclass(frozen=True)
class Model:
    name: str
    module: str
    args: tuple[str, ...]
    about: str  # one line, for progress and tables
    explain: str  # a paragraph, for the HTML report
    kind: str  # "readiness", "queued" or "mitigation"
    client: Client = EchoLoad()  # what drives it: the echo load generator, or slow readers

    def server_command(self, load: Load) -> list[str]:
        """The server's command line under `load`."""
        return [
            *(sys.executable, "-m", self.module, "--buffer-size", str(load.buffer_size)),
            *(("--host", "0.0.0.0") if load.netns else ()),
            *self.args,
        ]


def models(active: int) -> list[Model]:
    """Every model, the readiness baseline first. `active` sizes the provided-buffer ring."""
    ring = str(max(8, 2 * active))
    return [
        Model(
            "readiness-pool",
            "workloads.epoll_server",
            ("--buffers", "pool", "--pool-size", str(POOL_BUFFERS)),
            "epoll; a buffer from a shared pool only while a socket is readable",
            "The readiness model. The server waits in epoll_wait() for any socket to become "
            "readable, takes a buffer from a small shared pool, reads what is there and gives "
            "the buffer back. An idle connection costs no buffer at all: memory follows the "
            "data that has arrived, not the connections open.",
            "readiness",
        ),
        Model(
            "readiness-retain",
            "workloads.epoll_server",
            ("--buffers", "retain"),
            "epoll; each connection keeps its buffer after its first data",
            "Readiness, as commonly written: epoll tells the server when to read, but each "
            "connection allocates its buffer at its first data and keeps it. Connections that "
            "never speak cost nothing; every connection that has spoken once keeps a buffer, "
            "so the cost follows the connections that were ever active.",
            "readiness",
        ),
        Model(
            "queued-threads",
            "workloads.threaded_server",
            (),
            "a thread per connection blocked in recv() into its own buffer",
            "The queued model with threads: one thread per connection, blocked in recv() on "
            "its own buffer. The kernel holds that read posted until data arrives, so every "
            "open connection, idle or not, pins a buffer (and a thread stack).",
            "queued",
        ),
        Model(
            "queued-green",
            "workloads.green_server",
            (),
            "green threads parked on readiness holding their buffers (Go-style)",
            "Green threads, the way Go's runtime works: each connection's goroutine owns a "
            "buffer and calls Read(); on EAGAIN the runtime parks it on the netpoller and "
            "retries when the socket is readable. The kernel sees a readiness wait, but the "
            "buffer stays committed to the parked read: the queued model's cost.",
            "queued",
        ),
        Model(
            "queued-uring",
            "workloads.uring_server",
            ("--op", "recv"),
            "io_uring: one RECV with its own buffer posted per connection",
            "io_uring completions: one RECV request posted per connection with its own buffer. "
            "The request (and its buffer) stays in the kernel until data arrives, so every "
            "idle connection pins a buffer.",
            "queued",
        ),
        Model(
            "uring-buffer-ring",
            "workloads.uring_server",
            ("--buffer-ring", ring),
            "io_uring: multishot RECV taking buffers from a provided-buffer ring",
            "A mitigation inside io_uring: each connection posts a multishot RECV that names a "
            "provided-buffer ring instead of a buffer. The kernel picks a buffer only when data "
            "arrives; the ring is sized for the active connections, not the open ones.",
            "mitigation",
        ),
        Model(
            "uring-poll-first",
            "workloads.uring_server",
            ("--poll-first", str(POOL_BUFFERS)),
            "io_uring: POLL_ADD per connection, RECV into a pooled buffer once readable",
            "The other io_uring mitigation: each connection posts a POLL_ADD, which holds no "
            "buffer. When it fires the server posts a RECV into a buffer from a small pool and "
            "returns the buffer at its completion: readiness, expressed in io_uring.",
            "mitigation",
        ),
    ]


def push_models() -> list[Model]:
    """The write side: a server streaming lazily produced data to mostly stalled readers."""
    return [
        Model(
            "push-readiness",
            "workloads.push_server",
            ("--model", "readiness"),
            "epoll for EPOLLOUT; a chunk produced into one buffer only when writable",
            "Readiness for writes: the server waits for a socket to become writable, produces "
            "a chunk into one shared buffer and sends what fits without blocking. A reader "
            "that stops reading costs the server nothing but its socket's queue.",
            "readiness",
            SlowReaders(),
        ),
        Model(
            "push-queued",
            "workloads.push_server",
            ("--model", "queued"),
            "a thread per connection pre-fills a chunk and blocks in send()",
            "Queued writes: each connection's thread produces its next chunk ahead of time and "
            "blocks in send() until the reader takes it. Every stalled reader holds a whole "
            "chunk of user memory pending in a write, on top of the socket's queue.",
            "queued",
            SlowReaders(),
        ),
    ]


def chosen_models(spec: str | None, active: int, push: bool = False) -> list[Model]:
    """The models named in `spec` ("a,b", in that order), or all of them; UsageError names an
    unknown one. `active` sizes the provided-buffer ring."""
    available = push_models() if push else models(active)
    if not spec:
        return available
    names = {m.name: m for m in available}
    unknown = [n for n in spec.split(",") if n not in names]
    if unknown:
        raise UsageError(f"unknown model {unknown[0]!r}; choose from {', '.join(names)}")
    return [names[n] for n in spec.split(",")]
