"""A tree quota under the bpf engine before the kernel keeps trees: the engine
sums the members from /proc, at reads and commands only (nothing polls)."""

from __future__ import annotations

import contextlib
import signal
import time

from restrackfs import client
from tests.support.daemon import Daemon
from tests.support.procs import MiB
from tests.support.tree import is_dead
from tests.support.waiting import wait_until


def test_a_tree_under_bpf_is_checked_at_reads_only(bpf_daemon: Daemon, shell_root) -> None:
    m, root = bpf_daemon.mountpoint, shell_root(FANOUT_HOLD_MS="-1")
    client.register(root.pid, mount=m)
    # two children of 10 MiB: each alone under the kernel's per-process watch of 16 MiB
    client.set_quota(root.pid, heap="16M", scope="tree", mount=m)
    root.run(f"{{fanout}} 2 mmap {2 * MiB} 5")
    job = int(root.read_line("fanout")[1])
    children = {int(root.read_line("child")[1]) for _ in range(10)}
    time.sleep(0.5)  # the sum is over 16 MiB: nobody read, nothing checked it
    assert root.alive() and not is_dead(job)
    with contextlib.suppress(OSError):  # this read sees it over and kills the tree
        client.members(root.pid, mount=m)
    wait_until(lambda: not root.alive(), what="the root killed")
    assert root.proc.returncode == -signal.SIGKILL
    wait_until(lambda: all(is_dead(pid) for pid in [job, *children]), what="the job killed")
