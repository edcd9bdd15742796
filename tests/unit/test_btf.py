"""The BTF reader against bpftool's own dump of the running kernel's BTF."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from probes.btf import BTF, VMLINUX
from probes.offsets import KERNEL_OFFSETS

pytestmark = pytest.mark.skipif(not VMLINUX.exists(), reason="no kernel BTF")


def bpftool_members(structs: set[str]) -> dict[str, dict[str, int]]:
    """{struct: {member: bit offset}} for top-level named members, from `bpftool btf dump`."""
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    raw = subprocess.run(
        [bpftool, "btf", "dump", "file", str(VMLINUX), "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in raw.splitlines():
        head = re.match(r"\[\d+\] STRUCT '(\w+)'", line)
        if head:
            current = (
                head.group(1) if head.group(1) in structs and head.group(1) not in out else None
            )
            if current:
                out[current] = {}
            continue
        if line.startswith("["):
            current = None
        elif current:
            m = re.match(r"\s+'(\w+)' type_id=\d+ bits_offset=(\d+)$", line)
            if m:
                out[current][m.group(1)] = int(m.group(2))
    return out


def test_offsets_agree_with_bpftool() -> None:
    btf = BTF.load()
    wanted = {s for s, _ in KERNEL_OFFSETS.values()}
    reference = bpftool_members(wanted)
    checked = 0
    for struct_name, members in reference.items():
        for member, bits in members.items():
            if bits % 8 == 0:
                assert btf.offsetof(struct_name, member) == bits // 8, (struct_name, member)
                checked += 1
    assert checked > 50
    for struct_name, member in KERNEL_OFFSETS.values():
        if member in reference[struct_name]:
            assert btf.offsetof(struct_name, member) * 8 == reference[struct_name][member]


def test_anonymous_members_and_errors() -> None:
    btf = BTF.load()
    # task_struct.__state sits in no anonymous member; pid is reachable either way
    assert btf.offsetof("task_struct", "pid") > 0
    with pytest.raises(Exception, match="no member"):
        btf.offsetof("task_struct", "no_such_member")
    assert btf.enum_value("bpf_map_type", "BPF_MAP_TYPE_RINGBUF") == 27
