"""The `idlebuf` command: a registry of subcommands, `main(argv) -> int`.

Every expected failure raises an IdlebufError (probes.format.errors), printed as one sentence
with the exit code of its kind; anything else is a bug, shown as one line unless IDLEBUF_DEBUG
asks for the traceback. A permission refused is the one exception: a file or directory the
invoking user may not read (a trace recorded as root is owner-only) is no bug wherever it is
met, and is said as the reader says it, with the trace errors' exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from idlebuf.commands import compare, demo, doctor, fleet, record, report, sweep
from probes.format.errors import IdlebufError, TraceError
from probes.format.reader import unreadable

COMMANDS = {
    "record": record,
    "report": report,
    "compare": compare,
    "demo": demo,
    "sweep": sweep,
    "fleet": fleet,
    "doctor": doctor,
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`idlebuf CMD: error: ...`, exit 2): the usage is what
    --help is for."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="idlebuf",
        description="Trace the read buffers a process holds waiting for data (queued vs "
        "readiness IO), and the memory behind them.",
    )
    sub = parser.add_subparsers(
        dest="subcommand", metavar="COMMAND", required=True, parser_class=_Parser
    )
    for _name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except IdlebufError as exc:
        print(f"idlebuf {args.subcommand}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"idlebuf {args.subcommand}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except PermissionError as exc:
        print(f"idlebuf {args.subcommand}: error: {_refused(exc)}", file=sys.stderr)
        return TraceError.exit_code
    except Exception as exc:  # a bug: one line by default, the traceback on request
        if os.environ.get("IDLEBUF_DEBUG"):
            raise
        print(
            f"idlebuf {args.subcommand}: internal error: {exc!r} (a bug; run again with "
            "IDLEBUF_DEBUG=1 for the traceback; any trace written so far is kept, "
            "marked incomplete)",
            file=sys.stderr,
        )
        return 70


def _refused(exc: PermissionError) -> str:
    """What could not be opened, and why: the outermost directory on the path that the user
    may not enter (the trace directory, not the meta.json inside it), else the path."""
    if exc.filename is None:
        return f"permission denied: {exc.strerror or exc}"
    path = Path(os.fsdecode(exc.filename))
    for place in [*reversed(path.parents), path]:
        try:
            closed = place.is_dir() and not os.access(place, os.X_OK, effective_ids=True)
        except OSError:
            break
        if closed:
            return str(unreadable(place, exc))
    return str(unreadable(path, exc))


if __name__ == "__main__":
    sys.exit(main())
