"""Readers for the /proc files the engine needs, one small function per source.

Parsing only: no policy, no caching. Every reader raises `NoSuchProcess` when the
process is gone (or never was) and `AccessDenied` when /proc refuses; callers
that need to know the answer belongs to *their* process check a pidfd after
reading (see `tracker.linux.process`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
from dataclasses import dataclass
from typing import NamedTuple

from tracker.vocabulary import FD_ANON, FD_DIR, FD_FILE, FD_KINDS, FD_OTHER, FD_PIPE, FD_SOCKET

PROC = "/proc"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PF_KTHREAD = 0x00200000
PID_MAX_LIMIT = 4194304  # the kernel's largest pid_max: no pid is ever above it


class NoSuchProcess(ProcessLookupError):
    """The process does not exist (or exited while being read)."""

    def __init__(self, pid: int, detail: str = "no such process") -> None:
        super().__init__(errno.ESRCH, f"{pid}: {detail}")
        self.pid = pid


class AccessDenied(PermissionError):
    """/proc refused to show this process's file."""

    def __init__(self, pid: int) -> None:
        super().__init__(errno.EACCES, f"{pid}: access denied")
        self.pid = pid


def _task_dir(pid: int, tid: int | None) -> str:
    """/proc/PID, or one thread's /proc/PID/task/TID (memory and fd table are shared).

    A number no pid can be is no such process, before it makes a path /proc
    refuses in its own way (4096 digits: ENAMETOOLONG)."""
    if not 0 < pid <= PID_MAX_LIMIT or (tid is not None and not 0 < tid <= PID_MAX_LIMIT):
        raise NoSuchProcess(pid)
    return f"{PROC}/{pid}" if tid is None else f"{PROC}/{pid}/task/{tid}"


def _open(pid: int, name: str, tid: int | None = None) -> int:
    try:
        return os.open(f"{_task_dir(pid, tid)}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: caught mid-exit
        raise NoSuchProcess(pid) from None
    except PermissionError:
        raise AccessDenied(pid) from None


def _read(pid: int, name: str, tid: int | None = None) -> bytes:
    fd = _open(pid, name, tid)
    try:
        return os.read(fd, 16384)
    except ProcessLookupError:
        raise NoSuchProcess(pid) from None
    finally:
        os.close(fd)


def _read_whole(pid: int, name: str) -> bytes:
    """The whole file, however long (a command line, a mount table)."""
    with os.fdopen(_open(pid, name), "rb") as file:
        try:
            return file.read()
        except ProcessLookupError:
            raise NoSuchProcess(pid) from None


def _list_dir(pid: int, directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(pid) from None
    except PermissionError:
        raise AccessDenied(pid) from None


def _read_link(pid: int, name: str) -> str:
    try:
        return os.readlink(f"{_task_dir(pid, None)}/{name}")
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(pid) from None
    except PermissionError:
        raise AccessDenied(pid) from None


class Status(NamedTuple):
    """The fields of /proc/PID/status the engine uses (a tuple: made at every
    read of `stat` and `metrics`, it costs a third of a frozen dataclass)."""

    name: str  # comm
    tgid: int
    state: str
    real_uid: int
    real_gid: int
    vm_data: int | None  # bytes; None for zombies and kernel threads


def _field(raw: bytes, key: bytes) -> bytes:
    """The value of `key:` in a /proc `Key:\tvalue` file, found without a full parse
    (this runs on every read of a value: a dict of all 50-odd lines costs 2x more).
    KeyError if absent."""
    start = raw.find(b"\n" + key + b":") + 1
    if start == 0 and not raw.startswith(key + b":"):
        raise KeyError(key)
    start += len(key) + 1
    end = raw.find(b"\n", start)
    return raw[start : end if end >= 0 else len(raw)].strip()


def _name_field(raw: bytes) -> bytes:
    """status's first line, `Name:\\t<comm>`, exactly: a name may begin or end with
    whitespace, which `_field`'s strip would take."""
    if not raw.startswith(b"Name:\t"):
        raise KeyError(b"Name")
    end = raw.find(b"\n")
    return raw[6 : end if end >= 0 else len(raw)]


_NAME_ESCAPES = {b"\\n": b"\n", b"\\\\": b"\\"}


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_unprintable(text: str) -> str:
    """Every character that is not printable as `\\xHH`, `\\uHHHH` or `\\UHHHHHHHH`
    (backslashes left alone: for text whose names are escaped already). The log
    and the metrics use it, and the CLI on what the daemon sends: a name from an
    older daemon never moves the cursor or breaks a row there either."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escape_char(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if char == "\n":
        return "\\n"
    return char if char.isprintable() else _escaped(char)


def escape_comm(comm: str) -> str:
    """A name as the daemon prints it anywhere (stat, metrics, logs): nothing in it
    can break a line, move a terminal's cursor or hide as whitespace.

    Backslash and newline are escaped as /proc/PID/status does (`\\\\`, `\\n`);
    every other character that is not printable (Python's `str.isprintable`: the
    Unicode categories Cc, Cf, Zl, Zp, Zs but the ASCII space, Cs, Co, Cn; so
    C0, DEL, C1 with NEL, ESC, U+2028, U+2029, bidi overrides) as `\\xHH`,
    `\\uHHHH` or `\\UHHHHHHHH`. The result is all printable (the ASCII space
    is), and the escaping can be undone unambiguously.
    """
    if comm.isprintable() and "\\" not in comm:
        return comm
    return "".join(map(_escape_char, comm))


def _unescape_name(escaped: bytes) -> str:
    """status's Name is comm with newline and backslash escaped; undo that."""
    if b"\\" in escaped:
        escaped = re.sub(rb"\\[n\\]", lambda m: _NAME_ESCAPES[m[0]], escaped)
    return escaped.decode(errors="replace")


def parse_status(pid: int, raw: bytes) -> Status:
    try:
        vm_data: int | None = None  # zombies and kernel threads have no address space
        if b"\nVmData:" in raw:
            vm_data = int(_field(raw, b"VmData").split()[0]) * 1024
        return Status(
            name=_unescape_name(_name_field(raw)),
            tgid=int(_field(raw, b"Tgid")),
            state=_field(raw, b"State")[:1].decode(),
            real_uid=int(_field(raw, b"Uid").split()[0]),
            real_gid=int(_field(raw, b"Gid").split()[0]),
            vm_data=vm_data,
        )
    except (KeyError, ValueError, IndexError):
        # A status cut short: the task was reaped while the kernel printed it.
        raise NoSuchProcess(pid) from None


def read_status(pid: int, tid: int | None = None) -> Status:
    return parse_status(pid, read_status_text(pid, tid))


def read_status_text(pid: int, tid: int | None = None) -> bytes:
    """/proc/PID/status (or a thread's) as the kernel prints it, by path."""
    return _read(pid, "status", tid)


def open_status(pid: int) -> int:
    """An open descriptor of /proc/PID/status, for `reread_status`: it stays the
    file of the process that held `pid` when it was opened, never a later holder's
    (the kernel answers ESRCH once that process is reaped). The caller closes it."""
    return _open(pid, "status")


def reread_status(fd: int, pid: int) -> bytes:
    """The text of an `open_status` descriptor: a read at offset 0 makes the kernel
    print the file afresh, so this is the status of now, without the path lookup."""
    try:
        return os.pread(fd, 16384, 0)
    except ProcessLookupError:
        raise NoSuchProcess(pid) from None


def read_ids(pid: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(real, effective, saved, fs) uids and gids."""
    raw = _read(pid, "status")
    try:
        return (
            tuple(int(v) for v in _field(raw, b"Uid").split()),
            tuple(int(v) for v in _field(raw, b"Gid").split()),
        )
    except (KeyError, ValueError):
        raise NoSuchProcess(pid) from None


def vm_data_in(pid: int, raw: bytes) -> int:
    """VmData of a status text alone (no other field parsed: the hot path of reads
    and of the periodic check)."""
    try:
        return int(_field(raw, b"VmData").split()[0]) * 1024
    except (KeyError, ValueError, IndexError):
        raise NoSuchProcess(pid, "no address space (zombie or kernel thread)") from None


def name_and_vm_data_in(pid: int, raw: bytes) -> tuple[str, int]:
    """The name and VmData of a status text, no other field parsed (every render
    of `metrics` reads each tracked process's: `parse_status` costs 4x more)."""
    try:
        name = _unescape_name(_name_field(raw))
    except KeyError:
        raise NoSuchProcess(pid) from None  # cut short: reaped while printed
    return name, vm_data_in(pid, raw)


def vm_data_of(status: Status) -> int:
    """VmData in bytes: the kernel's data_vm counter (what RLIMIT_DATA limits)."""
    if status.vm_data is None:
        raise NoSuchProcess(status.tgid, "no address space (zombie or kernel thread)")
    return status.vm_data


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/PID/stat the engine uses."""

    comm: str
    state: str
    ppid: int
    flags: int  # PF_* bits
    start_time: int  # clock ticks since boot: with the pid, the process's identity

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def parse_stat(pid: int, raw: bytes) -> Stat:
    # comm may contain spaces and parentheses: it ends at the *last* ')'.
    open_paren = raw.find(b"(")
    close_paren = raw.rfind(b")")
    rest = raw[close_paren + 2 :].split()
    if open_paren < 0 or close_paren < 0 or len(rest) < 20:
        raise NoSuchProcess(pid)
    return Stat(
        comm=raw[open_paren + 1 : close_paren].decode(errors="replace"),
        state=rest[0].decode(),
        ppid=int(rest[1]),
        flags=int(rest[6]),
        start_time=int(rest[19]),
    )


def read_stat(pid: int, tid: int | None = None) -> Stat:
    return parse_stat(pid, _read(pid, "stat", tid))


def read_start_time(pid: int) -> int:
    """stat's start time (field 22, clock ticks since boot): with the pid, the
    process's identity, and what the BPF programs compare."""
    return read_stat(pid).start_time


def read_comm(pid: int) -> str:
    return _read(pid, "comm").rstrip(b"\n").decode(errors="replace")


def read_cgroup(pid: int) -> bytes:
    """/proc/PID/cgroup as it is (parsed by `tracker.linux.cgroup`)."""
    return _read(pid, "cgroup")


def _kernel_counts_fds_in_st_size() -> bool:
    """Since Linux 6.2, stat() of /proc/PID/fd reports the number of open fds."""
    release = os.uname().release.split(".")
    try:
        return (int(release[0]), int(release[1].split("-")[0])) >= (6, 2)
    except (ValueError, IndexError):
        return False


_FD_COUNT_IN_ST_SIZE = _kernel_counts_fds_in_st_size()


def count_fds(pid: int, tid: int | None = None) -> int:
    """Number of open file descriptors, in O(1) on Linux >= 6.2."""
    path = f"{_task_dir(pid, tid)}/fd"
    try:
        if _FD_COUNT_IN_ST_SIZE:
            return os.stat(path).st_size
        return len(os.listdir(path))
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: caught mid-exit
        raise NoSuchProcess(pid) from None
    except PermissionError:
        raise AccessDenied(pid) from None


def list_fds(pid: int, tid: int | None = None) -> list[int]:
    """The open file descriptor numbers, ascending."""
    return sorted(int(name) for name in _list_dir(pid, f"{_task_dir(pid, tid)}/fd"))


# What a descriptor's /proc/PID/fd link names, by its prefix, when it is no path.
_FD_PREFIXES = (("socket:", FD_SOCKET), ("pipe:", FD_PIPE), ("anon_inode:", FD_ANON))
# A path's kind, by the file type of what it names (the rest: devices, ...: other).
_FD_TYPES = {
    stat.S_IFREG: FD_FILE,
    stat.S_IFDIR: FD_DIR,
    stat.S_IFIFO: FD_PIPE,
    stat.S_IFSOCK: FD_SOCKET,
}


def fd_kind(target: str, file_type: int | None) -> str:
    """The kind of a descriptor whose link reads `target`; `file_type` (S_IFMT) is
    needed only for a path (`target` starting with "/"), and never shown."""
    if target.startswith("/"):
        return _FD_TYPES.get(file_type or 0, FD_OTHER)
    for prefix, kind in _FD_PREFIXES:
        if target.startswith(prefix):
            return kind
    return FD_OTHER  # net:[4026531840] (a namespace), and kinds to come


class _FileType:
    """S_IFMT of what a /proc/PID/fd link names, without asking its filesystem.

    statx(2) with AT_STATX_DONT_SYNC and only STATX_TYPE: the type lives in the
    inode, so no request reaches the file's filesystem (a descriptor on a hung FUSE
    or NFS mount, or on this very mount, cannot block the listing). os.stat where
    statx is missing."""

    _AT_FDCWD, _AT_STATX_DONT_SYNC, _STATX_TYPE, _MODE_OFFSET = -100, 0x4000, 0x1, 28

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._statx = getattr(libc, "statx", None)
        self._buffer = ctypes.create_string_buffer(256)  # struct statx

    def __call__(self, path: bytes) -> int:
        if self._statx is None:
            return stat.S_IFMT(os.stat(path).st_mode)
        flags, mask = self._AT_STATX_DONT_SYNC, self._STATX_TYPE
        if self._statx(self._AT_FDCWD, path, flags, mask, self._buffer):
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
        mode = int.from_bytes(self._buffer.raw[self._MODE_OFFSET : self._MODE_OFFSET + 2], "little")
        return stat.S_IFMT(mode)


def read_fd_kinds(pid: int, tid: int | None = None) -> dict[str, int]:
    """The open descriptors by kind (`FD_KINDS`), from one listing of /proc/PID/fd.

    The directory is listed once, then each link is read (and, for a path, the type
    of what it names). A descriptor closed between the listing and its link is left
    out, so the counts always sum to the size of the listing that was made: one
    consistent reading, never a count from another moment. Costs one readlink
    per descriptor (and one statx for a path); no path is kept or returned.
    """
    directory = f"{_task_dir(pid, tid)}/fd/".encode()
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(pid) from None
    except PermissionError:
        raise AccessDenied(pid) from None
    counts = dict.fromkeys(FD_KINDS, 0)
    file_type = _FileType()
    for name in names:
        link = directory + name
        try:
            target = os.readlink(link).decode(errors="replace")
            kind = fd_kind(target, file_type(link) if target.startswith("/") else None)
        except (FileNotFoundError, ProcessLookupError):
            continue  # closed meanwhile: not in this listing
        except PermissionError:
            raise AccessDenied(pid) from None
        counts[kind] += 1
    return counts


def list_tids(pid: int) -> list[int]:
    """The thread ids of thread group `pid` (/proc/PID/task)."""
    return [int(name) for name in _list_dir(pid, f"{_task_dir(pid, None)}/task")]


def live_thread(pid: int) -> int | None:
    """A thread of `pid` that still has the address space (when the leader is a
    zombie: its main thread called pthread_exit and the others go on)."""
    try:
        tids = list_tids(pid)
    except NoSuchProcess:
        return None
    for tid in tids:
        if tid == pid:
            continue
        try:
            if read_status(pid, tid).vm_data is not None:
                return tid
        except (NoSuchProcess, AccessDenied):
            continue
    return None


def list_pids() -> list[int]:
    """The thread-group ids visible in this PID namespace."""
    return [int(name) for name in os.listdir(PROC) if name.isdigit()]


RLIM_INFINITY = -1  # how Python's resource module spells "unlimited"


def parse_limits(raw: bytes) -> dict[str, tuple[int, int]]:
    """Map each limit's name ("Max data size") to (soft, hard), -1 for unlimited."""
    limits: dict[str, tuple[int, int]] = {}
    for line in raw.decode().splitlines()[1:]:
        name, values = line[:26].strip(), line[26:].split()
        if len(values) < 2:
            continue
        soft, hard = (RLIM_INFINITY if v == "unlimited" else int(v) for v in values[:2])
        limits[name] = (soft, hard)
    return limits


def read_limits(pid: int) -> dict[str, tuple[int, int]]:
    return parse_limits(_read(pid, "limits"))


def read_fd_targets(pid: int) -> list[str]:
    """What each open descriptor's /proc/PID/fd link names (a descriptor closed
    between the listing and its link is left out)."""
    directory = f"{_task_dir(pid, None)}/fd"
    targets = []
    for name in _list_dir(pid, directory):
        try:
            targets.append(os.readlink(f"{directory}/{name}"))
        except (FileNotFoundError, ProcessLookupError):
            continue  # closed meanwhile
        except PermissionError:
            raise AccessDenied(pid) from None
    return targets


def parse_cmdline(raw: bytes) -> list[str]:
    """The arguments of a /proc/PID/cmdline (NUL-separated), empty ones dropped."""
    return [os.fsdecode(arg) for arg in raw.split(b"\0") if arg]


def read_cmdline(pid: int) -> list[str]:
    return parse_cmdline(_read_whole(pid, "cmdline"))


def read_cwd(pid: int) -> str:
    """The working directory of `pid` (/proc/PID/cwd), as a path."""
    return _read_link(pid, "cwd")


# --- this process's own view: mounts, capabilities, pid namespace ----------------


class Mount(NamedTuple):
    """One line of a mount table: where, and which filesystem type."""

    mount_point: str
    fs_type: str


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # mount tables write a space as \040


def _unescape_path(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), field)


def parse_mounts(raw: bytes) -> list[Mount]:
    """/proc/self/mounts: `device mount_point type options 0 0` per line."""
    mounts = []
    for line in raw.decode(errors="replace").splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append(Mount(_unescape_path(fields[1]), fields[2]))
    return mounts


def read_mounts() -> list[Mount]:
    """The mounts this process sees, in mount order."""
    return parse_mounts(_read_self("mounts"))


def parse_mountinfo(raw: bytes) -> list[Mount]:
    """/proc/self/mountinfo: the mount point is field 5, the type the first field
    after the " - " separator (optional fields come between)."""
    mounts = []
    for line in raw.decode(errors="replace").splitlines():
        fields, _, tail = line.partition(" - ")
        parts = fields.split(" ")
        if tail and len(parts) >= 5:
            mounts.append(Mount(_unescape_path(parts[4]), tail.split(" ")[0]))
    return mounts


def read_mountinfo() -> list[Mount]:
    """The mounts this process sees, in mount order (the last one at a path is on top)."""
    return parse_mountinfo(_read_self("mountinfo"))


def parse_effective_caps(raw: bytes) -> int:
    """status's CapEff, the effective capability bits; 0 where it is missing."""
    try:
        return int(_field(raw, b"CapEff"), 16)
    except (KeyError, ValueError):
        return 0


def read_effective_caps() -> int:
    """This process's effective capabilities (/proc/self/status CapEff)."""
    return parse_effective_caps(_read_self("status"))


def read_pid_namespace_inode() -> int:
    """The inode of this process's pid namespace (/proc/self/ns/pid)."""
    return os.stat(f"{PROC}/self/ns/pid").st_ino


def read_self_link() -> str:
    """What /proc/self names: this process's pid as /proc's namespace numbers it
    (another number when /proc belongs to a parent pid namespace)."""
    return os.readlink(f"{PROC}/self")


def _read_self(name: str) -> bytes:
    """A file of /proc/self, whole: no pid of ours to vanish, so errors are plain
    OSErrors."""
    with open(f"{PROC}/self/{name}", "rb") as file:
        return file.read()
