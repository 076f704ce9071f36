"""User space of counters.bpf.c: a tracked process's VmData read in the kernel.

A read of `PID/heapsize` is the hot path of the mount (scripts poll it in
loops). Through /proc it costs an open, the kernel formatting all of
/proc/PID/status (~7 µs here), a read, a close and a parse; `data_vm()` costs
one bpf(BPF_PROG_TEST_RUN) of a program attached to nothing, which reads the
same counter (`mm->data_vm`) of the same task, identified by its pidfd's
inode. Nothing is cached: every call reads the kernel's value of that moment.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

from tracker.bpf import libbpf
from tracker.bpf.loader import BpfUnavailable, check_prerequisites, library, load_object

OBJECT = Path(__file__).with_name("counters.bpf.o")
PROGRAM = b"data_vm"
PAGE = os.sysconf("SC_PAGE_SIZE")
_QUERY = struct.Struct("<iIQQ")  # struct query: pid, pad, ino, data_vm_pages


def _test_run() -> ctypes._CFuncPtr:
    """bpf_prog_test_run_opts, called with the GIL held and no argument conversion.

    The call never blocks (the program takes no lock that sleeps), so releasing
    and taking back the GIL around it, as ctypes.CDLL does, would only add to
    its cost: 1.4 µs a call here instead of 1.8 (the kernel's part is 1.1)."""
    function = ctypes.PyDLL("libbpf.so.1").bpf_prog_test_run_opts
    function.restype = ctypes.c_int
    return function


class CounterReader:
    """counters.bpf.o loaded; `data_vm()` runs its program for one process."""

    def __init__(self, lib: ctypes.CDLL, obj: int) -> None:
        self._lib = lib
        self._obj = obj
        program = lib.bpf_object__find_program_by_name(obj, PROGRAM)
        self._fd = lib.bpf_program__fd(program)
        self._query = ctypes.create_string_buffer(_QUERY.size)
        # The kernel copies the query in and writes it back over ctx_in (a syscall
        # program's test run takes no ctx_out): one buffer, one options struct.
        self._opts = libbpf.TestRunOpts(
            sz=ctypes.sizeof(libbpf.TestRunOpts),
            ctx_in=ctypes.addressof(self._query),
            ctx_size_in=_QUERY.size,
        )
        self._opts_ref = ctypes.byref(self._opts)
        self._fd_arg = ctypes.c_int(self._fd)
        self._run = _test_run()

    @classmethod
    def open(cls) -> CounterReader:
        """Load the object; `BpfUnavailable` says in one line why it cannot be."""
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
        a zombie leader whose threads go on, ...). Event loop only: one buffer."""
        _QUERY.pack_into(self._query, 0, pid, 0, inode, 0)
        error = self._run(self._fd_arg, self._opts_ref)
        if error:  # libbpf returns -errno
            raise OSError(-error, os.strerror(-error))
        if self._opts.retval:
            return None  # -ESRCH or -ENODATA
        return _QUERY.unpack_from(self._query)[3] * PAGE

    def close(self) -> None:
        if self._obj:
            self._lib.bpf_object__close(self._obj)
            self._obj = 0
