"""The columns a comparison is shown in: each column once, in the lists of the terminal table
and of the HTML page (which shows its secondary columns in a details line under each row, so
that its table fits the window)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from idlebuf.reporters.units import count, human_bytes, ratio


@dataclass(frozen=True)
class Column:
    key: str  # a ComparisonRow field
    short: str  # header in the terminal
    title: str  # header on the HTML page
    fmt: Callable[[Any], str]


MODEL = Column("model", "model", "model", str)
CONNECTIONS = Column("connections", "conns", "connections", count)
ACTIVE = Column("active", "active", "active", count)
RSS_GROWTH = Column("rss_growth", "RSS growth", "RSS growth", human_bytes)
SOCKET_MEMORY = Column("socket_kernel_bytes", "socket mem", "kernel socket memory", human_bytes)
RATIO = Column("ratio_to_readiness", "x readiness", "x readiness", ratio)

POSTED = Column("posted_reads", "posted", "posted reads", count)
PINNED = Column("pinned_bytes", "pinned", "pinned", human_bytes)
IO_BUFFER_MEMORY = Column("io_buffer_memory", "IO-buffer memory", "IO-buffer memory", human_bytes)
RESIDENT = Column("io_buffer_memory_resident", "resident", "resident", human_bytes)
PER_IDLE = Column(
    "per_idle_connection_bytes",
    "per idle conn",
    "IO buffer + socket memory per idle connection",
    human_bytes,
)
KERNEL = Column("kernel_per_connection_bytes", "kernel/conn", "kernel per connection", human_bytes)
WHOLE = Column(
    "whole_per_idle_connection_bytes",
    "whole/idle conn",
    "whole cost per idle connection",
    human_bytes,
)

READS = [
    MODEL,
    CONNECTIONS,
    ACTIVE,
    POSTED,
    PINNED,
    IO_BUFFER_MEMORY,
    RESIDENT,
    RSS_GROWTH,
    SOCKET_MEMORY,
    PER_IDLE,
    KERNEL,
    WHOLE,
    RATIO,
]
WRITE_FIGURES = [
    Column("pending_writes", "pending writes", "pending writes", count),
    Column("pending_write_bytes", "pending bytes", "pending write bytes", human_bytes),
    Column("write_buffer_heap", "write-buffer memory", "write-buffer memory", human_bytes),
]
# the write side (demo --push): its own figures instead of the reads'
WRITES = [MODEL, CONNECTIONS, ACTIVE, *WRITE_FIGURES, RSS_GROWTH, SOCKET_MEMORY, RATIO]

# the page: what is compared in the table, the rest in each row's details line; KEY are
# the columns the page exists for, highlighted
PAGE_READS = [
    MODEL,
    CONNECTIONS,
    ACTIVE,
    POSTED,
    PINNED,
    IO_BUFFER_MEMORY,
    RSS_GROWTH,
    WHOLE,
    RATIO,
]
PAGE_READS_DETAILS = [RESIDENT, SOCKET_MEMORY, PER_IDLE, KERNEL]  # + the writes', where seen
PAGE_WRITES = WRITES
KEY = [WHOLE, RATIO]
