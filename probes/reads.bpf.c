/*
 * Posted reads from blocking syscalls.
 *
 * Measures: every read-type syscall on a socket by a target process, as a POST record when
 *   it enters (fd, buffer address, total length) and a COMPLETE record when it returns (bytes
 *   or -errno). `inflight` holds the reads the kernel is waiting to fill, keyed by thread.
 * Attach points: syscalls:sys_enter_/sys_exit_{read,readv,recvfrom,recvmsg,recvmmsg,preadv2},
 *   sched:sched_process_fork and sched:sched_process_exit (to follow children).
 * Needs: Linux 5.8 (BPF ring buffer), BTF for the offsets below.
 * With --min-wait and BLOCK_HOOKS (Linux 6.9+ with sock:sock_recv_length): no syscall
 *   tracepoint; sched_switch and sock:sock_{recv,send}_length as raw tracepoints instead
 *   (see "--min-wait without syscall tracepoints" below).
 * Overhead: ~615 ns per read-type syscall of a target (enter + exit + the socket check's 7
 *   kernel reads); ~140 ns per read-type syscall of any other process (the target test), and
 *   ~0.5 us per syscall of every process for the syscall tracepoints' slow path. With the
 *   scheduler hooks: a target's socket call that does not block, one task-storage lookup at
 *   its return; one that blocks, ~0.3 us more (with the socket check); anything else, a bit
 *   test per context switch and per socket call.
 *
 * Compile-time constants (cflags): OFF_TASK_FILES, OFF_FILES_FDT, OFF_FDT_MAX_FDS, OFF_FDT_FD,
 * OFF_FILE_INODE, OFF_INODE_MODE (from BTF), MAX_TARGETS, TARGET_WORDS, MAX_INFLIGHT,
 * RINGBUF_PAGES, FOLLOW_CHILDREN, MAX_IOV, MIN_WAIT_NS, WITH_WRITES, BLOCK_HOOKS.
 * The record layout comes from probes/layout.py (prepended).
 */
#include <uapi/linux/ptrace.h>
#include <linux/uio.h>
#include <uapi/linux/fs.h>
#include <linux/signal.h> /* sigset_t, in epoll_pwait's and ppoll's tracepoint contexts */

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
    u32 pid; /* the thread group, for the recorder's sweep of waiting calls (--min-wait) */
    u32 pad2;
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
/* The same targets as a bitmap over process ids: the filter every hook runs first, an array
 * lookup the verifier inlines (a hash lookup costs tens of ns, paid by every process). */
BPF_ARRAY(target_bits, u64, TARGET_WORDS);
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
    u32 word = tgid >> 6;
    u64 *bits = target_bits.lookup(&word);
    return bits && ((*bits >> (tgid & 63)) & 1);
}

static __always_inline void mark_target(u32 pid, int on)
{
    u32 word = pid >> 6;
    u64 *bits = target_bits.lookup(&word);
    if (!bits)
        return;
    if (on)
        __sync_fetch_and_or(bits, 1ULL << (pid & 63));
    else
        __sync_fetch_and_and(bits, ~(1ULL << (pid & 63)));
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

/* The user registers the current thread saved on entering the kernel that hold a syscall's
 * number (orig_ax), first arguments (di, si, dx) and, until it returns, -ENOSYS (ax): the
 * x86-64 struct pt_regs from ax to orig_ax. */
struct syscall_regs {
    u64 ax, cx, dx, si, di, orig_ax;
};

static __always_inline void syscall_regs(struct syscall_regs *out)
{
    char *regs = (char *)bpf_task_pt_regs(bpf_get_current_task_btf());
    bpf_probe_read_kernel(out, sizeof(*out), regs + offsetof(struct pt_regs, ax));
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

/* Reserve a record with every field zeroed but the common ones; NULL (counted) if full. */
static __always_inline struct read_event *new_event(u8 kind, u8 source)
{
    struct read_event *e = events.ringbuf_reserve(sizeof(struct read_event));
    u64 id = bpf_get_current_pid_tgid();
    if (!e) {
        count(CNT_RINGBUF_FULL);
        return NULL;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->ts_ns = bpf_ktime_get_ns();
    e->pid = id >> 32;
    e->tid = (u32)id;
    e->fd = -1;
    e->kind = kind;
    e->source = source;
    return e;
}

static __always_inline void emit_at(u8 kind, u64 key, u32 pid, const struct inflight *r,
                                    s64 value, u64 ts)
{
    struct read_event *e = new_event(kind, SOURCE_SYSCALL);
    if (!e)
        return;
    if (ts)
        e->ts_ns = ts;
    e->key = key;
    e->addr = r->addr;
    e->value = value;
    e->pid = pid;
    e->fd = r->fd;
    e->flags = r->flags;
    e->nvec = r->nvec;
    e->op = r->op;
    events.ringbuf_submit(e, 0);
}

static __always_inline void emit(u8 kind, u64 key, u32 pid, const struct inflight *r, s64 value)
{
    emit_at(kind, key, pid, r, value, 0);
}

/* --min-wait (MIN_WAIT_NS > 0): a call is recorded only if it waits. Its POST is emitted at
 * its return when it took at least MIN_WAIT_NS, with the time it began; calls that return
 * sooner are only counted. The recorder also records calls still waiting from a sweep of the
 * in-flight table (flagged SWEPT, same start time; the analysis keeps one of the two), and
 * never writes to the table, so a call can neither be lost nor marked for another one.
 * Returns 1 if the caller should emit its completion. */
static __always_inline int waited(u8 post_kind, u64 key, u32 pid, const struct inflight *r)
{
#if MIN_WAIT_NS > 0
    if (r->flags & FLAG_SCANNED) /* seeded by the /proc scan, whose POST is recorded */
        return 1;
    if (bpf_ktime_get_ns() - r->ts_ns < MIN_WAIT_NS) {
        count(CNT_QUICK);
        return 0;
    }
    emit_at(post_kind, key, pid, r, (s64)r->len, r->ts_ns);
#endif
    return 1;
}

/* The in-flight hash's call for this thread and direction (FLAG_WRITE or 0), taken out. */
static __always_inline int take_inflight(u64 key, u32 write, struct inflight *out)
{
    struct inflight *found = inflight.lookup(&key);
    if (!found || (found->flags & FLAG_WRITE) != write)
        return 0;
    *out = *found;
    inflight.delete(&key);
    return 1;
}

#if MIN_WAIT_NS > 0
/* --min-wait keeps a thread's call in the thread's own storage: no hashing and, after the
 * first call, no allocation (a hash update and delete per call cost ~0.3 us more here). The
 * recorder's sweep reads it by pidfd. Calls the /proc scan seeded are in the hash, or, with
 * the scheduler hooks below, in the same storage (written by pidfd). */
BPF_TASK_STORAGE(calls, struct inflight);

static __always_inline int remember(u64 key, const struct inflight *r)
{
    struct inflight *slot = calls.task_storage_get(bpf_get_current_task_btf(), 0,
                                                   BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!slot)
        return -1;
    *slot = *r;
    return 0;
}

/* The thread's call of this direction (FLAG_WRITE or 0), taken out; 0 if there is none. */
static __always_inline int recall(u64 key, u32 write, struct inflight *out)
{
    struct inflight *slot = calls.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (slot && slot->ts_ns) {
        if ((slot->flags & FLAG_WRITE) != write)
            return 0;
        *out = *slot;
        slot->ts_ns = 0;
        return 1;
    }
#if BLOCK_HOOKS
    return 0;
#else
    return take_inflight(key, write, out);
#endif
}
#else
static __always_inline int remember(u64 key, const struct inflight *r)
{
    return inflight.update(&key, (struct inflight *)r);
}

static __always_inline int recall(u64 key, u32 write, struct inflight *out)
{
    return take_inflight(key, write, out);
}
#endif

/* Common entry: filter, check the fd, remember the read, emit POST. */
static __always_inline int read_posted(struct inflight *r)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    u64 key = tid;

    if (!fd_is_socket(r->fd))
        return 0;
    r->ts_ns = bpf_ktime_get_ns();
    r->pid = tgid;
    if (remember(key, r)) {
        count(CNT_INFLIGHT_FULL);
        return 0;
    }
    count(CNT_POSTS);
    if (!MIN_WAIT_NS)
        emit(KIND_POST, key, tgid, r, (s64)r->len);
    return 0;
}

/* Common exit: a tracked read returned. */
static __always_inline int read_returned(long ret)
{
    u64 id = bpf_get_current_pid_tgid();
    u64 key = (u32)id;
    struct inflight r = {};

    if (!recall(key, 0, &r))
        return 0;
    count(CNT_COMPLETIONS);
    if (waited(KIND_POST, key, id >> 32, &r))
        emit(KIND_COMPLETE, key, id >> 32, &r, ret);
    return 0;
}

#if !BLOCK_HOOKS
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

#if WITH_WRITES
/* Writes to sockets: a blocking send() into a full socket buffer holds its buffer, pending,
 * the way a posted read does. Same in-flight table (a thread is in one syscall at a time). */
static __always_inline int write_posted(struct inflight *r)
{
    u64 id = bpf_get_current_pid_tgid();
    u64 key = (u32)id;

    if (!fd_is_socket(r->fd))
        return 0;
    r->ts_ns = bpf_ktime_get_ns();
    r->flags |= FLAG_WRITE;
    r->pid = id >> 32;
    if (remember(key, r)) {
        count(CNT_INFLIGHT_FULL);
        return 0;
    }
    if (!MIN_WAIT_NS)
        emit(KIND_WRITE_POST, key, id >> 32, r, (s64)r->len);
    return 0;
}

static __always_inline int write_returned(long ret)
{
    u64 id = bpf_get_current_pid_tgid();
    u64 key = (u32)id;
    struct inflight r = {};

    if (!recall(key, FLAG_WRITE, &r))
        return 0;
    if (waited(KIND_WRITE_POST, key, id >> 32, &r))
        emit(KIND_WRITE_COMPLETE, key, id >> 32, &r, ret);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_write)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .addr = (u64)args->buf, .len = args->count,
                         .op = NR_write};
    return write_posted(&r);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendto)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .addr = (u64)args->buff, .len = args->len,
                         .op = NR_sendto};
    return write_posted(&r);
}

TRACEPOINT_PROBE(syscalls, sys_enter_writev)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .op = NR_writev};
    sum_iov(&r, (const struct iovec *)args->vec, args->vlen);
    return write_posted(&r);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .op = NR_sendmsg};
    struct msghdr_u m = {};
    if (bpf_probe_read_user(&m, sizeof(m), (void *)args->msg) == 0)
        sum_iov(&r, m.iov, m.iovlen);
    return write_posted(&r);
}

TRACEPOINT_PROBE(syscalls, sys_exit_write) { return write_returned(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return write_returned(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return write_returned(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return write_returned(args->ret); }
#endif /* WITH_WRITES */

TRACEPOINT_PROBE(syscalls, sys_exit_read) { return read_returned(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return read_returned(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return read_returned(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_preadv2) { return read_returned(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return read_returned(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmmsg) { return read_returned(args->ret); }
#endif /* !BLOCK_HOOKS */

#if BLOCK_HOOKS
/*
 * --min-wait without syscall tracepoints. Enabling any syscall tracepoint sends every
 * syscall of every process through the kernel's slow path (~0.5 us each here, paid by the
 * load generator too); these hooks cost nothing on a call that does not wait. A call is
 * seen when its thread blocks in it (sched_switch, where the syscall and its arguments come
 * from the thread's saved user registers) and when it returns (sock:sock_recv_length and
 * sock:sock_send_length fire as a socket receive or send returns, in the caller's context).
 * Its start is the moment it first blocked. A thread woken without its data and blocking
 * again is still in the same call (its storage holds it until the return).
 * The socket check runs when a call first blocks: a read of a file that blocked at start-up
 * would otherwise stay in the thread's storage and, its fd later reused by a socket, be taken
 * for a socket read still waiting (seen in tests). The return hooks, which only sockets
 * reach, take the thread's call only if it is the one returning (same syscall and fd), and
 * the recorder's sweep checks the fd again before recording a call still waiting.
 */
#define TASK_RUNNING_ 0
#define ENOSYS_ 38

/* The traced call a thread is in, from its saved registers; 0 if it is in another. */
static __always_inline int call_of(struct inflight *r, const struct syscall_regs *regs)
{
    struct msghdr_u m = {};
    /* In a syscall the saved ax holds -ENOSYS until it returns; in an exception (a page
     * fault) orig_ax is an error code, which could pass for a syscall number; io_uring's
     * worker threads, which make no syscalls, have zeroed registers. */
    if (regs->ax != (unsigned long)-ENOSYS_)
        return 0;
    r->fd = (s32)regs->di;
    r->op = regs->orig_ax;
    switch (regs->orig_ax) {
    case NR_read:
    case NR_recvfrom:
        r->addr = regs->si;
        r->len = regs->dx;
        return 1;
    case NR_readv:
    case NR_preadv2:
        sum_iov(r, (const struct iovec *)regs->si, regs->dx);
        return 1;
    case NR_recvmsg:
    case NR_recvmmsg: /* the first message's buffers: a struct mmsghdr begins with its msghdr */
        if (bpf_probe_read_user(&m, sizeof(m), (void *)regs->si) == 0)
            sum_iov(r, m.iov, m.iovlen);
        return 1;
#if WITH_WRITES
    case NR_write:
    case NR_sendto:
        r->addr = regs->si;
        r->len = regs->dx;
        r->flags |= FLAG_WRITE;
        return 1;
    case NR_writev:
        sum_iov(r, (const struct iovec *)regs->si, regs->dx);
        r->flags |= FLAG_WRITE;
        return 1;
    case NR_sendmsg:
        if (bpf_probe_read_user(&m, sizeof(m), (void *)regs->si) == 0)
            sum_iov(r, m.iov, m.iovlen);
        r->flags |= FLAG_WRITE;
        return 1;
#endif
    }
    return 0;
}

/* A target thread goes to sleep (prev is the current thread): remember the socket read or
 * write it waits in, unless it already waits in that call. */
RAW_TRACEPOINT_PROBE(sched_switch)
{
    /* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
     *          unsigned int prev_state) - Linux 5.18+ */
    u64 id = bpf_get_current_pid_tgid();
    struct syscall_regs regs = {};
    struct inflight r = {}, *slot;

    /* Preempted, or rescheduled on the way back to user space (after the return hook):
     * still running, not waiting. */
    if (ctx->args[0] || ctx->args[3] == TASK_RUNNING_ || !is_target(id >> 32))
        return 0;
    syscall_regs(&regs);
    if (!call_of(&r, &regs))
        return 0;
    slot = calls.task_storage_get(bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!slot) {
        count(CNT_INFLIGHT_FULL);
        return 0;
    }
    if (slot->ts_ns && slot->op == r.op && slot->fd == r.fd && slot->addr == r.addr)
        return 0; /* woken, and waiting again in the same call */
    if (!fd_is_socket(r.fd)) {
        slot->ts_ns = 0; /* whatever it held has returned: the thread is in another call */
        return 0;
    }
    r.ts_ns = bpf_ktime_get_ns();
    r.pid = id >> 32;
    *slot = r;
    count(CNT_BLOCKED);
    return 0;
}

/* A socket receive or send returned: if its thread waited in it, record or count it. */
static __always_inline int block_returned(u32 write, long ret)
{
    u64 id = bpf_get_current_pid_tgid();
    u64 key = (u32)id;
    struct syscall_regs regs = {};
    struct inflight r = {};

    if (!is_target(id >> 32) || !recall(key, write, &r))
        return 0;
    syscall_regs(&regs);
    if (regs.orig_ax != r.op || (s32)regs.di != r.fd)
        return 0; /* it blocked in another call (not on a socket), which has returned */
    if (waited(write ? KIND_WRITE_POST : KIND_POST, key, id >> 32, &r))
        emit(write ? KIND_WRITE_COMPLETE : KIND_COMPLETE, key, id >> 32, &r, ret);
    return 0;
}

/* TP_PROTO(struct sock *sk, int ret, int flags) */
RAW_TRACEPOINT_PROBE(sock_recv_length) { return block_returned(0, (int)ctx->args[1]); }
#if WITH_WRITES
RAW_TRACEPOINT_PROBE(sock_send_length) { return block_returned(FLAG_WRITE, (int)ctx->args[1]); }
#endif
#endif /* BLOCK_HOOKS */

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
    else
        mark_target(child, 1);
    return 0;
}

/* A thread's id was added by the fork above; drop it when the thread exits. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    if (tid != (u32)(id >> 32) && targets.delete(&tid) == 0)
        mark_target(tid, 0);
    return 0;
}
#endif

#if WITH_URING
/*
 * io_uring posted reads.
 *
 * Measures: every read-type request a target submits (RECV, READ, READV, RECVMSG, READ_FIXED,
 *   READ_MULTISHOT) with its buffer, read from the prepared request (struct io_kiocb) at
 *   offsets taken from BTF; its final completion; each use of a provided buffer; buffers given
 *   to a group (IORING_REGISTER_PBUF_RING, IORING_OP_PROVIDE_BUFFERS).
 * Attach points: io_uring:io_uring_submit_req, io_uring:io_uring_complete,
 *   io_uring:io_uring_register.
 * Needs: Linux 6.0+ (io_uring_submit_req carries the request), BTF.
 * Overhead: ~600-870 ns per request of a target; a hash lookup per completion elsewhere.
 *
 * SQPOLL: the submission thread belongs to the ring owner's thread group, so the target
 * filter attributes its submissions to the owner. Multishot completions flagged MORE carry no
 * request pointer; they are matched by (ring, user_data) to learn the buffer group.
 */
#define CQE_F_BUFFER 1
#define CQE_F_MORE 2
#define RECVSEND_BUNDLE (1 << 4)
#define REGISTER_PBUF_RING 22

struct uring_req {
    u64 ring;
    u64 user_data;
    u32 pid;
    u32 flags;
    u16 group;
    u16 op;
    u32 pad;
};

struct select_key {
    u64 ring;
    u64 user_data;
};

struct pbuf_reg {
    u64 ring_addr;
    u32 entries;
    u16 bgid;
    u16 flags;
};

BPF_HASH(uring_inflight, u64, struct uring_req, MAX_INFLIGHT);
BPF_HASH(uring_select, struct select_key, u16, MAX_INFLIGHT);

static __always_inline struct read_event *uring_event(u8 kind, u64 key, u64 ring, u64 user_data)
{
    struct read_event *e = new_event(kind, SOURCE_URING);
    if (e) {
        e->key = key;
        e->ring = ring;
        e->aux = user_data;
    }
    return e;
}

/* The buffer behind an iov_iter: UBUF holds the address itself, IOVEC points at iovecs. */
static __always_inline int read_iter(const void *iter, u64 *addr, u64 *len, u32 *nvec)
{
    u8 type = 0;
    u64 ptr = 0, segs = 0;
    if (bpf_probe_read_kernel(&type, sizeof(type), iter + ITER_OFF_TYPE) ||
        bpf_probe_read_kernel(&ptr, sizeof(ptr), iter + ITER_OFF_IOV) ||
        bpf_probe_read_kernel(len, sizeof(*len), iter + ITER_OFF_COUNT))
        return -1;
    if (type == ITER_UBUF_VAL) {
        *addr = ptr;
        *nvec = 1;
        return 0;
    }
    if (type != ITER_IOVEC_VAL)
        return -1;
    bpf_probe_read_kernel(&segs, sizeof(segs), iter + ITER_OFF_NR_SEGS);
    *nvec = segs;
    return bpf_probe_read_kernel(addr, sizeof(*addr), (void *)ptr); /* iov[0].iov_base */
}

TRACEPOINT_PROBE(io_uring, io_uring_submit_req)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u8 op = args->opcode;
    u64 rflags = args->flags;
    void *req = args->req;
    u64 ring = (u64)args->ctx, user_data = args->user_data;
    u64 addr = 0, len = 0;
    u32 nvec = 0, flags = 0, sr_flags = 0;
    u16 group = 0;
    s32 fd = -1;
    struct read_event *e;

    if (!is_target(tgid))
        return 0;

    if (op == URING_OP_PROVIDE_BUFFERS) {
        u64 base = 0;
        u32 size = 0, bgid = 0, nbufs = 0;
        u16 bid = 0;
        bpf_probe_read_kernel(&bid, sizeof(bid), req + URING_OFF_PB_BID);
        bpf_probe_read_kernel(&base, sizeof(base), req + URING_OFF_PB_ADDR);
        bpf_probe_read_kernel(&size, sizeof(size), req + URING_OFF_PB_LEN);
        bpf_probe_read_kernel(&bgid, sizeof(bgid), req + URING_OFF_PB_BGID);
        bpf_probe_read_kernel(&nbufs, sizeof(nbufs), req + URING_OFF_PB_NBUFS);
        e = uring_event(KIND_BUFFER_GROUP, (u64)req, ring, user_data);
        if (!e)
            return 0;
        e->op = GROUP_PROVIDE;
        e->group = bgid;
        e->addr = base;
        e->value = size;
        e->nvec = nbufs;
        e->first_id = bid;
        events.ringbuf_submit(e, 0);
        return 0;
    }
    if (op != URING_OP_RECV && op != URING_OP_READ && op != URING_OP_READV &&
        op != URING_OP_RECVMSG && op != URING_OP_READ_FIXED && op != URING_OP_READ_MULTISHOT)
        return 0;

    /* Until the request is issued req->file is unset; the sqe's fd waits in req->cqe.fd. */
    bpf_probe_read_kernel(&fd, sizeof(fd), req + URING_OFF_CQE_FD);
    if (rflags & REQ_F_FIXED_FILE_MASK)
        flags |= FLAG_FIXED_FILE;
    else if (fd_is_socket(fd))
        flags |= FLAG_SOCKET;
    if (rflags & REQ_F_APOLL_MULTISHOT_MASK || op == URING_OP_READ_MULTISHOT)
        flags |= FLAG_MULTISHOT;

    if (rflags & REQ_F_BUFFER_SELECT_MASK) {
        /* no buffer of its own: one is taken from the group when data arrives */
        flags |= FLAG_BUFFER_SELECT;
        bpf_probe_read_kernel(&group, sizeof(group), req + URING_OFF_BUF_INDEX);
        if (op == URING_OP_RECV || op == URING_OP_RECVMSG) {
            bpf_probe_read_kernel(&sr_flags, sizeof(u16), req + URING_OFF_SR_FLAGS);
            if (sr_flags & RECVSEND_BUNDLE)
                flags |= FLAG_BUNDLE;
        }
    } else if (op == URING_OP_RECV) {
        bpf_probe_read_kernel(&addr, sizeof(addr), req + URING_OFF_SR_BUF);
        bpf_probe_read_kernel(&len, sizeof(u32), req + URING_OFF_SR_LEN);
    } else if (op == URING_OP_READ || op == URING_OP_READ_FIXED) {
        bpf_probe_read_kernel(&addr, sizeof(addr), req + URING_OFF_RW_ADDR);
        bpf_probe_read_kernel(&len, sizeof(u32), req + URING_OFF_RW_LEN);
        if (op == URING_OP_READ_FIXED)
            flags |= FLAG_FIXED_BUFFER;
    } else {
        /* READV, RECVMSG: the iovecs were imported into the request's async data */
        void *async = NULL;
        bpf_probe_read_kernel(&async, sizeof(async), req + URING_OFF_ASYNC);
        flags |= FLAG_VECTORED;
        if (!async || read_iter(async + (op == URING_OP_READV ? URING_OFF_ARW_ITER
                                                                 : URING_OFF_AMSG_ITER),
                                &addr, &len, &nvec)) {
            count(CNT_URING_UNREADABLE);
        }
    }

    struct uring_req r = {.ring = ring, .user_data = user_data, .pid = tgid, .flags = flags,
                          .group = group, .op = op};
    u64 key = (u64)req;
    if (uring_inflight.update(&key, &r)) {
        count(CNT_INFLIGHT_FULL);
        return 0;
    }
    if (flags & FLAG_BUFFER_SELECT) {
        struct select_key sk = {.ring = ring, .user_data = user_data};
        if (uring_select.update(&sk, &group))
            count(CNT_SELECT_FULL);
    }
    count(CNT_POSTS);
    e = uring_event(KIND_POST, key, ring, user_data);
    if (!e)
        return 0;
    e->addr = addr;
    e->value = len;
    e->fd = fd;
    e->flags = flags;
    e->nvec = nvec;
    e->op = op;
    e->group = group;
    events.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(io_uring, io_uring_complete)
{
    u64 key = (u64)args->req;
    u64 ring = (u64)args->ctx, user_data = args->user_data;
    u32 cflags = args->cflags;
    struct uring_req *found = NULL;
    struct uring_req r = {};
    struct select_key sk = {.ring = ring, .user_data = user_data};
    u16 *group = NULL;
    struct read_event *e;

    if (key) {
        found = uring_inflight.lookup(&key);
        if (!found)
            return 0;
        r = *found;
        uring_inflight.delete(&key);
        count(CNT_COMPLETIONS);
        if (r.flags & FLAG_BUFFER_SELECT)
            uring_select.delete(&sk);
        e = uring_event(KIND_COMPLETE, key, ring, user_data);
        if (e) {
            e->pid = r.pid;
            e->value = args->res;
            e->flags = cflags;
            e->op = r.op;
            e->group = r.group;
            events.ringbuf_submit(e, 0);
        }
        if (!(cflags & CQE_F_BUFFER))
            return 0;
    } else {
        /* an intermediate multishot completion: no request pointer */
        if (!(cflags & CQE_F_BUFFER))
            return 0;
        group = uring_select.lookup(&sk);
        if (!group)
            return 0;
        r.group = *group;
        r.pid = bpf_get_current_pid_tgid() >> 32;
    }
    e = uring_event(KIND_BUFFER_USED, key, ring, user_data);
    if (!e)
        return 0;
    e->pid = r.pid;
    e->group = r.group;
    e->addr = cflags >> 16; /* the buffer id */
    e->value = args->res;
    e->flags = cflags;
    events.ringbuf_submit(e, 0);
    return 0;
}

/* Registering a provided-buffer ring, once the kernel accepted it: the ring's address and size
 * are in the caller's memory, at the syscall's third argument (its saved user registers). */
TRACEPOINT_PROBE(io_uring, io_uring_register)
{
    struct syscall_regs regs = {};
    struct pbuf_reg reg = {};
    struct read_event *e;
    if (args->opcode != REGISTER_PBUF_RING || args->ret != 0)
        return 0;
    if (!is_target(bpf_get_current_pid_tgid() >> 32))
        return 0;
    syscall_regs(&regs);
    if (regs.orig_ax != NR_io_uring_register ||
        bpf_probe_read_user(&reg, sizeof(reg), (void *)regs.dx))
        return 0;
    e = uring_event(KIND_BUFFER_GROUP, 0, (u64)args->ctx, 0);
    if (e) {
        e->op = GROUP_RING;
        e->group = reg.bgid;
        e->addr = reg.ring_addr;
        e->value = reg.entries;
        events.ringbuf_submit(e, 0);
    }
    return 0;
}
#endif /* WITH_URING */

/*
 * Readiness waits: epoll_wait/epoll_pwait/epoll_pwait2/poll/ppoll/select/pselect6 of targets,
 * as WAIT (fd = the epoll fd or -1, value = maxevents or nfds) and WAIT_END (value = ready
 * count or -errno) records keyed by thread. They tell a thread parked on readiness with a
 * buffer in hand (EAGAIN, wait, retry) from one that merely read too early. Not with
 * --min-wait, which records only calls that wait (parked reads cannot be told then).
 */
#if !MIN_WAIT_NS
BPF_HASH(waiting, u32, u8, MAX_INFLIGHT);

static __always_inline int wait_enter(u16 call, s32 fd, s64 watched)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u8 one = 1;
    if (!is_target(id >> 32))
        return 0;
    if (waiting.update(&tid, &one)) {
        count(CNT_INFLIGHT_FULL);
        return 0;
    }
    struct read_event *e = new_event(KIND_WAIT, 0);
    if (!e)
        return 0;
    e->key = tid;
    e->op = call;
    e->fd = fd;
    e->value = watched;
    events.ringbuf_submit(e, 0);
    return 0;
}

static __always_inline int wait_exit(long ret)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    if (!waiting.lookup(&tid))
        return 0;
    waiting.delete(&tid);
    struct read_event *e = new_event(KIND_WAIT_END, 0);
    if (!e)
        return 0;
    e->key = tid;
    e->value = ret;
    events.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_epoll_wait)
{
    return wait_enter(WAIT_EPOLL_WAIT, args->epfd, args->maxevents);
}
TRACEPOINT_PROBE(syscalls, sys_enter_epoll_pwait)
{
    return wait_enter(WAIT_EPOLL_PWAIT, args->epfd, args->maxevents);
}
TRACEPOINT_PROBE(syscalls, sys_enter_poll) { return wait_enter(WAIT_POLL, -1, args->nfds); }
TRACEPOINT_PROBE(syscalls, sys_enter_ppoll) { return wait_enter(WAIT_PPOLL, -1, args->nfds); }
TRACEPOINT_PROBE(syscalls, sys_enter_select) { return wait_enter(WAIT_SELECT, -1, args->n); }
TRACEPOINT_PROBE(syscalls, sys_enter_pselect6) { return wait_enter(WAIT_PSELECT6, -1, args->n); }
TRACEPOINT_PROBE(syscalls, sys_exit_epoll_wait) { return wait_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_epoll_pwait) { return wait_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_poll) { return wait_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_ppoll) { return wait_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_select) { return wait_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_pselect6) { return wait_exit(args->ret); }
#endif /* !MIN_WAIT_NS */
