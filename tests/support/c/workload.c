/* A process the tests steer line by line on stdin; it answers one line each.
 *
 *   pid                 -> ok PID
 *   mmap BYTES          -> ok | err ERRNO    private anonymous read-write mapping
 *   munmap              -> ok                 unmaps the last mapping
 *   sbrk BYTES          -> ok | err ERRNO
 *   malloc BYTES        -> ok | err ERRNO    (memset, so it is really used)
 *   open N              -> ok OPENED [ERRNO]  opens /dev/null up to N times
 *   close N             -> ok                 closes the last N opened
 *   thread              -> ok TID             a thread that sleeps forever
 *   setrlimit data|nofile SOFT -> ok | err ERRNO  (SOFT -1 = hard limit)
 *   exit                -> exits 0
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

static void *maps[1024];
static size_t map_sizes[1024];
static int nmaps;
static int fds[65536];
static int nfds;

static void *sleeper(void *arg) {
    pid_t *tid = arg;
    *tid = (pid_t)syscall(SYS_gettid);
    for (;;) pause();
    return NULL;
}

int main(void) {
    char line[256], word[32], arg[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        long n = 0;
        arg[0] = 0;
        if (sscanf(line, "%31s %63s %ld", word, arg, &n) < 1) continue;
        long value = strtol(arg, NULL, 10);
        if (!strcmp(word, "pid")) {
            printf("ok %d\n", getpid());
        } else if (!strcmp(word, "mmap")) {
            void *p = mmap(NULL, value, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) { printf("err %d\n", errno); continue; }
            maps[nmaps] = p; map_sizes[nmaps++] = value;
            printf("ok\n");
        } else if (!strcmp(word, "munmap")) {
            if (nmaps) { nmaps--; munmap(maps[nmaps], map_sizes[nmaps]); }
            printf("ok\n");
        } else if (!strcmp(word, "sbrk")) {
            if (sbrk(value) == (void *)-1) printf("err %d\n", errno); else printf("ok\n");
        } else if (!strcmp(word, "malloc")) {
            char *p = malloc(value);
            if (!p) { printf("err %d\n", errno); continue; }
            memset(p, 1, value);
            printf("ok\n");
        } else if (!strcmp(word, "open")) {
            long opened = 0;
            int err = 0;
            for (; opened < value; opened++) {
                int fd = open("/dev/null", O_RDONLY);
                if (fd < 0) { err = errno; break; }
                fds[nfds++] = fd;
            }
            if (err) printf("ok %ld %d\n", opened, err); else printf("ok %ld\n", opened);
        } else if (!strcmp(word, "close")) {
            for (long i = 0; i < value && nfds; i++) close(fds[--nfds]);
            printf("ok\n");
        } else if (!strcmp(word, "thread")) {
            static volatile pid_t tid;
            pthread_t t;
            tid = 0;
            pthread_create(&t, NULL, sleeper, (void *)&tid);
            while (!tid) usleep(100);
            printf("ok %d\n", tid);
        } else if (!strcmp(word, "setrlimit")) {
            int which = !strcmp(arg, "data") ? RLIMIT_DATA : RLIMIT_NOFILE;
            struct rlimit rl;
            getrlimit(which, &rl);
            rl.rlim_cur = n < 0 ? rl.rlim_max : (rlim_t)n;
            if (setrlimit(which, &rl)) printf("err %d\n", errno); else printf("ok\n");
        } else if (!strcmp(word, "exit")) {
            return 0;
        } else {
            printf("err %d\n", EINVAL);
        }
    }
    return 0;
}
