"""Kernel structure offsets and constants the probes need, from the running kernel's BTF.

Offsets reach the BPF programs as -D constants (probes.loader); nothing is taken from the
installed kernel headers, which may belong to another kernel.
"""

from __future__ import annotations

from probes.btf import BTF
from probes.format import schema
from probes.format.errors import BTFError

# Kernel structure members the read probes read (fd_is_socket() walks them):
# constant name -> (struct, member).
KERNEL_OFFSETS = {
    "OFF_TASK_FILES": ("task_struct", "files"),
    "OFF_FILES_FDT": ("files_struct", "fdt"),
    "OFF_FDT_MAX_FDS": ("fdtable", "max_fds"),
    "OFF_FDT_FD": ("fdtable", "fd"),
    "OFF_FILE_INODE": ("file", "f_inode"),
    "OFF_INODE_MODE": ("inode", "i_mode"),
    # state at attach (attach.bpf.c): the iterator's view of tasks and files
    "OFF_TASK_TGID": ("task_struct", "tgid"),
    "OFF_TASK_MM": ("task_struct", "mm"),
    "OFF_FILE_PRIVATE": ("file", "private_data"),
}

# io_uring request layout, as (constant, struct, member path within the struct); op-specific
# structures live in io_kiocb's `cmd` area, so their offsets add io_kiocb.cmd.
URING_OFFSETS = {
    "URING_OFF_CQE_FD": [("io_kiocb", "cqe"), ("io_cqe", "fd")],
    "URING_OFF_ASYNC": [("io_kiocb", "async_data")],
    "URING_OFF_BUF_INDEX": [("io_kiocb", "buf_index")],
    "URING_OFF_SR_BUF": [("io_kiocb", "cmd"), ("io_sr_msg", "buf")],
    "URING_OFF_SR_LEN": [("io_kiocb", "cmd"), ("io_sr_msg", "len")],
    "URING_OFF_SR_FLAGS": [("io_kiocb", "cmd"), ("io_sr_msg", "flags")],
    "URING_OFF_RW_ADDR": [("io_kiocb", "cmd"), ("io_rw", "addr")],
    "URING_OFF_RW_LEN": [("io_kiocb", "cmd"), ("io_rw", "len")],
    "URING_OFF_PB_ADDR": [("io_kiocb", "cmd"), ("io_provide_buf", "addr")],
    "URING_OFF_PB_LEN": [("io_kiocb", "cmd"), ("io_provide_buf", "len")],
    "URING_OFF_PB_BGID": [("io_kiocb", "cmd"), ("io_provide_buf", "bgid")],
    "URING_OFF_PB_NBUFS": [("io_kiocb", "cmd"), ("io_provide_buf", "nbufs")],
    "URING_OFF_PB_BID": [("io_kiocb", "cmd"), ("io_provide_buf", "bid")],
    "URING_OFF_ARW_ITER": [("io_async_rw", "iter")],
    "URING_OFF_AMSG_ITER": [("io_async_msghdr", "msg"), ("msghdr", "msg_iter")],
    "ITER_OFF_TYPE": [("iov_iter", "iter_type")],
    "ITER_OFF_IOV": [("iov_iter", "__iov")],
    "ITER_OFF_COUNT": [("iov_iter", "count")],
    "ITER_OFF_NR_SEGS": [("iov_iter", "nr_segs")],
    # a request found at attach is read from memory, not from a tracepoint's fields
    "URING_OFF_FILE": [("io_kiocb", "file")],
    "URING_OFF_OPCODE": [("io_kiocb", "opcode")],
    "URING_OFF_FLAGS": [("io_kiocb", "flags")],
    "URING_OFF_USER_DATA": [("io_kiocb", "cqe"), ("io_cqe", "user_data")],
}
# request flag bits (anonymous enum in io_uring_types.h), passed as masks
URING_FLAG_BITS = {
    "REQ_F_FIXED_FILE_MASK": "REQ_F_FIXED_FILE_BIT",
    "REQ_F_BUFFER_SELECT_MASK": "REQ_F_BUFFER_SELECT_BIT",
    "REQ_F_APOLL_MULTISHOT_MASK": "REQ_F_APOLL_MULTISHOT_BIT",
}


def kernel_offsets(btf: BTF) -> dict[str, int]:
    try:
        return {c: btf.offsetof(s, m) for c, (s, m) in KERNEL_OFFSETS.items()}
    except BTFError as exc:
        raise BTFError(f"kernel BTF lacks what the socket check needs: {exc}") from None


def uring_constants(btf: BTF) -> dict[str, int]:
    """Offsets and constants the io_uring probes need; BTFError says what this kernel lacks."""
    out = {name: sum(btf.offsetof(s, m) for s, m in path) for name, path in URING_OFFSETS.items()}
    for mask, bit in URING_FLAG_BITS.items():
        out[mask] = 1 << btf.enumerator(bit)
    out["URING_FLAGS_SIZE"] = btf.member_size("io_kiocb", "flags")
    out["ITER_UBUF_VAL"] = btf.enum_value("iter_type", "ITER_UBUF")
    out["ITER_IOVEC_VAL"] = btf.enum_value("iter_type", "ITER_IOVEC")
    for name, value in (schema.URING_READ_OPS | schema.URING_WAIT_OPS).items():
        if btf.enum_value("io_uring_op", f"IORING_OP_{name}") != value:
            raise BTFError(f"IORING_OP_{name} is not {value} on this kernel")
    return out
