"""How counters are read: one reader, chosen with the backend at start.

`ProcReader` reads /proc through the pidfd-checked `Process`; every backend can
use it. `KernelReader` reads VmData (and the name) in the kernel, from one run
of a BPF program that checks the process's identity itself, and falls back to
/proc inside itself wherever the kernel cannot answer (the program did not
load, no pidfs inode, a zombie leader read through a live thread, a refused
run). The engine never knows which it has: a read is one call.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from tracker.engine.resources import HEAP_RESOURCE, Resource
from tracker.linux.process import Process, Usage

log = logging.getLogger("restrackfs.engine")


class ProcReader:
    """Every counter from /proc, through the entry's pidfd-checked process."""

    def usage(self, process: Process) -> Usage:
        """VmData, the name and the open descriptors now."""
        return process.usage()

    def read(self, process: Process, resource: Resource) -> int:
        """One resource's absolute value now, and nothing else read."""
        return resource.read(process)


class KernelCounters(Protocol):
    """A program run in the kernel for one process, named by pid and pidfd inode
    (`tracker.backends.bpf.counters.CounterReader`)."""

    def data_vm(self, pid: int, inode: int) -> int | None: ...

    def usage(self, pid: int, inode: int) -> tuple[int, str] | None: ...


class KernelReader(ProcReader):
    """VmData and the name from the kernel's own counters, the descriptors
    counted; /proc for whatever the kernel does not answer."""

    def __init__(self, kernel: KernelCounters) -> None:
        self.kernel: KernelCounters | None = kernel

    def stop(self) -> None:
        """The program is closed: /proc answers from now on."""
        self.kernel = None

    def usage(self, process: Process) -> Usage:
        read = self._in_kernel(process, "usage")
        if read is None:
            return process.usage()
        vm_data, comm = read
        _, open_fds = process.sample(heap=False, files=True)  # checks the pidfd
        return Usage(comm, vm_data, open_fds)

    def read(self, process: Process, resource: Resource) -> int:
        if resource is HEAP_RESOURCE:
            vm_data = self._in_kernel(process, "data_vm")
            if vm_data is not None:
                return vm_data
        return resource.read(process)

    def _in_kernel(self, process: Process, what: str) -> Any:
        """The kernel's `what` (`data_vm` or `usage`) for this very process (its
        pidfd's inode, checked in the kernel); None where /proc must answer."""
        kernel = self.kernel
        if kernel is None or process.inode is None or process.via is not None:
            return None
        try:
            return getattr(kernel, what)(process.pid, process.inode)
        except OSError as error:  # the kernel refused the run (ENOMEM...)
            log.debug("bpf: %s of pid=%d through /proc: %s", what, process.pid, error)
            return None
