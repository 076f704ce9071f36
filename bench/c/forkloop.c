/* forkloop COUNT: the cost of a fork to a tree quota.
 *
 * Prints "ready", waits for a line "go" on stdin (the bench makes it a tree's
 * root in between, or not), then forks COUNT children one at a time, each
 * exiting at once, waiting for each, and prints the mean nanoseconds of one
 * fork + exit + wait round trip.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    long count = argc > 1 ? atol(argv[1]) : 1000;
    char line[64];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    if (!fgets(line, sizeof line, stdin) || strncmp(line, "go", 2)) return 1;
    long long start = now_ns();
    for (long i = 0; i < count; i++) {
        pid_t child = fork();
        if (child < 0) return 1;
        if (child == 0) _exit(0);
        if (waitpid(child, NULL, 0) != child) return 1;
    }
    printf("%lld\n", (now_ns() - start) / count);
    return 0;
}
