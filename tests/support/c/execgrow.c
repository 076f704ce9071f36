/* A big process that execs a small one, which then grows: the exec baseline.
 *
 *   execgrow SIZE STEP COUNT
 *
 * Maps SIZE bytes (private, writable, untouched: VmData), prints "ready PID",
 * waits for one line on stdin, then execs itself as "execgrow - STEP COUNT",
 * which maps STEP bytes COUNT times, printing "step N" after each and "done".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) return fprintf(stderr, "usage: execgrow SIZE STEP COUNT\n"), 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (strcmp(argv[1], "-") != 0) {
        char line[16];
        if (mmap(NULL, atol(argv[1]), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                 0) == MAP_FAILED)
            return perror("mmap"), 1;
        printf("ready %d\n", getpid());
        if (!fgets(line, sizeof line, stdin)) return 1;
        execl("/proc/self/exe", "execgrow", "-", argv[2], argv[3], (char *)NULL);
        return perror("exec"), 1;
    }
    long step = atol(argv[2]), count = atol(argv[3]);
    for (long i = 0; i < count; i++) {
        if (mmap(NULL, step, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) ==
            MAP_FAILED)
            return perror("mmap"), 1;
        printf("step %ld\n", i + 1);
    }
    printf("done\n");
    return 0;
}
