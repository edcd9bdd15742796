"""How figures are written for people: bytes in binary units, counts with separators."""

from __future__ import annotations

import re

# C0 and C1 control characters and DEL: a traced process chooses its own name (and its
# command line, its paths): printed raw, they could drive the reader's terminal
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with every control character shown as an escape (\\x1b), safe for a terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


UNKNOWN = "unknown"


def human_bytes(n: float | None) -> str:
    """Binary units; None (a figure that could not be measured) reads "unknown"."""
    if n is None:
        return UNKNOWN
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def count(n: float | None) -> str:
    """With separators; None reads "unknown"."""
    return UNKNOWN if n is None else f"{n:,}"


def ratio(x: float) -> str:
    return f"{x:g}"
