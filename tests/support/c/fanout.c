/* A parent that fans out into children that grow: a job for a tree quota.
 *
 *   fanout N MODE STEP COUNT
 *
 * Forks N children; each grows COUNT times by STEP (MODE mmap: maps and touches
 * STEP bytes; MODE open: opens /dev/null STEP times), FANOUT_PAUSE_MS (default
 * 20) between two steps, writing "child PID step I" after each; then holds what
 * it has for FANOUT_HOLD_MS (default: until killed) and exits. The parent prints
 * "fanout PID" first, waits for every child, printing "end PID SIG" for each
 * (SIG 0: it exited by itself), then "done".
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long env_ms(const char *name, long otherwise) {
    const char *value = getenv(name);
    return value ? atol(value) : otherwise;
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static int grow(int open_mode, long step) {
    if (open_mode) {
        for (long i = 0; i < step; i++)
            if (open("/dev/null", O_RDONLY) < 0) return -1;
        return 0;
    }
    char *p = mmap(NULL, step, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return -1;
    memset(p, 1, step);
    return 0;
}

static void child(int open_mode, long step, long count) {
    long pause_ms = env_ms("FANOUT_PAUSE_MS", 20), hold_ms = env_ms("FANOUT_HOLD_MS", -1);
    for (long i = 1; i <= count; i++) {
        if (grow(open_mode, step) < 0) _exit(1);
        printf("child %d step %ld\n", getpid(), i);
        if (i < count) sleep_ms(pause_ms);
    }
    if (hold_ms < 0)
        for (;;) pause();
    sleep_ms(hold_ms);
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc != 5) return fprintf(stderr, "usage: fanout N mmap|open STEP COUNT\n"), 2;
    long n = atol(argv[1]), step = atol(argv[3]), count = atol(argv[4]);
    int open_mode = strcmp(argv[2], "open") == 0;
    if (!open_mode && strcmp(argv[2], "mmap") != 0) return fprintf(stderr, "bad mode\n"), 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("fanout %d\n", getpid());
    for (long i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) return 1;
        if (pid == 0) child(open_mode, step, count);
    }
    int status;
    pid_t pid;
    while ((pid = wait(&status)) > 0)
        printf("end %d %d\n", pid, WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    printf("done\n");
    return 0;
}
