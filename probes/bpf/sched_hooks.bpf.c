/*
 * --min-wait through the scheduler: calls seen when they wait, with no syscall tracepoint.
 *
 * Measures: the socket reads and writes of targets that block, recorded at their return if
 *   they waited at least MIN_WAIT_NS (the rest counted, CNT_QUICK; CNT_BLOCKED counts calls
 *   seen waiting).
 * Attach points: raw tracepoints sched_switch, sock_recv_length, sock_send_length.
 * Needs: common.bpf.c; Linux 6.9 (sock:sock_recv_length and thread pidfds for the sweep).
 * Overhead: a target's socket call that does not block, one task-storage lookup at its
 *   return; one that blocks, ~0.3 us more (with the socket check); anything else, a bit test
 *   per context switch and per socket call.
 */
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
    if (!(r.flags & FLAG_WRITE))
        r.stack = post_stack(ctx);
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
