/* A parent whose child grows at once: the race a scan cannot win.
 *
 *   forkgrow STEP COUNT
 *
 * Prints "ready PID", waits for one line on stdin, forks; the child maps and
 * touches STEP bytes COUNT times at once, writing "step N" after each; the
 * parent waits for it and prints "end SIG" (0: it exited by itself).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) return fprintf(stderr, "usage: forkgrow STEP COUNT\n"), 2;
    long step = atol(argv[1]), count = atol(argv[2]);
    char line[16];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    if (!fgets(line, sizeof line, stdin)) return 1;
    pid_t child = fork();
    if (child == 0) {
        for (long i = 0; i < count; i++) {
            char *p = mmap(NULL, step, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) _exit(1);
            memset(p, 1, step);
            char out[32];
            int n = snprintf(out, sizeof out, "step %ld\n", i + 1);
            if (write(1, out, n) != n) _exit(1);
        }
        _exit(0);
    }
    int status;
    waitpid(child, &status, 0);
    printf("end %d\n", WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    return 0;
}
