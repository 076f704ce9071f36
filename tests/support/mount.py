"""Reading a daemon's mount the way several test layers do: events, peaks, log lines."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

from tests.support.daemon import Daemon
from tests.support.grow import Grower
from tests.support.procs import MiB
from tests.support.waiting import wait_until

SPIKE = 30 * MiB


def events_of(daemon: Daemon, pid: int | None = None) -> dict[str, int]:
    """The counters of `events` (the process's, or the mount's top-level ones)."""
    text = daemon.read(pid, "events") if pid is not None else daemon.read("events")
    return {key: int(value) for key, value in (line.split() for line in text.splitlines())}


def top_events(daemon: Daemon) -> dict[str, int]:
    return events_of(daemon)


def enforcement_line(daemon: Daemon, pid: int) -> tuple[int, int] | None:
    """(usage, limit) of the daemon's enforcement log line for `pid`, if written."""
    found = re.search(rf"pid={pid} comm=\S+ quota=\S+ usage=(\d+) limit=(\d+)", daemon.log_text())
    return None if found is None else (int(found[1]), int(found[2]))


def capped(daemon: Daemon, grower: Grower, quota: str) -> Grower:
    daemon.register(grower.pid)
    daemon.write(quota, grower.pid, "quota")
    return grower


def peak(daemon: Daemon, pid: int, name: str = "heap_peak") -> int:
    return int(daemon.read(pid, name))


def spike_is_caught(daemon: Daemon, w, *, exact: bool) -> None:
    """A 30 MiB spike that no read sees shows in heap_peak under a quota.

    `exact` (the bpf engine: the kernel raises the peak at the mmap itself): mapped
    and unmapped at once. Otherwise (procfs): held until the periodic check has
    seen it (its notify breach counted in `events`, a read that samples nothing),
    since that check is the only sample taken; then unmapped."""
    daemon.register(w.pid)
    daemon.write(f"heap={SPIKE // 2} action=notify", w.pid, "quota")
    w.do("mmap", SPIKE)
    if not exact:
        wait_until(lambda: "notified 1" in daemon.read(w.pid, "events"), what="the check")
    w.do("munmap")
    assert peak(daemon, w.pid) >= SPIKE
    assert daemon.read(w.pid, "heapsize") == "0\n"


def events_from_fd(fd: int) -> dict[str, int]:
    """The counters of an `events` file held open (read from offset 0)."""
    text = os.pread(fd, 4096, 0).decode()
    return {key: int(value) for key, value in (line.split() for line in text.splitlines())}


@contextlib.contextmanager
def opened(daemon: Daemon, *parts: object, flags: int = os.O_RDONLY) -> Iterator[int]:
    """A descriptor of the mount's file `parts`, closed at the end."""
    fd = os.open(daemon.path(*parts), flags)
    try:
        yield fd
    finally:
        os.close(fd)
