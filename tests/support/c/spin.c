/* spin PID SECONDS: send SIGKILL to PID until it works or time is up. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(int argc, char **argv) {
    pid_t pid = atoi(argv[1]);
    double limit = atof(argv[2]);
    struct timespec t0, t;
    long tries = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        for (int i = 0; i < 1000; i++, tries++)
            if (kill(pid, SIGKILL) == 0) { printf("killed %ld\n", tries); return 0; }
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec + (t.tv_nsec - t0.tv_nsec) / 1e9 > limit) break;
    }
    printf("refused %ld\n", tries);
    return 1;
}
