/* A process tree that grows on command: the fan-outs of the tree-quota tests.
 *
 *   treegrow                   commands on stdin, one a line (below)
 *   treegrow member MODE STEP COUNT   what an exec'd member runs
 *
 * Prints "ready PID", then answers each command:
 *   fan N MODE STEP COUNT   fork N children held at a gate; "child PID" each, and
 *                           from each child "waiting PID" once it waits there
 *   go                      open the gate: each child makes COUNT steps at once
 *   grand MODE STEP COUNT   fork a child that forks a grandchild and exits (the
 *                           grandchild is reparented); "grand PID", then it steps
 *   exec MODE STEP COUNT    fork a child that execs "treegrow member ..."; "child PID"
 *   self MODE STEP COUNT    the parent itself makes the steps
 *   forks K                 fork K children that exit at once, one at a time;
 *                           "forks NS" (ns per fork+exit+wait round trip)
 *   wait                    reap every child: "end PID SIG" each (0: exited), "done"
 * At the end of stdin it kills its process group (itself, every member left).
 * A step is MODE mmap (map and touch STEP bytes) or open (open STEP descriptors
 * of /dev/null); after each one the stepping process writes "step PID I", after
 * the last "held PID", then waits to be killed. Lines are single write(2)s, so
 * processes writing at once never mix them.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void say(const char *format, ...) {
    char line[128];
    va_list args;
    va_start(args, format);
    int n = vsnprintf(line, sizeof line, format, args);
    va_end(args);
    if (write(1, line, n) != n) _exit(3);
}

static void one_step(const char *mode, long step) {
    if (strcmp(mode, "mmap") == 0) {
        char *p = mmap(NULL, step, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) _exit(1);
        memset(p, 1, step);
    } else {
        for (long i = 0; i < step; i++)
            if (open("/dev/null", O_RDONLY) < 0) _exit(1);
    }
}

static void steps(const char *mode, long step, long count) {
    for (long i = 1; i <= count; i++) {
        one_step(mode, step);
        say("step %d %ld\n", getpid(), i);
    }
    say("held %d\n", getpid());
    for (;;) pause();
}

/* Children of `fan` wait for one byte each on the gate, which `go` writes: no
 * descriptor opens or closes at the start, so the tests know the sums then. */
static int gate[2] = {-1, -1};
static int held_at_gate;

static void forget_gate(void) {
    if (gate[1] >= 0) close(gate[1]);
}

static void fan(int n, const char *mode, long step, long count) {
    for (int i = 0; i < n; i++) {
        pid_t child = fork();
        if (child == 0) {
            char byte;
            forget_gate();
            say("waiting %d\n", getpid());
            if (read(gate[0], &byte, 1) != 1) _exit(5);
            steps(mode, step, count);
        }
        say("child %d\n", child);
    }
    held_at_gate += n;
    say("forked %d\n", n);
}

static void go(void) {
    for (; held_at_gate > 0; held_at_gate--)
        if (write(gate[1], "", 1) != 1) _exit(5);
    say("gone\n");
}

static void grand(const char *mode, long step, long count) {
    pid_t child = fork();
    if (child == 0) {
        forget_gate();
        pid_t grandchild = fork();
        if (grandchild == 0) {
            usleep(20000);  /* its parent gone first: reparented */
            steps(mode, step, count);
        }
        say("grand %d\n", grandchild);
        _exit(0);
    }
    waitpid(child, NULL, 0);
}

static void exec_member(char *self, char *mode, char *step, char *count) {
    pid_t child = fork();
    if (child == 0) {
        forget_gate();
        char *argv[] = {self, "member", mode, step, count, NULL};
        execv("/proc/self/exe", argv);
        _exit(4);
    }
    say("child %d\n", child);
}

static void forks(long k) {
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < k; i++) {
        pid_t child = fork();
        if (child == 0) _exit(0);
        waitpid(child, NULL, 0);
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    long ns = (end.tv_sec - start.tv_sec) * 1000000000L + (end.tv_nsec - start.tv_nsec);
    say("forks %ld\n", ns / k);
}

static void reap(void) {
    int status;
    pid_t pid;
    while ((pid = wait(&status)) > 0)
        say("end %d %d\n", pid, WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    say("done\n");
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "member") == 0)
        steps(argv[2], atol(argv[3]), atol(argv[4]));
    if (setpgid(0, 0) || pipe2(gate, O_CLOEXEC)) return 1;
    say("ready %d\n", getpid());
    char line[128], mode[16];
    long a, b, c;
    while (fgets(line, sizeof line, stdin)) {
        if (sscanf(line, "fan %ld %15s %ld %ld", &a, mode, &b, &c) == 4) fan(a, mode, b, c);
        else if (strncmp(line, "go", 2) == 0) go();
        else if (sscanf(line, "grand %15s %ld %ld", mode, &b, &c) == 3) grand(mode, b, c);
        else if (sscanf(line, "self %15s %ld %ld", mode, &b, &c) == 3) {
            for (long i = 1; i <= c; i++) {
                one_step(mode, b);
                say("step %d %ld\n", getpid(), i);
            }
        } else if (strncmp(line, "exec ", 5) == 0) {
            char step[24], count[24];
            if (sscanf(line, "exec %15s %23s %23s", mode, step, count) == 3)
                exec_member(argv[0], mode, step, count);
        } else if (sscanf(line, "forks %ld", &a) == 1) forks(a);
        else if (strncmp(line, "wait", 4) == 0) reap();
        else say("? %s", line);
    }
    kill(0, SIGKILL);  /* stdin closed: the whole group goes, nothing left behind */
    return 0;
}
