/*
 * Resident memory of the targets (record --memory).
 *
 * Measures: every change of a target's resident-memory counters (anonymous, file, shared,
 *   swap), as RSS records keyed by address space.
 * Attach points: kmem:rss_stat.
 * Needs: common.bpf.c; Linux 5.5 (kmem:rss_stat).
 * Overhead: a bitmap test per counter change of any process; a record per change of a target
 *   (they come in page-fault batches, not per allocation).
 */
/* The kernel reports each counter's new value (bytes) as it changes. */
TRACEPOINT_PROBE(kmem, rss_stat)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!args->curr || !is_target(id >> 32))
        return 0;
    struct wire_event *e = new_event(KIND_RSS, 0);
    if (!e)
        return 0;
    e->key = args->mm_id;
    e->value = args->size;
    e->op = args->member;
    events.ringbuf_submit(e, 0);
    return 0;
}
