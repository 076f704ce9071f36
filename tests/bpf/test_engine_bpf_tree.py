"""Tree quotas through a bpf daemon: the kernel adds each member at its fork and
kills the crossing one in its call, the daemon the rest of the tree right after;
the tree outlives its root until its last member exits."""

from __future__ import annotations

import re
import signal

from restrackfs import client
from tests.support.bpf import BPF
from tests.support.daemon import Daemon, DaemonFactory
from tests.support.procs import MiB
from tests.support.tree import ShellRoot, is_dead
from tests.support.waiting import wait_until

STEP = 2 * MiB


def children(root: ShellRoot, n: int) -> list[int]:
    pids: list[int] = []
    while len(pids) < n:
        pid = int(root.read_line("child")[1])
        if pid not in pids:
            pids.append(pid)
    return pids


def kill_line(daemon: Daemon, pid: int) -> re.Match[str]:
    pattern = rf"pid={pid} comm=\S+ quota=heap usage=(\d+) limit=(\d+) action=kill"
    wait_until(lambda: re.search(pattern, daemon.log_text()), what="the kill's log line")
    found = re.search(pattern, daemon.log_text())
    assert found is not None
    return found


def test_a_fan_out_is_killed_in_the_crossing_call_then_whole(bpf_daemon: Daemon, shell_root):
    m, root = bpf_daemon.mountpoint, shell_root()
    client.register(root.pid, mount=m)
    # four children of up to 10 MiB: each alone far under 24 MiB, the sum over it
    client.set_quota(root.pid, heap="24M", scope="tree", mount=m)
    root.run(f"{{fanout}} 4 mmap {STEP} 5")
    job = int(root.read_line("fanout")[1])
    wait_until(lambda: not root.alive(), what="the root killed")
    assert root.proc.returncode == -signal.SIGKILL
    wait_until(lambda: is_dead(job), what="the job killed")
    usage, limit = map(int, kill_line(bpf_daemon, root.pid).groups())
    assert limit == 24 * MiB
    # caught in the crossing call: over by less than the one step that crossed
    assert limit < usage <= limit + STEP
    assert client.events(mount=m)["killed"] >= 1


def test_a_tree_outlives_its_root_and_is_killed_whole(bpf_daemon: Daemon, shell_root):
    m = bpf_daemon.mountpoint
    root = shell_root(FANOUT_PAUSE_MS="200")
    client.register(root.pid, mount=m)
    client.set_quota(root.pid, heap="24M", scope="tree", mount=m)
    # the root starts the job and exits: its directory goes, its tree stays
    root.run(f"{{fanout}} 4 mmap {STEP} 8 & exit 0")
    job = int(root.read_line("fanout")[1])
    members = children(root, 4)
    wait_until(lambda: not root.alive(), what="the root exited")
    assert root.proc.returncode == 0
    wait_until(lambda: root.pid not in client.tracked(mount=m), what="the root's entry removed")
    # the job grows on without its root: over 24 MiB the crossing member is killed
    # in its call, the rest of the tree by the daemon
    wait_until(lambda: all(is_dead(pid) for pid in [job, *members]), what="the tree killed")
    assert "outlives its root" in bpf_daemon.log_text()
    assert re.search(
        rf"the tree of pid={root.pid} .* killed its \d+ members", bpf_daemon.log_text()
    )


def test_a_usage_reset_retakes_the_trees_baseline(bpf_daemon: Daemon, shell_root):
    m = bpf_daemon.mountpoint
    root = shell_root(FANOUT_HOLD_MS="-1")
    client.register(root.pid, mount=m)
    client.set_quota(root.pid, heap="24M", scope="tree", mount=m)
    root.run(f"{{fanout}} 2 mmap {STEP} 4 &")  # 16 MiB and held
    children(root, 2)
    wait_until(lambda: client.tree_heapsize(root.pid, mount=m) >= 16 * MiB, what="the job grown")
    client.reset(root.pid, "usage", mount=m)
    assert client.tree_heapsize(root.pid, mount=m) < MiB
    # 16 MiB more: 32 MiB over the old baseline, 16 MiB over the new: alive
    root.run(f"{{fanout}} 2 mmap {STEP} 4 &")
    wait_until(lambda: client.tree_heapsize(root.pid, mount=m) >= 16 * MiB, what="grown again")
    assert root.alive()
    client.reset(root.pid, "all", mount=m)


def test_a_tree_stays_enforced_while_no_daemon_runs(bpf_factory: DaemonFactory, shell_root):
    """A stop is no window: members forked while no daemon runs join in the kernel
    and the crossing ones die in their calls; the next daemon kills the rest."""
    daemon = bpf_factory(*BPF)
    m, root = daemon.mountpoint, shell_root()
    client.register(root.pid, mount=m)
    client.set_quota(root.pid, heap="24M", scope="tree", mount=m)
    assert daemon.stop() == 0
    root.run(f"{{fanout}} 4 mmap {STEP} 5")
    job = int(root.read_line("fanout")[1])
    ends = [root.read_line("end") for _ in range(4)]
    # each child died in a checked call: the first crossing, the others at their next
    assert {int(signal_number) for _, _, signal_number in ends} == {signal.SIGKILL}
    # the root makes no checked call while it waits for its job: nobody killed it yet
    # (the job itself exits once its children are reaped)
    assert root.alive()
    daemon.start(*BPF)
    wait_until(lambda: not root.alive(), what="the root killed by the next daemon")
    assert root.proc.returncode == -signal.SIGKILL
    wait_until(lambda: is_dead(job), what="the job gone")


def test_a_trees_warning_comes_in_the_crossing_call(bpf_daemon: Daemon, shell_root):
    """Nothing reads the tree: only the kernel can see its sum cross 25 % of 64 MiB."""
    m = bpf_daemon.mountpoint
    root = shell_root(FANOUT_HOLD_MS="-1")
    client.register(root.pid, mount=m)
    before = client.events(mount=m)["warned"]
    (m / str(root.pid) / "quota").write_text("heap=64M action=notify warn=25% scope=tree\n")
    root.run(f"{{fanout}} 2 mmap {STEP} 6 &")  # 24 MiB together: over 16, under 64
    children(root, 2)
    wait_until(lambda: client.events(mount=m)["warned"] == before + 1, what="the warning")
    assert re.search(rf"pid={root.pid} .*action=warn warn=25%", bpf_daemon.log_text())
    assert client.events(root.pid, mount=m)["warned"] == 1
    assert client.events(root.pid, mount=m)["notified"] == 0
    client.reset(root.pid, "all", mount=m)
