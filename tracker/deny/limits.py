"""Deny mode: lowering, re-checking and restoring soft RLIMIT_DATA / RLIMIT_NOFILE.

Only soft limits are ever changed. prlimit(2) on another process needs
CAP_SYS_RESOURCE, or a *real* uid and gid equal to the target's. Where the
daemon lacks the capability (as on many hosts, and in containers), the call
is made by a short-lived helper, `setpriv --reuid UID --regid GID prlimit`,
that holds the target's ids. The daemon never takes a user's uid itself: a
thread of it with that real uid could be sent SIGKILL by that user, which
takes the whole daemon down.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable

from tracker.linux import procfs
from tracker.linux.procfs import RLIM_INFINITY, AccessDenied, NoSuchProcess
from tracker.vocabulary import LIMIT_MAX

DATA = resource.RLIMIT_DATA
NOFILE = resource.RLIMIT_NOFILE
PROC_LIMIT_NAMES = {DATA: "Max data size", NOFILE: "Max open files"}
_PRLIMIT_OPTIONS = {DATA: "--data", NOFILE: "--nofile"}


class NeedsHelper(Exception):
    """The daemon may not call prlimit() on this process: run `argv` to do it."""

    def __init__(self, argv: list[str], soft: int) -> None:
        super().__init__(" ".join(argv))
        self.argv = argv
        self.soft = soft  # what it will set


def set_soft_limit(
    pid: int, ids: tuple[tuple[int, ...], tuple[int, ...]], which: int, soft: int
) -> int:
    """Set the soft limit `which` of `pid` (never above its hard limit).

    `ids` are the process's (uids, gids) as read just before: who owns it now.
    Returns the soft limit to expect (`soft`, or the hard limit below it); the
    caller verifies in /proc/PID/limits that the kernel shows it. Raises
    `NeedsHelper` when only a helper with the process's ids may do it (the caller
    decides how to wait for it: the daemon never blocks its event loop on a
    process a user can SIGSTOP), and `AccessDenied` when nobody may: a process
    whose ids differ (a setuid program) is refused before any prlimit(), also
    where the daemon's CAP_SYS_RESOURCE would let the call through.
    """
    uids, gids = ids
    if len(set(uids)) != 1 or len(set(gids)) != 1:
        raise AccessDenied(pid)  # prlimit(2) without the capability needs uid == euid == suid
    # By number, as prlimit(2) itself goes (it takes no pidfd): the caller checked
    # the pidfd just before (Process.ids), and verifies the result through it after.
    _, hard = procfs.read_limits(pid)[PROC_LIMIT_NAMES[which]]
    if hard != RLIM_INFINITY and (soft == RLIM_INFINITY or soft > hard):
        soft = hard
    try:
        resource.prlimit(pid, which, (soft, hard))
    except ProcessLookupError:
        raise NoSuchProcess(pid) from None
    except PermissionError:
        value = "unlimited" if soft == RLIM_INFINITY else str(soft)
        argv = ["setpriv", f"--reuid={uids[0]}", f"--regid={gids[0]}", "--clear-groups", "--"]
        argv += ["prlimit", f"--pid={pid}", f"{_PRLIMIT_OPTIONS[which]}={value}:"]
        raise NeedsHelper(argv, soft) from None
    return soft


def clamp(limit: int) -> int:
    """A limit past what the kernel can hold is no limit at all."""
    return RLIM_INFINITY if limit > LIMIT_MAX else limit


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
