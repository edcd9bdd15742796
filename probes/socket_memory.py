"""Kernel socket memory of the targets, sampled through sock_diag (pyroute2), per (pid, fd).

Each sample dumps TCP and UDP (IPv4 and IPv6) and Unix sockets with their skmem counters (the
numbers `ss -m` shows) and keeps those whose inode one of the targets holds open, found in
/proc/PID/fd. Sampling, not tracing: a socket that lives between two samples is not seen.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Iterable
from typing import Any

from probes.format.schema import SKMEM_FIELDS

_INET_DIAG_SKMEMINFO = 7
_UDIAG_SHOW_NAME, _UDIAG_SHOW_PEER, _UDIAG_SHOW_RQLEN, _UDIAG_SHOW_MEMINFO = 1, 4, 0x10, 0x20
_TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}


def socket_inodes(
    pids: Iterable[int], epolls: dict[int, list[int]] | None = None
) -> dict[int, tuple[int, int]]:
    """socket inode -> (pid, fd) for every socket the processes hold; with `epolls`, also
    each process's epoll fds (pid -> fds)."""
    out: dict[int, tuple[int, int]] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.setdefault(int(link[8:-1]), (pid, int(fd)))
            elif epolls is not None and link == "anon_inode:[eventpoll]":
                epolls.setdefault(pid, []).append(int(fd))
    return out


def epoll_members(pid: int, epoll_fds: Iterable[int]) -> Counter[int]:
    """fd -> how many of the process's epoll sets watch it (/proc/PID/fdinfo "tfd:" lines;
    the fd numbers are those of the process that added them)."""
    members: Counter[int] = Counter()
    for efd in epoll_fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{efd}", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("tfd:"):
                        members[int(line.split()[1])] += 1
        except (OSError, ValueError, IndexError):
            continue
    return members


def parse_skmem(hexbytes: str | None) -> dict[str, int]:
    """pyroute2 hands SK_MEMINFO arrays over as "aa:bb:..." hex; 9 native u32s."""
    if not hexbytes:
        return dict.fromkeys(SKMEM_FIELDS, 0)
    raw = bytes(int(b, 16) for b in hexbytes.split(":"))
    values = [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw) - 3, 4)]
    values += [0] * (len(SKMEM_FIELDS) - len(values))
    return dict(zip(SKMEM_FIELDS, values))


class SocketSampler:
    """One sock_diag socket, kept open across samples."""

    def __init__(self) -> None:
        from pyroute2 import DiagSocket  # noqa: PLC0415 - only recording needs it

        self._diag = DiagSocket()
        self._diag.bind()

    def sample(self, pids: Iterable[int], ts_ns: int) -> list[dict[str, Any]]:
        epolls: dict[int, list[int]] = {}
        inodes = socket_inodes(pids, epolls)
        if not inodes:
            return []
        watched = {pid: epoll_members(pid, fds) for pid, fds in epolls.items()}
        rows = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
                for msg in self._diag.get_sock_stats(
                    family=family, protocol=proto, extensions=1 << (_INET_DIAG_SKMEMINFO - 1)
                ):
                    owner = inodes.get(msg["idiag_inode"])
                    if owner is None:
                        continue
                    rows.append(
                        {
                            "ts_ns": ts_ns,
                            "pid": owner[0],
                            "fd": owner[1],
                            "inode": msg["idiag_inode"],
                            "family": "tcp" if proto == socket.IPPROTO_TCP else "udp",
                            "ipv6": family == socket.AF_INET6,
                            "state": _TCP_STATES.get(msg["idiag_state"], str(msg["idiag_state"])),
                            "local": f"{msg['idiag_src']}:{msg['idiag_sport']}",
                            "remote": f"{msg['idiag_dst']}:{msg['idiag_dport']}",
                            "rqueue": msg["idiag_rqueue"],
                            "wqueue": msg["idiag_wqueue"],
                            **parse_skmem(msg.get_attr("INET_DIAG_SKMEMINFO")),
                            "epoll": watched.get(owner[0], Counter())[owner[1]],
                            "sock_type": 1 if proto == socket.IPPROTO_TCP else 2,
                        }
                    )
        show = _UDIAG_SHOW_NAME | _UDIAG_SHOW_PEER | _UDIAG_SHOW_RQLEN | _UDIAG_SHOW_MEMINFO
        for msg in self._diag.get_sock_stats(family=socket.AF_UNIX, show=show):
            owner = inodes.get(msg["udiag_ino"])
            if owner is None:
                continue
            queues = msg.get_attr("UNIX_DIAG_RQLEN") or {}
            rows.append(
                {
                    "ts_ns": ts_ns,
                    "pid": owner[0],
                    "fd": owner[1],
                    "inode": msg["udiag_ino"],
                    "family": "unix",
                    "ipv6": False,
                    "state": str(msg["udiag_state"]),
                    "local": msg.get_attr("UNIX_DIAG_NAME") or "",
                    "remote": str(msg.get_attr("UNIX_DIAG_PEER") or ""),
                    "rqueue": queues.get("udiag_rqueue", 0),
                    "wqueue": queues.get("udiag_wqueue", 0),
                    **parse_skmem(msg.get_attr("UNIX_DIAG_MEMINFO")),
                    "epoll": watched.get(owner[0], Counter())[owner[1]],
                    "sock_type": msg["udiag_type"],
                }
            )
        return rows

    def close(self) -> None:
        self._diag.close()
