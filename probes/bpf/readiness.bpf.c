/*
 * Readiness waits.
 *
 * Measures: epoll_wait/epoll_pwait/poll/ppoll/select/pselect6 of targets, as WAIT (fd = the
 *   epoll fd or -1, value = maxevents or nfds) and WAIT_END (value = ready count or -errno)
 *   records keyed by thread. They tell a thread parked on readiness with a buffer in hand
 *   (EAGAIN, wait, retry) from one that merely read too early. Not loaded with --min-wait,
 *   which records only calls that wait (parked reads cannot be told then).
 * Attach points: syscalls:sys_enter_/sys_exit_{epoll_wait,epoll_pwait,poll,ppoll,select,
 *   pselect6}.
 * Needs: common.bpf.c.
 * Overhead: a hash update and delete plus two records per wait of a target.
 */
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
    struct wire_event *e = new_event(KIND_WAIT, 0);
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
    struct wire_event *e = new_event(KIND_WAIT_END, 0);
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
