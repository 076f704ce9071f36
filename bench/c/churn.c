/* churn: the workload of the overhead benchmark.
 *
 * For each line "run ITERS" on stdin it does ITERS rounds of malloc/free
 * (sizes cycling from 16 bytes to 64 KiB, one byte written) and open/close of
 * /dev/null, then prints "ELAPSED_NS CPU_NS": wall time (CLOCK_MONOTONIC) and
 * the process's CPU time for those rounds. "pid" prints the pid.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(void) {
    char line[128];
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        long iters = 0;
        if (!strncmp(line, "pid", 3)) {
            printf("%d\n", getpid());
            continue;
        }
        if (sscanf(line, "run %ld", &iters) != 1) {
            printf("err\n");
            continue;
        }
        long long t0 = now(CLOCK_MONOTONIC), c0 = now(CLOCK_PROCESS_CPUTIME_ID);
        for (long i = 0; i < iters; i++) {
            size_t size = (size_t)16 << (i % 13);
            volatile char *p = malloc(size);
            if (!p) return 1;
            p[size - 1] = (char)i;
            free((void *)p);
            int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
            if (fd < 0) return 1;
            close(fd);
        }
        long long t1 = now(CLOCK_MONOTONIC), c1 = now(CLOCK_PROCESS_CPUTIME_ID);
        printf("%lld %lld\n", t1 - t0, c1 - c0);
    }
    return 0;
}
