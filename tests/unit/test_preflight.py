"""The recorder refuses to start, with one sentence, when the machine cannot trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from probes import features
from probes.recorder import RecordConfig, Recorder, RecordError


@pytest.fixture
def capable(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Pretend every check passes, so one test can break exactly one thing."""
    monkeypatch.setattr(features, "has_tracing_privileges", lambda: True)
    monkeypatch.setattr(features, "in_user_namespace", lambda: False)
    monkeypatch.setattr(features, "tracefs", lambda: Path("/sys/kernel/tracing"))
    monkeypatch.setattr(features, "tracepoint_present", lambda name, root=None: True)
    monkeypatch.setattr(features, "kernel_version", lambda: (6, 18))
    return monkeypatch


def preflight(tmp_path: Path, **kwargs: object) -> None:
    config = RecordConfig(output=tmp_path / "t", command=["true"], **kwargs)  # type: ignore[arg-type]
    Recorder(config)._preflight()


def test_passes_when_capable(capable: pytest.MonkeyPatch, tmp_path: Path) -> None:
    preflight(tmp_path)


def test_missing_tracepoint(capable: pytest.MonkeyPatch, tmp_path: Path) -> None:
    capable.setattr(features, "tracepoint_present", lambda name, root=None: "recvmsg" not in name)
    with pytest.raises(RecordError, match="no tracepoint syscalls:sys_enter_recvmsg"):
        preflight(tmp_path)


def test_old_kernel(capable: pytest.MonkeyPatch, tmp_path: Path) -> None:
    capable.setattr(features, "kernel_version", lambda: (5, 4))
    with pytest.raises(RecordError, match="too old"):
        preflight(tmp_path)


def test_tracefs_not_mounted(capable: pytest.MonkeyPatch, tmp_path: Path) -> None:
    capable.setattr(features, "tracefs", lambda: None)
    with pytest.raises(RecordError, match="tracefs is not mounted"):
        preflight(tmp_path)


def test_not_privileged(capable: pytest.MonkeyPatch, tmp_path: Path) -> None:
    capable.setattr(features, "has_tracing_privileges", lambda: False)
    with pytest.raises(RecordError, match="needs root"):
        preflight(tmp_path)


def test_in_a_user_namespace(capable: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Root in a user namespace of its own has every capability there, none the kernel
    honours for BPF: refused in one sentence that says so, not a failure to load."""
    capable.setattr(features, "in_user_namespace", lambda: True)
    with pytest.raises(RecordError, match="^recording needs root in the initial user namespace"):
        preflight(tmp_path)


def test_pid_and_command_together(capable: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="not both"):
        preflight(tmp_path, pids=[1])


def test_lockdown_parsing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "lockdown"
    f.write_text("none [integrity] confidentiality\n")
    real = Path.read_text
    monkeypatch.setattr(
        Path,
        "read_text",
        lambda self, *a, **k: real(f if str(self).endswith("lockdown") else self, *a, **k),
    )
    assert features.lockdown_mode() == "integrity"


def test_wait_hooks_follow_the_kernel(capable: pytest.MonkeyPatch) -> None:
    """--min-wait sees waits through the scheduler on 6.9+ with the socket tracepoints,
    through syscall tracepoints otherwise; asking for the scheduler where it cannot be is
    one sentence naming what is missing."""
    from probes.features import wait_hooks
    from probes.format.errors import ProbeError

    assert wait_hooks(0) is None
    waiting = 1_000_000
    assert wait_hooks(waiting) == "scheduler"
    assert wait_hooks(1, "syscalls") == "syscalls"
    capable.setattr(features, "kernel_version", lambda: (6, 8))
    assert wait_hooks(waiting) == "syscalls"
    capable.setattr(features, "kernel_version", lambda: (6, 18))
    capable.setattr(features, "tracepoint_present", lambda name, root=None: "sock/" not in name)
    assert wait_hooks(waiting) == "syscalls"
    with pytest.raises(ProbeError, match="sock:sock_recv_length, sock:sock_send_length"):
        wait_hooks(1, "scheduler")
