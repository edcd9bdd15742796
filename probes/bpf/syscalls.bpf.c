/*
 * Posted reads and pending writes from syscalls.
 *
 * Measures: every read-type syscall on a socket by a target, as a POST record when it enters
 *   (fd, buffer address, total length) and a COMPLETE record when it returns (bytes or
 *   -errno); writes to sockets likewise (WRITE_POST, WRITE_COMPLETE) with WITH_WRITES. With
 *   --min-wait (MIN_WAIT_NS) only calls that waited are recorded, at their return.
 * Attach points: syscalls:sys_enter_/sys_exit_{read,readv,recvfrom,recvmsg,recvmmsg,preadv2}
 *   and {write,writev,sendto,sendmsg}.
 * Needs: common.bpf.c; Linux 5.8.
 * Overhead: ~615 ns per read-type syscall of a target (enter + exit + the socket check's 7
 *   kernel reads); ~140 ns per such syscall of any other process (the target test), and
 *   ~0.5 us per syscall of every process for the syscall tracepoints' slow path.
 */
/* Common entry: filter, check the fd, remember the read, emit POST. */
static __always_inline int read_posted(void *ctx, struct inflight *r)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    u64 key = tid;

    if (!fd_is_socket(r->fd))
        return 0;
    r->ts_ns = bpf_ktime_get_ns();
    r->pid = tgid;
    r->stack = post_stack(ctx);
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

#define TARGET_ONLY()                                                                      \
    if (!is_target(bpf_get_current_pid_tgid() >> 32))                                      \
        return 0;

TRACEPOINT_PROBE(syscalls, sys_enter_read)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .addr = (u64)args->buf, .len = args->count,
                         .op = NR_read};
    return read_posted(args, &r);
}

TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .addr = (u64)args->ubuf, .len = args->size,
                         .op = NR_recvfrom};
    return read_posted(args, &r);
}

TRACEPOINT_PROBE(syscalls, sys_enter_readv)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .op = NR_readv};
    sum_iov(&r, (const struct iovec *)args->vec, args->vlen);
    return read_posted(args, &r);
}

TRACEPOINT_PROBE(syscalls, sys_enter_preadv2)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .op = NR_preadv2};
    sum_iov(&r, (const struct iovec *)args->vec, args->vlen);
    return read_posted(args, &r);
}

TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .op = NR_recvmsg};
    struct msghdr_u m = {};
    if (bpf_probe_read_user(&m, sizeof(m), (void *)args->msg) == 0)
        sum_iov(&r, m.iov, m.iovlen);
    return read_posted(args, &r);
}

/* recvmmsg: the buffers of the first message (the one a blocking call waits for). */
TRACEPOINT_PROBE(syscalls, sys_enter_recvmmsg)
{
    TARGET_ONLY();
    struct inflight r = {.fd = args->fd, .op = NR_recvmmsg};
    struct msghdr_u m = {};
    if (bpf_probe_read_user(&m, sizeof(m), (void *)args->mmsg) == 0)
        sum_iov(&r, m.iov, m.iovlen);
    return read_posted(args, &r);
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
