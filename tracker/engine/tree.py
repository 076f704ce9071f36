"""A tree quota's membership and sums, found in /proc.

A tree is one quota over a process (its root) and every process it starts from
the moment the quota is set, at any depth. Its members are pinned by pidfd once
found, so a member keeps its membership when it execs or when its parent exits
(it is reparented: its ppid no longer says whose it was), and its pid cannot be
recycled into the tree while it is pinned. A process that was already running
when the quota was set never joins: a child joins only if it started at or after
the quota's start (stat's start time, clock ticks since boot) and was not among
the root's children seen at that moment (the tick is 10 ms: that list settles
a child forked in the quota's own tick).

Membership is found by scanning /proc (one read of each process's stat: ppid
and start time) whenever the tree is checked: every --interval under procfs,
and at each read of a tree file. A child forked and reparented between two
scans (its parent, a member, exited before the scan) is never found: that is
the procfs engine's overshoot, measured in docs/engines.md.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Iterable

from tracker.engine.resources import Counters
from tracker.errors import AccessDenied, NoSuchProcess
from tracker.linux import procfs
from tracker.linux.process import Process

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# (pid, start time): a process's identity, as the state file keeps a member
Identity = tuple[int, int]


def boot_ticks_now() -> int:
    """Now, in stat's start-time unit (clock ticks since boot)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLOCK_TICKS)


def children_by_parent() -> dict[int, list[Identity]]:
    """One scan of /proc: each process's (pid, start time), under its parent's pid."""
    children: dict[int, list[Identity]] = defaultdict(list)
    for pid in procfs.list_pids():
        with contextlib.suppress(NoSuchProcess, AccessDenied, ValueError):
            stat = procfs.read_stat(pid)
            children[stat.ppid].append((pid, stat.start_time))
    return children


class Tree:
    """The members of one tree quota (the root first), its start and its baseline."""

    def __init__(
        self,
        root: Process | None,
        since: int,
        baseline: Counters,
        excluded: Iterable[Identity] = (),
    ) -> None:
        self.root = root  # the entry's own process, not closed here; None: it exited
        self.since = since  # the quota's start, in clock ticks since boot
        # the sums (absolute) that count as 0: the root's usage at its baseline,
        # or the sums at the last usage reset
        self.baseline = baseline
        self.excluded = frozenset(excluded)  # already running when the quota was set
        self.members: dict[int, Process] = {} if root is None else {root.pid: root}

    @classmethod
    def start(cls, root: Process, baseline: Counters) -> Tree:
        """A tree starting now: the root's children running now never join."""
        since = boot_ticks_now()
        running = children_by_parent().get(root.pid, [])
        return cls(root, since, baseline, running)

    def pids(self) -> list[int]:
        """The live members, root first."""
        return list(self.members)

    def identities(self) -> list[Identity]:
        """The members but the root, as the state file keeps them."""
        return [(p.pid, p.start_time) for p in self.members.values() if p is not self.root]

    def follow(self, identities: Iterable[Identity]) -> None:
        """Pin these processes as members (restored from the state file): each only
        if it is still the process it was (a recycled pid fails its start time)."""
        for pid, start_time in identities:
            if pid not in self.members:
                self._join(pid, start_time)

    def follow_kernel(self, identities: Iterable[Identity]) -> None:
        """The members a backend keeps in the kernel (it added them at their fork):
        pin those not pinned yet, each only if it is the process the kernel named
        (its start time), and unpin those it no longer lists."""
        listed = dict(identities)
        for pid in [
            pid for pid, p in self.members.items() if pid not in listed and p is not self.root
        ]:
            self._leave(pid)
        for pid in listed.keys() - self.members.keys():
            self._join(pid, listed[pid])

    def find_members(self) -> None:
        """Drop the members that exited, then take in every process started since
        the quota whose parent is a member, at any depth (one scan of /proc)."""
        for pid, process in list(self.members.items()):
            if process is not self.root and not process.is_alive():
                self._leave(pid)
        children = children_by_parent()
        parents = list(self.members)
        while parents:
            parent = parents.pop()
            for pid, start_time in children.get(parent, ()):
                if self._may_join(pid, start_time) and self._join(pid, start_time):
                    parents.append(pid)

    def _may_join(self, pid: int, start_time: int) -> bool:
        if pid in self.members or start_time < self.since:
            return False
        return (pid, start_time) not in self.excluded

    def _join(self, pid: int, start_time: int | None) -> bool:
        try:
            self.members[pid] = Process.open(pid, start_time)
        except (NoSuchProcess, AccessDenied):
            return False
        return True

    def _leave(self, pid: int) -> None:
        process = self.members.pop(pid)
        if process is not self.root:
            process.close()

    def sums(self) -> Counters:
        """VmData and open descriptors added up over the live members (absolute).
        A member gone meanwhile leaves; the root's exit raises NoSuchProcess."""
        heap = files = 0
        for pid, process in list(self.members.items()):
            try:
                vm_data, open_fds = process.sample(heap=True, files=True)
            except (NoSuchProcess, AccessDenied):
                if process is self.root:
                    raise
                self._leave(pid)
                continue
            heap += vm_data
            files += open_fds
        return Counters(heap, files)

    def orphaned(self) -> Tree | None:
        """The root exited: the members that outlive it as a tree of their own (their
        pidfds move to it; this one keeps the root alone), which goes on until its
        last member exits. None when no member is left."""
        if self.root is None:
            return None
        self.members.pop(self.root.pid, None)
        rest, self.members = self.members, {self.root.pid: self.root}
        if not rest:
            return None
        orphan = Tree(None, self.since, self.baseline, self.excluded)
        orphan.members = rest
        return orphan

    def kill(self) -> None:
        """SIGKILL to every member, each through its pidfd: a job over its quota is over."""
        for process in self.members.values():
            process.kill()

    def close(self) -> None:
        """The tree ends: unpin the members (the root stays the entry's)."""
        for pid in list(self.members):
            self._leave(pid)
