"""Argument types for numeric options: a number that is not finite (nan, inf) or out of its
range is refused by argparse, in one line, before any work."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number(
    kind: type = float,
    low: float | None = None,
    high: float | None = None,
    above: bool = False,
    what: str | None = None,
) -> Callable[[str], float]:
    """A parser of `kind` (int or float) for values >= `low` (> `low` with `above`) and
    <= `high`; `what` says what is wanted when a value is refused."""

    def refuse(text: str, why: str) -> argparse.ArgumentTypeError:
        return argparse.ArgumentTypeError(f"{text!r}: {what or why}")

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise refuse(text, f"not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise refuse(text, "not a finite number")
        if low is not None and (value <= low if above else value < low):
            raise refuse(text, f"must be {'more than' if above else 'at least'} {low:g}")
        if high is not None and value > high:
            raise refuse(text, f"must be at most {high:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def numbers(
    kind: type, low: float, high: float | None = None, what: str | None = None
) -> Callable[[str], list]:
    """A comma-separated list of numbers, each checked as number() checks one."""
    one = number(kind, low, high, what=what)

    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        return [one(str(v)) for v in values]

    return parse


def add_idle_threshold(parser: argparse.ArgumentParser) -> None:
    """--idle-threshold SECONDS, as report and fleet take it."""
    parser.add_argument(
        "--idle-threshold",
        type=number(float, 0),
        default=1.0,
        metavar="SECONDS",
        help="a connection with no data for this long is idle (default 1)",
    )
