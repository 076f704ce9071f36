/* victim BYTES: a process that crosses its heap quota when told to.
 *
 * Prints "ready". On a line "go" on stdin it reads CLOCK_MONOTONIC, writes it
 * (nanoseconds, one line) to stdout, then maps BYTES of private anonymous
 * read-write memory, which grows VmData past the quota the bench has set, and
 * sleeps until it is killed. The bench measures from that instant to the
 * death it sees on a pidfd.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    size_t bytes = argc > 1 ? strtoull(argv[1], NULL, 10) : 1 << 20;
    char line[64];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "go", 2)) continue;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        printf("%lld\n", (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
        void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            printf("err\n");
            return 1;
        }
        for (;;) pause();
    }
    return 0;
}
