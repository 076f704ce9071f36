/* Calls the kernel patch's syscalls (548-553) directly, as an unmodified
 * program written for the patch would; run under `restrack run`.
 * Each check prints "name rc errno" so the tests compare whole lines.
 *   abi codes      every return code of the ABI
 *   abi eperm PID  register someone else's process
 *   abi sixmib     3 MiB sbrk + 3 MiB malloc read back as 6 MiB
 *   abi forks      five children each run register/cap/fetch/deregister
 *   abi thread     a second thread calls fetch
 *   abi killed     a child over its file quota is SIGKILLed by the daemon
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

struct per_proc_resource {
    pid_t pid;
    unsigned long heapsize;
    unsigned long openfile_count;
    unsigned long heapsize_quota;
    unsigned long openfile_quota;
};

#define NOPID 4194304 /* above pid_max's largest value: never a process */

static void show(const char *name, long rc) {
    printf("%s %ld %s\n", name, rc, rc ? strerrorname_np(errno) : "0");
    errno = 0;
}

static long reg(pid_t p) { return syscall(549, p); }
static long fetch(void *s, pid_t p) { return syscall(550, s, p); }
static long dereg(pid_t p) { return syscall(551, p); }
static long cap(pid_t p, long h, long f) { return syscall(552, p, h, f); }
static long reset(pid_t p) { return syscall(553, p); }

static int codes(void) {
    pid_t me = getpid(), other = getppid(); /* the supervisor: alive, untracked */
    struct per_proc_resource s;
    show("sanity", syscall(548));
    show("register_zero", reg(0));
    show("register_negative", reg(-5));
    show("register_nopid", reg(NOPID));
    show("register", reg(me));
    show("register_again", reg(me));
    memset(&s, 0xff, sizeof s);
    show("fetch", fetch(&s, me));
    printf("fetched %d %lu %lu %ld %ld\n", s.pid, s.heapsize, s.openfile_count,
           (long)s.heapsize_quota, (long)s.openfile_quota);
    show("fetch_null", fetch(NULL, me));
    show("fetch_wild", fetch((void *)16, me));
    char *ro = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    show("fetch_readonly", fetch(ro, me));
    printf("readonly_untouched %d\n", ro[0] == 0 && ro[8] == 0);
    show("fetch_untracked", fetch(&s, other));
    show("cap_nopid", cap(NOPID, 1, 1));
    show("cap_untracked", cap(other, 1, 1));
    show("cap_below_minus_one", cap(me, -2, 5));
    show("cap", cap(me, 40, -1));
    show("cap_again", cap(me, 50, 5));
    fetch(&s, me);
    printf("capped %ld %ld\n", (long)s.heapsize_quota, (long)s.openfile_quota);
    show("reset_nopid", reset(NOPID));
    show("reset_untracked", reset(other));
    show("reset", reset(me));
    fetch(&s, me);
    printf("after_reset %ld %ld\n", (long)s.heapsize_quota, (long)s.openfile_quota);
    show("deregister_zero", dereg(0));
    show("deregister", dereg(me));
    show("deregister_again", dereg(me));
    return 0;
}

static int sixmib(void) {
    struct per_proc_resource s;
    if (reg(getpid())) return 1;
    sbrk(3 << 20);
    char *p = malloc(3 << 20);
    memset(p, 1, 3 << 20);
    __asm__ volatile("" : : "r"(p) : "memory"); /* p escapes: the compiler keeps malloc */
    show("fetch", fetch(&s, getpid()));
    printf("heap %lu\n", s.heapsize);
    return 0;
}

static int sequence(void) {
    struct per_proc_resource s;
    pid_t me = getpid();
    if (reg(me) || cap(me, 100, 50)) return 1;
    void *p = mmap(NULL, 4 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int fd = open("/dev/null", O_RDONLY);
    if (p == MAP_FAILED || fd < 0 || fetch(&s, me)) return 2;
    if (s.pid != me || s.heapsize != 4 || s.openfile_count != 1) return 3;
    if (s.heapsize_quota != 100 || s.openfile_quota != 50) return 4;
    if (reset(me) || dereg(me)) return 5;
    return 0;
}

static int forks(void) {
    pid_t kids[5];
    for (int i = 0; i < 5; i++)
        if ((kids[i] = fork()) == 0) _exit(sequence());
    int failed = 0;
    for (int i = 0; i < 5; i++) {
        int status;
        waitpid(kids[i], &status, 0);
        printf("child %d status %d\n", i, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        failed |= !WIFEXITED(status) || WEXITSTATUS(status);
    }
    return failed;
}

static struct per_proc_resource thread_stats;
static long thread_rc;
static void *fetcher(void *arg) {
    (void)arg;
    thread_rc = fetch(&thread_stats, getpid());
    return NULL;
}

static int thread(void) {
    pthread_t t;
    if (reg(getpid())) return 1;
    void *p = mmap(NULL, 2 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    (void)p;
    pthread_create(&t, NULL, fetcher, NULL);
    pthread_join(t, NULL);
    show("thread_fetch", thread_rc);
    /* the thread's 8 MiB stack is gone again after join; the 2 MiB mapping stays */
    printf("thread_pid %d ok %d heap_ge_2 %d\n", thread_stats.pid, thread_stats.pid == getpid(),
           thread_stats.heapsize >= 2);
    return 0;
}

static int killed(void) {
    pid_t kid = fork();
    if (kid == 0) {
        if (reg(getpid()) || cap(getpid(), -1, 2)) _exit(1);
        for (int i = 0; i < 5; i++) open("/dev/null", O_RDONLY);
        for (;;) pause();
    }
    int status;
    waitpid(kid, &status, 0);
    printf("child_signal %d\n", WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *mode = argc > 1 ? argv[1] : "codes";
    if (!strcmp(mode, "codes")) return codes();
    if (!strcmp(mode, "eperm")) { show("register_other", reg(atoi(argv[2]))); return 0; }
    if (!strcmp(mode, "sixmib")) return sixmib();
    if (!strcmp(mode, "forks")) return forks();
    if (!strcmp(mode, "thread")) return thread();
    if (!strcmp(mode, "killed")) return killed();
    return 2;
}
