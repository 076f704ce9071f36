/* leaderless: prints its pid; on a line on stdin the main thread exits
 * (pthread_exit) and a second thread lives on: it prints "ready" once the leader
 * is a zombie, then on each line "open N" opens /dev/null N times and prints
 * "opened N", and "mmap N" maps N MiB (private, anonymous) and prints "mapped N". */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static pthread_t main_thread;

static void *worker(void *arg) {
    char line[64];
    (void)arg;
    pthread_join(main_thread, NULL);
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        int n = atoi(line + 5), opened = 0;
        if (!strncmp(line, "mmap ", 5)) {
            void *p = mmap(NULL, (size_t)n << 20, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            printf("mapped %d\n", p == MAP_FAILED ? 0 : n);
            fflush(stdout);
            continue;
        }
        for (; opened < n; opened++)
            if (open("/dev/null", O_RDONLY) < 0) break;
        printf("opened %d\n", opened);
        fflush(stdout);
    }
    for (;;) pause();
    return NULL;
}

int main(void) {
    char line[16];
    pthread_t t;
    main_thread = pthread_self();
    printf("%d\n", getpid());
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    pthread_create(&t, NULL, worker, NULL);
    pthread_exit(NULL);
}
