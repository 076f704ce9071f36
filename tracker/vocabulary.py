"""The words the daemon, the client and the `restrack` command share.

The stat file's fields, how "no limit" is written, the largest limit, the
syscall numbers of the kernel patch (and of `restrack run`), the names of the
resources and of the event counters. One definition each, so the two sides of
the mount cannot drift apart. This module imports the standard library only,
never anything of `tracker/` or `restrackfs/`: the client imports it and stays
light (`test_the_client_imports_no_engine`).
"""

from __future__ import annotations

# The stat words spelled by more than one side (the daemon shows them, the client
# parses them); the rest are `Measurement`'s attribute names as they are.
COMM, HEAP_QUOTA, FILE_QUOTA, ACTION, REGISTERED = (
    "comm", "heap_quota", "file_quota", "action", "registered",
)  # fmt: skip
OPENFILE_TOTAL = "openfile_total"

# What `PID/stat` holds, in order: "field value" lines.
STAT_FIELDS = (
    "pid",
    COMM,
    "heapsize",
    "openfile_count",
    HEAP_QUOTA,
    FILE_QUOTA,
    ACTION,
    "heap_total",
    OPENFILE_TOTAL,
    REGISTERED,
    "heap_peak",
    "openfile_peak",
)

# What `PID/stat` adds while a tree quota (scope=tree) is set, after STAT_FIELDS:
# the sums over the tree's members and how many they are (the root included).
TREE_HEAPSIZE, TREE_OPENFILE_COUNT, MEMBERS = TREE_STAT_FIELDS = (
    "tree_heapsize", "tree_openfile_count", "members",
)  # fmt: skip

# What `PID/fds` holds, in order: the open descriptors by kind, then their sum
# (the size of that one listing): "kind count" lines.
FD_FILE, FD_DIR, FD_SOCKET, FD_PIPE, FD_ANON, FD_OTHER = FD_KINDS = (
    "file",  # a regular file (memfd too)
    "dir",  # a directory
    "socket",
    "pipe",  # a pipe end, or a named FIFO
    "anon",  # anon_inode: eventfd, epoll, signalfd, timerfd, inotify, pidfd, ...
    "other",  # devices, namespaces, and the rest
)

# A limit not set is written "max" (as cgroup v2 writes it).
UNLIMITED = "max"
LIMIT_MAX = 2**63 - 1  # what fits the kernel's signed 64-bit sizes


def format_limit(limit: int | None) -> str:
    """A limit as the files write it: a number, or "max" for none."""
    return UNLIMITED if limit is None else str(limit)


def parse_limit(text: str) -> int | None:
    """The inverse of `format_limit` for values the daemon wrote (trusted, not user input)."""
    return None if text == UNLIMITED else int(text)


# The resources a quota limits: the quota's keys, the log's `quota=` word.
HEAP = "heap"
FILES = "files"

# Event counters in the manner of cgroup v2's memory.events: a quota crossed
# (from under to over), what was done about it, and a warning's share crossed.
EXCEEDED, KILLED, DENIED, NOTIFIED, WARNED = EVENTS = (
    "exceeded", "killed", "denied", "notified", "warned",
)  # fmt: skip
# The action word of a warning (the log's `action=`, the metrics' `action` label).
WARN = "warn"

# The kernel patch's syscalls (x86_64), answered by `restrack run` for unmodified binaries.
SYS_SANITY, SYS_REGISTER, SYS_FETCH, SYS_DEREGISTER, SYS_CAP, SYS_RESET = SYSCALLS = tuple(
    range(548, 554)
)
FIRST_SYSCALL, LAST_SYSCALL = SYSCALLS[0], SYSCALLS[-1]
