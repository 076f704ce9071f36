/* race V_REG V_CAP V_DEREG TRIES: from short-lived threads, call register(V_REG),
 * resource_cap(V_CAP, 0, 0) and deregister(V_DEREG) in turn; each thread is made to
 * exit (a signal whose handler calls exit(2) for the thread alone) while its call is
 * with the supervisor, at a varying delay. Prints "won OP" for each call answered 0
 * and "done" at the end. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

static pid_t targets[3];
static volatile pid_t tids[3];

static void leave(int sig) {
    (void)sig;
    syscall(SYS_exit, 0);
}

struct call {
    int op;
    volatile pid_t tid;
    volatile long rc;
};

static void *caller(void *arg) {
    struct call *c = arg;
    c->tid = (pid_t)syscall(SYS_gettid);
    long rc;
    if (c->op == 0) rc = syscall(549, targets[0]);
    else if (c->op == 1) rc = syscall(552, targets[1], 0L, 0L);
    else rc = syscall(551, targets[2]);
    c->rc = rc;
    return NULL;
}

int main(int argc, char **argv) {
    static const char *names[] = {"register", "cap", "deregister"};
    struct sigaction sa = {.sa_handler = leave};
    sigaction(SIGUSR1, &sa, NULL);
    for (int i = 0; i < 3; i++) targets[i] = atoi(argv[1 + i]);
    int tries = atoi(argv[4]);
    for (int i = 0; i < tries; i++) {
        struct call c = {.op = i % 3, .tid = 0, .rc = -2};
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &attr, caller, &c)) { perror("pthread_create"); return 1; }
        while (!c.tid) ;
        for (volatile long spin = 0, n = random() % 400000; spin < n; spin++) ;
        syscall(SYS_tgkill, getpid(), c.tid, SIGUSR1);
        /* wait for the thread to be gone (its /proc/self/task entry) */
        char path[64];
        snprintf(path, sizeof path, "/proc/self/task/%d", c.tid);
        while (access(path, F_OK) == 0) usleep(50);
        if (c.rc == 0) printf("won %s\n", names[c.op]);
    }
    printf("done\n");
    return 0;
}
