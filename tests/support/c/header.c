/* The same calls through restrack.h (file reads and writes, no emulation). */
#define _GNU_SOURCE
#include <restrack.h>
#include <sys/mman.h>

static void show(const char *name, int rc) {
    printf("%s %d %s\n", name, rc, rc ? strerrorname_np(errno) : "0");
    errno = 0;
}

int main(void) {
    struct per_proc_resource s;
    pid_t me = getpid();
    setvbuf(stdout, NULL, _IOLBF, 0);
    show("register_zero", sys_register(0));
    show("register_nopid", sys_register(4194304));
    show("register", sys_register(me));
    show("register_again", sys_register(me));
    show("cap_nopid", sys_resource_cap(4194304, 1, 1));
    show("cap_untracked", sys_resource_cap(getppid(), 1, 1));
    show("cap_below_minus_one", sys_resource_cap(me, -2, 1));
    show("cap", sys_resource_cap(me, 40, 3));
    show("cap_again", sys_resource_cap(me, 40, 3));
    void *p = mmap(NULL, 20 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    (void)p;
    show("fetch", sys_fetch(&s, me));
    printf("fetched %d %lu %lu %lu %lu\n", s.pid == me, s.heapsize, s.openfile_count,
           s.heapsize_quota, s.openfile_quota);
    show("fetch_null", sys_fetch(NULL, me));
    show("reset_untracked", sys_resource_reset(getppid()));
    show("reset", sys_resource_reset(me));
    show("fetch", sys_fetch(&s, me));
    printf("after_reset %lu %ld %ld\n", s.heapsize, (long)s.heapsize_quota, (long)s.openfile_quota);
    show("deregister", sys_deregister(me));
    show("deregister_again", sys_deregister(me));
    show("fetch_untracked", sys_fetch(&s, me));
    return 0;
}
