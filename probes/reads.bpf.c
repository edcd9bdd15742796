/*
 * Posted reads from blocking syscalls.
 *
 * Measures: every read-type syscall on a socket by a target process, as a POST record when
 *   it enters (fd, buffer address, total length) and a COMPLETE record when it returns (bytes
 *   or -errno). `inflight` holds the reads the kernel is waiting to fill, keyed by thread.
 * Attach points: syscalls:sys_enter_/sys_exit_{read,readv,recvfrom,recvmsg,recvmmsg,preadv2},
 *   sched:sched_process_fork and sched:sched_process_exit (to follow children).
 * Needs: Linux 5.8 (BPF ring buffer), BTF for the offsets below.
 * Overhead: ~615 ns per read-type syscall of a target (enter + exit + the socket check's 7
 *   kernel reads); ~140 ns per read-type syscall of any other process (the target lookup).
 *
 * Compile-time constants (cflags): OFF_TASK_FILES, OFF_FILES_FDT, OFF_FDT_MAX_FDS, OFF_FDT_FD,
 * OFF_FILE_INODE, OFF_INODE_MODE (from BTF), MAX_TARGETS, MAX_INFLIGHT, RINGBUF_PAGES,
 * FOLLOW_CHILDREN, MAX_IOV. The record layout comes from probes/layout.py (prepended).
 */
#include <uapi/linux/ptrace.h>
#include <linux/uio.h>
#include <uapi/linux/fs.h>

/* preadv2's tracepoint context uses rwf_t, which only linux/fs.h (kernel-internal) names. */
typedef __kernel_rwf_t rwf_t;

#define S_IFMT_ 00170000
#define S_IFSOCK_ 0140000

struct inflight {
    u64 ts_ns;
    u64 addr;
    u64 len;
    s32 fd;
    u32 flags;
    u32 nvec;
    u16 op;
    u16 pad;
};

/* UAPI struct user_msghdr (64-bit) and struct mmsghdr */
struct msghdr_u {
    void *name;
    int namelen;
    struct iovec *iov;
    u64 iovlen;
    void *control;
    u64 controllen;
    unsigned int flags;
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_HASH(targets, u32, u8, MAX_TARGETS);
BPF_HASH(inflight, u64, struct inflight, MAX_INFLIGHT);
BPF_PERCPU_ARRAY(counters, u64, N_COUNTERS);

static __always_inline void count(u32 which)
{
    u64 *c = counters.lookup(&which);
    if (c)
        (*c)++;
}

static __always_inline int is_target(u32 tgid)
{
    return targets.lookup(&tgid) != NULL;
}

/* current->files->fdt->fd[fd]->f_inode->i_mode is a socket: files and pipes do not count. */
static __always_inline int fd_is_socket(int fd)
{
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    void *files = NULL, *fdt = NULL, *fdarr = NULL, *file = NULL, *inode = NULL;
    unsigned int max_fds = 0;
    u16 mode = 0;

    if (fd < 0)
        return 0;
    bpf_probe_read_kernel(&files, sizeof(files), (char *)task + OFF_TASK_FILES);
    if (!files)
        return 0;
    bpf_probe_read_kernel(&fdt, sizeof(fdt), (char *)files + OFF_FILES_FDT);
    if (!fdt)
        return 0;
    bpf_probe_read_kernel(&max_fds, sizeof(max_fds), (char *)fdt + OFF_FDT_MAX_FDS);
    if ((unsigned int)fd >= max_fds)
        return 0;
    bpf_probe_read_kernel(&fdarr, sizeof(fdarr), (char *)fdt + OFF_FDT_FD);
    if (!fdarr)
        return 0;
    bpf_probe_read_kernel(&file, sizeof(file), (char *)fdarr + (u64)fd * sizeof(void *));
    if (!file)
        return 0;
    bpf_probe_read_kernel(&inode, sizeof(inode), (char *)file + OFF_FILE_INODE);
    if (!inode)
        return 0;
    bpf_probe_read_kernel(&mode, sizeof(mode), (char *)inode + OFF_INODE_MODE);
    return (mode & S_IFMT_) == S_IFSOCK_;
}

/* Sum an iovec array from user memory: addr of the first buffer, total length. */
static __always_inline void sum_iov(struct inflight *r, const struct iovec *iov, u64 n)
{
    struct iovec v = {};
    r->nvec = n;
    r->flags |= FLAG_VECTORED;
    if (n > MAX_IOV) {
        n = MAX_IOV;
        r->flags |= FLAG_IOV_TRUNCATED;
    }
#pragma unroll
    for (int i = 0; i < MAX_IOV; i++) {
        if (i >= n)
            break;
        if (bpf_probe_read_user(&v, sizeof(v), &iov[i]))
            break;
        if (i == 0)
            r->addr = (u64)v.iov_base;
        r->len += v.iov_len;
    }
}

static __always_inline void emit(u8 kind, u64 key, u32 pid, u32 tid, const struct inflight *r,
                                 s64 value)
{
    struct read_event *e = events.ringbuf_reserve(sizeof(struct read_event));
    if (!e) {
        count(CNT_RINGBUF_FULL);
        return;
    }
    e->ts_ns = bpf_ktime_get_ns();
    e->key = key;
    e->addr = r->addr;
    e->value = value;
    e->pid = pid;
    e->tid = tid;
    e->fd = r->fd;
    e->flags = r->flags;
    e->nvec = r->nvec;
    e->op = r->op;
    e->kind = kind;
    e->source = SOURCE_SYSCALL;
    events.ringbuf_submit(e, 0);
}

/* Common entry: filter, check the fd, remember the read, emit POST. */
static __always_inline int read_posted(struct inflight *r)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    u64 key = tid;

    if (!fd_is_socket(r->fd))
        return 0;
    r->ts_ns = bpf_ktime_get_ns();
    if (inflight.update(&key, r)) {
        count(CNT_INFLIGHT_FULL);
        return 0;
    }
    count(CNT_POSTS);
    emit(KIND_POST, key, tgid, tid, r, (s64)r->len);
    return 0;
}

/* Common exit: a tracked read returned. */
static __always_inline int read_returned(long ret)
{
    u64 id = bpf_get_current_pid_tgid();
    u64 key = (u32)id;
    struct inflight *found = inflight.lookup(&key);
    struct inflight r;

    if (!found)
        return 0;
    r = *found;
    inflight.delete(&key);
    count(CNT_COMPLETIONS);
    emit(KIND_COMPLETE, key, id >> 32, (u32)id, &r, ret);
    return 0;
}

#define TARGET_ONLY()                                                                      \
    if (!is_target(bpf_get_current_pid_tgid() >> 32))                                      \
        return 0;

TRACEPOINT_PROBE(syscalls, sys_enter_read)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .addr = (u64)args->buf, .len = args->count,
                         .op = NR_read};
    return read_posted(&r);
}

TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .addr = (u64)args->ubuf, .len = args->size,
                         .op = NR_recvfrom};
    return read_posted(&r);
}

TRACEPOINT_PROBE(syscalls, sys_enter_readv)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .op = NR_readv};
    sum_iov(&r, (const struct iovec *)args->vec, args->vlen);
    return read_posted(&r);
}

TRACEPOINT_PROBE(syscalls, sys_enter_preadv2)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .op = NR_preadv2};
    sum_iov(&r, (const struct iovec *)args->vec, args->vlen);
    return read_posted(&r);
}

TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .op = NR_recvmsg};
    struct msghdr_u m = {};
    if (bpf_probe_read_user(&m, sizeof(m), (void *)args->msg) == 0)
        sum_iov(&r, m.iov, m.iovlen);
    return read_posted(&r);
}

/* recvmmsg: the buffers of the first message (the one a blocking call waits for). */
TRACEPOINT_PROBE(syscalls, sys_enter_recvmmsg)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .op = NR_recvmmsg};
    struct msghdr_u m = {};
    if (bpf_probe_read_user(&m, sizeof(m), (void *)args->mmsg) == 0)
        sum_iov(&r, m.iov, m.iovlen);
    return read_posted(&r);
}

TRACEPOINT_PROBE(syscalls, sys_exit_read) { return read_returned(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return read_returned(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return read_returned(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_preadv2) { return read_returned(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return read_returned(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmmsg) { return read_returned(args->ret); }

#if FOLLOW_CHILDREN
/* Children of a target become targets (the target table is keyed by process id). */
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    u32 child = args->child_pid;
    u8 one = 1;
    if (!is_target(parent))
        return 0;
    if (targets.update(&child, &one))
        count(CNT_TARGETS_FULL);
    return 0;
}

/* A thread's id was added by the fork above; drop it when the thread exits. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    if (tid != (u32)(id >> 32))
        targets.delete(&tid);
    return 0;
}
#endif
