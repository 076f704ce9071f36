/* A process that holds descriptors of every kind, for PID/fds; one line per command.
 *
 *   kinds FILE DIR -> ok   a socketpair (2 sockets), a pipe (both ends), an eventfd,
 *                          an epoll fd, DIR opened O_DIRECTORY, FILE opened read-only
 *   many N         -> ok OPENED [ERRNO]   dup()s of /dev/null (kind "other") up to N
 *   churn          -> ok   a thread that opens and closes descriptors in a loop
 *   leader-exit    -> ok   a new thread answers from now on; the main one pthread_exit()s
 *                          (the leader becomes a zombie, the process lives on)
 *   ready          -> ok   nothing: the answer says the loop runs (startup is over)
 *   exit           -> exits 0
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

static void *churn(void *arg) {
    (void)arg;
    for (;;) {
        int fds[8];
        for (int i = 0; i < 8; i++) fds[i] = open("/dev/null", O_RDONLY);
        for (int i = 0; i < 8; i++) close(fds[i]);
        int p[2];
        if (!pipe(p)) { close(p[0]); close(p[1]); }
    }
    return NULL;
}

static void *serve(void *arg);

static void *serve_after_leader(void *arg) {
    printf("ok\n");
    return serve(arg);
}

static void *serve(void *arg) {
    (void)arg;
    static char line[4096], word[32], a[2048], b[2048];
    while (fgets(line, sizeof line, stdin)) {
        a[0] = b[0] = 0;
        if (sscanf(line, "%31s %2047s %2047s", word, a, b) < 1) continue;
        if (!strcmp(word, "kinds")) {
            int sv[2], p[2];
            int ok = !socketpair(AF_UNIX, SOCK_STREAM, 0, sv) && !pipe(p)
                && eventfd(0, 0) >= 0 && epoll_create1(0) >= 0
                && open(b, O_RDONLY | O_DIRECTORY) >= 0 && open(a, O_RDONLY) >= 0;
            if (ok) printf("ok\n"); else printf("err %d\n", errno);
        } else if (!strcmp(word, "many")) {
            long n = strtol(a, NULL, 10), opened = 0;
            int null = open("/dev/null", O_RDONLY), err = 0;
            if (null < 0) { printf("err %d\n", errno); continue; }
            for (opened = 1; opened < n; opened++) {
                if (dup(null) < 0) { err = errno; break; }
            }
            if (err) printf("ok %ld %d\n", opened, err); else printf("ok %ld\n", opened);
        } else if (!strcmp(word, "churn")) {
            pthread_t t;
            if (pthread_create(&t, NULL, churn, NULL)) printf("err %d\n", errno);
            else printf("ok\n");
        } else if (!strcmp(word, "leader-exit")) {
            pthread_t t;
            if (pthread_create(&t, NULL, serve_after_leader, NULL)) printf("err %d\n", errno);
            else pthread_exit(NULL);
        } else if (!strcmp(word, "ready")) {
            printf("ok\n");
        } else if (!strcmp(word, "exit")) {
            exit(0);
        } else {
            printf("err %d\n", EINVAL);
        }
    }
    exit(0);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    serve(NULL);
    return 0;
}
