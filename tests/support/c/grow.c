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
 * ia32 system calls from this 64-bit process (int $0x80; needs IA32_EMULATION):
 *   ia32mmap  ia32 mmap2 of STEP bytes, untouched (at an address below 4 GiB)
 *   ia32brk   ia32 brk growing by STEP, untouched; a heap above 4 GiB (PIE) is first
 *             moved below, before "ready", by prctl(PR_SET_MM_MAP)
 *   ia32dup   ia32 dup(0); ia32open: ia32 open("/dev/null") (path in an ia32 mmap2 page)
 *   ia32nofile  after "go", one ia32 prlimit64 raising the soft RLIMIT_NOFILE to the
 *             hard one (failure only reported), prints "nofile SOFT" read back, then
 *             `open` COUNT times (lower the soft limit before starting it)
 * io_uring (raw syscalls) IORING_OP_OPENAT of "/dev/null":
 *   uring_async   one per step with IOSQE_ASYNC: an io-wq worker makes the descriptor
 *   uring_sqpoll  one per step on an IORING_SETUP_SQPOLL ring: the SQ thread makes it
 *   uring_batch   STEP (ring size) per step, submitted and reaped in one io_uring_enter
 * recvmsg_batch  STEP (1..253) descriptors per step by one recvmsg of SCM_RIGHTS; a
 *   forked sender (its own descriptor table) queues COUNT such messages before "ready"
 * Another thread group sharing the grower's memory or descriptors does the growth:
 * it prints "sharer PID", the step lines and "done"; the grower waits for it and
 * prints "sharer end SIG" (it exits 128+SIG if the sharer was killed):
 *   vmshare     clone(CLONE_VM), no CLONE_THREAD: the clone does `touch`
 *   vfork       clone(CLONE_VM|CLONE_VFORK): the same while the grower is suspended
 *   filesshare  clone(CLONE_FILES), a fork sharing the descriptor table: dup(0) each step
 * tryopen, trymmap: COUNT opens of /dev/null or mmaps of STEP, going on past failures;
 * prints "refused N".
 * flip: dup(0) and close it, COUNT times (STEP ignored): a crossing of files=0 each.
 * With GROW_HOLD set, the process waits for one more line after "done" before it exits.
 * With GROW_STAMP=FILE, the CLOCK_MONOTONIC ns before each call is written to
 * the start of FILE (shared), so a bench can time the crossing call to death.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
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

/* Whether the mode is one of the space-separated names. */
static int among(const char *names) {
    size_t n = strlen(mode);
    for (const char *p = names; n && (p = strstr(p, mode)); p += n)
        if ((p == names || p[-1] == ' ') && (p[n] == ' ' || !p[n])) return 1;
    return 0;
}

/* One line by one write(2), for processes sharing (or copying) stdio's state;
 * no number when n < 0. */
static void say(const char *word, long n) {
    char buf[64], digits[24];
    int len = strlen(word), k = 0;
    memcpy(buf, word, len);
    if (n >= 0) {
        buf[len++] = ' ';
        do digits[k++] = '0' + n % 10; while (n /= 10);
        while (k) buf[len++] = digits[--k];
    }
    buf[len++] = '\n';
    if (write(1, buf, len) != len) _exit(1);
}

/* An ia32 system call from this 64-bit process: int $0x80 takes the number in
 * eax and the arguments in ebx, ecx, edx, esi, edi and ebp (swapped with r12,
 * which the kernel preserves). -1 and errno on failure, like syscall(2). */
static long ia32(long nr, long a, long b, long c, long d, long e, long f) {
    register long r12 __asm__("r12") = f;
    long ret;
    __asm__ volatile("xchg %%rbp, %%r12\n\tint $0x80\n\txchg %%rbp, %%r12"
                     : "=a"(ret), "+r"(r12)
                     : "0"(nr), "b"(a), "c"(b), "d"(c), "S"(d), "D"(e)
                     : "memory", "cc", "r8", "r9", "r10", "r11");
    ret = (unsigned int)ret;
    if (ret > 0xfffff000L) return errno = -(int)ret, -1;
    return ret;
}

enum { IA32_OPEN = 5, IA32_DUP = 41, IA32_BRK = 45, IA32_MMAP2 = 192, IA32_PRLIMIT64 = 340 };

static char *low;   /* an ia32-mapped page (below 4 GiB) for the ia32 calls' pointers */
static long brk_at; /* the ia32brk break */

static char *ia32_mmap(long size) {
    long p = ia32(IA32_MMAP2, 0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p < 0 ? MAP_FAILED : (char *)p;
}

/* Moves the (empty) heap to `at` with PR_SET_MM_MAP (PR_SET_MM_BRK would need
 * CAP_SYS_RESOURCE); the other fields are the current ones, from /proc/self/stat. */
static int move_heap(unsigned long at) {
    char buf[1024], *p;
    unsigned long v[52] = {0};
    FILE *f = fopen("/proc/self/stat", "r");
    size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
    if (f) fclose(f);
    buf[n] = 0;
    p = strrchr(buf, ')');
    for (int i = 3; i < 52 && p && (p = strchr(p + 1, ' ')); i++) v[i] = strtoul(p + 1, NULL, 10);
    struct prctl_mm_map map = {
        .start_code = v[26], .end_code = v[27], .start_data = v[45], .end_data = v[46],
        .start_brk = at, .brk = at, .start_stack = v[28], .arg_start = v[48],
        .arg_end = v[49], .env_start = v[50], .env_end = v[51], .exe_fd = -1};
    return prctl(PR_SET_MM, PR_SET_MM_MAP, &map, sizeof map, 0);
}

static int prepare_ia32(void) {
    if (ia32(20, 0, 0, 0, 0, 0, 0) < 0) return perror("int $0x80 (ia32 getpid)"), 1;
    if ((low = ia32_mmap(4096)) == MAP_FAILED) return perror("ia32 mmap2"), 1;
    strcpy(low, "/dev/null");
    if (!is("ia32brk")) return 0;
    brk_at = syscall(SYS_brk, 0);
    if (brk_at >> 32) { /* where ia32 brk cannot reach: move the heap below 4 GiB */
        long room = step * count + (1L << 20);
        char *hole = ia32_mmap(room);
        if (hole == MAP_FAILED) return perror("ia32 mmap2 of the new heap"), 1;
        munmap(hole, room);
        if (move_heap((unsigned long)hole)) return perror("prctl(PR_SET_MM_MAP)"), 1;
    }
    brk_at = ia32(IA32_BRK, 0, 0, 0, 0, 0, 0);
    if (brk_at != syscall(SYS_brk, 0)) return fprintf(stderr, "ia32 brk(0): %lx\n", brk_at), 1;
    return 0;
}

static int grow_ia32(void) {
    if (is("ia32nofile")) {
        struct rlimit lim;
        unsigned long long *want = (void *)low + 64; /* struct rlimit64 */
        getrlimit(RLIMIT_NOFILE, &lim);
        want[0] = want[1] = lim.rlim_max;
        if (ia32(IA32_PRLIMIT64, 0, RLIMIT_NOFILE, (long)want, 0, 0, 0) < 0)
            perror("ia32 prlimit64");
        getrlimit(RLIMIT_NOFILE, &lim);
        printf("nofile %lu\n", (unsigned long)lim.rlim_cur);
    }
    for (long i = 0; i < count; i++) {
        long rc;
        mark();
        if (is("ia32mmap")) rc = ia32_mmap(step) == MAP_FAILED ? -1 : 0;
        else if (is("ia32brk")) {
            rc = ia32(IA32_BRK, brk_at + step, 0, 0, 0, 0, 0);
            if (rc != brk_at + step) rc = -1, errno = ENOMEM;
            else brk_at = rc;
        } else if (is("ia32dup")) rc = ia32(IA32_DUP, 0, 0, 0, 0, 0, 0);
        else if (is("ia32open")) rc = ia32(IA32_OPEN, (long)low, O_RDONLY, 0, 0, 0, 0);
        else rc = open("/dev/null", O_RDONLY);
        if (rc < 0) return perror(mode), 1;
        report(i);
    }
    return 0;
}

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#define __NR_io_uring_enter 426
#endif

static struct {
    int fd;
    unsigned *sq_tail, *sq_mask, *sq_array, *sq_flags, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
} ring;

static int prepare_uring(void) {
    struct io_uring_params p;
    int sqpoll = is("uring_sqpoll");
    memset(&p, 0, sizeof p);
    p.flags = sqpoll ? IORING_SETUP_SQPOLL : 0;
    p.sq_thread_idle = 1000;
    ring.fd = syscall(__NR_io_uring_setup, is("uring_batch") ? step : 8, &p);
    if (ring.fd < 0) return perror("io_uring_setup"), 1;
    size_t sq_size = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = p.features & IORING_FEAT_SINGLE_MMAP;
    if (single && cq_size > sq_size) sq_size = cq_size;
    int prot = PROT_READ | PROT_WRITE, flags = MAP_SHARED | MAP_POPULATE;
    char *sq = mmap(NULL, sq_size, prot, flags, ring.fd, IORING_OFF_SQ_RING);
    char *cq = single ? sq : mmap(NULL, cq_size, prot, flags, ring.fd, IORING_OFF_CQ_RING);
    ring.sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), prot, flags, ring.fd,
                     IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || ring.sqes == MAP_FAILED)
        return perror("mmap io_uring"), 1;
    ring.sq_tail = (unsigned *)(sq + p.sq_off.tail);
    ring.sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    ring.sq_array = (unsigned *)(sq + p.sq_off.array);
    ring.sq_flags = (unsigned *)(sq + p.sq_off.flags);
    ring.cq_head = (unsigned *)(cq + p.cq_off.head);
    ring.cq_tail = (unsigned *)(cq + p.cq_off.tail);
    ring.cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    ring.cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return 0;
}

/* An IORING_OP_OPENAT of "/dev/null" in the submission slot of `position`. */
static void queue_open(unsigned position) {
    unsigned at = position & *ring.sq_mask;
    struct io_uring_sqe *sqe = &ring.sqes[at];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_OPENAT;
    sqe->flags = is("uring_async") ? IOSQE_ASYNC : 0;
    sqe->fd = AT_FDCWD;
    sqe->addr = (unsigned long)"/dev/null";
    sqe->open_flags = O_RDONLY;
    ring.sq_array[at] = at;
}

/* uring_async, uring_sqpoll: the completion is awaited by spinning on the CQ ring,
 * with no system call after the submission: the descriptor is made and completed
 * outside any call of this process, by an io-wq worker or the SQ thread. */
static int uring_open_outside(void) {
    unsigned tail = *ring.sq_tail;
    queue_open(tail);
    __atomic_store_n(ring.sq_tail, tail + 1, __ATOMIC_RELEASE);
    if (is("uring_async") || (__atomic_load_n(ring.sq_flags, __ATOMIC_ACQUIRE) & IORING_SQ_NEED_WAKEUP)) {
        unsigned flags = is("uring_async") ? 0 : IORING_ENTER_SQ_WAKEUP;
        if (syscall(__NR_io_uring_enter, ring.fd, is("uring_async"), 0, flags, NULL, 0) < 0)
            return perror("io_uring_enter"), 1;
    }
    unsigned head = *ring.cq_head;
    while (__atomic_load_n(ring.cq_tail, __ATOMIC_ACQUIRE) == head)
        __builtin_ia32_pause();
    int res = ring.cqes[head & *ring.cq_mask].res;
    __atomic_store_n(ring.cq_head, head + 1, __ATOMIC_RELEASE);
    if (res < 0) return errno = -res, perror("io_uring openat"), 1;
    return 0;
}

/* Opens n "/dev/null" by the ring, submitted (unless the SQ thread does) and reaped
 * by io_uring_enter; 1 if one failed. */
static int uring_open(unsigned n) {
    if (!is("uring_batch")) return uring_open_outside();
    unsigned tail = *ring.sq_tail, got = 0, submit = is("uring_sqpoll") ? 0 : n;
    for (unsigned k = 0; k < n; k++) queue_open(tail + k);
    __atomic_store_n(ring.sq_tail, tail + n, __ATOMIC_RELEASE);
    while (got < n) {
        unsigned flags = IORING_ENTER_GETEVENTS | (submit ? 0 : IORING_ENTER_SQ_WAKEUP);
        long rc = syscall(__NR_io_uring_enter, ring.fd, submit, n - got, flags, NULL, 0);
        if (rc < 0 && errno != EINTR) return perror("io_uring_enter"), 1;
        if (rc > 0 && submit) submit -= rc;
        unsigned head = *ring.cq_head, end = __atomic_load_n(ring.cq_tail, __ATOMIC_ACQUIRE);
        for (; head != end; head++, got++) {
            int res = ring.cqes[head & *ring.cq_mask].res;
            if (res < 0) return errno = -res, perror("io_uring openat"), 1;
        }
        __atomic_store_n(ring.cq_head, head, __ATOMIC_RELEASE);
    }
    return 0;
}

static int sock = -1; /* recvmsg_batch: the receiving end */

/* The recvmsg_batch sender: COUNT messages of STEP copies of one descriptor. */
static void send_fds(int out) {
    union { char buf[CMSG_SPACE(253 * sizeof(int))]; struct cmsghdr align; } u;
    char byte = 0;
    struct iovec iov = {&byte, 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = CMSG_SPACE(step * sizeof(int))};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    int fd = open("/dev/null", O_RDONLY);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    close(0), close(1); /* not to hold the test's pipes */
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(step * sizeof(int));
    for (long i = 0; i < step; i++) ((int *)CMSG_DATA(c))[i] = fd;
    for (long i = 0; i < count; i++)
        if (sendmsg(out, &msg, MSG_NOSIGNAL) < 0) perror("sendmsg"), _exit(1);
    while (read(out, &byte, 1) > 0) continue; /* until the receiver is gone */
    _exit(0);
}

static int prepare_recvmsg(void) {
    int pair[2];
    if (step < 1 || step > 253) return fprintf(stderr, "recvmsg_batch: STEP 1..253\n"), 1;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, pair)) return perror("socketpair"), 1;
    pid_t pid = fork();
    if (pid < 0) return perror("fork"), 1;
    if (pid == 0) close(pair[0]), send_fds(pair[1]);
    close(pair[1]);
    sock = pair[0];
    return 0;
}

static int recv_fds(void) {
    union { char buf[CMSG_SPACE(253 * sizeof(int))]; struct cmsghdr align; } u;
    char byte;
    struct iovec iov = {&byte, 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = sizeof u.buf};
    if (recvmsg(sock, &msg, 0) <= 0) return perror("recvmsg"), 1;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    long got = c && c->cmsg_type == SCM_RIGHTS ? (c->cmsg_len - CMSG_LEN(0)) / sizeof(int) : 0;
    if (got != step || (msg.msg_flags & MSG_CTRUNC))
        return fprintf(stderr, "recvmsg: %ld descriptors, flags %x\n", got, msg.msg_flags), 1;
    return 0;
}

static int grow_queued(void) {
    for (long i = 0; i < count; i++) {
        mark();
        if (sock >= 0 ? recv_fds() : uring_open(is("uring_batch") ? step : 1)) return 1;
        report(i);
    }
    return 0;
}

#define SHARER_STACK (256 * 1024)
static char *sharer_stack;

/* The clone sharing the grower's memory (vmshare, vfork) or descriptor table. */
static int sharer(void *arg) {
    (void)arg;
    say("sharer", getpid());
    for (long i = 0; i < count; i++) {
        char *p;
        mark();
        if (is("filesshare")) {
            if (dup(0) < 0) perror("dup"), _exit(1);
        } else {
            p = mmap(NULL, step, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) perror("mmap"), _exit(1);
            memset(p, 1, step);
        }
        say("step", i + 1);
    }
    say("done", -1);
    _exit(0);
}

static int grow_shared(void) {
    int status, flags = is("filesshare") ? CLONE_FILES : CLONE_VM;
    if (is("vfork")) flags |= CLONE_VFORK;
    pid_t pid = clone(sharer, sharer_stack + SHARER_STACK, flags | SIGCHLD, NULL);
    if (pid < 0) return perror("clone"), 1;
    if (waitpid(pid, &status, __WALL) < 0) return perror("waitpid"), 1;
    printf("sharer end %d\n", WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

/* Before "ready": what the mode needs besides its growth. */
static int prepare(void) {
    if (!strncmp(mode, "ia32", 4)) return prepare_ia32();
    if (!strncmp(mode, "uring_", 6)) return prepare_uring();
    if (is("recvmsg_batch")) return prepare_recvmsg();
    if (among("vmshare vfork filesshare")) {
        sharer_stack = mmap(NULL, SHARER_STACK, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (sharer_stack == MAP_FAILED) return perror("mmap stack"), 1;
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
    if (prepare()) return 1;
    printf("ready %d\n", getpid());
    if (!fgets(line, sizeof line, stdin)) return 1;
    if (!strcmp(mode, "thread") || !strcmp(mode, "leader")) {
        pthread_t t;
        pthread_create(&t, NULL, in_thread, NULL);
        if (!strcmp(mode, "leader")) pthread_exit(NULL);
        pthread_join(t, NULL);
        return 0;
    }
    if (among("vmshare vfork filesshare")) return grow_shared(); /* the sharer says "done" */
    if (is("tryopen") || is("trymmap")) { /* COUNT attempts, failures counted, not fatal */
        long refused = 0;
        for (long i = 0; i < count; i++) {
            if (is("tryopen")) {
                if (open("/dev/null", O_RDONLY) < 0) refused++;
            } else if (mmap(NULL, step, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                            0) == MAP_FAILED) {
                refused++;
            }
        }
        printf("refused %ld\ndone\n", refused);
        if (getenv("GROW_HOLD")) fgets(line, sizeof line, stdin); /* held until a line */
        return 0;
    }
    if (is("flip")) { /* over a files=0 quota and back, COUNT times: a flood of crossings */
        for (long i = 0; i < count; i++) {
            int fd = dup(0);
            if (fd >= 0) close(fd);
        }
        printf("flipped %ld\ndone\n", count);
        return 0;
    }
    int rc;
    if (!strncmp(mode, "ia32", 4)) rc = grow_ia32();
    else if (!strncmp(mode, "uring_", 6) || is("recvmsg_batch")) rc = grow_queued();
    else if (among("open socket pipe dup ioctl")) rc = grow_files();
    else rc = grow_memory();
    printf("done\n");
    fflush(stdout);
    if (getenv("GROW_HOLD") && !fgets(line, sizeof line, stdin)) return rc; /* held until a line */
    return rc;
}
