"""The error family every layer raises for an expected failure.

Each class is one kind of failure with its own exit code; its message says what is wrong in
one sentence. The CLI catches `IdlebufError` alone and prints that sentence: anything else
that escapes is a bug. It lives in the format package because the format is the one module
capture, analysis and the application all import.
"""

from __future__ import annotations


class IdlebufError(Exception):
    """An expected failure: bad input or an environment that cannot do what was asked."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(IdlebufError):
    """The command line asks for something impossible or contradictory (argparse's code)."""

    exit_code = 2


class TraceError(IdlebufError):
    """A trace (or a saved comparison or sweep) cannot be read: foreign, newer or damaged."""

    exit_code = 3


class OutputError(IdlebufError):
    """An output path cannot be used or written."""

    exit_code = 4


class RecordError(IdlebufError):
    """A recording cannot start or go on: privileges, kernel features, targets."""

    exit_code = 5


class ProbeError(RecordError):
    """A probe could not be compiled or attached."""


class BTFError(RecordError):
    """The kernel's BTF lacks a type or member a probe needs, or cannot be read."""
