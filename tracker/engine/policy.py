"""What every backend shares, and what a backend calls: the one-sample check,
the reports of a pushed backend, the exec rebase, children watched from their
fork; and the rules every command applies first (enforce, then who may).

A backend sees the engine through this object alone (`backend.policy`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from tracker.backends.base import Report, ReportKind
from tracker.deny.keeper import DenyKeeper
from tracker.engine import access
from tracker.engine.enforce import Enforcer
from tracker.engine.entry import Ended, Entry
from tracker.engine.reading import Reader, check_current, raise_high
from tracker.engine.registry import Registry
from tracker.engine.resources import RESOURCES, Counters, sample
from tracker.engine.state import Store
from tracker.errors import AccessDenied, NoSuchProcess, StateNotSaved
from tracker.quota import Action

log = logging.getLogger("restrackfs.engine")


class Policy:
    def __init__(
        self,
        registry: Registry,
        enforcer: Enforcer,
        deny: DenyKeeper,
        reader: Reader,
        store: Store,
    ) -> None:
        self.registry = registry
        self.enforcer = enforcer
        self.deny = deny
        self.reader = reader
        self.store = store
        self._fork_listeners: list[Callable[[int, Counters], None]] = []

    @property
    def state_path(self) -> Path | None:
        """The state file (None: not kept). A backend that keeps state outside the
        daemon (bpf: pins in bpffs, adopted by the next daemon) names it after this."""
        return self.store.path

    def watched(self) -> Iterable[Entry]:
        """The entries with a quota, now."""
        return self.registry.watched()

    def check(self, entry: Entry) -> None:
        """One check: sample what the quota limits, enforce, keep deny limits."""
        quota = entry.quota
        if quota is None or entry.ended is not None:
            return
        try:
            if entry.tree is not None:
                self.reader.tree(entry)  # a tree's quota is on its sums (it cannot deny)
                return
            deny = quota.action is Action.DENY
            wanted = [r for r in RESOURCES if deny or r.limit(quota) is not None]
            absolute = self.reader.read_counters(entry, sample, entry.process, wanted)
            raise_high(entry, absolute)
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
            raise_high(entry, report.resource.alone(base + report.usage))
        else:  # exceeded, killed, notified
            self.enforcer.reported(report)

    def heap_rebased(self, entry: Entry, heap_base: int) -> None:
        """An exec left the process less VmData than its heap baseline: the old
        image's memory is gone, so the baseline follows it down (never up), and
        the heap watermark restarts there; deny's data limit is set anew. Also for
        a process whose exit the engine saw before the kernel's last counts came:
        its kill is reported against the baseline of the image that crossed."""
        if entry.ended not in (None, Ended.EXITED) or heap_base >= entry.heap_base:
            return
        before = (entry.baseline, entry.high)
        entry.baseline = Counters(heap=heap_base, files=entry.files_base)
        entry.high = Counters(heap=heap_base, files=entry.high.files)
        if entry.ended is None:  # an exited one is out of the store: its last counts settle
            try:
                self.store.put(entry)
            except StateNotSaved:
                entry.baseline, entry.high = before
                return
        log.info("exec: pid=%d heap baseline %d -> %d", entry.pid, before[0].heap, heap_base)
        if entry.ended is None and entry.quota is not None and entry.quota.action is Action.DENY:
            self.deny.apply_and_keep(entry)

    def on_forked(self, listener: Callable[[int, Counters], None]) -> None:
        """Call `listener(pid, baseline)` for each child a backend watches since its fork."""
        self._fork_listeners.append(listener)

    def forked(self, pid: int, baseline: Counters) -> None:
        """A child the backend watches since its fork (an inherit rule), not yet
        registered: its usage at fork is `baseline` (absolute)."""
        for listener in self._fork_listeners:
            listener(pid, baseline)

    # ----- what every command applies first ---------------------------------

    def enforce_first(self, entry: Entry) -> None:
        """Enforce the quota on the usage of this moment, then let the command act.

        Every command that names a tracked process (register again, deregister, quota,
        reset) comes through here first: a process that crossed its kill quota a moment
        ago must not be saved by a reset or a deregister that reaches the daemon before
        the next periodic check (the kernel patch killed in the crossing call). A process
        this kills answers as one that exited. Costs one sample per such command.
        """
        check_current(entry)
        if entry.quota is not None:
            self.check(entry)
            check_current(entry)

    def owner(self, entry: Entry) -> int:
        """The process's real uid now: kill(2) judges by it, not by who it was at registration."""
        try:
            status = entry.process.status()
        except NoSuchProcess:
            return entry.owner_uid  # reaped: its ids cannot change any more
        entry.owner_uid, entry.owner_gid = status.real_uid, status.real_gid
        return status.real_uid

    def check_may_lift(self, entry: Entry, caller_uid: int) -> None:
        access.check_control(caller_uid, self.owner(entry), entry.pid)
        access.check_lift_quota(caller_uid, entry.quota_uid, entry.pid)
