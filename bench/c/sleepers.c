/* sleepers N: fork N tiny children that sleep until this process goes away.
 *
 * Prints one child pid per line, then "ready". Each child only pause()s (it is
 * a fork of this small C program: no exec, no Python) and dies with SIGKILL
 * when its parent does (PR_SET_PDEATHSIG). On EOF or "quit" on stdin the
 * parent kills and reaps every child, prints "done" and exits.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1;
    pid_t parent = getpid();
    pid_t *pids = calloc(n > 0 ? n : 1, sizeof *pids);
    if (!pids) return 1;
    long started = 0;
    for (; started < n; started++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            break;
        }
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent) _exit(0);
            for (;;) pause();
        }
        pids[started] = pid;
    }
    for (long i = 0; i < started; i++) printf("%d\n", pids[i]);
    printf("ready %ld\n", started);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin))
        if (!strncmp(line, "quit", 4)) break;
    for (long i = 0; i < started; i++) kill(pids[i], SIGKILL);
    for (long i = 0; i < started; i++) waitpid(pids[i], NULL, 0);
    printf("done\n");
    return 0;
}
