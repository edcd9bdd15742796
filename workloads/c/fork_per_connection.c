/* A process per connection, each with known private memory: the truth for idlebuf's process
 * waiter (the model of PostgreSQL's backends, pre-fork servers).
 *
 * fork_per_connection CONNECTIONS PRIVATE_BYTES
 * Listens on 127.0.0.1 (any port), prints {"event": "listening", "pid", "port"}; forks a
 * child for each of CONNECTIONS connections, which writes PRIVATE_BYTES of memory of its own
 * (malloc'd, so private) and then waits in recv() on its connection, into an 8 KiB buffer. Once every child waits
 * it prints {"event": "ground_truth", "pid", "children": [...], "private": PRIVATE_BYTES}.
 * It serves until a signal ends it (its children end with it).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    int conns = atoi(argv[1]);
    size_t private_bytes = strtoul(argv[2], NULL, 10);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1, ready[2];
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1024) ||
        getsockname(ls, (struct sockaddr *)&a, &len) || pipe(ready))
        return 1;
    printf("{\"event\": \"listening\", \"pid\": %d, \"port\": %d}\n", getpid(), ntohs(a.sin_port));
    fflush(stdout);
    pid_t *children = calloc(conns, sizeof *children);
    for (int i = 0; i < conns; i++) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0)
            return 1;
        pid_t child = fork();
        if (child == 0) {
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            close(ls);
            close(ready[0]);
            char *mine = malloc(private_bytes);
            memset(mine, 0x5a, private_bytes); /* written: private, resident */
            if (write(ready[1], "x", 1) != 1)
                _exit(1);
            close(ready[1]);
            char *buf = malloc(8192); /* its receive buffer, as PostgreSQL's backends have */
            while (recv(fd, buf, 8192, 0) > 0)
                ;
            _exit(mine[0] == 0x5a ? 0 : 1);
        }
        children[i] = child;
        close(fd);
    }
    char c;
    for (int i = 0; i < conns; i++)
        if (read(ready[0], &c, 1) != 1)
            return 1;
    usleep(100000); /* every child inside recv() */
    printf("{\"event\": \"ground_truth\", \"pid\": %d, \"private\": %zu, \"children\": [", getpid(),
           private_bytes);
    for (int i = 0; i < conns; i++)
        printf("%s%d", i ? ", " : "", children[i]);
    printf("]}\n");
    fflush(stdout);
    for (;;)
        pause();
}
