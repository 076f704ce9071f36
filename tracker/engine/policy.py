"""The policy every backend shares: reading with enforcement, the one-sample
check, what a pushed backend reports, and who the owner is now.

A fresh reading that breaks a quota is acted on at once, whoever asked for it
(a `cat` of a file, the metrics, a command, the procfs backend's period), and
raises the entry's high-water mark (`entry.high`: heap_peak, openfile_peak),
into which a backend's exact peaks are folded when a peak is read. The
`Engine` (tracker/engine/engine.py) is a `Policy` with the commands and the lifecycle
on top; a backend sees it through the `backend.Policy` protocol.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import TypeVar

import trio

from tracker.backends.base import Report, ReportKind
from tracker.deny.keeper import DenyKeeper
from tracker.engine import access
from tracker.engine.enforce import Enforcer
from tracker.engine.entry import Ended, Entry, Measurement
from tracker.engine.registry import Registry
from tracker.engine.resources import (
    FILES_RESOURCE,
    HEAP_RESOURCE,
    RESOURCES,
    Counters,
    Resource,
    sample,
)
from tracker.errors import AccessDenied, Deregistered, NoSuchProcess
from tracker.linux.process import Process, Usage
from tracker.quota import Action

# fds listings at once in worker threads (each holds the GIL for its Python loop
# part of the time: two keep the event loop's share large; the others wait, async):
# root's two of its own, and two shared by the other users, at most one each.
FD_LISTINGS = 2

T = TypeVar("T")
MAX_IDLE_TURNS = 4096  # uids whose idle turn is remembered


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


log = logging.getLogger("restrackfs.engine")


class Policy:
    def __init__(self, registry: Registry, enforcer: Enforcer, deny: DenyKeeper) -> None:
        self.registry = registry
        self.enforcer = enforcer
        self.deny = deny
        # a backend's exact peaks (backend.ExactPeaks), if it has them; set by the Engine
        self.exact_peaks: Callable[[Entry], Counters | None] | None = None
        # a backend's read of VmData in the kernel (backend.KernelReads); set by the Engine
        self.kernel_vm_data: Callable[[Process], int | None] | None = None
        self.kernel_usage: Callable[[Process], tuple[int, str] | None] | None = None
        # root's, the other users' (made in the trio run); each user's turn
        self._fd_listings: tuple[trio.CapacityLimiter, trio.CapacityLimiter] | None = None
        self._listing_turns = UidTurns()

    # ----- reading, with enforcement ----------------------------------------

    def measure(self, entry: Entry) -> Measurement:
        """Read the process now; enforce its quota if the reading breaks it."""
        usage = self._read_counters(entry, self._usage, entry.process)
        absolute = Counters.of_usage(usage)
        self._raise_high(entry, absolute)
        relative = absolute.since(entry.baseline)
        if entry.setting is not None:
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
        )

    def heapsize(self, entry: Entry) -> int:
        """heapsize alone: reads VmData and nothing else (the hot path of `cat`)."""
        return self._one(entry, HEAP_RESOURCE)

    def openfile_count(self, entry: Entry) -> int:
        """openfile_count alone: one stat() of /proc/PID/fd."""
        return self._one(entry, FILES_RESOURCE)

    def _one(self, entry: Entry, resource: Resource) -> int:
        """One resource read alone (the hot path: no more work than that read)."""
        now = self._read_counters(entry, self._read_alone, entry.process, resource)
        if now > (entry.high.of(resource) or 0):
            entry.high = entry.high.highest(resource.alone(now))
        used = max(0, now - (entry.baseline.of(resource) or 0))
        if entry.setting is not None:
            self.enforcer.enforce(entry, resource.alone(used))
        return used

    def _usage(self, process: Process) -> Usage:
        """VmData, the name and the open fds now: the first two from the backend's
        kernel read where it answers (one run, no /proc file), the fds counted;
        else all three from /proc (`Process.usage`)."""
        if self.kernel_usage is not None and process.via is None:
            read = self.kernel_usage(process)  # of this very process (its pidfd's inode)
            if read is not None:
                vm_data, comm = read
                _, open_fds = process.sample(heap=False, files=True)  # checks the pidfd
                return Usage(comm, vm_data, open_fds)
        return process.usage()

    def _read_alone(self, process: Process, resource: Resource) -> int:
        """One resource's absolute value now: VmData from the backend's kernel read
        where it answers (the same counter, no /proc file), else the resource's sampler."""
        if resource is HEAP_RESOURCE and self.kernel_vm_data is not None and process.via is None:
            vm_data = self.kernel_vm_data(process)  # of this very process (its pidfd's inode)
            if vm_data is not None:
                return vm_data
        return resource.read(process)

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
        if self.exact_peaks is not None:
            exact = self.exact_peaks(entry)
            if exact is not None:
                self._raise_high(entry, exact)

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
        self.check_current(entry)
        worker = entry.process.duplicate()
        try:
            async with self._listing_turn(uid) as limiter:
                kinds = await trio.to_thread.run_sync(worker.fd_kinds, limiter=limiter)
        except NoSuchProcess:
            if entry.ended is None:
                self.registry.remove(entry, Ended.EXITED)
            self.check_current(entry)  # deregistered meanwhile: ENOENT, not ESRCH
            raise
        finally:
            worker.close()
        self.check_current(entry)  # deregistered, killed or exited during the listing
        if entry.process.via is None:
            entry.process.via = worker.via  # a zombie leader: the thread it went through
        total = sum(kinds.values())
        self._raise_high(entry, FILES_RESOURCE.alone(total))
        if entry.setting is not None:
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

    @staticmethod
    def _raise_high(entry: Entry, absolute: Counters) -> None:
        if absolute.exceeds(entry.high):
            entry.high = entry.high.highest(absolute)

    def check_current(self, entry: Entry) -> None:
        """Raise unless the entry is still registered and its process alive."""
        if entry.ended is Ended.DEREGISTERED:
            raise Deregistered(f"{entry.pid}: deregistered")
        if entry.ended is not None or entry.killed or not entry.process.is_alive():
            raise NoSuchProcess(entry.pid, "process exited")

    # ----- what backends call (backend.Policy) ------------------------------

    def watched(self) -> Iterable[Entry]:
        return self.registry.watched()

    def check(self, entry: Entry) -> None:
        """One check: sample what the quota limits, enforce, keep deny limits."""
        quota = entry.quota
        if quota is None or entry.ended is not None:
            return
        try:
            deny = quota.action is Action.DENY
            wanted = [r for r in RESOURCES if deny or r.limit(quota) is not None]
            absolute = self._sample(entry, wanted)
            self._raise_high(entry, absolute)
            self.enforcer.enforce(entry, absolute.since(entry.baseline))
            if deny:
                self.deny.recheck(entry, absolute)
        except NoSuchProcess:
            pass
        except AccessDenied as error:
            log.warning("check pid=%d: %s", entry.pid, error)

    def reported(self, report: Report) -> None:
        """A pushed backend's report: the kernel acted; log, count, announce (or keep limits)."""
        entry = report.entry
        if self.registry.get(entry.pid) is not entry and entry.ended is not Ended.EXITED:
            return  # deregistered meanwhile; what an exited one did before it exited counts
        if report.kind is ReportKind.RAISED:
            self.check(entry)  # lowers it back, counts it denied, a defeat
        elif report.kind is ReportKind.REFUSED:
            self.enforcer.refused(report)
        elif report.kind is ReportKind.PEAK:  # usage relative to the baseline, as every report's
            base = entry.baseline.of(report.resource) or 0
            self._raise_high(entry, report.resource.alone(base + report.usage))
        else:  # exceeded, killed, notified
            self.enforcer.reported(report)

    # ----- shared by the commands -------------------------------------------

    def _enforce_before_command(self, entry: Entry) -> None:
        """Enforce the quota on the usage of this moment, then let the command act.

        Every command that names a tracked process (register again, deregister, quota,
        reset) comes through here first: a process that crossed its kill quota a moment
        ago must not be saved by a reset or a deregister that reaches the daemon before
        the next periodic check (the kernel patch killed in the crossing call). A process
        this kills answers as one that exited. Costs one sample per such command.
        """
        self.check_current(entry)
        if entry.quota is not None:
            self.check(entry)
            self.check_current(entry)

    def _owner(self, entry: Entry) -> int:
        """The process's real uid now: kill(2) judges by it, not by who it was at registration."""
        try:
            status = entry.process.status()
        except NoSuchProcess:
            return entry.owner_uid  # reaped: its ids cannot change any more
        entry.owner_uid, entry.owner_gid = status.real_uid, status.real_gid
        return status.real_uid

    def _check_may_lift(self, entry: Entry, caller_uid: int) -> None:
        access.check_control(caller_uid, self._owner(entry), entry.pid)
        access.check_lift_quota(caller_uid, entry.quota_uid, entry.pid)

    def _sample(self, entry: Entry, wanted: Collection[Resource]) -> Counters:
        return self._read_counters(entry, lambda: sample(entry.process, wanted))

    def _read_counters(self, entry: Entry, read: Callable[..., T], *args: object) -> T:
        """`read(*args)` through the entry's pidfd; an exit seen on the way removes the entry."""
        if entry.ended is not None:
            self.check_current(entry)  # says deregistered or exited
        try:
            return read(*args)  # checks the pidfd after reading
        except NoSuchProcess:
            self.registry.remove(entry, Ended.EXITED)
            raise
