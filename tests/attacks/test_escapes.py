"""A process cannot slip out of its quota: not by ending its main thread (the heap),
nor by leaving its other threads to hold the files once the leader is a zombie."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.build import compile_c
from tests.support.paths import C_SOURCES
from tests.support.users import NOBODY, as_user

ESCAPE_C = r"""
/* escape: prints its pid; on a line on stdin the main thread exits (pthread_exit)
 * while a second thread lives on, then maps and touches 64 MiB, opens 8 files and
 * prints "done". */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
static pthread_t main_thread;
static void *worker(void *arg) {
    (void)arg;
    pthread_join(main_thread, NULL);
    usleep(300000); /* three of the daemon's check intervals */
    char *p = mmap(NULL, 64 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(p, 1, 64 << 20);
    for (int i = 0; i < 8; i++) open("/dev/null", O_RDONLY);
    printf("done\n");
    fflush(stdout);
    for (;;) pause();
    return NULL;
}
int main(void) {
    char line[16];
    pthread_t t;
    main_thread = pthread_self();
    printf("%d\n", getpid());
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    pthread_create(&t, NULL, worker, NULL);
    pthread_exit(NULL);
}
"""


def test_a_process_cannot_escape_its_quota_by_ending_its_main_thread(daemon, bin_dir):
    """Found here: when a process's main thread exits (pthread_exit) and its other
    threads go on, /proc/PID/status has no VmData (the leader is a zombie); the daemon
    took the whole process for exited and dropped it within one check, so its threads
    could allocate and open past a quota root set, unseen."""
    source = bin_dir / "escape.c"
    source.write_text(ESCAPE_C)
    subprocess.run(["gcc", "-O1", "-pthread", "-o", bin_dir / "escape", source], check=True)
    proc = subprocess.Popen(
        as_user(NOBODY, [bin_dir / "escape"]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid = int(proc.stdout.readline())
        daemon.register(pid)
        daemon.write("heap=10M files=4", pid, "quota")  # root's, kill
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.stdout.readline()  # "done" once over its quota, or "" if killed first
        try:  # wait for the kill itself: stdout closes before the kernel reaps the process
            status = proc.wait(timeout=5)  # fifty check intervals
        except subprocess.TimeoutExpired:
            status = None
        assert status == -signal.SIGKILL, (
            f"over its quota and alive ({status}); "
            f"tracked: {str(pid) in os.listdir(daemon.mountpoint)}"
        )
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def leaderless(bin_dir: Path) -> Path:
    return compile_c(C_SOURCES / "leaderless.c", bin_dir / "leaderless")


def test_a_files_quota_holds_when_the_main_thread_has_exited(daemon, leaderless):
    """Found by a review: with the leader a zombie, /proc/PID/fd reports st_size 0 and
    no error, so the count read 0 and the fallback to a live thread never ran: under
    root's `files=2 action=kill` a process opened 10 fds and lived until something
    else happened to read its memory. Now the count is read through a live thread: the
    file shows it, and the periodic check alone kills the process."""
    proc = subprocess.Popen(
        as_user(NOBODY, [leaderless]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        pid = int(proc.stdout.readline())
        daemon.register(pid)
        daemon.write("files=2 action=kill", pid, "quota")  # root's
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "ready\n"
        assert Path(f"/proc/{pid}/status").read_text().count("VmData") == 0  # a zombie leader
        proc.stdin.write("open 1\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "opened 1\n"
        assert daemon.read(pid, "openfile_count") == "1\n"
        proc.stdin.write("open 10\n")
        proc.stdin.flush()
        proc.stdout.readline()
        # nothing reads it now: the periodic check (100 ms) must see it on its own
        assert proc.wait(timeout=2) == -9
    finally:
        proc.kill()
        proc.wait()
