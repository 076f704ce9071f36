"""Deny mode's soft limits, kept: lowered, verified, re-checked, given back.

A deny quota holds only once the kernel shows its limits in /proc/PID/limits.
Where the daemon may not call prlimit(2) itself a helper does (tracker/deny/helpers.py);
a command awaits the changes it started (`settled`), the rest is finished in
the background. A soft limit the process raises is lowered back and counted
(denied); each raise, and each limit not in force after a set, is a defeat; a
deny quota root set falls back to kill after DEFEATS_BEFORE_KILL of them.
Every read of the process goes through its pidfd-guarded `Process`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from tracker.deny import limits
from tracker.deny.helpers import HelperRunner, LimitChange
from tracker.engine import access
from tracker.engine.enforce import Enforcer, enforcement_log
from tracker.engine.entry import Entry
from tracker.engine.resources import BY_RLIMIT, RESOURCES, Counters
from tracker.errors import AccessDenied, LimitNotInForce, NoSuchProcess, NotPermitted
from tracker.linux import procfs
from tracker.vocabulary import DENIED, KILLED

log = logging.getLogger("restrackfs.engine")

# A deny quota root set, defeated this many times (a soft limit found raised, a
# limit the kernel does not show after it was set), falls back to kill.
DEFEATS_BEFORE_KILL = 3
_RETRY_BACKOFF_MAX = 10.0  # seconds between tries to set a limit that keeps failing


def limit_text(soft: int) -> str:
    return "unlimited" if soft == procfs.RLIM_INFINITY else str(soft)


class DenyKeeper:
    def __init__(self, enforcer: Enforcer, *, interval: float, in_background: bool) -> None:
        self.enforcer = enforcer
        self.interval = interval
        self.helpers = HelperRunner(in_background=in_background)
        self.nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Finish what requests did not await, and run helpers, in `nursery`."""
        self.nursery = nursery
        self.helpers.attach(nursery)

    def wanted(self, entry: Entry) -> dict[int, int]:
        """The soft limits that make the kernel refuse what the quota forbids."""
        quota = entry.effective_quota
        saved = entry.deny.saved_soft
        wanted = {}
        for resource in RESOURCES:
            limit = resource.limit(quota)
            if limit is not None:
                base = entry.baseline.of(resource) or 0
                soft = limits.clamp(resource.soft_limit(entry.process, base, limit))
                wanted[resource.rlimit] = limits.lower(
                    soft, saved.get(resource.rlimit, procfs.RLIM_INFINITY)
                )
        return wanted

    def apply(self, entry: Entry) -> list[LimitChange]:
        """Lower the soft limits; the first time, remember the process's own."""
        wanted = self.wanted(entry)
        saved = entry.deny.saved_soft
        if not saved:
            current = entry.process.limits()
            for which in wanted:
                saved[which] = current[limits.PROC_LIMIT_NAMES[which]][0]
            wanted = {which: limits.lower(soft, saved[which]) for which, soft in wanted.items()}
        try:
            return [self._set_soft(entry, which, soft) for which, soft in wanted.items()]
        except AccessDenied:
            raise NotPermitted(
                f"{entry.pid}: cannot change its rlimits (its uids or gids differ)"
            ) from None

    def _set_soft(
        self, entry: Entry, which: int, soft: int, *, restore: bool = False
    ) -> LimitChange:
        """Set a soft limit, now or through a helper: done once the kernel shows it, or not."""
        entry.process.check_alive()
        ids = entry.process.ids()  # who owns it now: the helper takes these ids
        # checked alive just after: prlimit goes by number, never to a recycled pid
        previous = entry.deny.pending.pop(which, None)
        if previous is not None:
            self.helpers.cancel(previous)  # this change replaces it
        change = LimitChange(entry.pid, which, soft, restore=restore)
        try:
            change.soft = limits.set_soft_limit(entry.pid, ids, which, soft)
        except limits.NeedsHelper as needed:
            change.soft = needed.soft
            entry.deny.pending[which] = change
            self.helpers.start(
                change, needed.argv, lambda failure: self._verify(entry, change, failure)
            )
            return change
        self._verify(entry, change, None)
        return change

    def _verify(self, entry: Entry, change: LimitChange, failure: str | None) -> None:
        """A limit is in force only when the kernel shows it in /proc/PID/limits."""
        if entry.deny.pending.get(change.which) is change:
            del entry.deny.pending[change.which]
        name = limits.PROC_LIMIT_NAMES[change.which]
        if entry.ended is not None:  # gone or deregistered: only the helper can tell
            change.finish(None if failure is None else LimitNotInForce(f"helper {failure}"))
            return
        try:
            shown = entry.process.limits()[name][0]
        except (NoSuchProcess, AccessDenied) as error:
            change.finish(error)
            return
        if change.superseded:
            change.finish(LimitNotInForce(f"{entry.pid}: replaced by a later change"))
        elif shown != change.soft:
            why = f": helper {failure}" if failure else ""
            change.finish(
                LimitNotInForce(
                    f"{name.lower()} soft limit is {limit_text(shown)},"
                    f" not {limit_text(change.soft)}{why}"
                )
            )
        else:
            if not change.restore:
                entry.deny.applied_soft[change.which] = change.soft
            change.finish(None)

    def after(self, changes: list[LimitChange], then: Callable[[], None]) -> None:
        """Run `then` once `changes` are done: at once, or else in the background."""
        if all(change.done.is_set() for change in changes):
            then()
        else:
            assert self.nursery is not None, "the engine is not running"
            self.nursery.start_soon(self._then_after, changes, then)

    @staticmethod
    async def _then_after(changes: list[LimitChange], then: Callable[[], None]) -> None:
        for change in changes:
            await change.done.wait()
        try:
            then()
        except OSError:
            pass  # nobody to answer; `then` logged it
        except Exception:  # a bug must not take the nursery, and the daemon, down
            log.exception("after a limit change")

    def apply_and_keep(self, entry: Entry) -> list[LimitChange]:
        """Lower the limits; those not in force are the periodic check's to retry.
        The changes started, for a command to await."""
        changes = self.apply(entry)
        self.after(changes, lambda: self.kept(entry, changes))
        return changes

    def recheck(self, entry: Entry, absolute: Counters) -> None:
        """Keep the deny limits: a raise is lowered back, counted, and a defeat."""
        if time.monotonic() < entry.deny.retry_at:
            return  # the last set failed: retries back off
        current = entry.process.limits()
        changes = []
        for which, wanted in self.wanted(entry).items():
            if which in entry.deny.pending:
                continue  # a set under way: /proc shows the old value until it is done
            soft = current[limits.PROC_LIMIT_NAMES[which]][0]
            if soft == wanted:
                continue
            applied = entry.deny.applied_soft.get(which)
            above = limits.lower(soft, wanted) == wanted  # it lets the process have more
            if above and applied is not None and soft != applied:
                self._raised(entry, which, wanted, soft, absolute)
            elif soft != applied and applied is not None:
                continue  # the process lowered it further itself: its own choice
            changes.append(self._keep(entry, which, wanted))
        if changes:
            self.after(changes, lambda: self.kept(entry, changes))

    def _raised(self, entry: Entry, which: int, wanted: int, soft: int, absolute: Counters) -> None:
        resource = BY_RLIMIT[which]
        used = absolute.since(entry.baseline).of(resource) or 0
        limit = resource.limit(entry.effective_quota) or 0
        self.enforcer.record(entry, resource, used, limit, entry.effective_quota.action)
        self.enforcer.count(entry, DENIED)
        self.enforcer.announce(entry)
        self._defeated(
            entry,
            f"quota={resource.name} usage={absolute.of(resource)}"
            f" limit={wanted} action=deny (process raised its soft limit to"
            f" {limit_text(soft)}; lowered back",
        )

    def _keep(self, entry: Entry, which: int, wanted: int) -> LimitChange:
        try:
            return self._set_soft(entry, which, wanted)
        except AccessDenied:  # it changed its ids so that no prlimit() may set them
            refused = LimitChange(entry.pid, which, wanted)
            refused.finish(LimitNotInForce(f"{entry.pid}: its uids or gids differ"))
            return refused

    def kept(self, entry: Entry, changes: list[LimitChange]) -> None:
        """After sets that keep a deny quota: each one not in force is a defeat."""
        failed = [
            change.error
            for change in changes
            if change.error is not None
            and not change.superseded
            and not isinstance(change.error, NoSuchProcess)
        ]
        if entry.quota is None or entry.ended is not None:
            return
        deny = entry.deny
        if not failed:
            deny.failures, deny.retry_at = 0, 0.0
            return
        deny.failures += 1
        backoff = min(self.interval * 2**deny.failures, _RETRY_BACKOFF_MAX)
        deny.retry_at = time.monotonic() + backoff
        for error in failed:
            self._defeated(
                entry, f"action=deny (limit not in force: {error}; retry in {backoff:g} s"
            )

    def _defeated(self, entry: Entry, what: str) -> None:
        """One log line; a deny quota root set falls back to kill at the bounded count."""
        entry.deny.defeats += 1
        defeats = entry.deny.defeats
        by_root = entry.quota_uid == access.ROOT
        count = f"{defeats} of {DEFEATS_BEFORE_KILL}" if by_root else str(defeats)
        comm = procfs.escape_comm(self.enforcer.comm(entry))
        enforcement_log.warning("pid=%d comm=%s %s; defeat %s)", entry.pid, comm, what, count)
        if by_root and defeats >= DEFEATS_BEFORE_KILL and entry.process.is_alive():
            enforcement_log.warning(
                "pid=%d comm=%s action=kill (root's deny quota defeated %d times)",
                entry.pid,
                comm,
                defeats,
            )
            entry.process.kill()
            self.enforcer.count(entry, KILLED)
            self.enforcer.announce(entry)

    def forget(self, entry: Entry) -> None:
        """A quota gone: no defeats nor failures carry over to the next one."""
        entry.deny.defeats = entry.deny.failures = 0

    def restore(self, entry: Entry, saved_soft: dict[int, int] | None = None) -> list[LimitChange]:
        """Give back the soft limits deny mode saved (by default, the entry's); the
        changes started, for a command to await."""
        deny = entry.deny
        for change in list(deny.pending.values()):
            self.helpers.cancel(change)  # none may lower a limit after the restore
        deny.pending.clear()
        changes = []
        for which, soft in (deny.saved_soft if saved_soft is None else saved_soft).items():
            try:
                change = self._set_soft(entry, which, soft, restore=True)
            except (NoSuchProcess, AccessDenied) as error:
                log.info("pid=%d: limits not restored: %s", entry.pid, error)
                continue
            self.after([change], lambda change=change: self._restored(entry, change))
            changes.append(change)
        deny.saved_soft.clear()
        deny.applied_soft.clear()
        return changes

    @staticmethod
    def _restored(entry: Entry, change: LimitChange) -> None:
        if change.error is not None and not isinstance(change.error, NoSuchProcess):
            log.info("pid=%d: limit not restored: %s", entry.pid, change.error)
