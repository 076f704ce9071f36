/* Grows one resource step by step, for the BPF engine's tests and bench.
 *
 *   grow MODE STEP COUNT
 *
 * Prints "ready PID" (of a forked child that does the work: see reap_grower),
 * waits for one line on stdin (the test watches it
 * meanwhile), then makes COUNT growth calls of STEP (bytes, or descriptors
 * per call for the fd modes), printing "step N" after each one returned, and
 * "done" at the end. A process killed in its crossing call never prints that
 * call's step line. Memory modes:
 *   mmap      private anonymous read-write mappings, untouched
 *   touch     the same, every page written
 *   brk       sbrk, touched
 *   mprotect  one PROT_NONE reservation of STEP*COUNT, made writable step by step
 *   thread    `touch` from a second thread (the leader waits in pthread_join)
 *   leader    `touch` from a second thread after the leader pthread_exit()ed
 *   mremap    one mapping of STEP grown by STEP per call with mremap, untouched
 *   populate  COUNT mappings of STEP with MAP_POPULATE
 *   mlocked   mlockall(MCL_CURRENT|MCL_FUTURE) then `mmap` (each mapping populated)
 *   mlockbrk, mlockremap, mlockprot   the same before `brk`, `mremap`, `mprotect`
 * Descriptor modes (STEP ignored; one call each): open, socket, pipe (2 fds), dup,
 * ioctl (NS_GET_USERNS on a namespace fd returns a new descriptor).
 * With GROW_STAMP=FILE, the CLOCK_MONOTONIC ns before each call is written to
 * the start of FILE (shared), so a bench can time the crossing call to death.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char *mode;
static long step, count;

static volatile long long *stamp;

static void report(long i) { printf("step %ld\n", i + 1); }

/* Called just before each growth call. */
static void mark(void) {
    struct timespec t;
    if (!stamp) return;
    clock_gettime(CLOCK_MONOTONIC, &t);
    *stamp = t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void open_stamp(void) {
    const char *path = getenv("GROW_STAMP");
    int fd = path ? open(path, O_RDWR | O_CREAT, 0600) : -1;
    if (fd < 0 || ftruncate(fd, 4096)) return;
    void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p != MAP_FAILED) stamp = p;
    close(fd);
}

static int is(const char *name) { return !strcmp(mode, name); }

static int grow_memory(void) {
    int mlocked = !strncmp(mode, "mlock", 5);
    int by_brk = is("brk") || is("mlockbrk"), by_remap = is("mremap") || is("mlockremap");
    int touch = is("touch") || is("brk") || is("mprotect") || is("thread") || is("leader");
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | (is("populate") ? MAP_POPULATE : 0);
    char *reserve = NULL, *grown = NULL;
    size_t size = 0;
    if (is("mprotect") || is("mlockprot")) {
        reserve = mmap(NULL, step * count, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (reserve == MAP_FAILED) return perror("reserve"), 1;
    }
    if (mlocked && mlockall(MCL_CURRENT | MCL_FUTURE)) return perror("mlockall"), 1;
    for (long i = 0; i < count; i++) {
        char *p;
        mark();
        if (reserve) {
            p = reserve + i * step;
            if (mprotect(p, step, PROT_READ | PROT_WRITE)) return perror("mprotect"), 1;
        } else if (by_brk) {
            p = sbrk(step);
            if (p == (void *)-1) return perror("sbrk"), 1;
        } else if (by_remap && grown) {
            p = mremap(grown, size, size + step, MREMAP_MAYMOVE);
            if (p == MAP_FAILED) return perror("mremap"), 1;
            grown = p;
            size += step;
        } else {
            p = mmap(NULL, step, PROT_READ | PROT_WRITE, flags, -1, 0);
            if (p == MAP_FAILED) return perror("mmap"), 1;
            if (by_remap) {
                grown = p;
                size = step;
            }
        }
        if (touch) memset(p, 1, step);
        report(i);
    }
    return 0;
}

#define NS_GET_USERNS _IO(0xb7, 0x1)

static int grow_files(void) {
    int ns = is("ioctl") ? open("/proc/self/ns/net", O_RDONLY) : -1;
    for (long i = 0; i < count; i++) {
        int fds[2], rc;
        mark();
        if (!strcmp(mode, "open")) rc = open("/dev/null", O_RDONLY);
        else if (!strcmp(mode, "socket")) rc = socket(AF_UNIX, SOCK_STREAM, 0);
        else if (!strcmp(mode, "pipe")) rc = pipe(fds);
        else if (ns >= 0) rc = ioctl(ns, NS_GET_USERNS);
        else rc = dup(0);
        if (rc < 0) return perror(mode), 1;
        report(i);
    }
    return 0;
}

/* Whether the thread group leader has exited (a zombie while threads remain). */
static int leader_gone(void) {
    char buf[256];
    FILE *f = fopen("/proc/self/stat", "r");
    size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
    if (f) fclose(f);
    buf[n] = 0;
    char *end = strrchr(buf, ')');
    return end && end[2] == 'Z';
}

static void *in_thread(void *arg) {
    (void)arg;
    if (!strcmp(mode, "leader"))
        while (!leader_gone()) usleep(1000);
    int rc = grow_memory();
    printf("done\n");
    exit(rc);
}

/* The grower runs in a forked child, so that its max RSS is its own: a process
 * started by vfork (Python's subprocess) inherits its parent's in ru_maxrss.
 * This parent waits and prints "end SIGNAL MAXRSS_KIB" (SIGNAL 0: exited). */
static void reap_grower(void) {
    int status;
    struct rusage usage;
    pid_t pid = fork();
    if (pid < 0) perror("fork"), exit(1);
    if (pid == 0) return;
    if (wait4(pid, &status, 0, &usage) < 0) perror("wait4"), exit(1);
    printf("end %d %ld\n", WIFSIGNALED(status) ? WTERMSIG(status) : 0, usage.ru_maxrss);
    exit(WIFEXITED(status) ? WEXITSTATUS(status) : 0);
}

int main(int argc, char **argv) {
    char line[16];
    if (argc != 4) return fprintf(stderr, "usage: grow MODE STEP COUNT\n"), 2;
    mode = argv[1];
    step = atol(argv[2]);
    count = atol(argv[3]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    reap_grower();
    open_stamp();
    printf("ready %d\n", getpid());
    if (!fgets(line, sizeof line, stdin)) return 1;
    if (!strcmp(mode, "thread") || !strcmp(mode, "leader")) {
        pthread_t t;
        pthread_create(&t, NULL, in_thread, NULL);
        if (!strcmp(mode, "leader")) pthread_exit(NULL);
        pthread_join(t, NULL);
        return 0;
    }
    int memory = !is("open") && !is("socket") && !is("pipe") && !is("dup") && !is("ioctl");
    int rc = memory ? grow_memory() : grow_files();
    printf("done\n");
    return rc;
}
