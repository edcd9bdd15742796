/*
 * Address-space changes of the targets (record --memory --alloc-probes).
 *
 * Measures: mmap, mremap, munmap and brk of the targets, as MAP/UNMAP records. Allocators
 *   take their big blocks and arenas from here, and so do programs that manage buffer memory
 *   themselves (pools, io_uring buffer rings): a buffer outside every tracked allocation is
 *   looked for in the mappings. (With the allocator walkers the recorder reads
 *   /proc/PID/maps instead.)
 * Attach points: syscalls:sys_enter_/sys_exit_{mmap,mremap,munmap,brk}.
 * Needs: common.bpf.c.
 * Overhead: syscall tracepoints send every syscall of every process through the kernel's slow
 *   path (~0.5 us each here).
 */
struct map_call {
    u64 len;
    u64 old_addr;
    u32 flags;
    s32 fd;
    u16 fn;
    u16 pad0;
    u32 pad1;
};

BPF_HASH(map_calls, u32, struct map_call, MAX_TARGETS * 64);

static __always_inline int map_enter(u16 fn, u64 len, u64 old_addr, u32 flags, s32 fd)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct map_call call = {.len = len, .old_addr = old_addr, .flags = flags, .fd = fd, .fn = fn};
    if (!is_target(id >> 32))
        return 0;
    map_calls.update(&tid, &call);
    return 0;
}

static __always_inline int map_exit(long ret)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct map_call *call = map_calls.lookup(&tid);
    if (!call)
        return 0;
    struct map_call c = *call;
    map_calls.delete(&tid);
    if (ret < 0 && ret > -4096) /* an error, not an address */
        return 0;
    struct wire_event *e = new_event(KIND_MAP, 0);
    if (!e)
        return 0;
    e->addr = ret;
    e->value = c.len;
    e->key = c.old_addr;
    e->flags = c.flags;
    e->fd = c.fd;
    e->op = c.fn;
    events.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
    return map_enter(MAP_MMAP, args->len, 0, args->flags, (s32)args->fd);
}
TRACEPOINT_PROBE(syscalls, sys_exit_mmap) { return map_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_mremap)
{
    return map_enter(MAP_MREMAP, args->new_len, args->addr, args->flags, -1);
}
TRACEPOINT_PROBE(syscalls, sys_exit_mremap) { return map_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_brk) { return map_enter(MAP_BRK, 0, 0, 0, -1); }
TRACEPOINT_PROBE(syscalls, sys_exit_brk) { return map_exit(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_munmap)
{
    if (!is_target(bpf_get_current_pid_tgid() >> 32))
        return 0;
    struct wire_event *e = new_event(KIND_UNMAP, 0);
    if (!e)
        return 0;
    e->addr = args->addr;
    e->value = args->len;
    events.ringbuf_submit(e, 0);
    return 0;
}
