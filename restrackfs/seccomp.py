"""Seccomp user notification, in ctypes: the mechanics `restrack run` stands on.

A small classic-BPF filter sends syscalls 548-553 (the kernel patch's numbers,
`tracker.vocabulary.SYSCALLS`)
to a listener fd and lets every other syscall run natively. The supervisor
receives each trapped call with `receive()` and answers it with `respond()`.
x86_64 only, like the patch's syscall table.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from tracker.vocabulary import FIRST_SYSCALL, LAST_SYSCALL

AUDIT_ARCH_X86_64 = 0xC000003E
FIRST_NR, LAST_NR = FIRST_SYSCALL, LAST_SYSCALL

_SYS_SECCOMP = 317
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_USER_NOTIF = 0x7FC00000

_NOTIF = struct.Struct("=QIIiIQ6Q")  # id, pid, flags, data{nr, arch, ip, args[6]}
_RESP = struct.Struct("=QqiI")  # id, val, error, flags


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("!") << 8) | number


_IOC_WRITE, _IOC_READ = 1, 2
IOCTL_NOTIF_RECV = _ioc(_IOC_READ | _IOC_WRITE, 0, _NOTIF.size)
IOCTL_NOTIF_SEND = _ioc(_IOC_READ | _IOC_WRITE, 1, _RESP.size)
IOCTL_NOTIF_ID_VALID = _ioc(_IOC_WRITE, 2, 8)
IOCTL_NOTIF_SET_FLAGS = _ioc(_IOC_WRITE, 4, 8)
_USER_NOTIF_FD_SYNC_WAKE_UP = 1

# classic BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JGT_K = 0x25
_RET_K = 0x06


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _program() -> list[tuple[int, int, int, int]]:
    """nr in [548, 553] on x86_64 -> USER_NOTIF; everything else -> ALLOW."""
    return [
        (_LD_W_ABS, 0, 0, 4),  # 0: A = seccomp_data.arch
        (_JEQ_K, 0, 4, AUDIT_ARCH_X86_64),  # 1: other ABIs -> 6
        (_LD_W_ABS, 0, 0, 0),  # 2: A = seccomp_data.nr
        (_JGE_K, 0, 2, FIRST_NR),  # 3: nr < 548 -> 6
        (_JGT_K, 1, 0, LAST_NR),  # 4: nr > 553 -> 6
        (_RET_K, 0, 0, _SECCOMP_RET_USER_NOTIF),  # 5
        (_RET_K, 0, 0, _SECCOMP_RET_ALLOW),  # 6
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def install_filter() -> int:
    """In the process to be supervised: install the filter, return the listener fd."""
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    instructions = _program()
    filters = (_SockFilter * len(instructions))(*(_SockFilter(*i) for i in instructions))
    prog = _SockFprog(len(instructions), filters)
    return _check(
        _libc.syscall(
            ctypes.c_long(_SYS_SECCOMP),
            ctypes.c_long(_SECCOMP_SET_MODE_FILTER),
            ctypes.c_long(_SECCOMP_FILTER_FLAG_NEW_LISTENER),
            ctypes.byref(prog),
        )
    )


def raw_syscall(nr: int, *args: int) -> tuple[int, int]:
    """Call syscall `nr`: (return value, errno)."""
    result = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return result, ctypes.get_errno() if result == -1 else 0


def enable_sync_wakeup(listener: int) -> bool:
    """Linux >= 6.6: wake the caller on the supervisor's CPU, halving the round trip."""
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_SET_FLAGS, struct.pack("=Q", _USER_NOTIF_FD_SYNC_WAKE_UP))
    except OSError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Notification:
    id: int
    tid: int  # the calling thread, in the supervisor's pid namespace
    nr: int
    args: tuple[int, ...]  # raw 64-bit register values


def receive(listener: int) -> Notification | None:
    """The next trapped call; None if its caller vanished before we got it."""
    buffer = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_RECV, buffer)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return None
        raise
    notif_id, tid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(buffer)
    return Notification(notif_id, tid, nr, tuple(args))


def is_valid(listener: int, notif_id: int) -> bool:
    """Is the caller still waiting (so its tid still names it)?"""
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_ID_VALID, struct.pack("=Q", notif_id))
    except OSError:
        return False
    return True


def respond(listener: int, notif_id: int, result: int) -> None:
    """Return `result` from the trapped call: >= 0 as is, < 0 as -errno."""
    value, error = (result, 0) if result >= 0 else (0, result)
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_SEND, _RESP.pack(notif_id, value, error, 0))
    except OSError as failure:
        if failure.errno != errno.ENOENT:  # ENOENT: the caller was killed meanwhile
            raise


class CallerMemory:
    """The caller's address space, pinned before its notification is checked.

    /proc/TID/mem and /proc/TID/maps, opened while the caller waits in its call,
    hold the address space of that moment: if the caller is killed afterwards and
    its tid goes to another task (an exec by another thread of its group takes
    the leader's id at once, in de_thread), writes through them reach the old,
    dead address space and fail, never the new image (a setuid one, say).
    Page protections are checked from maps, as process_vm_writev would: a write
    through mem would pass them."""

    def __init__(self, tid: int) -> None:
        self._mem = os.open(f"/proc/{tid}/mem", os.O_RDWR | os.O_CLOEXEC)
        try:
            self._maps = os.open(f"/proc/{tid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(self._mem)
            raise

    def close(self) -> None:
        os.close(self._mem)
        os.close(self._maps)

    def __enter__(self) -> CallerMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, address: int, data: bytes) -> bool:
        """Write `data` at `address` if all of it lies in writable mappings."""
        if not self._writable(address, address + len(data)):
            return False
        try:
            return os.pwrite(self._mem, data, address) == len(data)
        except OSError:
            return False

    def _writable(self, start: int, end: int) -> bool:
        chunks: list[bytes] = []
        while chunk := os.pread(self._maps, 65536, sum(map(len, chunks))):
            chunks.append(chunk)
        maps = b"".join(chunks)
        covered = start
        for line in maps.splitlines():
            span, perms = line.split()[:2]
            low, high = (int(x, 16) for x in span.split(b"-"))
            if low <= covered < high:
                if perms[1:2] != b"w":
                    return False
                covered = high
                if covered >= end:
                    return True
        return False
