"""The kernel patch's syscall API as a thin library over the mount.

Every call is one read or one write of a file under the mount, nothing else:
no private channel to the daemon, so anything this library can do a shell can
do with `cat` and `echo`, under the same permission checks.

The mount point comes from the `mount=` argument, else `$RESTRACK_MOUNT`, else
`/restrack`. Errors are `OSError` subclasses, one meaning each, with a message
naming the pid and saying why: `ProcessLookupError` (ESRCH) no such process,
`FileNotFoundError` (ENOENT) a live process that is not tracked,
`FileExistsError` (EEXIST) already tracked, `PermissionError` (EPERM) not
permitted, a plain `OSError` with `errno.EBUSY` a quota already set and with
`errno.EINVAL` an invalid value; `NotMountedError` when no daemon serves the
mount point. The daemon answers "not tracked" with ESRCH for deregister and
ENOENT elsewhere (docs/files.md, errors); the client tells the two cases apart by
asking the kernel whether the pid names a live process.

Values are checked with the daemon's own grammar (`tracker.quota`, which is
pure) before anything is written, so an error says what is wrong with it; the
daemon still decides. The words both sides use (the stat fields, "max") are
`tracker.vocabulary`'s, which imports nothing but the standard library.
"""

from __future__ import annotations

import errno
import json
import os
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from tracker.quota import parse_action, parse_count, parse_reset, parse_scope, parse_size
from tracker.vocabulary import (
    ACTION,
    COMM,
    FD_KINDS,
    FILE_QUOTA,
    FILES,
    HEAP,
    HEAP_QUOTA,
    MEMBERS,
    OPENFILE_TOTAL,
    STAT_FIELDS,
    TREE_STAT_FIELDS,
    UNLIMITED,
    parse_limit,
)

DEFAULT_MOUNT = "/restrack"
_NOT_SERVED = (errno.ENOTCONN, errno.ECONNABORTED)
_REASONS = {
    errno.ENOENT: "not tracked",
    errno.EEXIST: "already tracked",
    errno.ESRCH: "no such process",
    errno.EBUSY: "a quota is already set (reset it first)",
    errno.EPERM: "operation not permitted",
}


KERNEL_THREAD = "a kernel thread: it has no heap or files of its own to track"


class NotMountedError(FileNotFoundError):
    """Nothing (or a dead daemon) is mounted at the mount point."""


@dataclass(frozen=True, slots=True)
class Resource:
    """What the kernel patch's `fetch` returned; sizes in bytes, None = no limit."""

    pid: int
    heapsize: int
    openfile_count: int
    heapsize_quota: int | None
    openfile_quota: int | None


@dataclass(frozen=True, slots=True)
class Stat:
    """Every field of `PID/stat`, in its order (`STAT_FIELDS`)."""

    pid: int
    comm: str
    heapsize: int
    openfile_count: int
    heap_quota: int | None
    file_quota: int | None
    action: str
    heap_total: int
    openfile_total: int
    registered: int  # when it was registered, in unix seconds
    heap_peak: int  # the highest heapsize since registration or the last usage reset
    openfile_peak: int  # the highest openfile_count, likewise
    # while a tree quota is set (TREE_STAT_FIELDS): its sums and its live members
    tree_heapsize: int | None = None
    tree_openfile_count: int | None = None
    members: int | None = None

    @property
    def is_tree(self) -> bool:
        return self.members is not None

    def resource(self) -> Resource:
        return Resource(
            self.pid, self.heapsize, self.openfile_count, self.heap_quota, self.file_quota
        )


@dataclass(frozen=True, slots=True)
class Enforcement:
    """One record of the `enforcements` file: an action the daemon took, and on what.

    `usage`, `limit` and `peak` are bytes for the `heap` quota, descriptors for
    `files`; `fds` the descriptors by kind at that moment (None where they could no
    longer be read); `container` and `pod` None where none was found; `scope` is
    "tree" for a tree quota's record. `line` is the record as the daemon wrote it."""

    time: float
    pid: int
    comm: str
    uid: int
    quota: str
    usage: int
    limit: int
    peak: int
    action: str
    fds: dict[str, int] | None
    container: str | None
    pod: str | None
    scope: str
    line: str

    @classmethod
    def parse(cls, line: str) -> Enforcement:
        """A record from its JSON line; keys this client does not know are left out."""
        fields = json.loads(line)
        return cls(
            time=float(fields["time"]),
            pid=int(fields["pid"]),
            comm=str(fields["comm"]),
            uid=int(fields["uid"]),
            quota=str(fields["quota"]),
            usage=int(fields["usage"]),
            limit=int(fields["limit"]),
            peak=int(fields["peak"]),
            action=str(fields["action"]),
            fds=fields["fds"],
            container=fields["container"],
            pod=fields["pod"],
            scope=str(fields.get("scope", "process")),
            line=line.rstrip("\n"),
        )


def mount_point(mount: str | os.PathLike[str] | None = None) -> Path:
    return Path(mount or os.environ.get("RESTRACK_MOUNT") or DEFAULT_MOUNT)


def _is_served(root: Path) -> bool:
    """A mount point with our files (a stray `register` file in a plain
    directory, left by an `echo` while no daemon ran, is not)."""
    try:
        return os.path.ismount(root) and (root / "register").exists()
    except OSError:
        return False


def _served(root: Path) -> Path:
    if not _is_served(root):
        _raise(OSError(errno.ENOENT, ""), root, str(root))
    return root


def _process_exists(pid: int) -> bool:
    """Whether `pid` names a live process here (a zombie is none, as for register)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass  # another user's: it exists
    except (ProcessLookupError, OverflowError):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            text = file.read()
    except OSError:
        return True  # hidden by /proc's hidepid=, say; kill() saw it
    return text[text.rfind(b")") + 2 : text.rfind(b")") + 3] not in (b"Z", b"X")


PF_KTHREAD = 0x00200000  # the kernel's flag of its own threads (/proc/PID/stat field 9)


def _is_kernel_thread(pid: int) -> bool:
    """Whether `pid` is a kernel thread (kthreadd, kworker/...): no address space,
    no files of its own, so nothing to track. False where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            text = file.read()
        flags = int(text[text.rfind(b")") + 2 :].split()[6])
    except (OSError, ValueError, IndexError):
        return False
    return bool(flags & PF_KTHREAD)


def _meaning(code: int, root: Path, pid: int | None, untracked: int) -> int:
    """ESRCH for no such process, ENOENT for a live one that is not tracked.

    `untracked` is the errno by which the daemon said "not tracked" for this
    call: ESRCH for deregister, ENOENT for the files of a process directory.
    A deregister answered ESRCH while the pid is still tracked means the process
    exited, or was killed by its quota that moment (it may not be reaped yet,
    so it would still look alive): no such process.
    """
    if pid is None or code != untracked:
        return code
    if untracked == errno.ESRCH and os.path.lexists(root / str(pid)):
        return code
    return errno.ENOENT if _process_exists(pid) else errno.ESRCH


def _raise(
    error: OSError,
    root: Path,
    subject: str,
    pid: int | None = None,
    untracked: int = errno.ENOENT,
) -> NoReturn:
    code = error.errno or errno.EIO
    if code in _NOT_SERVED or not _is_served(root):
        raise NotMountedError(
            errno.ENOENT,
            f"no restrackfs daemon serves {root} (start restrackfs, or set RESTRACK_MOUNT)",
        ) from None
    code = _meaning(code, root, pid, untracked)
    reason = _REASONS.get(code) or os.strerror(code).lower()
    raise OSError(code, f"{subject}: {reason}") from None


def _pid_of(relative: str) -> int | None:
    """The pid of a path in a process directory (`4242/stat`); None for a top file."""
    head, sep, _ = relative.partition("/")
    return int(head) if sep and head.isdigit() else None


def _write(
    root: Path,
    relative: str,
    text: str,
    subject: str,
    pid: int | None = None,
    untracked: int = errno.ENOENT,
) -> None:
    try:
        fd = os.open(_served(root) / relative, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as error:
        _raise(error, root, subject, pid if pid is not None else _pid_of(relative), untracked)


def _read(root: Path, relative: str, subject: str) -> str:
    try:
        fd = os.open(_served(root) / relative, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks).decode()
        finally:
            os.close(fd)
    except OSError as error:
        _raise(error, root, subject, _pid_of(relative))


def _check_pid(pid: int) -> int:
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise TypeError(f"pid must be an int, not {type(pid).__name__}")
    if pid < 1:  # the daemon refuses it too (EINVAL); say why
        raise OSError(errno.EINVAL, f"{pid}: not a pid: want an integer >= 1")
    return pid


def _checked(pid: int, parse: Callable[[str], object], text: str) -> None:
    """Refuse a value the daemon would refuse, saying why (the daemon's own parser)."""
    try:
        parse(text)
    except OSError as error:
        raise OSError(errno.EINVAL, f"{pid}: {error.strerror}") from None


def _quota_token(pid: int, key: str, value: int | str | None) -> str:
    if value is None or (isinstance(value, int) and value == -1):
        return f"{key}={UNLIMITED}"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{key} quota must be an int, a str or None, not {type(value).__name__}")
    if isinstance(value, int) and value < -1:
        raise OSError(errno.EINVAL, f"{pid}: {key} quota {value}: want >= 0, or -1/None for none")
    _checked(pid, parse_count if key == FILES else parse_size, str(value))
    return f"{key}={value}"


# ----- the kernel patch's five calls ------------------------------------------


def register(pid: int, *, mount: str | os.PathLike[str] | None = None) -> None:
    """Start tracking `pid` (a thread id registers its process).

    A kernel thread cannot be tracked: the daemon answers ESRCH, as for a zombie
    (no address space); the error says which."""
    try:
        _write(mount_point(mount), "register", f"{_check_pid(pid)}\n", str(pid))
    except ProcessLookupError:
        if _is_kernel_thread(pid):
            raise ProcessLookupError(errno.ESRCH, f"{pid}: {KERNEL_THREAD}") from None
        raise


def deregister(pid: int, *, mount: str | os.PathLike[str] | None = None) -> None:
    """Stop tracking `pid`."""
    _write(mount_point(mount), "deregister", f"{_check_pid(pid)}\n", str(pid), pid, errno.ESRCH)


def resource_cap(
    pid: int,
    heap_quota: int | None,
    file_quota: int | None,
    *,
    action: str | None = None,
    mount: str | os.PathLike[str] | None = None,
) -> None:
    """Set the heap quota (bytes) and file quota; None or -1 is no limit."""
    set_quota(pid, heap=heap_quota, files=file_quota, action=action, mount=mount)


def resource_reset(pid: int, *, mount: str | os.PathLike[str] | None = None) -> None:
    """Clear the quotas and restart the usage counters, as the kernel patch did."""
    reset(pid, "all", mount=mount)


def fetch(pid: int, *, mount: str | os.PathLike[str] | None = None) -> Resource:
    """The usage and quotas of a tracked process, from one read of `PID/stat`."""
    return stat(pid, mount=mount).resource()


# ----- extras -----------------------------------------------------------------


def set_quota(
    pid: int,
    *,
    heap: int | str | None = None,
    files: int | str | None = None,
    action: str | None = None,
    scope: str | None = None,
    mount: str | os.PathLike[str] | None = None,
) -> None:
    """Write a quota; sizes may be bytes or strings the daemon parses (`40M`);
    `scope="tree"` makes it cover the process and everything it starts."""
    _check_pid(pid)
    tokens = [_quota_token(pid, HEAP, heap), _quota_token(pid, FILES, files)]
    if action is not None:
        _checked(pid, parse_action, action)
        tokens.append(f"action={action}")
    if scope is not None:
        _checked(pid, parse_scope, scope)
        tokens.append(f"scope={scope}")
    _write(mount_point(mount), f"{_check_pid(pid)}/quota", " ".join(tokens) + "\n", str(pid))


def reset(pid: int, what: str = "all", *, mount: str | os.PathLike[str] | None = None) -> None:
    """`all` (quota and counters), `quota` or `usage`."""
    _checked(_check_pid(pid), parse_reset, what)
    _write(mount_point(mount), f"{_check_pid(pid)}/reset", f"{what}\n", str(pid))


def stat(pid: int, *, mount: str | os.PathLike[str] | None = None) -> Stat:
    """Every field of `PID/stat`, read at once (one consistent reading)."""
    return parse_stat(_read(mount_point(mount), f"{_check_pid(pid)}/stat", str(pid)))


def tree_heapsize(pid: int, *, mount: str | os.PathLike[str] | None = None) -> int:
    """A tree quota's heap: its members' VmData summed, over the root's baseline
    (ENOENT while `pid` has no tree quota)."""
    return int(_read(mount_point(mount), f"{_check_pid(pid)}/tree_heapsize", str(pid)))


def tree_openfile_count(pid: int, *, mount: str | os.PathLike[str] | None = None) -> int:
    """A tree quota's open descriptors summed over its members, over the root's baseline."""
    return int(_read(mount_point(mount), f"{_check_pid(pid)}/tree_openfile_count", str(pid)))


def members(pid: int, *, mount: str | os.PathLike[str] | None = None) -> list[int]:
    """A tree quota's live members, `pid` first."""
    text = _read(mount_point(mount), f"{_check_pid(pid)}/members", str(pid))
    return [int(line) for line in lines(text)]


def fds(pid: int, *, mount: str | os.PathLike[str] | None = None) -> dict[str, int]:
    """The open descriptors of a tracked process by kind (`FD_KINDS`, in order), and
    `openfile_total`, their sum: one read of `PID/fds`, one listing."""
    text = _read(mount_point(mount), f"{_check_pid(pid)}/fds", str(pid))
    return parse_fds(text)


def parse_fds(text: str) -> dict[str, int]:
    """`PID/fds`'s `kind count` lines; a kind missing or given twice is refused."""
    counts: dict[str, int] = {}
    for line in lines(text):
        key, _, value = line.partition(" ")
        if key in counts:
            raise OSError(errno.EIO, f"fds: {key!r} given twice")
        counts[key] = int(value)
    return {key: counts[key] for key in (*FD_KINDS, OPENFILE_TOTAL)}


def lines(text: str) -> list[str]:
    """The lines of a file of the mount: split on `\\n` alone. (`str.splitlines()`
    also splits on `\\x1c`, `\\x85`, `\\u2028`... which a process name may hold.)"""
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def parse_stat(text: str) -> Stat:
    """`PID/stat`'s `key value` lines; `comm` stays as the daemon escaped it
    (control characters as `\\xHH`...: see the README), so it is safe to print.
    A key given twice is refused rather than let a later line override an earlier."""
    fields: dict[str, str] = {}
    for line in lines(text):
        key, _, value = line.partition(" ")
        if key in fields:
            raise OSError(errno.EIO, f"stat: {key!r} given twice (a forged line?)")
        fields[key] = value
    values = {name: _STAT_VALUE.get(name, int)(fields[name]) for name in STAT_FIELDS}
    if MEMBERS in fields:  # a tree quota is set
        values |= {name: int(fields[name]) for name in TREE_STAT_FIELDS}
    return Stat(**values)


# How each stat field's text is read (int unless said here).
_STAT_VALUE: dict[str, Callable[[str], object]] = {
    COMM: str,
    ACTION: str,
    HEAP_QUOTA: parse_limit,
    FILE_QUOTA: parse_limit,
}


def tracked(*, mount: str | os.PathLike[str] | None = None) -> list[int]:
    """The tracked pids (that the caller may see), ascending."""
    root = mount_point(mount)
    try:
        names = os.listdir(_served(root))
    except OSError as error:
        _raise(error, root, str(root))
    return sorted(int(name) for name in names if name.isascii() and name.isdigit())


def engine(*, mount: str | os.PathLike[str] | None = None) -> str | None:
    """The engine in force, `bpf` or `procfs` (None: a daemon without the `engine` file)."""
    root = mount_point(mount)
    try:
        return _read(root, "engine", str(root)).strip()
    except FileNotFoundError as error:
        if isinstance(error, NotMountedError):
            raise
        return None


def events(
    pid: int | None = None, *, mount: str | os.PathLike[str] | None = None
) -> dict[str, int]:
    """The `events` counters (`exceeded`, `killed`, ...): the daemon's since it
    started, or with `pid` that tracked process's."""
    root = mount_point(mount)
    relative = "events" if pid is None else f"{_check_pid(pid)}/events"
    text = _read(root, relative, str(root) if pid is None else str(pid))
    return {key: int(value) for key, _, value in (line.partition(" ") for line in lines(text))}


def metrics(*, mount: str | os.PathLike[str] | None = None) -> str:
    """The Prometheus exposition text of `metrics`."""
    root = mount_point(mount)
    return _read(root, "metrics", str(root))


ENFORCEMENTS = "enforcements"
_READ_SIZE = 1 << 20


def enforcements(*, mount: str | os.PathLike[str] | None = None) -> list[Enforcement]:
    """The records the daemon keeps (its last 1,000 enforcement actions), oldest first;
    under --hidepid only those of the caller's own processes."""
    root = mount_point(mount)
    text = _read(root, ENFORCEMENTS, str(root))
    return [Enforcement.parse(line) for line in text.splitlines()]


def follow_enforcements(
    *,
    mount: str | os.PathLike[str] | None = None,
    new_only: bool = False,
    timeout: float | None = None,
) -> Iterator[Enforcement]:
    """The records as they are made, like `tail -f`: the kept ones first (unless
    `new_only`), then each new one once poll() says the file changed (no sleeping);
    with `timeout`, it ends that many seconds after it began.

    Each wake reads the file again from its start and yields the lines after the
    last one yielded; if more than the whole file's worth came meanwhile, all of
    them (the ones between were dropped by the daemon)."""
    root = mount_point(mount)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        fd = os.open(_served(root) / ENFORCEMENTS, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        _raise(error, root, str(root))
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        lines = _read_whole(fd, root).splitlines()
        fresh = [] if new_only else lines
        last = None
        while True:
            for line in fresh:
                yield Enforcement.parse(line)
            last = lines[-1] if lines else last
            wait_ms = None
            if deadline is not None:
                wait_ms = max(0, int((deadline - time.monotonic()) * 1000) + 1)
            if not poller.poll(wait_ms):
                return  # the time given passed with nothing new
            lines = _read_whole(fd, root).splitlines()
            fresh = _after(lines, last)
    finally:
        os.close(fd)


def _read_whole(fd: int, root: Path) -> str:
    """The file's text from one rendering: a read at offset 0 renders it, the reads
    after continue that text."""
    chunks = []
    try:
        while chunk := os.pread(fd, _READ_SIZE, sum(map(len, chunks))):
            chunks.append(chunk)
    except OSError as error:
        _raise(error, root, str(root))
    return b"".join(chunks).decode()


def _after(lines: list[str], last: str | None) -> list[str]:
    """The lines after `last` (all of them when it is gone or None)."""
    if last is None:
        return lines
    for index in range(len(lines) - 1, -1, -1):
        if lines[index] == last:
            return lines[index + 1 :]
    return lines
