"""Small helpers shared by the workloads (they import nothing else of idlebuf)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
from typing import Any


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one: servers here hold thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def emit(record: dict[str, Any]) -> None:
    """One JSON object per line on stdout: how workloads report their ground truth."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def server_parser(doc: str) -> argparse.ArgumentParser:
    """The options every server shares: where to listen and how big a buffer is."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--buffer-size", type=int, default=16384)
    return parser


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(4096)
    return listener


def listening(listener: socket.socket, **extra: Any) -> None:
    """Announce the server is ready: {"event": "listening", "pid", "host", "port", ...}."""
    host, port = listener.getsockname()[:2]
    emit({"event": "listening", "pid": os.getpid(), "host": host, "port": port, **extra})
