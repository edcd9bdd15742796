/*
 * io_uring posted reads.
 *
 * Measures: every read-type request a target submits (RECV, READ, READV, RECVMSG, READ_FIXED,
 *   READ_MULTISHOT) with its buffer, read from the prepared request (struct io_kiocb) at
 *   offsets taken from BTF; its final completion; each use of a provided buffer; buffers given
 *   to a group (IORING_REGISTER_PBUF_RING, IORING_OP_PROVIDE_BUFFERS).
 * Attach points: io_uring:io_uring_submit_req, io_uring:io_uring_complete,
 *   io_uring:io_uring_register.
 * Needs: common.bpf.c; Linux 6.0+ (io_uring_submit_req carries the request), BTF for the
 *   URING_OFF_* and ITER_OFF_* offsets and the REQ_F_* masks (probes/offsets.py).
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

static __always_inline struct wire_event *uring_event(u8 kind, u64 key, u64 ring, u64 user_data)
{
    struct wire_event *e = new_event(kind, SOURCE_URING);
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

/* What a read-type request holds: its buffer (address, total length, iovecs), flags and
 * provided-buffer group, into `e`. `socket`: whether its file is a socket (the caller knows
 * how to tell). Returns 0 if the request does not read into a buffer. Shared by the submit
 * probe and the walk of requests posted before the attach (attach.bpf.c). */
static __always_inline int uring_read_of(const void *req, u8 op, u64 rflags, int socket,
                                         struct wire_event *e)
{
    u64 addr = 0, len = 0;
    u32 nvec = 0, flags = 0, sr_flags = 0;
    u16 group = 0;
    s32 fd = -1;

    if (op != URING_OP_RECV && op != URING_OP_READ && op != URING_OP_READV &&
        op != URING_OP_RECVMSG && op != URING_OP_READ_FIXED && op != URING_OP_READ_MULTISHOT &&
        !(op == URING_OP_POLL_ADD && socket))
        return 0;
    /* Until the request is issued req->file is unset; the sqe's fd waits in req->cqe.fd. */
    bpf_probe_read_kernel(&fd, sizeof(fd), req + URING_OFF_CQE_FD);
    if (op == URING_OP_POLL_ADD) {
        /* a readiness wait on one socket: no buffer; its request is the connection's waiter */
        e->fd = fd;
        e->flags |= FLAG_SOCKET;
        e->op = op;
        return 1;
    }
    if (rflags & REQ_F_FIXED_FILE_MASK)
        flags |= FLAG_FIXED_FILE;
    else if (socket)
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
    e->addr = addr;
    e->value = len;
    e->fd = fd;
    e->flags |= flags;
    e->nvec = nvec;
    e->op = op;
    e->group = group;
    return 1;
}

/* Track a decoded read in flight until its final completion (`e` from uring_read_of, with
 * pid, ring and aux = user_data set). `replace`: a new submission replaces what the table
 * held for a recycled request; the walk at attach never replaces what the probes saw.
 * Returns 0 if it is not tracked. */
static __always_inline int uring_track(u64 req, const struct wire_event *e, int replace)
{
    struct uring_req r = {.ring = e->ring, .user_data = e->aux, .pid = e->pid,
                          .flags = e->flags, .group = e->group, .op = e->op};
    if (replace ? uring_inflight.update(&req, &r) : uring_inflight.insert(&req, &r)) {
        if (replace)
            count(CNT_INFLIGHT_FULL);
        return 0;
    }
    if (e->flags & FLAG_BUFFER_SELECT) {
        struct select_key sk = {.ring = e->ring, .user_data = e->aux};
        if (uring_select.update(&sk, (u16 *)&e->group))
            count(CNT_SELECT_FULL);
    }
    count(CNT_POSTS);
    return 1;
}

TRACEPOINT_PROBE(io_uring, io_uring_submit_req)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u8 op = args->opcode;
    void *req = args->req;
    u64 ring = (u64)args->ctx, user_data = args->user_data;
    struct wire_event *e;

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
    struct wire_event d = {.ring = ring, .aux = user_data, .pid = tgid};
    u64 rflags = args->flags;
    s32 fd = -1;
    bpf_probe_read_kernel(&fd, sizeof(fd), req + URING_OFF_CQE_FD);
    /* a registered file's fd indexes the ring's table, not the process's: no check */
    int socket = !(rflags & REQ_F_FIXED_FILE_MASK) && fd_is_socket(fd);
    if (!uring_read_of(req, op, rflags, socket, &d))
        return 0;
    if (!uring_track((u64)req, &d, 1))
        return 0;
    e = uring_event(KIND_POST, (u64)req, ring, user_data);
    if (!e)
        return 0;
    e->addr = d.addr;
    e->value = d.value;
    e->fd = d.fd;
    e->flags = d.flags;
    e->nvec = d.nvec;
    e->op = d.op;
    e->group = d.group;
    e->first_id = post_stack(args);
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
    struct wire_event *e;

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
    struct wire_event *e;
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
