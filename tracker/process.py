"""A process held by its identity (a pidfd), so a recycled PID is never it."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

from tracker import procfs
from tracker.procfs import NoSuchProcess


@dataclass(frozen=True, slots=True)
class Usage:
    """What the process holds right now, read from the kernel's counters."""

    comm: str
    vm_data: int  # bytes
    open_fds: int


class Process:
    """One thread group, pinned by a pidfd.

    /proc is addressed by number, so every read is followed by `check_alive()`:
    if the pidfd still refers to a living (or zombie, not yet reaped) process,
    its PID cannot have been reused while we read, and the values were its own.
    """

    __slots__ = ("pid", "start_time", "pidfd")

    def __init__(self, pid: int, start_time: int, pidfd: int) -> None:
        self.pid = pid
        self.start_time = start_time
        self.pidfd = pidfd

    @classmethod
    def open(cls, pid: int, start_time: int | None = None) -> Process:
        """Pin thread group `pid`; with `start_time`, only if it is that process."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise NoSuchProcess(pid) from None
        try:
            stat = procfs.read_stat(pid)  # after pidfd_open: the stat is the pinned one's
            if stat.state in "ZX" or (start_time is not None and stat.start_time != start_time):
                raise NoSuchProcess(pid)
        except BaseException:
            os.close(pidfd)
            raise
        return cls(pid, stat.start_time, pidfd)

    def close(self) -> None:
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
        status = procfs.read_status(self.pid)
        open_fds = procfs.count_fds(self.pid)
        self.check_alive()
        return Usage(status.name, procfs.vm_data_of(status), open_fds)

    def sample(self, *, heap: bool, files: bool) -> tuple[int, int]:
        """(VmData, open fds) reading only what is asked for (0 for the rest)."""
        vm_data = procfs.read_vm_data(self.pid) if heap else 0
        open_fds = procfs.count_fds(self.pid) if files else 0
        self.check_alive()
        return vm_data, open_fds

    def status(self) -> procfs.Status:
        status = procfs.read_status(self.pid)
        self.check_alive()
        return status

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
