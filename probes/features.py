"""What this machine offers for tracing, detected at start and shown by `idlebuf doctor`.

Each check says what is missing and what that costs, so users see plainly what cannot be traced.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from probes.btf import BTF, BTFError

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

# Tracepoints idlebuf uses, with what is lost without them.
TRACEPOINTS: dict[str, str] = {
    "syscalls/sys_enter_recvfrom": "no posted reads from blocking recv()/recvfrom()",
    "syscalls/sys_enter_read": "no posted reads from blocking read()",
    "syscalls/sys_enter_readv": "no posted reads from readv()",
    "syscalls/sys_enter_recvmsg": "no posted reads from recvmsg()",
    "syscalls/sys_enter_recvmmsg": "no posted reads from recvmmsg()",
    "syscalls/sys_enter_preadv2": "no posted reads from preadv2()",
    "syscalls/sys_enter_epoll_wait": "no readiness waits (epoll_wait)",
    "syscalls/sys_enter_poll": "no readiness waits (poll)",
    "syscalls/sys_enter_select": "no readiness waits (select)",
    "sched/sched_process_fork": "children of a launched command are not followed",
    "io_uring/io_uring_submit_req": "io_uring requests are invisible",
    "io_uring/io_uring_complete": "io_uring completions are invisible",
    "kmem/rss_stat": "no resident-memory time series",
    "sock/sock_recv_length": "--min-wait uses syscall tracepoints (every syscall pays ~0.5 us)",
    "sock/sock_send_length": "--min-wait uses syscall tracepoints (every syscall pays ~0.5 us)",
}
# Tracepoints without which the read probes cannot load at all.
REQUIRED_TRACEPOINTS = tuple(t for t in TRACEPOINTS if t.startswith(("syscalls/", "sched/")))

CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 19, 21, 38, 39


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    cost: str  # what is lost when not ok
    required: bool = True

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def effective_caps() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def has_tracing_privileges() -> bool:
    caps = effective_caps()
    has = lambda cap: bool(caps >> cap & 1)  # noqa: E731
    bpf_ok = has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))
    return bpf_ok and has(CAP_SYS_PTRACE)


def tracefs() -> Path | None:
    for candidate in TRACEFS_CANDIDATES:
        if (candidate / "events").is_dir():
            return candidate
    return None


def kernel_version() -> tuple[int, int]:
    release = platform.release()
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def lockdown_mode() -> str | None:
    try:
        text = Path("/sys/kernel/security/lockdown").read_text()
    except OSError:
        return None
    # "none [integrity] confidentiality": the bracketed word is in force
    for word in text.split():
        if word.startswith("["):
            return word.strip("[]")
    return None


def tracepoint_present(name: str, root: Path | None = None) -> bool:
    root = root or tracefs()
    return bool(root and (root / "events" / name).is_dir())


def bcc_importable() -> tuple[bool, str]:
    try:
        import bcc  # noqa: F401, PLC0415
    except ImportError as exc:
        return False, str(exc)
    return True, "bcc importable"


def run_checks(parsed_btf: BTF | None = None) -> list[Check]:
    """Every check; `parsed_btf` spares parsing the kernel's BTF again when a caller has it."""
    checks = []
    major, minor = kernel_version()
    checks.append(
        Check(
            "kernel >= 5.8",
            (major, minor) >= (5, 8),
            platform.release(),
            "no BPF ring buffer: nothing can be recorded",
        )
    )
    privileged = has_tracing_privileges()
    checks.append(
        Check(
            "privileges",
            privileged,
            "root or CAP_BPF+CAP_PERFMON+CAP_SYS_PTRACE"
            + ("" if privileged else f" (effective caps {effective_caps():#x})"),
            "cannot load probes: run as root (sudo)",
        )
    )
    root = tracefs()
    checks.append(
        Check(
            "tracefs mounted",
            root is not None,
            str(root) if root else "not mounted",
            "tracepoints cannot be attached: mount -t tracefs nodev /sys/kernel/tracing "
            "(scripts/bootstrap does this)",
        )
    )
    btf = Path("/sys/kernel/btf/vmlinux")
    checks.append(
        Check(
            "BTF",
            btf.exists(),
            str(btf),
            "kernel structure offsets unknown: sockets cannot be told from files",
        )
    )
    mode = lockdown_mode()
    checks.append(
        Check(
            "lockdown",
            mode in (None, "none", "integrity"),
            mode or "not reported (securityfs not mounted or no lockdown LSM)",
            "confidentiality lockdown forbids reading kernel memory from BPF",
        )
    )
    headers = Path(f"/lib/modules/{platform.release()}/build/include")
    checks.append(
        Check(
            "kernel headers",
            headers.exists(),
            str(headers.parent.resolve()) if headers.exists() else "absent",
            "bcc cannot compile probes: run scripts/bootstrap",
        )
    )
    if btf.exists():
        from probes.loader import uring_support  # noqa: PLC0415 - loader imports this module

        try:
            constants, why = uring_support(parsed_btf or BTF.load())
        except BTFError as exc:
            constants, why = None, str(exc)
        checks.append(
            Check(
                "io_uring request layout",
                constants is not None,
                "understood (offsets from BTF)" if constants else why,
                "io_uring reads cannot be traced (syscall reads still are)",
                required=False,
            )
        )
    ok, detail = bcc_importable()
    checks.append(Check("bcc", ok, detail, "cannot load probes: run scripts/bootstrap"))
    for name, cost in TRACEPOINTS.items():
        present = tracepoint_present(name, root) if root else False
        checks.append(
            Check(
                f"tracepoint {name.replace('/', ':')}",
                present,
                "present" if present else "absent",
                cost,
                required=name in REQUIRED_TRACEPOINTS,
            )
        )
    return checks


def missing_required(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.required and not c.ok]


def host_facts() -> dict[str, str]:
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": str(os.cpu_count()),
    }
