"""Deny mode: lowering, re-checking and restoring soft RLIMIT_DATA / RLIMIT_NOFILE.

Only soft limits are ever changed. The daemon's root lacks CAP_SYS_RESOURCE on
many machines, and prlimit(2) on another process without it is allowed only
when the caller's *real* uid and gid equal the target's. So the calling thread
borrows the target's real ids for the duration of one prlimit call (raw
setresuid/setresgid syscalls change one thread only; the effective uid stays 0,
so the thread keeps its capabilities and can switch back).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
from collections.abc import Iterable, Iterator

from tracker.procfs import RLIM_INFINITY, AccessDenied, NoSuchProcess

DATA = resource.RLIMIT_DATA
NOFILE = resource.RLIMIT_NOFILE
PROC_LIMIT_NAMES = {DATA: "Max data size", NOFILE: "Max open files"}

_SYS_SETRESUID = 117  # x86_64
_SYS_SETRESGID = 119
_libc = ctypes.CDLL(None, use_errno=True)


def _raw_setres(nr: int, real: int) -> None:
    if _libc.syscall(nr, ctypes.c_long(real), ctypes.c_long(-1), ctypes.c_long(-1)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def _real_ids_of(uid: int, gid: int) -> Iterator[None]:
    """Give this thread the target's real uid and gid, and take them back."""
    my_uid, my_gid = os.getuid(), os.getgid()
    if os.geteuid() != 0 or (uid, gid) == (my_uid, my_gid):
        yield
        return
    _raw_setres(_SYS_SETRESGID, gid)
    try:
        _raw_setres(_SYS_SETRESUID, uid)
        try:
            yield
        finally:
            _raw_setres(_SYS_SETRESUID, my_uid)
    finally:
        _raw_setres(_SYS_SETRESGID, my_gid)


def set_soft_limit(pid: int, uid: int, gid: int, which: int, soft: int) -> tuple[int, int]:
    """Set the soft limit `which` of `pid` (never above its hard limit).

    Returns the (soft, hard) pair the process had before.
    """
    try:
        with _real_ids_of(uid, gid):
            _, hard = resource.prlimit(pid, which)
            if hard != RLIM_INFINITY and (soft == RLIM_INFINITY or soft > hard):
                soft = hard
            return resource.prlimit(pid, which, (soft, hard))
    except ProcessLookupError:
        raise NoSuchProcess(pid) from None
    except PermissionError:
        raise AccessDenied(pid) from None


def lower(limit: int, cap: int) -> int:
    """The smaller of two soft limits, -1 being unlimited."""
    if limit == RLIM_INFINITY:
        return cap
    if cap == RLIM_INFINITY:
        return limit
    return min(limit, cap)


def nofile_soft_limit(open_fds: Iterable[int], allowance: int) -> int:
    """The soft RLIMIT_NOFILE that lets exactly `allowance` more opens succeed now.

    A new descriptor takes the lowest free number and fails when that number
    is >= the soft limit; so the limit goes just above the allowance-th free
    number. Closing a descriptor below it makes room again: the periodic check
    recomputes. O(open fds), whatever the allowance.
    """
    limit = max(allowance, 0)  # the (allowance+1)-th free number, were no fd open
    for fd in sorted(set(open_fds)):
        if fd <= limit:
            limit += 1  # each open fd at or below it pushes it one number up
    return limit
