"""The procfs backend: polls /proc every `interval` (see tracker/backends/base.py).

Its whole job is time: every period it asks the policy to `check` each entry
with a quota (one sample through the entry's pidfd, enforcement, deny limits
kept). It needs no notification: the registry is read afresh each period; but
a tree quota outlives its root, so a root's exit hands its tree over, checked
every period until its last member exits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import trio

from tracker.backends.readers import ProcReader
from tracker.engine.entry import Ended, Entry
from tracker.engine.resources import Counters
from tracker.engine.tree import Tree
from tracker.quota import Quota

if TYPE_CHECKING:
    from tracker.engine.policy import Policy

log = logging.getLogger("restrackfs.engine")


class Backend:
    name = "procfs"
    events_dropped = None  # nothing queued, nothing to lose

    def __init__(self, policy: Policy, interval: float) -> None:
        self.policy = policy
        self.interval = interval
        self.reader = ProcReader()
        self._orphans: dict[int, tuple[Entry, Tree]] = {}  # the exited root's pid -> its tree
        self._running = False

    @property
    def unloaded(self) -> str | None:
        return None if self._running else "procfs: the polling task is not running"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        self._running = True
        try:
            await self._poll()
        finally:
            self._running = False

    async def _poll(self) -> None:
        while True:
            await trio.sleep(self.interval)
            for entry in list(self.policy.watched()):
                try:
                    self.policy.check(entry)
                except Exception:  # a bug must not stop the checks of all the others
                    log.exception("check of pid=%d failed", entry.pid)
            for root, (entry, tree) in list(self._orphans.items()):
                try:
                    self._check_orphan(root, entry, tree)
                except Exception:
                    log.exception("check of the tree of pid=%d failed", root)

    def _check_orphan(self, root: int, entry: Entry, tree: Tree) -> None:
        """A tree whose root exited: its members found and summed, its quota enforced
        (on the exited root's entry, as its log lines and counts were)."""
        tree.find_members()
        entry.tree = tree  # what a kill kills
        if tree.members:
            self.policy.enforcer.enforce(entry, tree.sums().since(tree.baseline))
        if not tree.members or entry.killed:
            del self._orphans[root]
            entry.tree = None
            tree.close()

    # Polling needs to be told nothing: each period reads the registry.

    def adopt(self, entries: Iterable[Entry]) -> None:
        pass

    def quota_set(self, entry: Entry) -> None:
        pass

    def quota_cleared(self, entry: Entry) -> None:
        pass

    def baseline_reset(self, entry: Entry) -> None:
        pass

    def removed(self, entry: Entry) -> None:
        """An exited root's tree goes on, to its last member."""
        if entry.tree is None or entry.ended is not Ended.EXITED or entry.killed:
            return
        orphan = entry.tree.orphaned()
        if orphan is not None:
            self._orphans[entry.pid] = (entry, orphan)
            log.info("the tree of pid=%d outlives its root, to its last member", entry.pid)

    def flush(self) -> None:
        pass

    def peaks(self, entry: Entry) -> Counters | None:
        """Nothing exact: the policy's own samples (each read and check) are the peaks."""
        return None

    def tree_members(self, entry: Entry) -> list[tuple[int, int]] | None:
        """Found in /proc by the engine at each check."""
        return None

    def inherit(self, pid: int, start_time: int, quota: Quota) -> bool:
        """Not from the fork: the next scan of --track-children finds them."""
        return False

    def close(self) -> None:
        for _, tree in self._orphans.values():
            tree.close()
        self._orphans.clear()
