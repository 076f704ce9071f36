/* helper_attack MODE SECONDS DAEMON: attack each process of my uid that DAEMON (a pid) runs
 * as a deny-mode helper (its children only: the machine may run other suites' helpers too) (comm "prlimit", or "setpriv" once it has taken my uid):
 *   stop   SIGSTOP it
 *   trace  PTRACE_SEIZE it, PTRACE_INTERRUPT it, hold it stopped until the end
 *   fork   make it fork (an injected fork syscall) a child that stays stopped,
 *          holding its stderr, then SIGKILL the helper (and reap it as its tracer)
 *   kill   SIGKILL it
 * At the end, kills what it holds and prints "attacked N". */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PID 4194304
static unsigned char done_with[MAX_PID / 8 + 1];
static pid_t held[65536];
static int nheld;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static pid_t parent_of(pid_t pid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *end = strrchr(buf, ')'); /* comm may hold spaces and parentheses */
    return end ? (pid_t)atoi(end + 4) : -1; /* ") S PPID" */
}

static int trace(pid_t pid, long options) {
    int st;
    if (ptrace(PTRACE_SEIZE, pid, 0, options) < 0) return -1;
    if (ptrace(PTRACE_INTERRUPT, pid, 0, 0) < 0 || waitpid(pid, &st, __WALL) < 0) return -1;
    return WIFSTOPPED(st) ? 0 : -1;
}

static int inject_fork(pid_t pid) {
    struct user_regs_struct regs;
    int st;
    if (trace(pid, PTRACE_O_TRACEFORK) < 0) return -1;
    if (ptrace(PTRACE_GETREGS, pid, 0, &regs) < 0) return -1;
    errno = 0;
    long word = ptrace(PTRACE_PEEKTEXT, pid, regs.rip, 0);
    if (errno) return -1;
    ptrace(PTRACE_POKETEXT, pid, regs.rip, (word & ~0xffffL) | 0x050f); /* syscall */
    regs.rax = 57; /* fork */
    regs.orig_rax = -1;
    ptrace(PTRACE_SETREGS, pid, 0, &regs);
    ptrace(PTRACE_CONT, pid, 0, 0);
    for (int i = 0; i < 20; i++) {
        if (waitpid(pid, &st, __WALL) < 0 || !WIFSTOPPED(st)) return -1;
        if ((st >> 8) == (SIGTRAP | (PTRACE_EVENT_FORK << 8))) {
            unsigned long child = 0;
            ptrace(PTRACE_GETEVENTMSG, pid, 0, &child);
            waitpid((pid_t)child, &st, __WALL);          /* its first stop */
            kill((pid_t)child, SIGSTOP); /* pending: it stops once let go, untraced */
            ptrace(PTRACE_DETACH, (pid_t)child, 0, 0);
            held[nheld++] = (pid_t)child;
            done_with[child / 8] |= 1 << child % 8; /* a "prlimit" too: never attack it */
            kill(pid, SIGKILL);
            while (waitpid(pid, &st, __WALL) == pid && !WIFEXITED(st) && !WIFSIGNALED(st))
                ;
            return 0;
        }
        ptrace(PTRACE_CONT, pid, 0, 0);
    }
    return -1;
}

static volatile sig_atomic_t stopping;
static void stop_attacking(int sig) { (void)sig; stopping = 1; }
static volatile long attacked;

/* A bound on the attacker itself: a waitpid() on a tracee that never reports again
 * (seen once in 100s of runs) must not outlive the test. Reports and exits. */
static void out_of_time(int sig) {
    char line[32] = "attacked ", digits[20];
    int n = 0, at = 9;
    long value = attacked;
    (void)sig;
    for (int i = 0; i < nheld; i++) kill(held[i], SIGKILL);
    do digits[n++] = (char)('0' + value % 10); while ((value /= 10) && n < 20);
    while (n) line[at++] = digits[--n];
    line[at++] = '\n';
    write(1, line, (size_t)at);
    _exit(0);
}

int main(int argc, char **argv) {
    signal(SIGTERM, stop_attacking); /* then report how many it caught, and exit */
    signal(SIGALRM, out_of_time);
    alarm((unsigned)atof(argv[2]) + 10);
    const char *mode = argv[1];
    double end = now() + atof(argv[2]);
    pid_t daemon = (pid_t)atoi(argv[3]);
    int ptracing = !strcmp(mode, "trace") || !strcmp(mode, "fork");
    while (now() < end && !stopping) {
        DIR *d = opendir("/proc");
        struct dirent *e;
        while ((e = readdir(d))) {
            char path[64], comm[32] = {0};
            pid_t pid = atoi(e->d_name);
            if (pid <= 0 || pid >= MAX_PID || done_with[pid / 8] & (1 << pid % 8)) continue;
            snprintf(path, sizeof path, "/proc/%d/comm", pid);
            int fd = open(path, O_RDONLY);
            if (fd < 0) continue;
            ssize_t n = read(fd, comm, sizeof comm - 1);
            close(fd);
            if (n <= 0) continue;
            int is_prlimit = !strncmp(comm, "prlimit", 7);
            int is_setpriv = !strncmp(comm, "setpriv", 7);
            if (!is_prlimit && !is_setpriv) {
                /* never a helper, unless it is the daemon's child before its exec */
                if (strncmp(comm, "python", 6)) done_with[pid / 8] |= 1 << pid % 8;
                continue;
            }
            if (parent_of(pid) != daemon) continue; /* not this daemon's helper */
            /* setpriv may still be root (refused: try again), or already my uid */
            if (ptracing && !is_prlimit) continue;
            int ok;
            if (!strcmp(mode, "stop")) ok = kill(pid, SIGSTOP) == 0;
            else if (!strcmp(mode, "kill")) ok = kill(pid, SIGKILL) == 0;
            else if (!strcmp(mode, "trace")) {
                ok = trace(pid, 0) == 0;
                if (ok) held[nheld++] = pid;
            } else ok = inject_fork(pid) == 0;
            if (ok) {
                attacked++;
                done_with[pid / 8] |= 1 << pid % 8;
            }
            if (nheld >= 65535) break;
        }
        closedir(d);
    }
    for (int i = 0; i < nheld; i++) kill(held[i], SIGKILL);
    printf("attacked %ld\n", attacked);
    return 0;
}
