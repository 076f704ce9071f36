"""tracker/linux/process.py: a process read through its pidfd, and its held status file.

VmData is read by pread of /proc/PID/status kept open (no path lookup
per read), for a bounded number of processes daemon-wide. A descriptor opened by
path names the process that held the pid then, so these tests check that such a
file is read afresh, never shows a later holder of the pid, and that the bound
holds and is given back.
"""

from __future__ import annotations

import os

import pytest

from tests.support.pids import force_pids, spawn_at
from tests.support.procs import MiB, open_fds, proc_vm_data
from tracker.linux import process as process_module
from tracker.linux import procfs
from tracker.linux.process import NoSuchProcess, Process


def test_the_held_status_file_is_read_afresh(spawn):
    w = spawn()
    p = Process.open(w.pid)
    try:
        assert p.sample(heap=True, files=False)[0] == proc_vm_data(w.pid)
        assert p.status_fd >= 0  # held from the first read on
        w.do("mmap", 8 * MiB)
        assert p.sample(heap=True, files=False)[0] == proc_vm_data(w.pid)
        w.do("munmap", 8 * MiB)
        assert p.sample(heap=True, files=True)[0] == proc_vm_data(w.pid)
        w.do("mmap", 4 * MiB)
        usage = p.usage()  # all of status, through the same held file
        assert (usage.comm, usage.vm_data) == ("workload", proc_vm_data(w.pid))
        assert usage.open_fds == len(os.listdir(f"/proc/{w.pid}/fd"))
    finally:
        p.close()
    assert p.status_fd == -1


@force_pids
def test_a_held_status_file_never_shows_the_next_holder_of_the_pid(spawn):
    old = spawn()
    pid = old.pid
    p = Process.open(pid)
    try:
        p.sample(heap=True, files=False)
        held = p.status_fd
        old.stop()  # killed and reaped
        new = spawn_at(pid, spawn)
        new.do("mmap", 64 * MiB)
        with pytest.raises(NoSuchProcess):
            procfs.reread_status(held, pid)  # the file is the old process's: ESRCH
        with pytest.raises(NoSuchProcess):
            p.sample(heap=True, files=False)
    finally:
        p.close()


def test_held_status_files_are_bounded_and_given_back(spawn, monkeypatch):
    a, b = spawn(), spawn()
    before = open_fds()
    monkeypatch.setattr(process_module, "MAX_HELD_STATUS", process_module._held_status + 1)
    pa, pb = Process.open(a.pid), Process.open(b.pid)
    try:
        pa.sample(heap=True, files=False)
        b.do("mmap", 4 * MiB)
        assert pb.sample(heap=True, files=False)[0] == proc_vm_data(b.pid)  # by path
        assert pa.status_fd >= 0 and pb.status_fd == -1
        pa.close()
        pb.sample(heap=True, files=False)
        assert pb.status_fd >= 0  # the slot pa gave back
    finally:
        pa.close()
        pb.close()
    assert open_fds() == before
