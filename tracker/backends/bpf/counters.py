"""User space of counters.bpf.c: a tracked process's VmData (and name) read in the
kernel.

A read of `PID/heapsize` is the hot path of the mount (scripts poll it in
loops). Through /proc it costs an open, the kernel formatting all of
/proc/PID/status (~7 µs here), a read, a close and a parse; `data_vm()` costs
one bpf(BPF_PROG_TEST_RUN) of a program attached to nothing, which reads the
same counter (`mm->data_vm`) of the same task, identified by its pidfd's
inode. The run is made from C (`_counters.c`, a CPython extension): through
ctypes, a call after an idle spell cost ~3 times as much. Nothing is cached:
every call reads the kernel's value of that moment.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from tracker.backends.bpf.loader import BpfUnavailable, check_prerequisites, library, load_object

try:
    from tracker.backends.bpf import _counters  # built by scripts/setup (setup.py)
except ImportError as error:  # an install that did not compile it: /proc reads heapsize
    _counters = None
    _NOT_BUILT = f"tracker.backends.bpf._counters not built ({error}): run scripts/setup"

OBJECT = Path(__file__).with_name("counters.bpf.o")
PROGRAM = b"data_vm"
PAGE = os.sysconf("SC_PAGE_SIZE")


class CounterReader:
    """counters.bpf.o loaded; `data_vm()` runs its program for one process."""

    def __init__(self, lib: ctypes.CDLL, obj: int) -> None:
        self._lib = lib
        self._obj = obj
        program = lib.bpf_object__find_program_by_name(obj, PROGRAM)
        self._fd = lib.bpf_program__fd(program)

    @classmethod
    def open(cls) -> CounterReader:
        """Load the object; `BpfUnavailable` says in one line why it cannot be."""
        if _counters is None:
            raise BpfUnavailable(_NOT_BUILT)
        check_prerequisites(OBJECT, mounts=False)
        lib = library()
        reader = cls(lib, load_object(lib, OBJECT))
        reader._check_runs()
        return reader

    def _check_runs(self) -> None:
        """A kernel may load the program and still refuse to run it, or number
        pidfds otherwise: find out now, on the daemon's own process."""
        try:
            pidfd = os.pidfd_open(os.getpid())
            try:
                inode = os.fstat(pidfd).st_ino
            finally:
                os.close(pidfd)
            if self.data_vm(os.getpid(), inode) is None:
                raise BpfUnavailable("data_vm does not find the daemon's own process by its pidfd")
        except OSError as error:
            self.close()
            raise BpfUnavailable(f"test run: {error.strerror}") from None
        except BpfUnavailable:
            self.close()
            raise

    def data_vm(self, pid: int, inode: int) -> int | None:
        """VmData in bytes of the process numbered `pid` whose pidfd's st_ino is
        `inode` (pidfs: one number per process since boot); None when the kernel
        has no such task or it has no address space: then /proc decides (reaped,
        a zombie leader whose threads go on, ...); OSError when the kernel refuses
        the run."""
        pages = _counters.data_vm_pages(self._fd, pid, inode)
        return None if pages is None else pages * PAGE

    def usage(self, pid: int, inode: int) -> tuple[int, str] | None:
        """(VmData in bytes, name) of that process, from one run; None and OSError
        as for `data_vm`. The name is the task's comm as the kernel holds it: what
        status's Name shows, unescaped."""
        read = _counters.usage(self._fd, pid, inode)
        if read is None:
            return None
        pages, comm = read
        return pages * PAGE, comm.decode(errors="replace")

    def close(self) -> None:
        if self._obj:
            self._lib.bpf_object__close(self._obj)
            self._obj = 0
