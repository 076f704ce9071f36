"""What /proc says of a process, and a few process facts the tests need."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

MiB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")


def limits_of(pid: int, name: str) -> tuple[str, str]:
    """(soft, hard) of the limit `name` ("Max open files") as /proc/PID/limits shows them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith(name):
            soft, hard = line[26:].split()[:2]
            return soft, hard
    raise AssertionError(name)


def soft_limit(pid: int, name: str) -> int:
    """The soft limit `name` ("Max data size") of pid, -1 for unlimited."""
    soft = limits_of(pid, name)[0]
    return -1 if soft == "unlimited" else int(soft)


def start_time(pid: int) -> int:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat)."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return int(raw[raw.rindex(b")") + 2 :].split()[19])


def exited(pid: int) -> bool:
    """A zombie (or gone): its exit, and the kernel's map cleanup, have run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not os.path.exists(f"/proc/{proc.pid}")
    return proc.pid


def proc_vm_data(pid: int, tid: int | None = None) -> int:
    """VmData in bytes, of the process or of one of its threads."""
    task = f"/proc/{pid}" if tid is None else f"/proc/{pid}/task/{tid}"
    status = Path(f"{task}/status").read_text()
    return int(status.split("VmData:")[1].split()[0]) * 1024


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def has_cap_sys_resource(pid: int) -> bool:
    eff = Path(f"/proc/{pid}/status").read_text().split("CapEff:")[1].split()[0]
    return bool(int(eff, 16) & (1 << 24))


def tracked(mount: Path) -> list[int]:
    """The pids a mount lists, sorted."""
    return sorted(int(name) for name in os.listdir(mount) if name.isdigit())


def errno_of(action) -> int:
    """The errno of the OSError `action()` raises (fails the test if none)."""
    with pytest.raises(OSError) as info:
        action()
    return info.value.errno


def nofile_soft(pid: int) -> int:
    """The soft limit of open files, -1 for unlimited."""
    return soft_limit(pid, "Max open files")


def data_soft(pid: int) -> int:
    """The soft limit of the data segment, -1 for unlimited."""
    return soft_limit(pid, "Max data size")
