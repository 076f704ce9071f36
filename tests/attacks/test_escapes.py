"""A process cannot slip out of its quota: not by ending its main thread (the heap),
nor by leaving its other threads to hold the files once the leader is a zombie."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.support.users import NOBODY, as_user


def test_a_process_cannot_escape_its_quota_by_ending_its_main_thread(daemon, leaderless):
    """Found here: when a process's main thread exits (pthread_exit) and its other
    threads go on, /proc/PID/status has no VmData (the leader is a zombie); the daemon
    took the whole process for exited and dropped it within one check, so its threads
    could allocate and open past a quota root set, unseen."""
    proc = subprocess.Popen(
        as_user(NOBODY, [leaderless]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        pid = int(proc.stdout.readline())
        daemon.register(pid)
        daemon.write("heap=10M files=4", pid, "quota")  # root's, kill
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.3)  # three of the daemon's check intervals with the leader a zombie
        proc.stdin.write("mmap 64\nopen 8\n")
        proc.stdin.flush()
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
