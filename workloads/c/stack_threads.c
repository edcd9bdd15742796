/* A thread per connection, each with a known stack: the truth for idlebuf's thread waiter.
 *
 * stack_threads PORT CONNECTIONS TOUCH_BYTES [poll]
 * Listens on 127.0.0.1:PORT (0: any), prints {"event": "listening", "pid", "port"}; accepts
 * CONNECTIONS connections, each served by a thread of its own that first touches TOUCH_BYTES
 * of its stack (written, so resident) and counts its stack mapping's resident bytes with
 * mincore(), then waits on its socket: blocked in recv(), or with
 * "poll" in poll() on that socket alone (as MariaDB's threads wait) and then recv(). Once
 * every thread waits it prints {"event": "ground_truth", "pid", "connections", "touched",
 * "stack_size", "stack_resident" (over every thread)}. It serves until a signal ends it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

static size_t touch;
static int use_poll;
static volatile int waiting;
static volatile long stack_resident; /* over every thread, as mincore() says */

/* The resident bytes of the mapping holding `addr` (this thread's stack), by mincore(). */
static long resident_of(void *addr)
{
    unsigned long at = (unsigned long)addr, lo = 0, hi = 0;
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[512];
    while (maps && fgets(line, sizeof line, maps)) {
        unsigned long a, b;
        if (sscanf(line, "%lx-%lx", &a, &b) == 2 && a <= at && at < b) {
            lo = a, hi = b;
            break;
        }
    }
    if (maps)
        fclose(maps);
    long page = sysconf(_SC_PAGESIZE), n = (hi - lo) / page, in = 0;
    unsigned char *vec = malloc(n ? n : 1);
    if (hi > lo && mincore((void *)lo, hi - lo, vec) == 0)
        for (long i = 0; i < n; i++)
            in += vec[i] & 1;
    free(vec);
    return in * page;
}

static void *serve(void *arg)
{
    int fd = (int)(long)arg;
    char *area = alloca(touch);
    memset(area, 0x5a, touch); /* resident: written */
    __asm__ volatile("" : : "r"(area) : "memory"); /* and kept */
    __sync_fetch_and_add(&stack_resident, resident_of(&fd));
    __sync_fetch_and_add(&waiting, 1);
    char buf[4096];
    for (;;) {
        if (use_poll) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            if (poll(&p, 1, -1) < 0)
                break;
        }
        ssize_t n = recv(fd, buf, sizeof buf, use_poll ? MSG_DONTWAIT : 0);
        if (n == 0 || (n < 0 && !use_poll))
            break;
    }
    close(fd);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    int port = atoi(argv[1]), conns = atoi(argv[2]);
    touch = strtoul(argv[3], NULL, 10);
    use_poll = argc > 4 && strcmp(argv[4], "poll") == 0;
    size_t stack_size = 256 * 1024 + touch;
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
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, stack_size);
    for (int i = 0; i < conns; i++) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0)
            return 1;
        pthread_t t;
        if (pthread_create(&t, &attr, serve, (void *)(long)fd))
            return 1;
        pthread_detach(t);
    }
    while (waiting < conns)
        usleep(1000);
    usleep(100000); /* every thread inside its call */
    printf("{\"event\": \"ground_truth\", \"pid\": %d, \"connections\": %d, \"touched\": %zu, "
           "\"stack_size\": %zu, \"stack_resident\": %ld, \"waits_in\": \"%s\"}\n",
           getpid(), conns, touch, stack_size, stack_resident, use_poll ? "poll" : "recv");
    fflush(stdout);
    for (;;)
        pause();
}
