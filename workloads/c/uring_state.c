/* An io_uring event loop whose requests name their connection by pointer: the truth for
 * idlebuf's owned-state walk from io_uring user_data.
 *
 * uring_state PORT CONNECTIONS
 * One thread, one ring (liburing). Each connection gets a state of known size - a struct
 * pointing to 3 more allocations and the buffer it reads into - and a RECV posted on it
 * whose user_data is that struct (as liburing servers commonly do); a global array also
 * points at every connection's struct, so that global data cannot simply veto it. Nothing
 * else points at a connection's state: the loop waits in io_uring_enter for all of them.
 * Prints {"event": "listening", "pid", "port"}; for each connection {"event": "connection",
 * "fd", "index", "owned", "graph", "buffer"}: glibc's own count of the bytes in use
 * (mallinfo2's uordblks) grew by `owned` + `buffer` as the connection was set up (`buffer`:
 * the chunk of its buffer, where its RECV is posted - the buffer part, not owned state);
 * then {"event": "ground_truth", "pid", "connections"}. Serves until a signal ends it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <liburing.h>
#include <malloc.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUFFER 4099
#define PARTS 3
#define MAX_CONNS 1024

struct conn {
    int fd, index;
    char *buffer;
    char *part[PARTS];
};

static struct conn **all; /* global: every connection's struct */
static char accept_tag;

static long chunk(void *p) { return (long)malloc_usable_size(p) + 8; }

static size_t part_size(int i, int k)
{
    static const size_t base[PARTS] = {104, 1000, 3001}, step[PARTS] = {24, 40, 8};
    return base[k] + step[k] * (size_t)i;
}

static __attribute__((noinline)) struct conn *set_up(int fd, int index, long *graph, long *buffer)
{
    struct conn *c = malloc(sizeof *c);
    c->fd = fd;
    c->index = index;
    *graph = chunk(c);
    for (int k = 0; k < PARTS; k++) {
        c->part[k] = malloc(part_size(index, k));
        memset(c->part[k], 0x11 * (k + 1), part_size(index, k));
        *graph += chunk(c->part[k]);
    }
    c->buffer = malloc(BUFFER);
    memset(c->buffer, 0, BUFFER);
    *buffer = chunk(c->buffer);
    *graph += *buffer;
    all[index] = c;
    return c;
}

static void post_recv(struct io_uring *ring, struct conn *c)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    io_uring_prep_recv(sqe, c->fd, c->buffer, BUFFER, 0);
    io_uring_sqe_set_data(sqe, c);
    io_uring_submit(ring);
}

static void post_accept(struct io_uring *ring, int ls)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    io_uring_prep_accept(sqe, ls, NULL, NULL, 0);
    io_uring_sqe_set_data(sqe, &accept_tag);
    io_uring_submit(ring);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    int port = atoi(argv[1]), conns = atoi(argv[2]);
    if (conns > MAX_CONNS)
        return 2;
    mallopt(M_ARENA_MAX, 1);
    all = calloc(MAX_CONNS, sizeof *all);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1024) ||
        getsockname(ls, (struct sockaddr *)&a, &len))
        return 1;
    struct io_uring ring;
    if (io_uring_queue_init(256, &ring, 0))
        return 1;
    printf("{\"event\": \"listening\", \"pid\": %d, \"port\": %d}\n", getpid(), ntohs(a.sin_port));
    fflush(stdout);
    post_accept(&ring, ls);
    int accepted = 0;
    for (;;) {
        struct io_uring_cqe *cqe;
        if (io_uring_wait_cqe(&ring, &cqe))
            return 1;
        void *data = io_uring_cqe_get_data(cqe);
        int res = cqe->res;
        io_uring_cqe_seen(&ring, cqe);
        if (data == &accept_tag) {
            if (res < 0 || accepted >= conns)
                return 1;
            long before = (long)mallinfo2().uordblks, graph, buffer;
            struct conn *c = set_up(res, accepted, &graph, &buffer);
            long grown = (long)mallinfo2().uordblks - before;
            post_recv(&ring, c);
            printf("{\"event\": \"connection\", \"fd\": %d, \"index\": %d, \"owned\": %ld, "
                   "\"graph\": %ld, \"buffer\": %ld}\n",
                   res, accepted, grown - buffer, graph, buffer);
            fflush(stdout);
            if (++accepted == conns) {
                printf("{\"event\": \"ground_truth\", \"pid\": %d, \"connections\": %d}\n", getpid(),
                       conns);
                fflush(stdout);
            } else {
                post_accept(&ring, ls);
            }
            continue;
        }
        struct conn *c = data;
        if (res <= 0) {
            close(c->fd);
            continue;
        }
        post_recv(&ring, c);
    }
}
