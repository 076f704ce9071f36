/* restrack.h - the kernel patch's resource-tracking calls over a restrackfs mount.
 *
 * Header-only, libc only. For C programs that can be recompiled: the calls
 * behave as the patch's syscalls 549-553 under `restrack run`,
 * returning 0, or -1 with errno set, but are plain reads and writes of the
 * mount's files. The mount is $RESTRACK_MOUNT, else /restrack.
 *
 *   cc $(restrack cflags) prog.c
 *
 * Heap sizes are MiB (truncated); (unsigned long)-1 / -1 mean no limit.
 * sys_fetch cannot tell a wild pointer from a good one in-process: pass a
 * valid struct (NULL gives EINVAL).
 */
#ifndef RESTRACK_H
#define RESTRACK_H

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef RESTRACK_NO_STRUCT
struct per_proc_resource {
    pid_t pid;
    unsigned long heapsize;       /* MiB */
    unsigned long openfile_count;
    unsigned long heapsize_quota; /* MiB, (unsigned long)-1 if none */
    unsigned long openfile_quota; /* (unsigned long)-1 if none */
};
#endif

static inline const char *restrack_mount(void) {
    const char *mount = getenv("RESTRACK_MOUNT");
    return mount && *mount ? mount : "/restrack";
}

/* One write() of text to MOUNT/relative; 0 or -errno. */
static inline int restrack__write(const char *relative, const char *text) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", restrack_mount(), relative);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    ssize_t n = write(fd, text, strlen(text));
    int err = n < 0 ? errno : 0;
    close(fd);
    return -err;
}

static inline int restrack__fail(int err) {
    errno = err;
    return -1;
}

static inline int restrack__exists(pid_t pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d", (int)pid);
    return pid > 0 && access(path, F_OK) == 0;
}

static inline int sys_register(pid_t pid) {
    char text[32];
    if (pid < 1) return restrack__fail(EINVAL);
    snprintf(text, sizeof text, "%d\n", (int)pid);
    int rc = restrack__write("register", text);
    return rc ? restrack__fail(rc == -EEXIST ? ENFILE : -rc) : 0;
}

static inline int sys_deregister(pid_t pid) {
    char text[32];
    if (pid < 1) return restrack__fail(EINVAL);
    snprintf(text, sizeof text, "%d\n", (int)pid);
    int rc = restrack__write("deregister", text);
    return rc ? restrack__fail(-rc) : 0;
}

/* ENOENT on PID/... means not registered, or (if /proc has no such pid) gone. */
static inline int restrack__pid_error(pid_t pid, int rc) {
    if (rc == -ENOENT) return restrack__fail(restrack__exists(pid) ? EINVAL : ESRCH);
    if (rc == -EBUSY) return restrack__fail(ENFILE);
    return restrack__fail(-rc);
}

static inline int sys_resource_cap(pid_t pid, long heap_quota, long file_quota) {
    char relative[64], text[128], heap[40], files[40];
    if (!restrack__exists(pid)) return restrack__fail(ESRCH);
    if (heap_quota < -1 || file_quota < -1) return restrack__fail(EINVAL);
    if (heap_quota == -1) snprintf(heap, sizeof heap, "max");
    else snprintf(heap, sizeof heap, "%ldM", heap_quota);
    if (file_quota == -1) snprintf(files, sizeof files, "max");
    else snprintf(files, sizeof files, "%ld", file_quota);
    snprintf(relative, sizeof relative, "%d/quota", (int)pid);
    snprintf(text, sizeof text, "heap=%s files=%s\n", heap, files);
    int rc = restrack__write(relative, text);
    return rc ? restrack__pid_error(pid, rc) : 0;
}

static inline int sys_resource_reset(pid_t pid) {
    char relative[64];
    if (!restrack__exists(pid)) return restrack__fail(ESRCH);
    snprintf(relative, sizeof relative, "%d/reset", (int)pid);
    int rc = restrack__write(relative, "1\n");
    return rc ? restrack__pid_error(pid, rc) : 0;
}

static inline unsigned long restrack__limit(const char *value, int shift) {
    return strcmp(value, "max") == 0 ? (unsigned long)-1 : strtoul(value, NULL, 10) >> shift;
}

static inline int sys_fetch(struct per_proc_resource *stats, pid_t pid) {
    char path[4096], line[256], key[64], value[192];
    if (!stats) return restrack__fail(EINVAL);
    snprintf(path, sizeof path, "%s/%d/stat", restrack_mount(), (int)pid);
    FILE *file = fopen(path, "re");
    if (!file) return restrack__fail(errno == ENOENT || errno == ESRCH ? EINVAL : errno);
    struct per_proc_resource got = {0};
    int fields = 0;
    while (fgets(line, sizeof line, file)) {
        if (sscanf(line, "%63s %191s", key, value) != 2) continue;
        if (!strcmp(key, "pid")) got.pid = (pid_t)atoi(value), fields++;
        else if (!strcmp(key, "heapsize")) got.heapsize = restrack__limit(value, 20), fields++;
        else if (!strcmp(key, "openfile_count")) got.openfile_count = restrack__limit(value, 0), fields++;
        else if (!strcmp(key, "heap_quota")) got.heapsize_quota = restrack__limit(value, 20), fields++;
        else if (!strcmp(key, "file_quota")) got.openfile_quota = restrack__limit(value, 0), fields++;
    }
    int err = ferror(file) ? (errno == ENOENT || errno == ESRCH ? EINVAL : errno) : 0;
    fclose(file);
    if (err) return restrack__fail(err);
    if (fields != 5) return restrack__fail(EINVAL);
    *stats = got;
    return 0;
}

#endif /* RESTRACK_H */
