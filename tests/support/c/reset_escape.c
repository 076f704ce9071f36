/* The kernel patch's user, trying to outrun the procfs engine:
 * register, 6 MiB, cap 7 MiB / 5 files, fetch, 2 MiB more (over the quota: the
 * patch killed here), then reset and deregister at once. Prints a line per call
 * before the crossing; nothing after it must ever print. Run under `restrack run`. */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

struct per_proc_resource {
    pid_t pid;
    unsigned long heapsize, openfile_count, heapsize_quota, openfile_quota;
};

static void grow(size_t mib) {
    char *p = mmap(NULL, mib << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        _exit(2);
    }
    memset(p, 1, mib << 20);
}

int main(void) {
    pid_t me = getpid();
    struct per_proc_resource s;
    printf("register %ld\n", syscall(549, me));
    grow(6);
    printf("cap %ld\n", syscall(552, me, 7L, 5L));
    printf("fetch %ld heap %lu\n", syscall(550, &s, me), s.heapsize);
    fflush(stdout);
    grow(2);
    long reset = syscall(553, me);
    long dereg = syscall(551, me);
    printf("escaped reset %ld deregister %ld\n", reset, dereg);
    return 0;
}
