"""User space of the BPF engine: load restrack.bpf.o, attach it, fill `watched`,
read `events`. Everything enforcing happens in the kernel; this only steers it.

Maps and links are pinned under one bpffs directory per mount, so quotas keep
being enforced while no daemon runs; `KernelWatch.open()` on a directory left
by a killed daemon adopts them. See README.md next to this file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import stat
import struct
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from tracker.backends.bpf import libbpf
from tracker.linux import procfs

OBJECT = Path(__file__).with_name("restrack.bpf.o")
BPFFS = Path("/sys/fs/bpf")
TRACEFS = Path("/sys/kernel/tracing")
NONE = (1 << 64) - 1  # restrack_shared.h's NONE: no limit
MAPS = ("watched", "events", "raises", "by_mm", "by_files", "stats", "inherit", "trees")
WATCHED_MAX = 65536  # restrack_shared.h's: max_entries of `watched`

# Syscalls whose exit is checked. Heap: every call that can grow mm->data_vm,
# plus munmap and execve so a notify crossing re-arms when usage falls back.
HEAP_EXIT = ("mmap", "brk", "mremap", "mprotect", "pkey_mprotect", "munmap", "execve", "execveat")
# Files: every call that can add a descriptor (clone: CLONE_PIDFD; ioctl: KVM,
# pidfd and namespace ioctls; io_uring_enter: IORING_OP_OPENAT/ACCEPT/SOCKET),
# plus close, close_range and execve (close-on-exec) to re-arm notify.
FILES_EXIT = (
    "open", "openat", "openat2", "creat", "open_by_handle_at", "dup", "dup2", "dup3",
    "fcntl", "socket", "socketpair", "accept", "accept4", "recvmsg", "recvmmsg", "pipe",
    "pipe2", "eventfd", "eventfd2", "epoll_create", "epoll_create1", "signalfd", "signalfd4",
    "timerfd_create", "inotify_init", "inotify_init1", "fanotify_init", "memfd_create",
    "memfd_secret", "pidfd_open", "pidfd_getfd", "userfaultfd", "perf_event_open", "bpf",
    "io_uring_setup", "io_uring_enter", "mq_open", "fsopen", "fsmount", "fspick", "open_tree",
    "open_tree_attr", "landlock_create_ruleset", "seccomp", "ioctl", "clone", "clone3",
    "close", "close_range", "execve", "execveat",
)  # fmt: skip
# Absent on some kernels (open_tree_attr: 6.15; memfd_secret: a config option).
OPTIONAL = frozenset({"sys_exit_open_tree_attr", "sys_exit_memfd_secret"})
# Descriptors made by io_uring work that completes outside the submitting call
# (io-wq workers, the SQPOLL thread: threads of the submitter's group).
IO_URING = ("io_uring/io_uring_complete",)  # uring_files
# Program -> the tracepoints it is attached to ("category/name"; bare: syscalls/).
HOOKS: dict[str, tuple[str, ...]] = {
    "heap_exit": tuple(f"sys_exit_{name}" for name in HEAP_EXIT),
    "files_exit": tuple(f"sys_exit_{name}" for name in FILES_EXIT),
    "uring_files": IO_URING,
    "mmap_enter": ("sys_enter_mmap",),
    "brk_enter": ("sys_enter_brk",),
    "mremap_enter": ("sys_enter_mremap",),
    "mprotect_enter": ("sys_enter_mprotect", "sys_enter_pkey_mprotect"),
    "setrlimit_enter": ("sys_enter_setrlimit",),
    "prlimit_enter": ("sys_enter_prlimit64",),
    "rlimit_exit": ("sys_exit_setrlimit", "sys_exit_prlimit64"),
}
EXIT_PROGRAM = "group_exit"  # tp_btf/sched_process_exit, attached by its section
COMPAT_PROGRAM = "compat_exit"  # tp_btf/sys_exit: ia32 calls, which syscalls/ misses
EXEC_PROGRAM = "group_exec"  # tp_btf/sched_process_exec: the new address space indexed
FORK_PROGRAM = "group_fork"  # tp_btf/sched_process_fork: children watched at birth
SECTION_PROGRAMS = (EXIT_PROGRAM, COMPAT_PROGRAM, EXEC_PROGRAM, FORK_PROGRAM)
BIND_PROGRAM = "bind_process"  # SEC("syscall"): index a watched process's mm and files
TAKE_PROGRAM = "take_counts"  # SEC("syscall"): an entry's counts, taken once
PEAKS_PROGRAM = "set_peaks"  # SEC("syscall"): restart an entry's watermarks
NAMESPACE_PROGRAM = "learn_namespace"  # SEC("syscall"): run once after each load
SET_TREE_PROGRAM = "set_tree"  # SEC("syscall"): make or update a tree, its root a member
TAKE_TREE_PROGRAM = "take_tree"  # SEC("syscall"): a tree's counts, taken once
DROP_MEMBER_PROGRAM = "drop_member"  # SEC("syscall"): a member with its own quota leaves
REWATCH_PROGRAM = "rewatch"  # SEC("syscall"): a member's settings rewritten, its tree kept

# The structs of restrack_shared.h, field by field in its order (struct codes;
# "2Q" is a __u64[2]): tests/unit/test_bpf_layouts.py compares each with the object's BTF,
# and this list with the header's, so the two sides cannot drift apart in silence.
LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "watch": (
        ("start_time", "Q"), ("heap_limit_pages", "Q"), ("fd_limit", "Q"),
        ("heap_peak_pages", "Q"), ("fd_peak", "Q"), ("data_soft", "Q"), ("nofile_soft", "Q"),
        ("action", "I"), ("flags", "I"), ("mm", "Q"), ("files", "Q"), ("host_tgid", "I"),
        ("pending", "I"), ("crossings", "2Q"), ("usage_at", "2Q"), ("denied", "2Q"),
        ("raised", "Q"), ("kills", "Q"), ("kill_failed", "Q"), ("heap_base_pages", "Q"),
        ("execs", "Q"), ("fd_last", "Q"), ("shrunk", "Q"), ("seen_heap_pages", "Q"),
        ("seen_fds", "Q"), ("tree", "I"), ("pad", "I"), ("heap_warn_pages", "Q"),
        ("fd_warn", "Q"), ("warnings", "2Q"), ("warned_at", "2Q"),
    ),
    "tree": (
        ("start_time", "Q"), ("heap_limit_pages", "Q"), ("fd_limit", "Q"),
        ("heap_base_pages", "Q"), ("fd_base", "Q"), ("heap_pages", "Q"), ("fds", "Q"),
        ("members", "I"), ("action", "I"), ("flags", "I"), ("pending", "I"), ("killer", "I"),
        ("lost", "I"), ("crossings", "2Q"), ("usage_at", "2Q"), ("kills", "Q"),
        ("heap_warn_pages", "Q"), ("fd_warn", "Q"), ("warnings", "2Q"), ("warned_at", "2Q"),
    ),
    "tree_end_event": (
        ("head", "4I3Q"), ("crossings", "2Q"), ("usage_at", "2Q"), ("kills", "Q"),
        ("killer", "I"), ("lost", "I"), ("warnings", "2Q"), ("warned_at", "2Q"),
    ),
    "tree_args": (
        ("key", "I"), ("action", "I"), ("start_time", "Q"), ("heap_limit_pages", "Q"),
        ("fd_limit", "Q"), ("heap_base_pages", "Q"), ("fd_base", "Q"),
        ("heap_warn_pages", "Q"), ("fd_warn", "Q"),
    ),
    "tree_take": (
        ("key", "I"), ("found", "I"), ("crossings", "2Q"), ("usage_at", "2Q"), ("kills", "Q"),
        ("warnings", "2Q"), ("warned_at", "2Q"),
    ),
    "take": (
        ("key", "I"), ("found", "I"), ("crossings", "2Q"), ("usage_at", "2Q"),
        ("denied", "2Q"), ("raised", "Q"), ("kills", "Q"), ("kill_failed", "Q"),
        ("execs", "Q"), ("heap_base_pages", "Q"), ("shrunk", "Q"), ("warnings", "2Q"),
        ("warned_at", "2Q"),
    ),
    "peaks_args": (("key", "I"), ("found", "I"), ("heap_pages", "Q"), ("fds", "Q")),
    "inherit": (
        ("start_time", "Q"), ("heap_quota_pages", "Q"), ("fd_quota", "Q"), ("action", "I"),
        ("pad", "I"),
    ),
    "event": (
        ("tgid", "I"), ("kind", "I"), ("which", "I"), ("member", "I"), ("usage", "Q"),
        ("limit", "Q"), ("time_ns", "Q"),
    ),
    "exit_event": (
        ("head", "4I3Q"), ("crossings", "2Q"), ("denied", "2Q"), ("raised", "Q"),
        ("kills", "Q"), ("kill_failed", "Q"), ("usage_at", "2Q"), ("execs", "Q"),
        ("heap_base_pages", "Q"), ("warnings", "2Q"), ("warned_at", "2Q"),
    ),
    "bind_args": (("key", "I"),),
    "stats": (("dropped", "Q"),),
}  # fmt: skip
# struct rewatch holds a struct watch whole: one field of all its codes.
LAYOUTS["rewatch"] = (
    ("key", "I"), ("found", "I"), ("w", "".join(code for _, code in LAYOUTS["watch"])),
)  # fmt: skip


Fields = dict[str, "int | tuple[int, ...]"]


@functools.cache
def layout(name: str) -> struct.Struct:
    return struct.Struct("<" + "".join(code for _, code in LAYOUTS[name]))


@functools.cache
def _counts(name: str) -> tuple[int, ...]:
    """How many values each field of struct `name` packs (2 for a __u64[2])."""
    return tuple(len(struct.unpack("<" + code, bytes(struct.calcsize("<" + code))))
                 for _, code in LAYOUTS[name])  # fmt: skip


def unpack(name: str, raw: bytes) -> Fields:
    """The struct `name` in `raw`, by field: an int, or a tuple for an array (or
    a nested struct)."""
    values = iter(layout(name).unpack_from(raw))
    fields: Fields = {}
    for (field, _), count in zip(LAYOUTS[name], _counts(name), strict=True):
        items = tuple(next(values) for _ in range(count))
        fields[field] = items[0] if count == 1 else items
    return fields


def pack(name: str, **fields: int | tuple[int, ...]) -> bytes:
    """The struct `name` with these fields set, every other one 0."""
    values: list[int] = []
    for (field, _), count in zip(LAYOUTS[name], _counts(name), strict=True):
        value = fields.pop(field, 0)
        values += list(value) if isinstance(value, tuple) else [value] * count
    assert not fields, f"struct {name} has no {sorted(fields)}"
    return layout(name).pack(*values)


_WATCH = layout("watch")
_EVENT = layout("event")
_KEY = struct.Struct("<I")  # a key of watched, inherit, the stats array
_CAP_SYS_ADMIN, _CAP_PERFMON, _CAP_BPF = 21, 38, 39


class BpfUnavailable(Exception):
    """The BPF engine cannot run here; str() is one line saying why."""


# The enums of restrack_shared.h (tests/unit/test_bpf_layouts.py compares them).


class KernelAction(IntEnum):
    KILL = 0
    DENY = 1
    NOTIFY = 2


class Kind(IntEnum):
    EXCEEDED = 1  # deny: usage passed the limit anyway (counted once per crossing)
    KILLED = 2
    NOTIFIED = 3
    RAISED = 4  # deny: the process raised its soft limit above the one set
    EXITED = 5  # the thread group is gone; its entry was removed in the kernel
    KILL_FAILED = 6  # bpf_send_signal refused (an exiting task): user space kills
    DENIED = 7  # deny: the kernel refused a call for the limit (ENOMEM, EMFILE)
    EXEC = 8  # an exec lowered the heap baseline (take_counts says to what)
    SHRUNK = 9  # deny: the table got smaller; the soft RLIMIT_NOFILE is set anew
    FORKED = 10  # a child watched at birth (an inherit rule): usage, limit = its baseline
    # Tree events: tgid is the root's key; `member` the member whose call crossed.
    TREE_KILLED = 11  # a member crossed a kill limit, killed in its call: kill the rest
    TREE_NOTIFIED = 12  # the sum crossed a notify limit (counted in take_tree)
    TREE_ENDED = 13  # the last member exited: the kernel deleted the tree (final: TreeTaken)
    WARNED = 14  # usage crossed a warn threshold (warn=N%; counted in take_counts)
    TREE_WARNED = 15  # a tree's sum crossed its warn threshold (counted in take_tree)


class Which(IntEnum):
    NONE = 0
    HEAP = 1
    FILES = 2


FLAG_HEAP_OVER, FLAG_FILES_OVER, FLAG_KILLED, FLAG_KILL_FAILED, FLAG_LOST = 1, 2, 4, 8, 16
FLAG_HEAP_WARNED, FLAG_FILES_WARNED = 32, 64  # usage over the warn threshold (warn=N%)


@dataclass(frozen=True, slots=True)
class Taken:
    """What the kernel counted for one entry since the last take (take_counts).

    An event only says "this entry changed"; the counts are here, taken once,
    so a flood of crossings is one event and a full ring loses none of them."""

    crossings: tuple[int, int]  # heap, files: crossings over a notify or deny limit
    usage_at: tuple[int, int]  # heap pages, descriptors at the last crossing or kill
    denied: tuple[int, int]  # heap, files, deny: calls the kernel refused
    raised: int  # deny: soft limits seen raised
    killed: bool
    kill_failed: bool
    execs: int = 0  # execs that lowered the heap baseline, now heap_base_pages
    heap_base_pages: int = 0
    shrunk: int = 0  # deny: checks that found the descriptor table smaller than before
    warnings: tuple[int, int] = (0, 0)  # heap, files: upward crossings of a warn threshold
    warned_at: tuple[int, int] = (0, 0)  # heap pages, descriptors at the last one

    @property
    def empty(self) -> bool:
        nothing = not (self.raised or self.killed or self.kill_failed or self.execs)
        nothing = nothing and not self.shrunk and not any(self.warnings)
        return nothing and not any(self.crossings) and not any(self.denied)


@dataclass(frozen=True, slots=True)
class Event:
    tgid: int
    kind: Kind
    which: Which
    usage: int  # heap: data_vm pages; files: descriptors; raised: the new soft limit
    limit: int
    time_ns: int  # CLOCK_MONOTONIC (time.monotonic_ns()) when the kernel saw it
    final: Taken | TreeTaken | None = None  # EXITED, TREE_ENDED: what was left uncollected
    member: int = 0  # tree events: the member whose call crossed


@dataclass(frozen=True, slots=True)
class WatchState:
    """One `watched` entry; limits and soft limits are None for "none"."""

    start_time: int
    heap_limit_pages: int | None
    fd_limit: int | None
    heap_peak_pages: int
    fd_peak: int
    data_soft: int | None
    nofile_soft: int | None
    action: KernelAction
    flags: int
    mm: int = 0  # the kernel's: the address of its mm_struct and files_struct (bind)
    files: int = 0
    host_tgid: int = 0
    heap_base_pages: int = 0  # data_vm at the baseline (an exec may lower it)
    tree: int = 0  # the kernel's: the key of the root of the tree it is a member of
    # warn=N%: absolute thresholds (usage over them is warned of), None for none
    heap_warn_pages: int | None = None
    fd_warn: int | None = None

    @classmethod
    def unpack(cls, raw: bytes) -> WatchState:
        f = unpack("watch", raw)
        return cls(
            f["start_time"], _opt(f["heap_limit_pages"]), _opt(f["fd_limit"]),
            f["heap_peak_pages"], f["fd_peak"], _opt(f["data_soft"]), _opt(f["nofile_soft"]),
            KernelAction(f["action"]), f["flags"], f["mm"], f["files"], f["host_tgid"],
            f["heap_base_pages"], f["tree"], _opt(f["heap_warn_pages"]), _opt(f["fd_warn"]),
        )  # fmt: skip

    def pack(self) -> bytes:
        """The entry as written by user space: the counts (taken by take_counts)
        and `pending` start at 0."""
        return pack(
            "watch", start_time=self.start_time, heap_limit_pages=_raw(self.heap_limit_pages),
            fd_limit=_raw(self.fd_limit), heap_peak_pages=self.heap_peak_pages,
            fd_peak=self.fd_peak, data_soft=_raw(self.data_soft),
            nofile_soft=_raw(self.nofile_soft), action=int(self.action), flags=self.flags,
            mm=self.mm, files=self.files, host_tgid=self.host_tgid,
            heap_base_pages=self.heap_base_pages, heap_warn_pages=_raw(self.heap_warn_pages),
            fd_warn=_raw(self.fd_warn),
        )  # fmt: skip

    @property
    def killed(self) -> bool:
        return bool(self.flags & FLAG_KILLED)

    @property
    def setting(self) -> tuple[object, ...]:
        """What user space decides (peaks, flags, counts and the bind aside): two
        states with the same setting enforce the same quota on the same process."""
        return (
            self.start_time, self.heap_limit_pages, self.fd_limit, self.action,
            self.data_soft, self.nofile_soft, self.heap_warn_pages, self.fd_warn,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class TreeTaken:
    """What the kernel counted for one tree since the last take (take_tree)."""

    crossings: tuple[int, int]  # heap, files: notify crossings of the sums
    usage_at: tuple[int, int]  # the sums (heap pages, descriptors) at the last crossing or kill
    killed: bool
    warnings: tuple[int, int] = (0, 0)  # heap, files: crossings of the warn thresholds
    warned_at: tuple[int, int] = (0, 0)  # the sums at the last of them


@dataclass(frozen=True, slots=True)
class TreeState:
    """One `trees` entry: a quota on the sum over a root and its descendants.

    Limits are absolute (base + quota), None for none; the sums are over the
    live members' usage as last seen (at fork, at each checked call), so tree
    usage is `heap_pages - heap_base_pages` (floored at 0), the same for fds."""

    start_time: int  # the root's
    heap_limit_pages: int | None
    fd_limit: int | None
    heap_base_pages: int
    fd_base: int
    heap_pages: int
    fds: int
    members: int
    action: KernelAction
    flags: int  # FLAG_HEAP_OVER, FLAG_FILES_OVER, FLAG_KILLED; FLAG_LOST: a child not added
    killer: int  # the member killed in its crossing call (0: none yet)
    lost: int  # children that could not be made members (`watched` full)

    @classmethod
    def unpack(cls, raw: bytes) -> TreeState:
        f = unpack("tree", raw)
        return cls(
            f["start_time"], _opt(f["heap_limit_pages"]), _opt(f["fd_limit"]),
            f["heap_base_pages"], f["fd_base"], f["heap_pages"], f["fds"], f["members"],
            KernelAction(f["action"]), f["flags"], f["killer"], f["lost"],
        )  # fmt: skip

    @property
    def killed(self) -> bool:
        return bool(self.flags & FLAG_KILLED)

    @property
    def usage(self) -> tuple[int, int]:
        """Heap pages and descriptors over the root's baseline, floored at 0."""
        return max(self.heap_pages - self.heap_base_pages, 0), max(self.fds - self.fd_base, 0)


def _taken(f: Fields, **rest: int) -> Taken:
    """Taken from the fields take_counts or an exit event hand over."""
    return Taken(
        f["crossings"], f["usage_at"], f["denied"], f["raised"], f["kills"] > 0,
        f["kill_failed"] > 0, warnings=f["warnings"], warned_at=f["warned_at"], **rest,
    )  # type: ignore[arg-type]  # fmt: skip


def _opt(value: int) -> int | None:
    return None if value == NONE else value


def _raw(value: int | None) -> int:
    return NONE if value is None else value


def _running(tgid: int, start_time: int) -> bool:
    """Thread group `tgid` is the one started at `start_time` and has a live thread
    (its exit, which removes the entry in the kernel, has not run yet). A zombie
    leader with live threads is running; a wholly dead, unreaped group is not."""
    try:
        if procfs.read_start_time(tgid) != start_time:
            return False
        for tid in procfs.list_tids(tgid):
            if procfs.read_stat(tgid, tid).state not in ("Z", "X"):
                return True
    except procfs.NoSuchProcess:
        pass
    return False


class KernelWatch:
    """The loaded object and its pinned maps: the `watched` entries written and
    read, the SEC("syscall") programs run on them, the ring read (`Ring`), the
    programs attached while needed (`Links`)."""

    def __init__(self, lib: ctypes.CDLL, obj: int, pin_dir: Path) -> None:
        self._lib = lib
        self._obj = obj
        self.pin_dir = pin_dir
        self._maps = {name: lib.bpf_object__find_map_by_name(obj, name.encode()) for name in MAPS}
        self._watched = lib.bpf_map__fd(self._maps["watched"])
        self._trees = lib.bpf_map__fd(self._maps["trees"])
        self._learn_namespace()
        self.links = Links(lib, obj, pin_dir / "links")
        self.ring = Ring(lib, lib.bpf_map__fd(self._maps["events"]))

    def _learn_namespace(self) -> None:
        """Tell the programs which PID namespace the daemon's pids are in: map keys
        are those pids, and the kernel must find the same numbers from a task."""
        prog = self._lib.bpf_object__find_program_by_name(self._obj, NAMESPACE_PROGRAM.encode())
        try:
            result = libbpf.run_syscall_program(self._lib, self._lib.bpf_program__fd(prog))
        except OSError as error:
            result, why = -1, error.strerror
        else:
            why = "no struct pid numbers for this task"
        if result != 0:
            self._lib.bpf_object__close(self._obj)
            raise BpfUnavailable(f"cannot learn the daemon's PID namespace: {why}")

    # --- life cycle -------------------------------------------------------------

    @classmethod
    def open(cls, pin_dir: Path) -> KernelWatch:
        """Load the object, reusing the maps (and links) pinned in `pin_dir` if any."""
        check_prerequisites()
        _hook_list()  # every tracepoint there, or no engine
        lib = library()
        created = not os.path.lexists(pin_dir)
        make_private_dirs(pin_dir)
        check_pins(pin_dir)
        try:
            obj = _load(lib, pin_dir)
        except BpfUnavailable:
            if created:
                remove_tree(pin_dir)
            raise
        watch = cls(lib, obj, pin_dir)
        watch.links.adopt()
        return watch

    def close(self, unpin: bool) -> None:
        """Stop: with `unpin`, detach and remove every pin (enforcement ends); without,
        leave maps and links pinned so the kernel keeps enforcing for a successor."""
        if not self._obj:
            return  # closed already
        if unpin:
            self.links.detach()
            for bpf_map in self._maps.values():
                self._lib.bpf_map__unpin(bpf_map, None)
            remove_tree(self.pin_dir)
        else:
            self.links.release()
        self.ring.free()
        self._lib.bpf_object__close(self._obj)
        self._obj = 0

    # --- attachment and events: Links and Ring, as the backend and tests call them ---

    @property
    def attached(self) -> bool:
        return self.links.attached

    def attach(self) -> None:
        self.links.attach()

    def detach(self) -> None:
        self.links.detach()

    def ring_fd(self) -> int:
        return self.ring.fd()

    def drain(self) -> list[Event]:
        return self.ring.drain()

    # --- the watched map -------------------------------------------------------

    def watch(
        self,
        tgid: int,
        start_time: int,
        heap_limit_pages: int | None,
        fd_limit: int | None,
        action: str,
        *,
        data_soft: int | None = None,
        nofile_soft: int | None = None,
        heap_peak_pages: int = 0,
        fd_peak: int = 0,
        heap_base_pages: int = 0,
    ) -> None:
        """Watch thread group `tgid` with these limits (`watch_state`, spelled out)."""
        state = WatchState(
            start_time, heap_limit_pages, fd_limit, heap_peak_pages, fd_peak,
            data_soft, nofile_soft, KernelAction[action.upper()], 0,
            heap_base_pages=heap_base_pages,
        )  # fmt: skip
        self.watch_state(tgid, state)

    def watch_state(self, tgid: int, state: WatchState) -> None:
        """Watch thread group `tgid` as `state` says (replacing its entry).

        Limits are absolute data_vm pages and descriptors (baseline + quota);
        usage is over a limit when it exceeds it. Raises ProcessLookupError, leaving no entry,
        if `tgid` is no longer the process that started at `state.start_time`: an
        entry inserted after its exit would otherwise never be removed."""
        if not self._rewatch(tgid, state):
            self._update(tgid, state, libbpf.BPF_ANY)
        if not _running(tgid, state.start_time) or not self._bind(tgid):
            self.unwatch(tgid)
            raise ProcessLookupError(tgid, f"process {tgid} (start {state.start_time}) is gone")

    def _rewatch(self, tgid: int, state: WatchState) -> bool:
        """Rewrite a tree member's entry in the kernel, its membership and share of
        the sums kept (a write of the whole entry would lose them); False when
        `tgid` is no tree member started at `state.start_time`."""
        args = pack("rewatch", key=tgid, w=_WATCH.unpack(state.pack()))
        return bool(unpack("rewatch", self._run(REWATCH_PROGRAM, args))["found"])

    def _bind(self, tgid: int) -> bool:
        """Index the process's address space and descriptor table in the kernel (for
        whoever shares them); False when `tgid` is no longer the process watched."""
        try:
            self._run(BIND_PROGRAM, pack("bind_args", key=tgid))
        except OSError as error:
            return error.errno != errno.ESRCH
        return True

    def inherit(
        self, tgid: int, start_time: int, heap_quota_pages: int | None, fd_quota: int | None,
        action: str,
    ) -> None:  # fmt: skip
        """Watch every child that `tgid` forks from then on (at any depth) from its
        first instruction, with these quotas over its usage at fork."""
        rule = pack(
            "inherit", start_time=start_time, heap_quota_pages=_raw(heap_quota_pages),
            fd_quota=_raw(fd_quota), action=int(KernelAction[action.upper()]),
        )  # fmt: skip
        fd = self._lib.bpf_map__fd(self._maps["inherit"])
        error = self._lib.bpf_map_update_elem(fd, _KEY.pack(tgid), rule, libbpf.BPF_ANY)
        if error:
            errno_ = libbpf.errno_of(error)
            raise OSError(errno_, f"inherit[{tgid}]: {os.strerror(errno_)}")

    # --- trees (scope=tree) ----------------------------------------------------

    def watch_tree(
        self, root_tgid: int, start_time: int, heap_limit_pages: int | None,
        fd_limit: int | None, action: str, heap_base_pages: int, fd_base: int,
        heap_warn_pages: int | None = None, fd_warn: int | None = None,
    ) -> None:  # fmt: skip
        """One quota on the sum over `root_tgid` and every process forked from a
        member from now on (the kernel adds each child at fork, before it runs).

        Limits are absolute (base + quota; over: sum > limit); the bases are the
        root's usage at its baseline. On a tree already set, only its settings
        change (a usage reset re-takes the bases): sums and members stay. The root
        gets a `watched` entry (no limit of its own) unless it has one. Raises
        ValueError for deny (a sum cannot be held by per-process rlimits),
        ProcessLookupError if the root is gone or not the one started at
        `start_time`, OSError EBUSY if it is a member of another tree (or its pid
        names a tree of an earlier process that still has members), ENOSPC when a
        map is full."""
        kernel_action = KernelAction[action.upper()]
        if kernel_action is KernelAction.DENY:
            raise ValueError("scope=tree cannot deny: per-process rlimits cannot hold a sum")
        created = self.entry(root_tgid) is None
        if created:
            state = WatchState(start_time, None, None, 0, 0, None, None, kernel_action, 0)
            self.watch_state(root_tgid, state)
        args = pack(
            "tree_args", key=root_tgid, action=int(kernel_action), start_time=start_time,
            heap_limit_pages=_raw(heap_limit_pages), fd_limit=_raw(fd_limit),
            heap_base_pages=heap_base_pages, fd_base=fd_base,
            heap_warn_pages=_raw(heap_warn_pages), fd_warn=_raw(fd_warn),
        )  # fmt: skip
        try:
            self._run(SET_TREE_PROGRAM, args)
        except OSError as error:
            if error.errno == errno.ESRCH:  # the tree is this root's: its exit may have run
                self._remove_tree(root_tgid, keep_root=not created)
            elif created:
                self.unwatch(root_tgid)
            if error.errno in (errno.ENOENT, errno.ESRCH):
                raise ProcessLookupError(root_tgid, f"process {root_tgid} is gone") from None
            raise

    def unwatch_tree(self, root_tgid: int) -> None:
        """End the tree quota of `root_tgid`: the tree deleted, then its members'
        entries (those with a quota of their own stay watched, as non-members)."""
        self._remove_tree(root_tgid, keep_root=False)

    def _remove_tree(self, root_tgid: int, keep_root: bool) -> None:
        """The tree deleted first, so no fork joins it any more (a fork under way
        undoes its join when it finds the tree gone), then every member swept."""
        self._lib.bpf_map_delete_elem(self._trees, _KEY.pack(root_tgid))
        for tgid, state in self.entries().items():
            if state.tree != root_tgid or (keep_root and tgid == root_tgid):
                continue
            own = (state.heap_limit_pages, state.fd_limit, state.data_soft, state.nofile_soft)
            if any(limit is not None for limit in own):
                with contextlib.suppress(OSError):  # exited meanwhile
                    self._run(DROP_MEMBER_PROGRAM, pack("bind_args", key=tgid))
            else:
                self.unwatch(tgid)

    def tree(self, root_tgid: int) -> TreeState | None:
        """The tree of `root_tgid` as the kernel holds it; None when there is none
        (never set, removed, or ended with its last member)."""
        value = ctypes.create_string_buffer(layout("tree").size)
        if self._lib.bpf_map_lookup_elem(self._trees, _KEY.pack(root_tgid), value):
            return None
        return TreeState.unpack(value.raw)

    def tree_members(self, root_tgid: int) -> list[int]:
        """The live members of the tree of `root_tgid` (the `watched` entries that
        name it; an entry goes when its last thread exits), the root first."""
        return [pid for pid, _ in self.tree_identities(root_tgid)]

    def tree_identities(self, root_tgid: int) -> list[tuple[int, int]]:
        """The live members as (pid, start time in clock ticks), the root first: what
        a pidfd opened on a member is checked against, so a pid recycled since the
        kernel listed it is never taken for a member."""
        members = sorted(
            (tgid, state.start_time)
            for tgid, state in self.entries().items()
            if state.tree == root_tgid
        )
        members.sort(key=lambda member: member[0] != root_tgid)
        return members

    def take_tree(self, root_tgid: int) -> TreeTaken | None:
        """The tree's counts since the last take, zeroed in the kernel (run it for
        each tree event); None when there is no such tree."""
        f = unpack("tree_take", self._run(TAKE_TREE_PROGRAM, pack("tree_take", key=root_tgid)))
        if not f["found"]:
            return None
        return _tree_taken(f)

    def unwatch(self, tgid: int) -> None:
        """Watch `tgid` no more; a member of a tree stays one, with no quota of its own."""
        state = self.entry(tgid)
        if state is not None and state.tree and self.tree(state.tree) is not None:
            member = WatchState(state.start_time, None, None, 0, 0, None, None, state.action, 0)
            if self._rewatch(tgid, member):
                return
        self._lib.bpf_map_delete_elem(self._watched, _KEY.pack(tgid))
        if state is not None:  # its index entries, unless someone else's by now
            for name, pointer in (("by_mm", state.mm), ("by_files", state.files)):
                self._forget(name, pointer, tgid)

    def _forget(self, name: str, pointer: int, tgid: int) -> None:
        if not pointer:
            return
        fd = self._lib.bpf_map__fd(self._maps[name])
        key, value = struct.pack("<Q", pointer), ctypes.create_string_buffer(4)
        if not self._lib.bpf_map_lookup_elem(fd, key, value) and _KEY.unpack(value.raw)[0] == tgid:
            self._lib.bpf_map_delete_elem(fd, key)

    def entry(self, tgid: int) -> WatchState | None:
        value = ctypes.create_string_buffer(_WATCH.size)
        if self._lib.bpf_map_lookup_elem(self._watched, _KEY.pack(tgid), value):
            return None
        return WatchState.unpack(value.raw)

    def entries(self) -> dict[int, WatchState]:
        found = {}
        for tgid in self._keys():
            state = self.entry(tgid)
            if state is not None:
                found[tgid] = state
        return found

    def reset_peaks(self, tgid: int, heap_peak_pages: int = 0, fd_peak: int = 0) -> None:
        """Restart the watermarks from the given current values (in the kernel: the
        flags and counts changed meanwhile are kept)."""
        args = pack("peaks_args", key=tgid, heap_pages=heap_peak_pages, fds=fd_peak)
        if not unpack("peaks_args", self._run(PEAKS_PROGRAM, args))["found"]:
            raise ProcessLookupError(tgid, f"process {tgid} is not watched")

    def take(self, tgid: int) -> Taken | None:
        """The entry's counts since the last take, zeroed in the kernel; None when
        it is not watched (any more)."""
        f = unpack("take", self._run(TAKE_PROGRAM, pack("take", key=tgid)))
        if not f["found"]:
            return None
        return _taken(f, execs=f["execs"], heap_base_pages=f["heap_base_pages"],
                      shrunk=f["shrunk"])  # fmt: skip

    def dropped(self) -> int:
        """Events the kernel could not queue (a full ring) since the maps were made."""
        value = ctypes.create_string_buffer(layout("stats").size)
        fd = self._lib.bpf_map__fd(self._maps["stats"])
        if self._lib.bpf_map_lookup_elem(fd, _KEY.pack(0), value):
            return 0
        return unpack("stats", value.raw)["dropped"]

    def _run(self, program: str, context: bytes) -> bytes:
        """Run a SEC("syscall") program on `context`; the context as it wrote it."""
        prog = self._lib.bpf_object__find_program_by_name(self._obj, program.encode())
        buffer = ctypes.create_string_buffer(context, len(context))
        result = libbpf.run_syscall_program(self._lib, self._lib.bpf_program__fd(prog), buffer)
        if result:
            raise OSError(-result, f"{program}: {os.strerror(-result)}")
        return buffer.raw

    def _update(self, tgid: int, state: WatchState, flags: int) -> None:
        error = self._lib.bpf_map_update_elem(self._watched, _KEY.pack(tgid), state.pack(), flags)
        if error:
            errno = libbpf.errno_of(error)
            raise OSError(errno, f"watched[{tgid}]: {os.strerror(errno)}")

    def _keys(self) -> list[int]:
        """Every key. A key deleted under our feet (an exit) restarts the walk from
        the first key: duplicates are dropped, and the walk is bounded."""
        keys: dict[int, None] = {}
        key, following = None, ctypes.create_string_buffer(_KEY.size)
        for _ in range(4 * WATCHED_MAX):
            if self._lib.bpf_map_get_next_key(self._watched, key, following):
                break
            key = following.raw
            keys[_KEY.unpack(key)[0]] = None
        return list(keys)

    # --- for tests and diagnostics ------------------------------------------------

    def program_ids(self) -> list[int]:
        names = (*HOOKS, *SECTION_PROGRAMS)
        progs = [self._lib.bpf_object__find_program_by_name(self._obj, n.encode()) for n in names]
        return [_object_id(self._lib, self._lib.bpf_program__fd(prog)) for prog in progs]

    def link_ids(self) -> list[int]:
        return self.links.ids()


class Links:
    """The programs' links, each pinned in `directory` as it is made: attached
    while some process is watched, adopted from a previous holder, left pinned
    (enforcing) or removed at the end."""

    def __init__(self, lib: ctypes.CDLL, obj: int, directory: Path) -> None:
        self._lib = lib
        self._obj = obj
        self._dir = directory
        self._links: dict[str, int] = {}  # pin name -> struct bpf_link *

    @property
    def attached(self) -> bool:
        return bool(self._links)

    def attach(self) -> None:
        """Attach every program (the links missing only), each link pinned.

        While attached, every syscall of every process on the machine takes the
        tracepoint slow path: attach only while some process has a quota. On
        failure the links made by this call are removed, adopted ones kept."""
        made = []
        try:
            for program, category, tracepoint in _hook_list():
                name = _pin_name(program, tracepoint)
                if name not in self._links:
                    made.append(name)
                    self._attach_one(name, program, category, tracepoint)
        except BpfUnavailable:
            self._remove(made)
            raise

    def detach(self) -> None:
        """Remove every link (blocks ~3 s: see _remove); enforcement stops."""
        self._remove(list(self._links))
        remove_tree(self._dir)

    def release(self) -> None:
        """Close our handles only: the pins keep every link attached."""
        for link in self._links.values():
            self._lib.bpf_link__destroy(link)
        self._links.clear()

    def adopt(self) -> None:
        """Take over the links a previous holder pinned; complete a partial set."""
        if not self._dir.is_dir():
            return
        for path in sorted(self._dir.iterdir()):
            link = self._lib.bpf_link__open(str(path).encode())
            if link:
                self._links[path.name] = link
        if self._links:
            self.attach()

    def ids(self) -> list[int]:
        links = self._links.values()
        return [_object_id(self._lib, self._lib.bpf_link__fd(link)) for link in links]

    def _remove(self, names: list[str]) -> None:
        """Unpin and destroy links, in parallel: the last perf event of each
        tracepoint waits for RCU grace periods as it goes (~4.5 s for all
        serially here, ~3 s in parallel). Blocking: run it off the trio loop."""
        links = [link for link in (self._links.pop(name, None) for name in names) if link]
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(self._remove_one, links))

    def _remove_one(self, link: int) -> None:
        self._lib.bpf_link__unpin(link)
        self._lib.bpf_link__destroy(link)

    def _attach_one(self, name: str, program: str, category: str, tracepoint: str) -> None:
        prog = self._lib.bpf_object__find_program_by_name(self._obj, program.encode())
        if tracepoint:
            link = self._lib.bpf_program__attach_tracepoint(
                prog, category.encode(), tracepoint.encode()
            )
        else:
            link = self._lib.bpf_program__attach(prog)
        if not link:
            where = f"{category}/{tracepoint}" if tracepoint else program
            raise BpfUnavailable(f"attach {where}: {os.strerror(ctypes.get_errno())}")
        self._links[name] = link
        self._dir.mkdir(mode=0o700, exist_ok=True)
        error = self._lib.bpf_link__pin(link, str(self._dir / name).encode())
        if error:
            raise BpfUnavailable(f"pin link {name}: {os.strerror(libbpf.errno_of(error))}")


class Ring:
    """The `events` ring buffer: its fd to wait on, and the events it holds."""

    def __init__(self, lib: ctypes.CDLL, events_fd: int) -> None:
        self._lib = lib
        self._events: list[Event] = []
        self._sample = libbpf.SAMPLE_FN(self._collect)  # referenced: libbpf calls it
        self._ring = lib.ring_buffer__new(events_fd, self._sample, None, None)
        if not self._ring:
            raise BpfUnavailable(f"ring_buffer__new: {os.strerror(ctypes.get_errno())}")

    def fd(self) -> int:
        """Readable when events wait: `await trio.lowlevel.wait_readable(fd)`."""
        if not self._ring:
            raise ValueError("the kernel watch is closed")
        return self._lib.ring_buffer__epoll_fd(self._ring)

    def drain(self) -> list[Event]:
        """Every event the kernel has queued, oldest first (none once closed)."""
        if not self._ring:
            return []
        self._lib.ring_buffer__consume(self._ring)
        events, self._events = self._events, []
        return events

    def free(self) -> None:
        self._lib.ring_buffer__free(self._ring)
        self._ring = 0

    def _collect(self, _ctx: int | None, data: int, size: int) -> int:
        raw = ctypes.string_at(data, size)
        tgid, kind, which, member, usage, limit, when = _EVENT.unpack_from(raw)
        final: Taken | TreeTaken | None = None
        if kind == Kind.TREE_ENDED:  # what a deleted tree held
            f = unpack("tree_end_event", raw)
            final = _tree_taken(f)
            member = f["killer"]
        elif size >= layout("exit_event").size:  # what a deleted entry held
            f = unpack("exit_event", raw)
            final = _taken(f, execs=f["execs"], heap_base_pages=f["heap_base_pages"])
        event = Event(tgid, Kind(kind), Which(which), usage, limit, when, final, member)
        self._events.append(event)
        return 0


def _tree_taken(f: dict[str, object]) -> TreeTaken:
    """What take_tree or a tree's end event carried."""
    return TreeTaken(
        f["crossings"], f["usage_at"], f["kills"] > 0,  # type: ignore[operator]
        f["warnings"], f["warned_at"],
    )  # type: ignore[arg-type]  # fmt: skip


def _pin_name(program: str, tracepoint: str) -> str:
    return f"{program}-{tracepoint}" if tracepoint else program  # bpffs forbids "."


def _hook_list() -> list[tuple[str, str, str]]:
    """(program, category, tracepoint) for every hook. A tracepoint this kernel
    lacks is skipped only if it is OPTIONAL: an engine that silently misses a
    path would accept quotas it cannot keep."""
    hooks = []
    for program, tracepoints in HOOKS.items():
        for hook in tracepoints:
            category, _, tracepoint = hook.rpartition("/")
            category = category or "syscalls"
            if (TRACEFS / "events" / category / tracepoint).is_dir():
                hooks.append((program, category, tracepoint))
            elif tracepoint not in OPTIONAL:
                raise BpfUnavailable(f"tracepoint {category}/{tracepoint} missing in this kernel")
    return [*hooks, *((program, "", "") for program in SECTION_PROGRAMS)]


def _object_id(lib: ctypes.CDLL, fd: int) -> int:
    """The kernel id of a prog or link fd (both info structs start with type, id)."""
    info = ctypes.create_string_buffer(256)
    size = ctypes.c_uint(len(info))
    if lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)):
        raise OSError(ctypes.get_errno(), "bpf_obj_get_info_by_fd")
    return struct.unpack_from("<I", info.raw, 4)[0]


def object_exists(kind: str, object_id: int) -> bool:
    """Whether a prog or link with this id still exists anywhere on the machine."""
    lib = library()
    get = lib.bpf_prog_get_fd_by_id if kind == "prog" else lib.bpf_link_get_fd_by_id
    fd = get(object_id)
    if fd < 0:
        return False
    os.close(fd)
    return True


# --- pins only root made ------------------------------------------------------------

PIN_NAMES = frozenset({*MAPS, "links"})


def _bpffs_root(path: Path) -> Path:
    """The mount point of the bpffs that holds `path` (the longest mount prefix)."""
    mounts = [Path(m.mount_point) for m in procfs.read_mounts() if m.fs_type == "bpf"]
    under = [m for m in mounts if path == m or m in path.parents]
    if not under:
        raise BpfUnavailable(f"{path} is not on a bpf filesystem")
    return max(under, key=lambda m: len(m.parts))


def make_private_dirs(pin_dir: Path) -> None:
    """Create the missing directories from the bpffs root down to `pin_dir`, 0700."""
    root = _bpffs_root(pin_dir)
    for directory in [*reversed(pin_dir.relative_to(root).parents), pin_dir.relative_to(root)]:
        if str(directory) != ".":
            with contextlib.suppress(FileExistsError):  # checked by check_pins
                (root / directory).mkdir(mode=0o700)


def check_pins(pin_dir: Path) -> None:
    """Refuse pins anyone but root made or could have changed: every directory from
    the bpffs root down to `pin_dir` is root's, no symlink, writable by root only;
    inside, only this project's names, root's, none a symlink. An attacker who could
    plant a directory, a symlink to another daemon's map, or remove our link pins
    could lift a quota; `BpfUnavailable` says which path and why."""
    root = _bpffs_root(pin_dir)
    path = root
    for part in pin_dir.relative_to(root).parts:
        path = path / part
        _check_owned(path, directory=True)
    for entry in pin_dir.iterdir():
        if entry.name not in PIN_NAMES:
            raise BpfUnavailable(
                f"pin directory {pin_dir}: {entry.name} was not made by restrackfs"
            )
        _check_owned(entry, directory=entry.name == "links")
    links = pin_dir / "links"
    if links.is_dir():
        for entry in links.iterdir():
            _check_owned(entry, directory=False)


def _check_owned(path: Path, directory: bool) -> None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise BpfUnavailable(f"pin path {path} is a symlink: refused")
    if info.st_uid != 0:
        raise BpfUnavailable(f"pin path {path} belongs to uid {info.st_uid}, not root: refused")
    if directory != stat.S_ISDIR(info.st_mode):
        kind = "not a directory" if directory else "a directory"
        raise BpfUnavailable(f"pin path {path} is {kind}: refused")
    if directory and info.st_mode & 0o022:
        raise BpfUnavailable(f"pin directory {path} is writable by others: refused")


def remove_tree(path: Path) -> None:
    """Remove a pin directory bottom-up (bpffs has files, dirs and symlinks; a
    symlink is removed, never followed)."""
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            remove_tree(child)
        else:
            child.unlink(missing_ok=True)
    path.rmdir()


# --- loading ---------------------------------------------------------------------

_log: deque[str] = deque(maxlen=500)  # libbpf's recent lines, cleared at each load


def _capture(level: int, fmt: bytes, args: int | None) -> int:
    if level <= libbpf.LIBBPF_INFO:
        _log.append(libbpf.format_va(fmt, args))
    return 0


_PRINT = libbpf.PRINT_FN(_capture)
_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """libbpf.so.1, loaded once, its messages captured for the one-line reasons of
    `load_object`'s failures."""
    global _lib
    if _lib is None:
        try:
            _lib = libbpf.load()
        except OSError as error:
            raise BpfUnavailable(f"libbpf.so.1 not loadable: {error}") from None
        _lib.libbpf_set_print(_PRINT)
    return _lib


def check_prerequisites(obj: Path | None = None, *, mounts: bool = True) -> None:
    """What loading `obj` (default: the engine's object) needs; `BpfUnavailable` if
    something is missing. With `mounts`, bpffs and tracefs are mounted if absent."""
    obj = obj or OBJECT
    if not Path("/sys/kernel/btf/vmlinux").exists():
        raise BpfUnavailable("no kernel BTF (/sys/kernel/btf/vmlinux): CO-RE cannot relocate")
    if not obj.exists():
        raise BpfUnavailable(f"BPF object missing: {obj} (tracker/backends/bpf/build.sh)")
    caps = procfs.read_effective_caps()
    if not (caps >> _CAP_SYS_ADMIN & 1 or (caps >> _CAP_BPF & 1 and caps >> _CAP_PERFMON & 1)):
        raise BpfUnavailable("no CAP_BPF/CAP_PERFMON (nor CAP_SYS_ADMIN)")
    if mounts:
        _ensure_mounted(BPFFS, "bpf", "mode=0700")
        _ensure_mounted(TRACEFS, "tracefs")


def _ensure_mounted(target: Path, fstype: str, options: str = "") -> None:
    if procfs.Mount(str(target), fstype) in procfs.read_mounts():
        return
    try:
        libbpf.mount("nodev" if fstype == "tracefs" else fstype, str(target), fstype, options)
    except OSError as error:
        raise BpfUnavailable(str(error)) from None


def _load(lib: ctypes.CDLL, pin_dir: Path) -> int:
    """Open and load the object with every map pinned in (or reused from) pin_dir."""
    return load_object(lib, OBJECT, {name: pin_dir / name for name in MAPS})


def load_object(lib: ctypes.CDLL, path: Path, pins: Mapping[str, Path] | None = None) -> int:
    """Open and load the BPF object at `path`, the maps named in `pins` pinned at
    (or reused from) their paths; `BpfUnavailable` says why in one line."""
    _log.clear()
    obj = lib.bpf_object__open_file(str(path).encode(), None)
    if not obj:
        raise BpfUnavailable(f"cannot open {path.name}: {_reason(ctypes.get_errno())}")
    for name, pin in (pins or {}).items():
        bpf_map = lib.bpf_object__find_map_by_name(obj, name.encode())
        lib.bpf_map__set_pin_path(bpf_map, str(pin).encode())
    error = lib.bpf_object__load(obj)
    if error:
        lib.bpf_object__close(obj)
        raise BpfUnavailable(f"load failed: {_reason(libbpf.errno_of(error))}")
    return obj


def _reason(errno: int) -> str:
    """The one line that says why libbpf failed: the verifier's verdict if any.

    The verifier log replays the program and ends with the rejection, then
    "processed N insns"; the line before that is the reason."""
    lines = [line.strip() for text in _log for line in text.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith(("processed ", "verification time")) and index:
            verdict = lines[index - 1]
            program = next((x for x in lines if "BPF program load failed" in x), "")
            prog = program.split(":")[1].strip() if program.count(":") >= 2 else ""
            return f"verifier: {prog + ': ' if prog else ''}{verdict}"
    failures = [line for line in lines if "failed" in line or "error" in line.lower()]
    detail = failures[0].removeprefix("libbpf: ") if failures else ""
    return f"{os.strerror(errno)}{' (' + detail + ')' if detail else ''}"
