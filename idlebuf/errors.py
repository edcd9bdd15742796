"""The one error type the CLI turns into a one-line message and an exit code."""

from __future__ import annotations


class IdlebufError(Exception):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
