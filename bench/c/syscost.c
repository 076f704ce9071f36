/* Nanoseconds per operation, for the machine-wide cost of attached BPF programs.
 *   syscost OP ITERATIONS [wait]   OP: getppid | mmap (1 MiB mmap+munmap) | open (open+close)
 * Prints one number: the mean ns per operation over ITERATIONS. With `wait`, it
 * first prints its pid and waits for a line on stdin (to be watched meanwhile).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv) {
    char line[16];
    if (argc < 3) return fprintf(stderr, "usage: syscost OP ITERATIONS [wait]\n"), 2;
    const char *op = argv[1];
    long n = atol(argv[2]);
    if (argc > 3) {
        printf("%d\n", getpid());
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 1;
    }
    long long start = now_ns();
    for (long i = 0; i < n; i++) {
        if (!strcmp(op, "getppid")) {
            syscall(SYS_getppid);
        } else if (!strcmp(op, "mmap")) {
            void *p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) return perror("mmap"), 1;
            munmap(p, 1 << 20);
        } else {
            int fd = open("/dev/null", O_RDONLY);
            if (fd < 0) return perror("open"), 1;
            close(fd);
        }
    }
    printf("%.1f\n", (double)(now_ns() - start) / n);
    return 0;
}
