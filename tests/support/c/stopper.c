/* stopper SECONDS DAEMON: SIGSTOP each child of DAEMON of my uid named setpriv or prlimit
 * (its children only: the machine may run other suites' helpers too). */
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static long parent_of(const char *pid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%s/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *end = strrchr(buf, ')'); /* comm may hold spaces and parentheses */
    return end ? atol(end + 4) : -1; /* ") S PPID" */
}
int main(int argc, char **argv) {
    double limit = atof(argv[1]);
    long daemon = atol(argv[2]);
    struct timespec t0, t;
    long stopped = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        DIR *d = opendir("/proc");
        struct dirent *e;
        while ((e = readdir(d))) {
            char path[64], comm[32] = {0};
            if (e->d_name[0] < '1' || e->d_name[0] > '9') continue;
            snprintf(path, sizeof path, "/proc/%s/comm", e->d_name);
            FILE *f = fopen(path, "r");
            if (!f) continue;
            if (fgets(comm, sizeof comm, f)
                && (!strncmp(comm, "prlimit", 7) || !strncmp(comm, "setpriv", 7))
                && parent_of(e->d_name) == daemon && kill(atoi(e->d_name), SIGSTOP) == 0)
                stopped++;
            fclose(f);
        }
        closedir(d);
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec + (t.tv_nsec - t0.tv_nsec) / 1e9 > limit) break;
    }
    printf("stopped %ld\n", stopped);
    return 0;
}
