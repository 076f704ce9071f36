"""A new process at a chosen pid (ns_last_pid), to test what a recycled pid meets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.workload import Workload

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


def _can_force_pids() -> bool:
    try:
        NS_LAST_PID.write_text(NS_LAST_PID.read_text())
    except OSError:
        return False
    return True


force_pids = pytest.mark.skipif(not _can_force_pids(), reason="ns_last_pid not writable")


def spawn_at(pid: int, start: Callable[[], Workload], tries: int = 300) -> Workload:
    """A new process with exactly this (free) pid."""
    for _ in range(tries):
        NS_LAST_PID.write_text(str(pid - 1))
        w = start()
        if w.pid == pid:
            return w
        w.stop()
    pytest.fail(f"could not get pid {pid}")
