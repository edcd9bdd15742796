/*
 * What every idlebuf program shares: the ring buffer, the target filter, the socket check,
 * event emission and the storage of a thread's call in flight.
 *
 * The loader (probes/loader.py) compiles this file, then the programs enabled for a
 * recording: syscalls.bpf.c (reads and writes at syscall entry and exit) or
 * sched_hooks.bpf.c (--min-wait without syscall tracepoints), children.bpf.c (following a
 * launched command's children), uring.bpf.c, readiness.bpf.c, alloc.bpf.c (--memory). The
 * record layout and constants come from probes/format/schema.py (prepended).
 * Needs: Linux 5.8 (BPF ring buffer), BTF for the offsets below.
 *
 * Compile-time constants (cflags): OFF_TASK_FILES, OFF_FILES_FDT, OFF_FDT_MAX_FDS, OFF_FDT_FD,
 * OFF_FILE_INODE, OFF_INODE_MODE (from BTF), MAX_TARGETS, TARGET_WORDS, MAX_INFLIGHT,
 * RINGBUF_PAGES, MAX_IOV, MIN_WAIT_NS, WITH_WRITES, BLOCK_HOOKS.
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
    u32 stack; /* POST_STACKS: the user stack that posted it, id + 1 (0: none) */
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

/* file->f_inode->i_mode is a socket: files and pipes do not count. */
static __always_inline int file_is_socket(const void *file)
{
    void *inode = NULL;
    u16 mode = 0;

    if (!file)
        return 0;
    bpf_probe_read_kernel(&inode, sizeof(inode), (char *)file + OFF_FILE_INODE);
    if (!inode)
        return 0;
    bpf_probe_read_kernel(&mode, sizeof(mode), (char *)inode + OFF_INODE_MODE);
    return (mode & S_IFMT_) == S_IFSOCK_;
}

/* current->files->fdt->fd[fd] is a socket. */
static __always_inline int fd_is_socket(int fd)
{
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    void *files = NULL, *fdt = NULL, *fdarr = NULL, *file = NULL;
    unsigned int max_fds = 0;

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
    return file_is_socket(file);
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
static __always_inline struct wire_event *new_event(u8 kind, u8 source)
{
    struct wire_event *e = events.ringbuf_reserve(sizeof(struct wire_event));
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

#if POST_STACKS
/* Where reads are posted from (record --memory): a user stack per posted read, symbolized as
 * the recording ends. Costs a stack walk (~1 us) per post: the memory side only. */
BPF_STACK_TRACE(post_stacks, MAX_STACKS);
#endif

/* The user stack of the current thread, id + 1 (0: not taken, or the walk failed). */
static __always_inline u32 post_stack(void *ctx)
{
#if POST_STACKS
    int id = post_stacks.get_stackid(ctx, BPF_F_USER_STACK);
    if (id >= 0)
        return id + 1;
    count(CNT_STACK_MISSED);
#endif
    return 0;
}

static __always_inline void emit_at(u8 kind, u64 key, u32 pid, const struct inflight *r,
                                    s64 value, u64 ts)
{
    struct wire_event *e = new_event(kind, SOURCE_SYSCALL);
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
    e->first_id = r->stack;
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

