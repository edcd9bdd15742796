/* Per-connection state of known size, kept alive only by each connection's roots: the truth
 * for idlebuf's owned-state walk.
 *
 * owned_state PORT CONNECTIONS MODE [FILLER_MB]
 * MODE threads: a thread per connection, blocked in recv() on a buffer of its own; its state
 *   (a struct pointing to 3 more allocations and the buffer) is held by a pointer on its
 *   stack alone - and by a global linked list that points at every connection's struct, so
 *   that global data cannot simply veto it.
 * MODE epoll: one event loop; epoll's data for each connection points to its struct (which
 *   points to 3 more allocations and its buffer); a global array points at every struct.
 * MODE slots: one event loop whose connection structs are slots of one array (as nginx
 *   keeps them); epoll's data points to a connection's slot, which points to its 3
 *   allocations and its buffer.
 * Listens on 127.0.0.1:PORT (0: any), prints {"event": "listening", "pid", "port"}; then for
 * each connection {"event": "connection", "fd", "index", "owned", "graph", "buffer"}: glibc's
 * own count of the bytes in use (mallinfo2's uordblks) grew by `owned` + the list node, as
 * the connection was set up: its state's chunks (`graph`, malloc_usable_size + 8 each,
 * `buffer` the chunk of the buffer it reads into: left out of `owned` where a read is
 * posted on it - the buffer part - and in it where none is), and, for a thread, what glibc
 * allocates for the thread itself (its TLS's dtv, its tcache) - reachable from its stack
 * alone, so owned. One arena (M_ARENA_MAX 1) keeps the count exact. Then
 * {"event": "ground_truth", "pid", "connections", "mode"}; it serves until a signal ends it.
 * FILLER_MB: first, a global graph of that many MiB of small allocations (48 to 400 bytes,
 * each pointing at two earlier ones and at random data) - a big heap to walk (benchmarks).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <malloc.h>
#include <netinet/in.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
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

struct node { /* the global list: every connection's struct */
    struct node *next;
    struct conn *conn;
};

static struct node *list_head;
static pthread_mutex_t list_lock = PTHREAD_MUTEX_INITIALIZER;
static struct conn **all; /* epoll: a global array of every struct */
static struct conn *slots; /* slots: the array of connection structs */
static sem_t ready;
static long graph_bytes, buffer_bytes, node_bytes; /* set by a thread before it posts */
static char listener_tag;

static long chunk(void *p) { return (long)malloc_usable_size(p) + 8; }

static size_t part_size(int i, int k)
{
    static const size_t base[PARTS] = {104, 1000, 3001}, step[PARTS] = {24, 40, 8};
    return base[k] + step[k] * (size_t)i;
}

/* Fill a connection's state: its 3 allocations (touched: resident) and its buffer. */
static __attribute__((noinline)) long fill(struct conn *c, int fd, int index)
{
    c->fd = fd;
    c->index = index;
    long bytes = 0;
    for (int k = 0; k < PARTS; k++) {
        c->part[k] = malloc(part_size(index, k));
        memset(c->part[k], 0x11 * (k + 1), part_size(index, k));
        bytes += chunk(c->part[k]);
    }
    c->buffer = malloc(BUFFER);
    memset(c->buffer, 0, BUFFER);
    buffer_bytes = chunk(c->buffer);
    return bytes;
}

static __attribute__((noinline)) void list_add(struct conn *c)
{
    struct node *n = malloc(sizeof *n);
    n->conn = c;
    node_bytes = chunk(n);
    pthread_mutex_lock(&list_lock);
    n->next = list_head;
    list_head = n;
    pthread_mutex_unlock(&list_lock);
}

static __attribute__((noinline)) struct conn *set_up(int fd, int index)
{
    struct conn *c = malloc(sizeof *c);
    graph_bytes = chunk(c) + fill(c, fd, index);
    list_add(c);
    return c;
}

static void *serve(void *arg)
{
    int fd = (int)((long)arg & 0xffff), index = (int)((long)arg >> 16);
    struct conn *volatile c = set_up(fd, index); /* on this stack alone */
    sem_post(&ready);
    for (;;) {
        ssize_t n = recv(fd, c->buffer, BUFFER, 0);
        if (n <= 0)
            break;
    }
    close(fd);
    return NULL;
}

static long in_use(void) { return (long)mallinfo2().uordblks; }

void **filler; /* the global graph (not static: kept although never read) */

static void fill_heap(long bytes)
{
    unsigned long state = 88172645463325252UL, made = 0;
    void **nodes = NULL;
    long n = 0, cap = 0;
    while ((long)made < bytes) {
        state ^= state << 13, state ^= state >> 7, state ^= state << 17;
        size_t size = 48 + state % 353;
        void **p = malloc(size);
        for (size_t w = 0; w < size / 8; w++)
            p[w] = (void *)(state * (w + 1)); /* data, mostly not pointers */
        p[0] = n ? nodes[state % n] : NULL;
        p[1] = n ? nodes[(state >> 20) % n] : NULL;
        if (n == cap)
            nodes = realloc(nodes, (cap = cap ? 2 * cap : 1024) * sizeof *nodes);
        nodes[n++] = p;
        made += chunk(p);
    }
    filler = nodes; /* global: every one of them reached from here */
}

static void say(int fd, int index, long grown, int posted)
{
    long owned = grown - node_bytes - (posted ? buffer_bytes : 0);
    printf("{\"event\": \"connection\", \"fd\": %d, \"index\": %d, \"owned\": %ld, "
           "\"graph\": %ld, \"buffer\": %ld}\n",
           fd, index, owned, graph_bytes, buffer_bytes);
    fflush(stdout);
}

static __attribute__((noinline)) void *set_up_loop(int fd, int index, int use_slots)
{
    struct conn *c = use_slots ? &slots[index] : malloc(sizeof *c);
    graph_bytes = (use_slots ? 0 : chunk(c)) + fill(c, fd, index);
    if (!use_slots)
        all[index] = c;
    return c;
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    int port = atoi(argv[1]), conns = atoi(argv[2]);
    const char *mode = argv[3];
    int threads = strcmp(mode, "threads") == 0, use_slots = strcmp(mode, "slots") == 0;
    if (conns > MAX_CONNS || (!threads && !use_slots && strcmp(mode, "epoll")))
        return 2;
    mallopt(M_ARENA_MAX, 1);
    if (argc > 4)
        fill_heap(atol(argv[4]) << 20);
    sem_init(&ready, 0, 0);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1024) ||
        getsockname(ls, (struct sockaddr *)&a, &len))
        return 1;
    printf("{\"event\": \"listening\", \"pid\": %d, \"port\": %d}\n", getpid(), ntohs(a.sin_port));
    fflush(stdout);
    if (threads) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        for (int i = 0; i < conns; i++) {
            int fd = accept(ls, NULL, NULL);
            if (fd < 0)
                return 1;
            long before = in_use();
            pthread_t t;
            if (pthread_create(&t, &attr, serve, (void *)(((long)i << 16) | fd)))
                return 1;
            sem_wait(&ready);
            say(fd, i, in_use() - before, 1);
        }
    } else {
        all = calloc(MAX_CONNS, sizeof *all);
        slots = use_slots ? calloc(MAX_CONNS, sizeof *slots) : NULL;
        int ep = epoll_create1(0);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &listener_tag};
        epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
        int accepted = 0;
        struct epoll_event events[16];
        for (;;) {
            if (accepted == conns) {
                printf("{\"event\": \"ground_truth\", \"pid\": %d, \"connections\": %d, "
                       "\"mode\": \"%s\"}\n",
                       getpid(), conns, mode);
                fflush(stdout);
                accepted++;
            }
            int n = epoll_wait(ep, events, 16, -1);
            for (int k = 0; k < n; k++) {
                if (events[k].data.ptr == &listener_tag) {
                    int fd = accept(ls, NULL, NULL);
                    if (fd < 0 || accepted >= conns)
                        return 1;
                    long before = in_use();
                    struct epoll_event add = {.events = EPOLLIN};
                    add.data.ptr = set_up_loop(fd, accepted, use_slots);
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &add);
                    node_bytes = 0;
                    say(fd, accepted, in_use() - before, 0);
                    accepted++;
                    continue;
                }
                struct conn *c = events[k].data.ptr;
                ssize_t got = recv(c->fd, c->buffer, BUFFER, MSG_DONTWAIT);
                if (got == 0)
                    close(c->fd);
            }
        }
    }
    printf("{\"event\": \"ground_truth\", \"pid\": %d, \"connections\": %d, \"mode\": \"%s\"}\n",
           getpid(), conns, mode);
    fflush(stdout);
    for (;;)
        pause();
}
