"""`restrack run`: run an unmodified program whose syscalls 548-553 are the
kernel patch's, answering them through `restrackfs.client`.

The supervisor is single-threaded and forks the program before anything else
happens, so the child can safely install the filter and exec. Each trapped
call is executed with the *caller's* file-system uid (setfsuid is per thread),
so the daemon applies its permission rules to the program, not to whoever ran the
supervisor. It fails closed: a call whose caller's ids cannot be established
for certain is refused, never made with the supervisor's own.

The child waits for the supervisor's word (GO) before it execs, so a quota
(`restrackfs.jobquota`) is in place before the program's first instruction.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from restrackfs import client, seccomp
from restrackfs.client import NotMountedError
from restrackfs.jobquota import READING_INTERVAL, QuotaWatch, StartQuota, program_name
from tracker import vocabulary
from tracker.vocabulary import SYS_SANITY

MiB_SHIFT = 20
NO_LIMIT = 2**64 - 1  # (unsigned long)-1
FETCH_STRUCT = struct.Struct("=i4xQQQQ")  # struct per_proc_resource, 40 bytes on x86_64

_HIDDEN = b"H"  # the child's probe came back without reaching us
_READY = b"R"
_libc = ctypes.CDLL(None, use_errno=True)


class EmulationUnavailable(RuntimeError):
    """The kernel, or an outer seccomp filter, keeps us from trapping the calls."""


# ----- the ABI ----------------------------------------------------------------


def _pid_arg(raw: int) -> int:
    """pid_t is a 32-bit int in the lower half of the register."""
    return ctypes.c_int32(raw & 0xFFFFFFFF).value


def _long_arg(raw: int) -> int:
    return ctypes.c_int64(raw).value


def _process_exists(pid: int) -> bool:
    return pid > 0 and os.path.exists(f"/proc/{pid}")


def _errno_result(error: OSError, table: dict[int, int]) -> int:
    code = error.errno or errno.EIO
    return -table.get(code, code)


def _call(action: Callable[[], object], table: dict[int, int]) -> int:
    try:
        action()
    except NotMountedError:
        raise
    except OSError as error:
        return _errno_result(error, table)
    return 0


def sys_register(pid: int, mount: str | None) -> int:
    if pid < 1:
        return -errno.EINVAL
    return _call(lambda: client.register(pid, mount=mount), {errno.EEXIST: errno.ENFILE})


def sys_deregister(pid: int, mount: str | None) -> int:
    if pid < 1:
        return -errno.EINVAL
    # the client says "not tracked" with ENOENT; the ABI with ESRCH
    return _call(lambda: client.deregister(pid, mount=mount), {errno.ENOENT: errno.ESRCH})


def _not_registered_is_einval(pid: int) -> dict[int, int]:
    # An untracked pid's files are ENOENT; a process that is gone is ESRCH.
    return {errno.ENOENT: errno.ESRCH if not _process_exists(pid) else errno.EINVAL}


def sys_cap(pid: int, heap_mib: int, files: int, mount: str | None) -> int:
    if not _process_exists(pid):
        return -errno.ESRCH
    if heap_mib < -1 or files < -1:
        return -errno.EINVAL
    heap = None if heap_mib == -1 else heap_mib << MiB_SHIFT
    table = {**_not_registered_is_einval(pid), errno.EBUSY: errno.ENFILE}
    return _call(lambda: client.resource_cap(pid, heap, None if files == -1 else files,
                                             mount=mount), table)  # fmt: skip


def sys_reset(pid: int, mount: str | None) -> int:
    if not _process_exists(pid):
        return -errno.ESRCH
    return _call(lambda: client.resource_reset(pid, mount=mount), _not_registered_is_einval(pid))


def pack_fetch(record: client.Resource) -> bytes:
    def limit(value: int | None, shift: int = 0) -> int:
        return NO_LIMIT if value is None else value >> shift

    return FETCH_STRUCT.pack(
        record.pid,
        record.heapsize >> MiB_SHIFT,
        record.openfile_count,
        limit(record.heapsize_quota, MiB_SHIFT),
        limit(record.openfile_quota),
    )


# ----- the supervisor -------------------------------------------------------------


def _caller_fs_ids(listener: int, note: seccomp.Notification) -> tuple[int, int] | None:
    """The calling thread's fs uid and gid, or None unless they are certain.

    /proc/TID/status is read by number, so it names the caller only while the
    caller still waits in its call: a thread interrupted by a signal (and gone, or
    its tid reused) leaves the notification invalid, which is checked *after* the
    read. A status that cannot be read at all is no answer either.
    """
    uid = gid = None
    try:
        with open(f"/proc/{note.tid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Uid:"):
                    uid = int(line.split()[4])
                elif line.startswith(b"Gid:"):
                    gid = int(line.split()[4])
    except (OSError, ValueError, IndexError):
        return None
    if uid is None or gid is None or not seccomp.is_valid(listener, note.id):
        return None
    return uid, gid


@contextmanager
def _fs_ids(uid: int, gid: int) -> Iterator[bool]:
    """Act on the mount with these fs ids (this thread only); yields whether they
    are in force, so nothing is ever done with the supervisor's own instead.

    setfsuid() says nothing of failure: the ids are read back (-1 changes nothing).
    Without privilege only the supervisor's own ids can be taken, which is right:
    a caller with other ids is then refused.
    """
    old_gid = _libc.setfsgid(gid)
    old_uid = _libc.setfsuid(uid)
    try:
        yield _libc.setfsuid(-1) == uid and _libc.setfsgid(-1) == gid
    finally:
        _libc.setfsuid(old_uid)
        _libc.setfsgid(old_gid)


class Supervisor:
    """Answers the trapped calls of one program and all its descendants."""

    def __init__(self, listener: int, mount: str | None) -> None:
        self.listener = listener
        self.mount = mount
        self.warned_unmounted = False

    def answer(self, note: seccomp.Notification) -> int:
        args = note.args
        match note.nr:
            case vocabulary.SYS_SANITY:
                return 0
            case vocabulary.SYS_REGISTER:
                return sys_register(_pid_arg(args[0]), self.mount)
            case vocabulary.SYS_FETCH:
                return self._fetch(note, args[0], _pid_arg(args[1]))
            case vocabulary.SYS_DEREGISTER:
                return sys_deregister(_pid_arg(args[0]), self.mount)
            case vocabulary.SYS_CAP:
                heap, files = _long_arg(args[1]), _long_arg(args[2])
                return sys_cap(_pid_arg(args[0]), heap, files, self.mount)
            case vocabulary.SYS_RESET:
                return sys_reset(_pid_arg(args[0]), self.mount)
        return -errno.ENOSYS

    def _fetch(self, note: seccomp.Notification, address: int, pid: int) -> int:
        try:
            record = client.fetch(pid, mount=self.mount)
        except NotMountedError:
            raise
        except OSError as error:
            return -errno.EPERM if error.errno == errno.EPERM else -errno.EINVAL
        try:
            memory = seccomp.CallerMemory(note.tid)  # pinned first, then checked
        except OSError:
            return -errno.EINVAL
        with memory:
            if not seccomp.is_valid(self.listener, note.id):
                return -errno.EINVAL  # the caller is gone: its tid may name another process
            if not memory.write(address, pack_fetch(record)):
                return -errno.EINVAL
        return 0

    def handle_one(self) -> None:
        note = seccomp.receive(self.listener)
        if note is None:
            return
        ids = _caller_fs_ids(self.listener, note)
        if ids is None:  # the caller is gone, or who it is cannot be told: fail closed
            seccomp.respond(self.listener, note.id, -errno.ESRCH)
            return
        try:
            with _fs_ids(*ids) as in_force:
                result = self.answer(note) if in_force else -errno.EPERM
        except NotMountedError as error:
            if not self.warned_unmounted:
                print(f"restrack run: {error.strerror}; answering ENOSYS", file=sys.stderr)
                self.warned_unmounted = True
            result = -errno.ENOSYS
        seccomp.respond(self.listener, note.id, result)


GO = signal.SIGUSR1  # the parent's word to the waiting child: exec now
_WAIT_STEP = 0.5  # seconds between the waiting child's looks at its parent


def _child(program: list[str], sock: socket.socket) -> None:
    """In the forked child: filter, hand over the listener, probe, wait for GO, exec."""
    parent = os.getppid()
    try:
        listener = seccomp.install_filter()
        socket.send_fds(sock, [b"L"], [listener])
        os.close(listener)
        result, err = seccomp.raw_syscall(SYS_SANITY)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {GO})
        sock.sendall(_READY if result == 0 else _HIDDEN + str(err).encode())
        sock.close()  # the parent sees it closed: waiting, with no descriptor of ours left
        _wait_for_go(parent)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a mask survives the exec
        os.execvp(program[0], program)
    except OSError as error:
        print(f"restrack run: {program[0]}: {error.strerror}", file=sys.stderr)
        os._exit(127 if error.errno == errno.ENOENT else 126)
    finally:
        os._exit(126)


def _wait_for_go(parent: int) -> None:
    """Block until the parent says GO; if the parent dies first, never exec.

    A signal, not a read on the socket: a descriptor held here would be counted
    in the files baseline and be gone after the exec."""
    while signal.sigtimedwait({GO}, _WAIT_STEP) is None:
        if os.getppid() != parent:
            os._exit(126)


def _wait_closed(sock: socket.socket) -> None:
    """Until the child has closed its end of the channel (it then waits for GO)."""
    with suppress(OSError):
        while sock.recv(64):
            pass


def _handshake(sock: socket.socket, child: int, mount: str) -> tuple[Supervisor, int]:
    """Receive the listener and answer the child's probe call."""
    try:
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    except OSError:
        fds = []
    if not fds:
        _, status = os.waitpid(child, 0)
        raise EmulationUnavailable(f"seccomp listener unavailable (child status {status})")
    listener = fds[0]
    seccomp.enable_sync_wakeup(listener)
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    poller.register(sock, select.POLLIN)
    supervisor = Supervisor(listener, mount)
    while True:
        ready = dict(poller.poll())
        if listener in ready and ready[listener] & select.POLLIN:
            supervisor.handle_one()
        if sock.fileno() in ready:
            reply = sock.recv(64)
            if reply.startswith(_READY):
                return supervisor, listener
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            detail = reply[1:].decode() or "?"
            raise EmulationUnavailable(
                "an outer seccomp filter answers syscall 548 itself "
                f"(errno {detail}): the emulation is hidden here"
            )


def run(program: list[str], mount: str | None = None, quota: StartQuota | None = None) -> int:
    """Run `program` under emulation, under `quota` from its first instruction if
    given; return its exit status (128 + signal if killed)."""
    root = client.mount_point(mount)
    client.tracked(mount=root)  # NotMountedError now, in words, not later as ENOSYS
    parent_sock, child_sock = socket.socketpair()
    child = os.fork()
    if child == 0:
        parent_sock.close()
        _child(program, child_sock)
    child_sock.close()
    forward = _forward_signals(child)
    try:
        supervisor, listener = _handshake(parent_sock, child, str(root))
        _wait_closed(parent_sock)
        parent_sock.close()
        watch = None if quota is None else QuotaWatch(child, quota, root)
        _start(child, watch)
        return _serve(supervisor, listener, child, watch, program_name(program))
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)


def _start(child: int, watch: QuotaWatch | None) -> None:
    """Let the waiting child exec, its quota in place first; if that fails, the child
    is killed unstarted and the error goes up."""
    try:
        if watch is not None:
            watch.put_in_place()
    except BaseException:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        raise
    os.kill(child, GO)


def _forward_signals(child: int) -> dict[int, object]:
    def forward(signum: int, _frame: object) -> None:
        with suppress(ProcessLookupError):
            os.kill(child, signum)

    return {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}


def _serve(
    supervisor: Supervisor,
    listener: int,
    child: int,
    watch: QuotaWatch | None = None,
    name: str = "",
) -> int:
    """Serve until no process uses the filter any more; the child's status."""
    child_fd = os.pidfd_open(child)
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    poller.register(child_fd, select.POLLIN)
    status: int | None = None
    while True:
        timeout = None
        if watch is not None and status is None:  # while the program runs
            watch.read_if_due()
            timeout = READING_INTERVAL * 1000
        for fd, events in poller.poll(timeout):
            if fd == child_fd:
                status = _ended(child, watch, name)
                poller.unregister(child_fd)
                os.close(child_fd)
            elif events & select.POLLIN:
                supervisor.handle_one()
            elif events & (select.POLLHUP | select.POLLERR):
                # every process using the filter has exited (orphans included)
                if status is None:
                    status = _ended(child, watch, name)
                os.close(listener)
                return 128 - status if status < 0 else status


def _ended(child: int, watch: QuotaWatch | None, name: str) -> int:
    """The child's exit code (-signal if killed), reaped only after the record of a
    kill is printed: held unreaped, its pid cannot name another process meanwhile."""
    info = os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
    killed = info is not None and info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
    if killed and watch is not None and info.si_status == signal.SIGKILL:
        watch.report_kill(name)
    _, raw = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(raw)
