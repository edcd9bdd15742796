/*
 * Following a launched command's children.
 *
 * Measures: nothing of its own; a fork by a target makes the child a target, and a thread's
 *   exit drops its id.
 * Attach points: sched:sched_process_fork, sched:sched_process_exit.
 * Needs: common.bpf.c.
 * Overhead: a bitmap test per fork and per thread exit of any process.
 */
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
