"""Reading with enforcement: every file of a tracked process is one reading here.

A fresh reading that breaks a quota is acted on at once, whoever asked for it
(a `cat` of a file, the metrics, a command), and raises the entry's high-water
mark (`entry.high`: heap_peak, openfile_peak), into which the backend's exact
peaks are folded when a peak is read. Counters come from one reader chosen with
the backend (`tracker.backends.readers`): the engine never asks which.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import TypeVar

import trio

from tracker.backends.readers import ProcReader
from tracker.engine import access
from tracker.engine.enforce import Enforcer
from tracker.engine.entry import Ended, Entry, Measurement, TreeReading
from tracker.engine.registry import Registry
from tracker.engine.resources import FILES_RESOURCE, HEAP_RESOURCE, Counters, Resource
from tracker.errors import Deregistered, NoSuchProcess
from tracker.linux.process import Usage

# fds listings at once in worker threads (each holds the GIL for its Python loop
# part of the time: two keep the event loop's share large; the others wait, async):
# root's two of its own, and two shared by the other users, at most one each.
FD_LISTINGS = 2

T = TypeVar("T")
MAX_IDLE_TURNS = 4096  # uids whose idle turn is remembered

log = logging.getLogger("restrackfs.engine")


class UidTurns:
    """One turn at a time for each uid but root's: however many requests of one
    kind a user starts at once (16 readers of `metrics`, of `fds`), they wait
    behind each other, and another user's — root's above all — behind one."""

    def __init__(self) -> None:
        self._locks: dict[int, trio.Lock] = {}

    def of(self, uid: int) -> AbstractAsyncContextManager[object]:
        if uid == access.ROOT:
            return nullcontext()
        lock = self._locks.get(uid)
        if lock is None:
            if len(self._locks) > MAX_IDLE_TURNS:  # forget the idle ones
                for idle in [u for u, held in self._locks.items() if not held.locked()]:
                    del self._locks[idle]
            lock = self._locks[uid] = trio.Lock()
        return lock


def check_current(entry: Entry) -> None:
    """Raise unless the entry is still registered and its process alive."""
    if entry.ended is Ended.DEREGISTERED:
        raise Deregistered(f"{entry.pid}: deregistered")
    if entry.ended is not None or entry.killed or not entry.process.is_alive():
        raise NoSuchProcess(entry.pid, "process exited")


def raise_high(entry: Entry, absolute: Counters) -> None:
    """Raise the entry's high-water mark to `absolute` where it is higher."""
    if absolute.exceeds(entry.high):
        entry.high = entry.high.highest(absolute)


class Reader:
    """The readings of tracked processes, each enforced and raising the peaks."""

    def __init__(self, registry: Registry, enforcer: Enforcer) -> None:
        self.registry = registry
        self.enforcer = enforcer
        self.counters = ProcReader()  # the backend's, once it is chosen (`use`)
        self._exact_peaks: Callable[[Entry], Counters | None] = lambda entry: None
        self._tree_members: Callable[[Entry], list[tuple[int, int]] | None] = lambda entry: None
        # root's, the other users' (made in the trio run); each user's turn
        self._fd_listings: tuple[trio.CapacityLimiter, trio.CapacityLimiter] | None = None
        self._listing_turns = UidTurns()

    def use(
        self,
        counters: ProcReader,
        exact_peaks: Callable[[Entry], Counters | None],
        tree_members: Callable[[Entry], list[tuple[int, int]] | None],
    ) -> None:
        """Read through the backend's counter reader, with its exact peaks and, where
        it keeps trees itself, their members (each returning None: /proc's)."""
        self.counters = counters
        self._exact_peaks = exact_peaks
        self._tree_members = tree_members

    def tree(self, entry: Entry) -> TreeReading:
        """Check a tree quota now: find its members, sum them, enforce the sums.

        The members and sums are the backend's where it keeps them; else found in
        /proc now (one scan) and summed over the members' pidfds. The root's exit
        removes the entry, as any reading's."""
        tree = entry.tree
        assert tree is not None
        absolute = self.tree_sums(entry)
        relative = absolute.since(tree.baseline)
        self.enforcer.enforce(entry, relative)
        return TreeReading(relative.heap or 0, relative.files or 0, len(tree.members))

    def tree_sums(self, entry: Entry) -> Counters:
        """The tree's members brought up to date (the backend's where it keeps them,
        else found in /proc now) and their sums, read now (absolute). The kernel's
        own sums are not read back: a member's share there is refreshed at its next
        checked call, so after a free it is higher than the process is now."""
        tree = entry.tree
        assert tree is not None
        identities = self._tree_members(entry)
        if identities is None:
            self.read_counters(entry, tree.find_members)
        else:
            tree.follow_kernel(identities)
        return self.read_counters(entry, tree.sums)

    def measure(self, entry: Entry) -> Measurement:
        """Read the process now; enforce its quota if the reading breaks it."""
        usage = self.usage_now(entry)
        absolute = Counters.of_usage(usage)
        raise_high(entry, absolute)
        relative = absolute.since(entry.baseline)
        tree = None
        if entry.tree is not None:
            tree = self.tree(entry)
        elif entry.setting is not None:
            self.enforcer.enforce(entry, relative, usage.comm)
        peaks = self.peaks(entry)
        return Measurement(
            pid=entry.pid,
            comm=usage.comm,
            heapsize=relative.heap or 0,
            openfile_count=relative.files or 0,
            heap_total=usage.vm_data,
            openfile_total=usage.open_fds,
            quota=entry.effective_quota,
            registered=entry.registered,
            heap_peak=peaks.heap or 0,
            openfile_peak=peaks.files or 0,
            tree=tree,
            workload=entry.workload,
        )

    def heapsize(self, entry: Entry) -> int:
        """heapsize alone: reads VmData and nothing else (the hot path of `cat`)."""
        return self._one(entry, HEAP_RESOURCE)

    def openfile_count(self, entry: Entry) -> int:
        """openfile_count alone: one stat() of /proc/PID/fd."""
        return self._one(entry, FILES_RESOURCE)

    def _one(self, entry: Entry, resource: Resource) -> int:
        """One resource read alone (the hot path: no more work than that read)."""
        now = self.read_counters(entry, self.counters.read, entry.process, resource)
        if now > (entry.high.of(resource) or 0):
            entry.high = entry.high.highest(resource.alone(now))
        used = max(0, now - (entry.baseline.of(resource) or 0))
        if entry.setting is not None and entry.tree is None:  # a tree's: on its sums
            self.enforcer.enforce(entry, resource.alone(used))
        return used

    # ----- peaks and descriptors ---------------------------------------------

    def heap_peak(self, entry: Entry) -> int:
        """heap_peak: sampled now (so never below the heapsize of this moment), then
        the high-water mark, with the backend's exact one folded in."""
        self._one(entry, HEAP_RESOURCE)
        return self.peaks(entry).heap or 0

    def openfile_peak(self, entry: Entry) -> int:
        self._one(entry, FILES_RESOURCE)
        return self.peaks(entry).files or 0

    def peaks(self, entry: Entry) -> Counters:
        """The peaks over the baseline (no sample of its own): the samples' high-water
        mark and the backend's exact peaks, whichever is higher."""
        self.fold_exact_peaks(entry)
        return entry.peaks

    def fold_exact_peaks(self, entry: Entry) -> None:
        """Take the backend's exact peaks into `entry.high` (before they may be lost)."""
        exact = self._exact_peaks(entry)
        if exact is not None:
            raise_high(entry, exact)

    async def fds(self, entry: Entry, uid: int = 0) -> dict[str, int]:
        """The open descriptors by kind (`vocabulary.FD_KINDS`), from one listing.

        O(descriptors) (a readlink each, a statx for a path): made in a worker
        thread, on a duplicate of the entry's pidfd, so a process with 100,000
        descriptors does not hold up other requests. Root's listings have
        FD_LISTINGS workers of their own; the other users share FD_LISTINGS, one
        each at most, so no user's listings make another's (root's above all)
        wait behind them. The sum is a fresh files sample: it raises
        openfile_peak and is enforced like one.
        """
        check_current(entry)
        worker = entry.process.duplicate()
        try:
            async with self._listing_turn(uid) as limiter:
                kinds = await trio.to_thread.run_sync(worker.fd_kinds, limiter=limiter)
        except NoSuchProcess:
            if entry.ended is None:
                self.registry.remove(entry, Ended.EXITED)
            check_current(entry)  # deregistered meanwhile: ENOENT, not ESRCH
            raise
        finally:
            worker.close()
        check_current(entry)  # deregistered, killed or exited during the listing
        if entry.process.via is None:
            entry.process.via = worker.via  # a zombie leader: the thread it went through
        total = sum(kinds.values())
        raise_high(entry, FILES_RESOURCE.alone(total))
        if entry.setting is not None and entry.tree is None:
            used = max(0, total - entry.files_base)
            self.enforcer.enforce(entry, FILES_RESOURCE.alone(used))
        return kinds

    @asynccontextmanager
    async def _listing_turn(self, uid: int) -> AsyncIterator[trio.CapacityLimiter]:
        """The worker pool this uid's listing runs in, after its own turn."""
        if self._fd_listings is None:
            pools = trio.CapacityLimiter(FD_LISTINGS), trio.CapacityLimiter(FD_LISTINGS)
            self._fd_listings = pools
        root, users = self._fd_listings
        async with self._listing_turns.of(uid):
            yield root if uid == access.ROOT else users

    def usage_now(self, entry: Entry) -> Usage:
        """VmData, the name and the open descriptors of the entry's process now."""
        return self.read_counters(entry, self.counters.usage, entry.process)

    def read_counters(self, entry: Entry, read: Callable[..., T], *args: object) -> T:
        """`read(*args)` through the entry's pidfd; an exit seen on the way removes the entry."""
        if entry.ended is not None:
            check_current(entry)  # says deregistered or exited
        try:
            return read(*args)  # checks the pidfd after reading
        except NoSuchProcess:
            self.registry.remove(entry, Ended.EXITED)
            raise
