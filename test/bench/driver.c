/* Benchmark driver: N sessions of one pipelined conversation, against a
 * program started per session on pipes ("pipe": from spawn to exit), or
 * against a TCP port ("tcp": from connect to the server's close).  Prints
 * "sessions/s p50_us p99_us peak_rss_kib cpu_us faults", cpu_us being the
 * mean user + system CPU time of the program per session and faults its
 * mean minor page faults (wait4's rusage; pipe mode only, 0 otherwise):
 * less swayed than wall time by other work on the machine.  Peak RSS is measured in a
 * separate mode ("rss": the program's VmHWM read from /proc while it lives,
 * after it has answered the transaction and before QUIT), because wait4's
 * ru_maxrss also counts the spawning parent's pages; it is 0 otherwise. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;
static const char session[] = "EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n"
                              "RCPT TO:<b@mx.test>\r\nQUIT\r\n";

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static long drain(int fd) {
    char buf[4096];
    long total = 0;
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) total += n;
    return total;
}

/* Start argv with stdin and stdout on pipes (stderr to /dev/null); the
 * caller gets the pipe ends it keeps. */
static pid_t spawn_on_pipes(char **argv, int *to_child, int *from_child) {
    int in[2], out[2];
    if (pipe(in) || pipe(out)) { perror("pipe"); exit(1); }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_addclose(&fa, in[1]);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    pid_t pid;
    if (posix_spawn(&pid, argv[0], &fa, NULL, argv, environ)) { perror("posix_spawn"); exit(1); }
    posix_spawn_file_actions_destroy(&fa);
    close(in[0]);
    close(out[1]);
    *to_child = in[1];
    *from_child = out[0];
    return pid;
}

static double cpu_total; /* seconds of CPU of every program spawned */
static long faults_total; /* their minor page faults */

static long pipe_session(char **argv) {
    int to, from;
    pid_t pid = spawn_on_pipes(argv, &to, &from);
    (void)!write(to, session, sizeof session - 1);
    close(to);
    long got = drain(from);
    close(from);
    struct rusage ru;
    wait4(pid, NULL, 0, &ru);
    cpu_total += ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    faults_total += ru.ru_minflt;
    return got;
}

/* Peak RSS (KiB) of one session: after the replies to EHLO, MAIL and RCPT
 * (and the greeting) have come, read VmHWM, then QUIT. */
static long rss_session(char **argv) {
    int to, from;
    pid_t pid = spawn_on_pipes(argv, &to, &from);
    const char *quit = strstr(session, "QUIT");
    (void)!write(to, session, (size_t)(quit - session));
    char buf[4096];
    int lines = 0;
    ssize_t n;
    while (lines < 4 && (n = read(from, buf, sizeof buf)) > 0)
        for (ssize_t i = 0; i < n; i++) lines += buf[i] == '\n';
    char path[64], status[4096];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    long hwm = 0;
    FILE *f = fopen(path, "r");
    while (f && fgets(status, sizeof status, f))
        if (!strncmp(status, "VmHWM:", 6)) hwm = atol(status + 6);
    if (f) fclose(f);
    (void)!write(to, quit, strlen(quit));
    close(to);
    drain(from);
    close(from);
    waitpid(pid, NULL, 0);
    return hwm;
}

static long tcp_session(int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); exit(1); }
    (void)!write(s, session, sizeof session - 1);
    long got = drain(s);
    close(s);
    return got;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: driver pipe|tcp N prog [args] | port\n");
        return 64;
    }
    int tcp = !strcmp(argv[1], "tcp");
    int n = atoi(argv[2]);
    if (!strcmp(argv[1], "rss")) {
        long peak = 0;
        for (int i = 0; i < n; i++) {
            long hwm = rss_session(argv + 3);
            if (hwm > peak) peak = hwm;
        }
        printf("0 0 0 %ld 0 0\n", peak);
        return 0;
    }
    double *t = calloc(n, sizeof *t);
    long expect = -1;
    double start = now();
    for (int i = 0; i < n; i++) {
        double t0 = now();
        long got = tcp ? tcp_session(atoi(argv[3])) : pipe_session(argv + 3);
        t[i] = now() - t0;
        if (expect < 0) expect = got;
        if (got != expect || got <= 0) { fprintf(stderr, "session %d: %ld bytes, not %ld\n", i, got, expect); return 1; }
    }
    double total = now() - start;
    qsort(t, n, sizeof *t, cmp);
    printf("%.1f %.1f %.1f 0 %.1f %.1f\n", n / total, t[n / 2] * 1e6, t[(n * 99) / 100] * 1e6, cpu_total / n * 1e6,
           (double)faults_total / n);
    return 0;
}
