/* Calls the kernel patch's syscalls on one pid: abi_ops PID OP...; prints "op rc errno". */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

struct per_proc_resource {
    pid_t pid;
    unsigned long heapsize, openfile_count, heapsize_quota, openfile_quota;
};

int main(int argc, char **argv) {
    pid_t pid = atoi(argv[1]);
    struct per_proc_resource s;
    for (int i = 2; i < argc; i++) {
        const char *op = argv[i];
        long rc = -2;
        errno = 0;
        if (!strcmp(op, "register")) rc = syscall(549, pid);
        else if (!strcmp(op, "fetch")) rc = syscall(550, &s, pid);
        else if (!strcmp(op, "deregister")) rc = syscall(551, pid);
        else if (!strcmp(op, "cap")) rc = syscall(552, pid, 1L, 1L);
        else if (!strcmp(op, "uncap")) rc = syscall(552, pid, -1L, -1L);
        else if (!strcmp(op, "reset")) rc = syscall(553, pid);
        printf("%s %ld %s\n", op, rc, rc ? strerrorname_np(errno) : "0");
    }
    return 0;
}
