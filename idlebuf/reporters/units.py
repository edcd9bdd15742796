"""How figures are written for people: bytes in binary units, counts with separators."""

from __future__ import annotations

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


def count(n: float) -> str:
    return f"{n:,}"


def ratio(x: float) -> str:
    return f"{x:g}"
