"""A process's own state from /proc: resident memory (status) and its anonymous mappings."""

from __future__ import annotations

from dataclasses import dataclass

STATUS_FIELDS = {
    "VmRSS": "vm_rss",
    "RssAnon": "rss_anon",
    "RssFile": "rss_file",
    "RssShmem": "rss_shmem",
}
# Mappings that are not a program's own memory: the brk heap (the allocator's, found by the
# heap analysis), stacks and the kernel's.
_NOT_OWN = ("[heap]", "[stack]", "[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]")


@dataclass(frozen=True)
class Mapping:
    addr: int
    length: int
    prot: str  # "rw-p"...


def status(pid: int) -> dict[str, int] | None:
    """Resident bytes from /proc/PID/status (VmRSS, RssAnon, RssFile, RssShmem); None if the
    process is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in STATUS_FIELDS:
                    out[STATUS_FIELDS[key]] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return out if len(out) == len(STATUS_FIELDS) else None


def anonymous_mappings(pid: int) -> list[Mapping]:
    """The private anonymous mappings of `pid` (its own memory: pools, a Go heap's arenas,
    thread arenas), as /proc/PID/maps shows them now."""
    out = []
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 5 or parts[4] != "0":  # inode 0: not file-backed
                    continue
                name = parts[5] if len(parts) > 5 else ""
                if name in _NOT_OWN or (name and not name.startswith("[anon")):
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append(Mapping(lo, hi - lo, parts[1]))
    except OSError:
        return []
    return out
