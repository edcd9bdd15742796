/*
 * Allocator probes (record --memory --alloc-probes, or a target whose allocator has no
 * walker): every heap allocation and free of the targets.
 *
 * Measures: allocations of at least MIN_ALLOC bytes made through the allocator's public API
 *   (malloc, calloc, realloc, posix_memalign, aligned_alloc, memalign, valloc) and their frees,
 *   as ALLOC/FREE records, with the allocation's user stack. `live_allocs` holds the tracked
 *   allocations so a free of anything else costs one lookup.
 * Attach points: uprobes/uretprobes on the allocator library each target maps (pid-filtered),
 *   attached per target by the recorder (nothing until then).
 * Needs: common.bpf.c; uprobes.
 * Overhead: ~1,100 ns per allocation call of a target (uprobe + uretprobe), ~600 ns per free:
 *   allocators are hot, so raise MIN_ALLOC or sample (SAMPLE_EVERY) on busy processes.
 *
 * Sampling keeps an allocation when a hash of its address falls in 1/SAMPLE_EVERY: the same
 * address always decides the same way, so a sampled allocation's free is never missed.
 */

enum alloc_fn { FN_MALLOC = 1, FN_CALLOC, FN_REALLOC, FN_POSIX_MEMALIGN, FN_ALIGNED_ALLOC,
                FN_MEMALIGN, FN_VALLOC };

struct alloc_call {
    u64 size;
    u64 memptr; /* posix_memalign's out-parameter */
    u64 old;    /* realloc's old pointer */
    u32 fn;
    u32 pad;
};

BPF_HASH(alloc_calls, u32, struct alloc_call, MAX_TARGETS * 64);
/* Where tracked allocations were made (user stacks, walked at the allocator's return). */
BPF_STACK_TRACE(alloc_stacks, MAX_STACKS);
BPF_HASH(live_allocs, u64, u64, MAX_ALLOCS);

static __always_inline int sampled(u64 addr)
{
    if (SAMPLE_EVERY <= 1)
        return 1;
    return ((addr >> 4) * 0x9E3779B97F4A7C15ULL >> 40) % SAMPLE_EVERY == 0;
}

static __always_inline void emit_alloc(u8 kind, u64 addr, u64 size, u32 fn, s64 stack)
{
    struct wire_event *e = new_event(kind, 0);
    if (!e)
        return;
    e->addr = addr;
    e->value = size;
    e->op = fn;
    e->key = stack >= 0 ? stack + 1 : 0; /* 0: no stack */
    events.ringbuf_submit(e, 0);
}

static __always_inline void track_free(u64 addr)
{
    if (!addr || !live_allocs.lookup(&addr))
        return;
    live_allocs.delete(&addr);
    emit_alloc(KIND_FREE, addr, 0, 0, -1);
}

static __always_inline int alloc_enter(u32 fn, u64 size, u64 memptr, u64 old)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct alloc_call call = {.size = size, .memptr = memptr, .old = old, .fn = fn};
    if (size < MIN_ALLOC && fn != FN_REALLOC)
        return 0;
    alloc_calls.update(&tid, &call);
    return 0;
}

static __always_inline int alloc_return(struct pt_regs *ctx, u64 ret)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct alloc_call *call = alloc_calls.lookup(&tid);
    u64 addr = ret;
    if (!call)
        return 0;
    struct alloc_call c = *call;
    alloc_calls.delete(&tid);
    if (c.fn == FN_POSIX_MEMALIGN) {
        if (ret != 0 || bpf_probe_read_user(&addr, sizeof(addr), (void *)c.memptr))
            return 0;
    }
    if (c.fn == FN_REALLOC && addr)
        track_free(c.old); /* the old block is gone (or became this one) */
    if (!addr || c.size < MIN_ALLOC || !sampled(addr))
        return 0;
    if (live_allocs.update(&addr, &c.size)) {
        count(CNT_ALLOCS_FULL);
        return 0;
    }
    s64 stack = alloc_stacks.get_stackid(ctx, BPF_F_USER_STACK);
    if (stack < 0)
        count(CNT_STACK_MISSED);
    emit_alloc(KIND_ALLOC, addr, c.size, c.fn, stack);
    return 0;
}

int malloc_enter(struct pt_regs *ctx) { return alloc_enter(FN_MALLOC, PT_REGS_PARM1(ctx), 0, 0); }
int calloc_enter(struct pt_regs *ctx)
{
    return alloc_enter(FN_CALLOC, PT_REGS_PARM1(ctx) * PT_REGS_PARM2(ctx), 0, 0);
}
int realloc_enter(struct pt_regs *ctx)
{
    return alloc_enter(FN_REALLOC, PT_REGS_PARM2(ctx), 0, PT_REGS_PARM1(ctx));
}
int posix_memalign_enter(struct pt_regs *ctx)
{
    return alloc_enter(FN_POSIX_MEMALIGN, PT_REGS_PARM3(ctx), PT_REGS_PARM1(ctx), 0);
}
int aligned_alloc_enter(struct pt_regs *ctx)
{
    return alloc_enter(FN_ALIGNED_ALLOC, PT_REGS_PARM2(ctx), 0, 0);
}
int memalign_enter(struct pt_regs *ctx) { return alloc_enter(FN_MEMALIGN, PT_REGS_PARM2(ctx), 0, 0); }
int valloc_enter(struct pt_regs *ctx) { return alloc_enter(FN_VALLOC, PT_REGS_PARM1(ctx), 0, 0); }
int alloc_exit(struct pt_regs *ctx) { return alloc_return(ctx, PT_REGS_RC(ctx)); }
int free_enter(struct pt_regs *ctx)
{
    track_free(PT_REGS_PARM1(ctx));
    return 0;
}
