"""Automatic tracking for sidecars: register the processes of this PID namespace.

A scan of /proc every `period` seconds (a quarter second by default, inside
the promised one second) registers each process the selection names, and
gives it the default quota. /proc is the one source that works in any
container without extra capabilities; the proc connector would be instant
but needs CAP_NET_ADMIN in the initial user namespace.

A process is decided once per identity (pid + start time): one that was
deregistered by hand is not registered again, and one that did not match is
looked at again only when its comm changes (an exec).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass

import trio

from tracker.engine.access import ROOT
from tracker.engine.engine import Engine
from tracker.engine.entry import Entry
from tracker.engine.resources import Counters
from tracker.linux import procfs
from tracker.linux.procfs import Stat
from tracker.quota import Action, Quota

log = logging.getLogger("restrackfs.autotrack")

# The inode of the kernel's initial pid namespace (PROC_PID_INIT_INO in
# include/linux/proc_ns.h, fixed since Linux 3.8): every other pid namespace
# gets a fresh inode. Comparing with /proc/1/ns/pid would not do: inside a
# namespace, pid 1 is that namespace's own init.
INITIAL_PID_NAMESPACE_INODE = 0xEFFFFFFC


def in_initial_pid_namespace() -> bool:
    """Is this process in the host's pid namespace (so /proc shows every process)?"""
    return procfs.read_pid_namespace_inode() == INITIAL_PID_NAMESPACE_INODE


def proc_matches_my_pid_namespace() -> bool:
    """Does /proc show this process's own pid namespace?

    Not after `unshare --pid --fork` without `--mount-proc`: /proc is then the
    parent namespace's, and each pid read there names another process than the
    same number does for pidfd_open() and kill() here.
    """
    return procfs.read_self_link() == str(os.getpid())


@dataclass(frozen=True, slots=True)
class Selection:
    """What `--track-all`, `--track-comm` and `--track-children` select."""

    track_all: bool = False
    comm_glob: str | None = None
    children_of: int | None = None
    default_quota: Quota | None = None

    @property
    def enabled(self) -> bool:
        return self.track_all or self.comm_glob is not None or self.children_of is not None

    @property
    def acts_on_everything(self) -> bool:
        """Every process of the namespace gets a quota that kills or denies."""
        quota = self.default_quota
        return (
            self.track_all
            and self.comm_glob is None
            and self.children_of is None
            and quota is not None
            and quota.action in (Action.KILL, Action.DENY)
            and (quota.heap is not None or quota.files is not None)
        )


class AutoTracker:
    def __init__(self, engine: Engine, selection: Selection) -> None:
        self.engine = engine
        self.selection = selection
        self.me = os.getpid()
        # identity -> the comm it was decided with (None: decided for good)
        self._decided: dict[tuple[int, int], str | None] = {}
        self._previous: dict[int, Stat] = {}
        self._quotas: trio.Nursery | None = None  # run()'s: default quotas being set

    @property
    def _at_fork(self) -> bool:
        """--track-children with a default quota and no --track-comm (a name is only
        known after an exec): where the backend can, children are watched at fork,
        before they run, and registered as soon as the daemon hears of them."""
        selection = self.selection
        return (
            selection.children_of is not None
            and selection.default_quota is not None
            and selection.comm_glob is None
        )

    def _forked(self, pid: int, baseline: Counters) -> None:
        self._track(pid, baseline)

    def _still_tracked(self, pid: int, known: Stat) -> bool:
        entry = self.engine.get(pid)
        return (
            entry is not None
            and entry.process.start_time == known.start_time
            and entry.process.is_alive()
        )

    async def run(self, period: float = 0.25) -> None:
        async with trio.open_nursery() as nursery:
            self._quotas = nursery  # default quotas, each awaiting its own deny limits
            if self._at_fork:
                self.engine.policy.on_forked(self._forked)  # before: the next scan
                self._inherit_from_root()
            while True:
                self.scan()
                await trio.sleep(period)

    def scan(self) -> None:
        stats: dict[int, Stat] = {}
        for pid in procfs.list_pids():
            known = self._previous.get(pid)
            if known is not None and self._still_tracked(pid, known):
                stats[pid] = known  # its pidfd vouches for it: no need to read it again
                continue
            try:  # by number: only to choose; register() pins by pidfd and reads again
                stats[pid] = procfs.read_stat(pid)
            except (procfs.NoSuchProcess, procfs.AccessDenied):
                continue
        self._previous = stats
        seen = {(pid, stat.start_time) for pid, stat in stats.items()}
        self._decided = {key: comm for key, comm in self._decided.items() if key in seen}
        for pid, stat in stats.items():
            key = (pid, stat.start_time)
            if key in self._decided and self._decided[key] in (None, stat.comm):
                continue
            if self._selects(pid, stat, stats):
                self._decided[key] = None
                self._track(pid)
            else:
                self._decided[key] = stat.comm

    def _selects(self, pid: int, stat: Stat, stats: dict[int, Stat]) -> bool:
        selection = self.selection
        if pid == self.me or stat.is_kernel_thread or stat.state in "ZX":
            return False  # kernel threads have no heap to track
        if selection.comm_glob is not None and not fnmatch.fnmatchcase(
            stat.comm, selection.comm_glob
        ):
            return False
        return selection.children_of is None or _descends(pid, selection.children_of, stats)

    def _inherit_from_root(self) -> None:
        """The root of --track-children is not tracked itself: a registration of it
        carrying the default quota as an inherit rule only would be one; instead
        the rule is set on it directly, where the backend takes rules."""
        root = self.selection.children_of
        quota = self.selection.default_quota
        assert root is not None and quota is not None
        try:
            start_time = procfs.read_stat(root).start_time
        except (procfs.NoSuchProcess, procfs.AccessDenied) as error:
            log.warning("--track-children %d: %s", root, error)
            return
        if self.engine.inherit(root, start_time, quota):
            log.info("children of pid=%d watched from their fork (%s)", root, quota.format())

    async def _set_default_quota(self, entry: Entry) -> None:
        """The default quota on an entry just registered, and, where the backend
        watches children from their fork, its rule for them; a user's stopped
        helper delays this one entry, never the scan."""
        quota = self.selection.default_quota
        assert quota is not None
        try:
            await self.engine.set_quota(entry, quota, ROOT)
            if self._at_fork:
                self.engine.inherit(entry.pid, entry.process.start_time, quota)
        except OSError as error:  # it exited meanwhile, a state save failed, no limits
            log.debug("auto-track pid=%d: quota not set: %s", entry.pid, error)

    def _track(self, pid: int, baseline: Counters | None = None) -> None:
        if self.engine.get(pid) is not None:
            return
        key = None
        try:
            entry = self.engine.register(pid, ROOT, baseline)
            key = (pid, entry.process.start_time)
            if self.selection.default_quota is not None:
                assert self._quotas is not None, "tracking before run()"
                self._quotas.start_soon(self._set_default_quota, entry)
        except OSError as error:  # it exited meanwhile, or a state save failed
            log.debug("auto-track pid=%d: %s", pid, error)
            return
        if key is not None:
            self._decided[key] = None  # a later scan need not look at it again
        how = " (watched since its fork)" if baseline is not None else ""
        log.info("auto-tracked pid=%d comm=%s%s", pid, procfs.escape_comm(entry.comm), how)


def _descends(pid: int, ancestor: int, stats: dict[int, Stat]) -> bool:
    """Is `pid` a descendant of `ancestor` (by the parent links of this scan)?"""
    hops = 0
    while pid in stats and hops < 4096:
        pid = stats[pid].ppid
        if pid == ancestor:
            return True
        hops += 1
    return False
