"""What this machine offers for tracing: detected at start (`preflight`, which refuses in one
sentence when recording is impossible), shown by `idlebuf doctor`, and consulted by the loader
(which probes can run here: io_uring, the scheduler wait hooks).

Each check says what is missing and what that costs, so users see plainly what cannot be traced.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from probes import offsets
from probes.btf import BTF
from probes.format.errors import BTFError, ProbeError, RecordError
from probes.format.meta import Host

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
URING_TRACEPOINTS = (
    "io_uring/io_uring_submit_req",
    "io_uring/io_uring_complete",
    "io_uring/io_uring_register",
)
# --min-wait sees calls wait through the scheduler and the socket layer, not syscall
# tracepoints, where the kernel has these and thread pidfds (6.9+: the recorder reads and
# seeds each thread's call through one).
BLOCK_TRACEPOINTS = ("sock/sock_recv_length", "sock/sock_send_length")
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
    refusal: str = ""  # why recording is refused when a required check fails (one sentence)

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


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace of its own (unshare --user, a rootless
    container): its capabilities hold there only, and the kernel loads BPF programs and
    lets other processes' memory be read for capabilities in the initial namespace. The
    initial namespace maps every uid to itself."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def tracefs() -> Path | None:
    for candidate in TRACEFS_CANDIDATES:
        with contextlib.suppress(OSError):  # not mounted, or not ours to look at
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


def _kernel_check() -> Check:
    major, minor = kernel_version()
    return Check(
        "kernel >= 5.8",
        (major, minor) >= (5, 8),
        platform.release(),
        "no BPF ring buffer: nothing can be recorded",
        refusal=f"kernel {platform.release()} is too old: idlebuf needs 5.8+",
    )


def _privileges_check() -> Check:
    if in_user_namespace():
        return Check(
            "privileges",
            False,
            "in a user namespace: its root is not the kernel's",
            "cannot load probes: run as root outside the user namespace",
            refusal="recording needs root in the initial user namespace: this process runs "
            "in a user namespace of its own (unshare --user, a rootless container), whose "
            "root the kernel does not let load BPF programs",
        )
    privileged = has_tracing_privileges()
    return Check(
        "privileges",
        privileged,
        "root or CAP_BPF+CAP_PERFMON+CAP_SYS_PTRACE"
        + ("" if privileged else f" (effective caps {effective_caps():#x})"),
        "cannot load probes: run as root (sudo)",
        refusal="recording needs root (or CAP_BPF+CAP_PERFMON+CAP_SYS_PTRACE)",
    )


def _tracefs_check() -> Check:
    root = tracefs()
    return Check(
        "tracefs mounted",
        root is not None,
        str(root) if root else "not mounted",
        "tracepoints cannot be attached: mount -t tracefs nodev /sys/kernel/tracing "
        "(scripts/bootstrap does this)",
        refusal="tracefs is not mounted: run scripts/bootstrap (or mount it)",
    )


def _tracepoint_checks(root: Path | None) -> list[Check]:
    checks = []
    for name, cost in TRACEPOINTS.items():
        present = tracepoint_present(name, root) if root else False
        shown = name.replace("/", ":")
        checks.append(
            Check(
                f"tracepoint {shown}",
                present,
                "present" if present else "absent",
                cost,
                required=name in REQUIRED_TRACEPOINTS,
                refusal=f"this kernel has no tracepoint {shown}",
            )
        )
    return checks


def preflight() -> None:
    """RecordError, in one sentence, if this machine or user cannot record at all: the
    required checks `idlebuf doctor` shows, cheapest first and one at a time (without
    privileges, tracefs cannot even be looked at), without parsing BTF."""
    steps: list[Callable[[], list[Check]]] = [
        lambda: [_privileges_check()],
        lambda: [_tracefs_check()],
        lambda: _tracepoint_checks(tracefs()),
        lambda: [_kernel_check()],
    ]
    for step in steps:
        for check in missing_required(step()):
            raise RecordError(check.refusal)


def uring_support(btf: BTF) -> tuple[dict[str, int] | None, str]:
    """(constants, why): the io_uring probes' constants, or None and why io_uring cannot be
    traced here."""
    missing = [t for t in URING_TRACEPOINTS if not tracepoint_present(t)]
    if missing:
        return None, "no tracepoint " + ", ".join(m.replace("/", ":") for m in missing)
    try:
        return offsets.uring_constants(btf), "traced"
    except BTFError as exc:
        return None, f"this kernel's io_uring layout is not understood: {exc}"


def wait_hooks(min_wait_ns: int, asked: str = "auto") -> str | None:
    """How --min-wait sees calls wait here: "scheduler" (no syscall tracepoint; a call that
    does not wait costs a lookup at its return), "syscalls" (older kernels), None without
    --min-wait. ProbeError if the scheduler hooks are `asked` for where they cannot run."""
    if not min_wait_ns:
        return None
    if asked == "syscalls":
        return "syscalls"
    missing = [t.replace("/", ":") for t in BLOCK_TRACEPOINTS if not tracepoint_present(t)]
    if kernel_version() < (6, 9):
        missing.append("thread pidfds (Linux 6.9)")
    if not missing:
        return "scheduler"
    if asked == "scheduler":
        raise ProbeError("the scheduler wait hooks need " + ", ".join(missing))
    return "syscalls"


def run_checks(parsed_btf: BTF | None = None) -> list[Check]:
    """Every check; `parsed_btf` spares parsing the kernel's BTF again when a caller has it."""
    root = tracefs()
    checks = [_kernel_check(), _privileges_check(), _tracefs_check()]
    btf = Path("/sys/kernel/btf/vmlinux")
    checks.append(
        Check(
            "BTF",
            btf.exists(),
            str(btf),
            "kernel structure offsets unknown: sockets cannot be told from files",
            refusal="this kernel has no BTF (/sys/kernel/btf/vmlinux)",
        )
    )
    mode = lockdown_mode()
    checks.append(
        Check(
            "lockdown",
            mode in (None, "none", "integrity"),
            mode or "not reported (securityfs not mounted or no lockdown LSM)",
            "confidentiality lockdown forbids reading kernel memory from BPF",
            refusal="lockdown mode 'confidentiality' forbids reading kernel memory from BPF",
        )
    )
    headers = Path(f"/lib/modules/{platform.release()}/build/include")
    checks.append(
        Check(
            "kernel headers",
            headers.exists(),
            str(headers.parent.resolve()) if headers.exists() else "absent",
            "bcc cannot compile probes: run scripts/bootstrap",
            refusal="no kernel header tree for bcc: run scripts/bootstrap",
        )
    )
    if btf.exists():
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
    checks.append(
        Check(
            "bcc",
            ok,
            detail,
            "cannot load probes: run scripts/bootstrap",
            refusal="bcc is not importable: run scripts/bootstrap",
        )
    )
    checks += _tracepoint_checks(root)
    return checks


def missing_required(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.required and not c.ok]


def host_facts() -> Host:
    return Host(platform.node(), platform.release(), platform.machine(), str(os.cpu_count()))
