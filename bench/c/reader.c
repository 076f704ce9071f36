/* reader: timed open+read+close loops for the read benchmarks.
 *
 *   reader lat BLOCK ROUNDS PATH...
 *       Interleaved rounds: in each round every PATH (in an order rotated by
 *       one each round) gets BLOCK timed open + read-to-EOF + close. One
 *       untimed round warms up first. Prints one line per PATH, in argument
 *       order: the latencies in nanoseconds, space separated.
 *   reader gap GAP_US BLOCK ROUNDS PATH...
 *       As lat, with a pause of GAP_US (untimed) before each read: isolated
 *       reads, as a script polling a file sees them.
 *   reader cat BLOCK ROUNDS CAT PATH...
 *       The same, but each read is one `CAT PATH >/dev/null` process
 *       (posix_spawn + waitpid), as a shell loop would run it.
 *   reader tput START_NS DURATION_NS PATH
 *       Waits until CLOCK_MONOTONIC reaches START_NS, then reads PATH in a
 *       loop for DURATION_NS. Prints "COUNT P50_NS P99_NS".
 *
 * Any failed open/read prints "error PATH ERRNO" on stderr and exits 3.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;
static char buf[65536];

static long long now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void pause_ns(long long ns) {
    struct timespec ts = {ns / 1000000000LL, ns % 1000000000LL};
    while (nanosleep(&ts, &ts) == EINTR) {
    }
}

static void fail(const char *path, int err) {
    fprintf(stderr, "error %s %d %s\n", path, err, strerror(err));
    exit(3);
}

static void read_once(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(path, errno);
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n == 0) break;
        if (n < 0) {
            if (errno == EINTR) continue;
            fail(path, errno);
        }
    }
    close(fd);
}

static const char *cat_path;
static posix_spawn_file_actions_t cat_actions;

static void cat_once(const char *path) {
    pid_t pid;
    char *argv[] = {(char *)cat_path, (char *)path, NULL};
    int err = posix_spawn(&pid, cat_path, &cat_actions, NULL, argv, environ);
    if (err) fail(cat_path, err);
    int status;
    if (waitpid(pid, &status, 0) < 0) fail(cat_path, errno);
    if (!WIFEXITED(status) || WEXITSTATUS(status)) fail(path, EIO);
}

static int cmp_ll(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: reader lat|cat|tput ...\n");
        return 2;
    }
    if (!strcmp(argv[1], "tput")) {
        if (argc != 5) return 2;
        long long start = atoll(argv[2]), duration = atoll(argv[3]);
        const char *path = argv[4];
        struct timespec ts = {start / 1000000000LL, start % 1000000000LL};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
        }
        long long end = start + duration, t = now();
        size_t cap = 1 << 16, count = 0;
        long long *lat = malloc(cap * sizeof *lat);
        while (t < end) {
            read_once(path);
            long long t2 = now();
            if (count == cap) lat = realloc(lat, (cap *= 2) * sizeof *lat);
            lat[count++] = t2 - t;
            t = t2;
        }
        qsort(lat, count, sizeof *lat, cmp_ll);
        printf("%zu %lld %lld\n", count, count ? lat[count / 2] : 0,
               count ? lat[(size_t)(count * 0.99)] : 0);
        return 0;
    }
    long long gap_ns = 0;
    if (!strcmp(argv[1], "gap")) {  /* as lat, after GAP_US: shift it out */
        if (argc < 3) return 2;
        gap_ns = atoll(argv[2]) * 1000LL;
        argv++;
        argc--;
    }
    int is_cat = !strcmp(argv[1], "cat");
    if (!is_cat && !gap_ns && strcmp(argv[1], "lat")) return 2;
    int first = is_cat ? 5 : 4;
    if (argc <= first) return 2;
    long block = atol(argv[2]), rounds = atol(argv[3]);
    if (is_cat) {
        cat_path = argv[4];
        posix_spawn_file_actions_init(&cat_actions);
        posix_spawn_file_actions_addopen(&cat_actions, 1, "/dev/null", O_WRONLY, 0);
    }
    int npaths = argc - first;
    char **paths = argv + first;
    long long *lat = malloc(sizeof *lat * npaths * block * rounds);
    for (int p = 0; p < npaths; p++)
        for (long b = 0; b < block; b++) is_cat ? cat_once(paths[p]) : read_once(paths[p]);
    for (long r = 0; r < rounds; r++) {
        for (int k = 0; k < npaths; k++) {
            int p = (int)((k + r) % npaths);
            long long *out = lat + (size_t)p * block * rounds + (size_t)r * block;
            for (long b = 0; b < block; b++) {
                if (gap_ns) pause_ns(gap_ns);
                long long t0 = now();
                is_cat ? cat_once(paths[p]) : read_once(paths[p]);
                out[b] = now() - t0;
            }
        }
    }
    for (int p = 0; p < npaths; p++) {
        long long *row = lat + (size_t)p * block * rounds;
        for (long i = 0; i < block * rounds; i++) printf(i ? " %lld" : "%lld", row[i]);
        printf("\n");
    }
    return 0;
}
