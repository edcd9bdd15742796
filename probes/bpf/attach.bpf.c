/*
 * State at attach: what the targets already hold when tracing starts, read from the kernel.
 *
 * Measures: nothing live. Three programs the recorder runs on demand:
 *   - bpf_iter__task_file (a BPF iterator): every open file of the targets, with its
 *     struct file, its private data (an io_uring file's struct io_ring_ctx) and the task's
 *     address space (the mm id kmem:rss_stat reports);
 *   - peek_kernel (run with BPF_PROG_TEST_RUN): copies up to PEEK_SLOTS chunks of kernel
 *     memory the recorder names, so that it can walk kernel lists (a ring's cancel table,
 *     its provided-buffer lists) itself, reading only;
 *   - seed_uring (likewise): decodes a request found by that walk with the
 *     submit probe's own logic (uring_read_of) and enters them in the in-flight table, so
 *     their completions after the attach retire them. Requests the probes saw submitted are
 *     left alone.
 * Attach points: none (an iterator link, and test runs of raw-tracepoint programs).
 * Needs: common.bpf.c (and uring.bpf.c for seed_uring); Linux 5.10 (test runs of raw
 *   tracepoint programs), BTF for OFF_TASK_TGID, OFF_TASK_MM, OFF_FILE_PRIVATE and the
 *   io_kiocb offsets URING_OFF_FILE, URING_OFF_OPCODE, URING_OFF_FLAGS, URING_OFF_USER_DATA.
 * Overhead: none while recording; the walk costs ~50 us per PEEK_SLOTS chunks, in the
 *   recorder's own thread.
 */
#define PEEK_SLOTS 64
#define PEEK_BYTES 64

/* The context of a task_file iterator program (declared here: the installed headers are not
 * this kernel's). */
struct iter_meta_ {
    void *seq;
    u64 session_id;
    u64 seq_num;
};
struct task_file_ctx {
    struct iter_meta_ *meta;
    void *task;
    u32 fd;
    void *file;
};

struct open_file {
    u64 file;
    u64 private_data;
    u64 mm;
    u32 pid;
    s32 fd;
    u32 socket;
    u32 pad;
};

/* One batch in, one out: a single map update and lookup per run. */
struct peek_batch {
    u64 addr[PEEK_SLOTS];
};
struct peek_result {
    u64 failed; /* bit i: chunk i could not be read (its bytes are zeros) */
    u8 bytes[PEEK_SLOTS * PEEK_BYTES]; /* one dimension: bcc's ctypes map types have no other */
};

BPF_ARRAY(peek_in, struct peek_batch, 1);
BPF_ARRAY(peek_out, struct peek_result, 1);

int bpf_iter__task_file(struct task_file_ctx *ctx)
{
    u64 task = (u64)ctx->task, file = (u64)ctx->file;
    struct open_file f = {};
    u32 tgid = 0;

    if (!task || !file)
        return 0;
    bpf_probe_read_kernel(&tgid, sizeof(tgid), (void *)(task + OFF_TASK_TGID));
    if (!is_target(tgid))
        return 0;
    f.file = file;
    f.pid = tgid;
    f.fd = ctx->fd;
    f.socket = file_is_socket((void *)file);
    bpf_probe_read_kernel(&f.private_data, 8, (void *)(file + OFF_FILE_PRIVATE));
    bpf_probe_read_kernel(&f.mm, 8, (void *)(task + OFF_TASK_MM));
    bpf_seq_write(ctx->meta->seq, &f, sizeof(f));
    return 0;
}

/* args[0]: how many addresses of peek_in to read, PEEK_BYTES each. */
int peek_kernel(struct bpf_raw_tracepoint_args *ctx)
{
    u32 zero = 0, n = ctx->args[0];
    struct peek_batch *in = peek_in.lookup(&zero);
    struct peek_result *out = peek_out.lookup(&zero);
    if (!in || !out)
        return 0;
    out->failed = 0;
    for (u32 i = 0; i < PEEK_SLOTS; i++) {
        if (i >= n)
            break;
        u8 *chunk = &out->bytes[i * PEEK_BYTES];
        if (bpf_probe_read_kernel(chunk, PEEK_BYTES, (void *)in->addr[i])) {
            __builtin_memset(chunk, 0, PEEK_BYTES);
            out->failed |= 1ULL << i;
        }
    }
    return 0;
}

#ifdef URING_OFF_FILE
/* seed_uring's results: the request decoded as a POST record (kind 0: not a read, or already
 * tracked by the probes), and its file (to name its fd). */
struct seeded {
    struct wire_event e;
    u64 file;
};

BPF_ARRAY(seed_out, struct seeded, 1);

/* One request per run (a loop over a batch defeats the verifier's bounds here): args[0] the
 * request, args[1] its ring (io_ring_ctx), args[2] the process that owns it. */
int seed_uring(struct bpf_raw_tracepoint_args *ctx)
{
    u32 zero = 0;
    u64 req = ctx->args[0], ring = ctx->args[1];
    u32 pid = ctx->args[2];
    struct seeded *out = seed_out.lookup(&zero);
    if (!out)
        return 0;
    __builtin_memset(out, 0, sizeof(*out));
    void *r = (void *)req;
    u8 op = 0;
    u64 rflags = 0, file = 0;
    bpf_probe_read_kernel(&op, sizeof(op), r + URING_OFF_OPCODE);
    bpf_probe_read_kernel(&rflags, URING_FLAGS_SIZE, r + URING_OFF_FLAGS);
    bpf_probe_read_kernel(&file, sizeof(file), r + URING_OFF_FILE);
    out->file = file;
    out->e.ring = ring;
    out->e.pid = pid;
    out->e.flags = FLAG_SCANNED;
    bpf_probe_read_kernel(&out->e.aux, sizeof(u64), r + URING_OFF_USER_DATA);
    int socket = !(rflags & REQ_F_FIXED_FILE_MASK) && file_is_socket((void *)file);
    if (!uring_read_of(r, op, rflags, socket, &out->e) || !uring_track(req, &out->e, 0))
        return 0;
    out->e.kind = KIND_POST;
    out->e.source = SOURCE_URING;
    out->e.key = req;
    out->e.ts_ns = bpf_ktime_get_ns();
    return 0;
}
#endif
