"""A process held by its identity (a pidfd), so a recycled PID is never it."""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from tracker.linux import procfs
from tracker.linux.cgroup import NO_WORKLOAD, Workload, read_workload
from tracker.linux.procfs import NoSuchProcess

T = TypeVar("T")


class Usage(NamedTuple):
    """What the process holds right now, read from the kernel's counters (a tuple:
    one is made per process at every render of `metrics`)."""

    comm: str
    vm_data: int  # bytes
    open_fds: int


def _pidfs_available() -> bool:
    """On pidfs every process has its own pidfd inode; before it, all share one."""
    inodes = set()
    for pid in {os.getpid(), os.getppid() or 1}:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False
        try:
            inodes.add(os.fstat(fd).st_ino)
        finally:
            os.close(fd)
    return len(inodes) == 2


_PIDFS = _pidfs_available()

# /proc/PID/status descriptors kept open across reads of VmData, daemon-wide: a
# pread of one costs ~7 µs, an open + read + close ~12 µs. Bounded, since each
# is a descriptor (10,000 tracked processes already hold 10,000 pidfds); a
# process beyond the bound is read by path, as before.
MAX_HELD_STATUS = 1024
_held_status = 0


def pidfd_inode(pidfd: int) -> int | None:
    return os.fstat(pidfd).st_ino if _PIDFS else None


class Process:
    """One thread group, pinned by a pidfd.

    /proc is addressed by number, so every read is followed by `check_alive()`:
    if the pidfd still refers to a living (or zombie, not yet reaped) process,
    its PID cannot have been reused while we read, and the values were its own.
    """

    __slots__ = ("pid", "start_time", "inode", "pidfd", "via", "status_fd")

    def __init__(self, pid: int, start_time: int, inode: int | None, pidfd: int) -> None:
        self.pid = pid
        self.start_time = start_time
        self.inode = inode  # the pidfd's inode: unique per process where pidfs exists
        self.pidfd = pidfd
        # A live thread to read the counters through once the leader is a zombie
        # (pthread_exit of the main thread): /proc/PID then shows no memory and
        # no fds, but the process lives on, and so does its quota.
        self.via: int | None = None
        self.status_fd = -1  # its /proc/PID/status held open (see MAX_HELD_STATUS), or -1

    @classmethod
    def open(cls, pid: int, start_time: int | None = None, inode: int | None = None) -> Process:
        """Pin thread group `pid`; with `start_time` and `inode`, only if it is that process.

        The start time has clock-tick (10 ms) resolution: a pid recycled within one
        tick would pass for the old process. The pidfd's inode (pidfs, Linux >= 6.9)
        tells any two processes apart, so it is checked too when both sides have it.
        """
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise NoSuchProcess(pid) from None
        try:
            stat = procfs.read_stat(pid)
            process = cls(pid, stat.start_time, pidfd_inode(pidfd), pidfd)
            process.check_alive()  # so the stat read was the pinned process's
            # a zombie leader whose threads live on is a live process (pthread_exit)
            gone = stat.state == "X" or (stat.state == "Z" and process.has_exited())
            if gone or (start_time is not None and stat.start_time != start_time):
                raise NoSuchProcess(pid)
            if inode is not None and process.inode is not None and inode != process.inode:
                raise NoSuchProcess(pid, "pid recycled")
        except BaseException:
            os.close(pidfd)
            raise
        return process

    def close(self) -> None:
        global _held_status
        if self.status_fd >= 0:
            os.close(self.status_fd)
            self.status_fd = -1
            _held_status -= 1
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def is_alive(self) -> bool:
        """False once the process has been reaped (its PID may now be reused)."""
        if self.pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, 0)
        except ProcessLookupError:
            return False
        return True

    def check_alive(self) -> None:
        if not self.is_alive():
            raise NoSuchProcess(self.pid, "process exited")

    def usage(self) -> Usage:
        """VmData and open fds now; `NoSuchProcess` once it has exited."""

        def read() -> Usage:
            name, vm_data = procfs.name_and_vm_data_in(self.pid, self._status_text())
            open_fds = self._count_fds()
            self.check_alive()
            return Usage(name, vm_data, open_fds)

        return self._through_a_live_thread(read)

    def sample(self, *, heap: bool, files: bool) -> tuple[int, int]:
        """(VmData, open fds) reading only what is asked for (0 for the rest)."""

        def read() -> tuple[int, int]:
            vm_data = procfs.vm_data_in(self.pid, self._status_text()) if heap else 0
            open_fds = self._count_fds() if files else 0
            self.check_alive()
            return vm_data, open_fds

        return self._through_a_live_thread(read)

    def _status_text(self) -> bytes:
        """/proc/PID/status now: through the held file of the leader where there is
        one (or room for one), else by path (a live thread's once the leader is a
        zombie: its own shows no memory)."""
        if self.via is None and (self.status_fd >= 0 or self._hold_status()):
            return procfs.reread_status(self.status_fd, self.pid)
        return procfs.read_status_text(self.pid, self.via)

    def _hold_status(self) -> bool:
        """Open the status file to keep, if the bound allows; it is this process's
        file only if the pidfd shows the process alive after the open."""
        global _held_status
        if _held_status >= MAX_HELD_STATUS or self.pidfd < 0:
            return False
        fd = procfs.open_status(self.pid)
        if not self.is_alive():
            os.close(fd)
            raise NoSuchProcess(self.pid, "process exited")
        self.status_fd = fd
        _held_status += 1
        return True

    def fd_kinds(self) -> dict[str, int]:
        """The open descriptors by kind, from one listing (`procfs.read_fd_kinds`),
        through a live thread when the leader is a zombie; `NoSuchProcess` once exited.

        O(descriptors): callers with the event loop to keep free run it in a worker
        thread, on a `duplicate()`."""

        def read() -> dict[str, int]:
            kinds = procfs.read_fd_kinds(self.pid, self.via)
            if not any(kinds.values()) and procfs.read_status(self.pid, self.via).vm_data is None:
                raise NoSuchProcess(self.pid, "no fd table (a zombie leader, or exiting)")
            self.check_alive()
            return kinds

        return self._through_a_live_thread(read)

    def duplicate(self) -> Process:
        """The same process on a pidfd of its own, for a read in a worker thread.

        The event loop closes an entry's pidfd when the entry leaves; a thread still
        using that number could then check whatever the number names next. The
        duplicate's pidfd lives until its own `close()`."""
        twin = Process(self.pid, self.start_time, self.inode, os.dup(self.pidfd))
        twin.via = self.via
        return twin

    def _count_fds(self) -> int:
        """Open fds, read through the task in use; `NoSuchProcess` if it has no fd table.

        A task without one (a zombie leader whose threads go on, a thread on its
        way out) shows /proc/.../fd with st_size 0 and no error, so a zero is only
        believed from a task that still has its address space: exit_mm() comes
        before exit_files() in do_exit(), so a task whose table is gone shows no
        VmData by the time this looks.
        """
        count = procfs.count_fds(self.pid, self.via)
        if count == 0 and procfs.read_status(self.pid, self.via).vm_data is None:
            raise NoSuchProcess(self.pid, "no fd table (a zombie leader, or exiting)")
        return count

    def _through_a_live_thread(self, read: Callable[[], T]) -> T:
        try:
            return read()
        except NoSuchProcess:
            if self.has_exited():
                raise
            self.via = procfs.live_thread(self.pid)
            if self.via is None:
                raise
            return read()

    def has_exited(self) -> bool:
        """The pidfd polls readable once the whole thread group has exited."""
        if self.pidfd < 0:
            return True
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def status(self) -> procfs.Status:
        status = procfs.read_status(self.pid)
        self.check_alive()
        return status

    # Reads by number, each followed by `check_alive()`: the values were this process's.

    def limits(self) -> dict[str, tuple[int, int]]:
        """/proc/PID/limits: (soft, hard) by the limit's name."""
        return self._checked(lambda: procfs.read_limits(self.pid))

    def fds(self) -> list[int]:
        """The open descriptor numbers, through the live thread in use."""
        return self._checked(lambda: procfs.list_fds(self.pid, self.via))

    def comm(self) -> str:
        """The name now (an exec changes it)."""
        return self._checked(lambda: procfs.read_comm(self.pid))

    def workload(self) -> Workload:
        """The container and pod its cgroup paths name (`NO_WORKLOAD` where /proc
        hides the file from us): read once, at registration, by the engine."""
        try:
            return self._checked(lambda: read_workload(self.pid))
        except procfs.AccessDenied:
            self.check_alive()
            return NO_WORKLOAD

    def ids(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(uids, gids) now: who owns it, as prlimit(2) judges."""
        return self._checked(lambda: procfs.read_ids(self.pid))

    def _checked(self, read: Callable[[], T]) -> T:
        value = read()
        self.check_alive()
        return value

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
