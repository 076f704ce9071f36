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
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


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


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def write_memory(pid: int, address: int, data: bytes) -> bool:
    """process_vm_writev: honours page protections, so a read-only or unmapped
    target fails (EFAULT) instead of being written through like /proc/PID/mem."""
    buffer = ctypes.create_string_buffer(data, len(data))
    local = _IoVec(ctypes.cast(buffer, ctypes.c_void_p), len(data))
    remote = _IoVec(address, len(data))
    written = _libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    return written == len(data)
