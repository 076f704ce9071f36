"""Acting on usage: a quota newly exceeded is logged, counted, announced and,
for a kill quota, answered with SIGKILL.

Shared by every backend: the procfs one hands fresh samples (`enforce`), a
pushed one hands what the kernel already did (`reported`). The counters move
here only, so the `events` files and the metrics agree with the log.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from tracker.backends.base import Report, ReportKind
from tracker.engine.entry import Ended, Entry
from tracker.engine.records import Records, name_after_exit
from tracker.engine.resources import RESOURCES, Counters, Resource
from tracker.errors import AccessDenied, NoSuchProcess
from tracker.linux.procfs import escape_comm
from tracker.quota import Action
from tracker.vocabulary import DENIED, EVENTS, EXCEEDED, KILLED, NOTIFIED, WARN, WARNED

enforcement_log = logging.getLogger("restrackfs.enforce")

EVENT_OF_ACTION = {Action.KILL: KILLED, Action.DENY: DENIED, Action.NOTIFY: NOTIFIED}


LINES_PER_WINDOW = 10
WINDOW = 5.0  # seconds


def kill(entry: Entry) -> None:
    """SIGKILL through the pidfd: to the process, or to every member of its tree."""
    if entry.tree is not None:
        entry.tree.kill()
    else:
        entry.process.kill()


class LineThrottle:
    """At most LINES_PER_WINDOW enforcement lines per entry and WINDOW: the kernel
    counts crossings as fast as a process makes them, the log must stay readable."""

    def __init__(self) -> None:
        self._windows: dict[int, tuple[float, int, int]] = {}  # serial -> start, lines, unlogged

    def admit(self, entry: Entry, times: int) -> int | None:
        """The crossings the line to log now stands for, or None: log nothing now."""
        now = time.monotonic()
        start, lines, unlogged = self._windows.get(entry.serial, (now, 0, 0))
        if now - start >= WINDOW:
            start, lines = now, 0
        if lines >= LINES_PER_WINDOW:
            self._windows[entry.serial] = (start, lines, unlogged + times)
            return None
        if len(self._windows) > 4096:
            self._windows.clear()
        self._windows[entry.serial] = (start, lines + 1, 0)
        return unlogged + times


class Enforcer:
    def __init__(self) -> None:
        self.events: Counter[str] = Counter(dict.fromkeys(EVENTS, 0))  # since the start
        self._throttle = LineThrottle()
        self._listeners: list[Callable[[Entry], None]] = []
        self.records = Records()  # the `enforcements` file's, and the per-process counter
        self._kernel_warns: Callable[[Entry], bool] = lambda entry: False

    @property
    def enforcements(self) -> dict[str, int]:
        """Enforcement actions taken since the start, by action word; warnings as `warn`."""
        taken = {str(action): self.events[event] for action, event in EVENT_OF_ACTION.items()}
        return taken | {WARN: self.events[WARNED]}

    def on_event(self, listener: Callable[[Entry], None]) -> None:
        """Call `listener(entry)` whenever one of the entry's event counters moves."""
        self._listeners.append(listener)

    def enforce(self, entry: Entry, usage: Counters, comm: str | None = None) -> None:
        """Act on quotas newly exceeded; a resource not sampled (None) keeps its state."""
        setting = entry.setting
        if setting is None:
            return
        warned = self.warn_check(entry, usage, comm)  # a warning comes before the action
        quota = setting.quota
        over = set(entry.over)
        for resource, used in zip(RESOURCES, usage, strict=True):
            if used is not None:
                over.discard(resource.name)
                limit = resource.limit(quota)
                if limit is not None and used > limit:
                    over.add(resource.name)
        newly_over = over - entry.over
        entry.over = frozenset(over)
        if not newly_over:
            if warned:
                self.announce(entry)
            return
        comm = self.comm(entry) if comm is None else comm
        for resource in RESOURCES:
            if resource.name in newly_over:
                used, limit = usage.of(resource), resource.limit(quota)
                assert used is not None and limit is not None
                self._exceeded(entry, resource, used, limit, comm)
        if quota.action is Action.KILL:
            kill(entry)
            entry.killed = True
            self.count(entry, KILLED)
        self.announce(entry)

    def _exceeded(
        self,
        entry: Entry,
        resource: Resource,
        used: int,
        limit: int,
        comm: str | None,
        times: int = 1,
    ) -> None:
        """One line however many crossings (`times`: the kernel counted a burst); a
        process that crosses over and over gets LINES_PER_WINDOW lines a window, the
        next one saying how many crossings went unlogged. Counting is never limited."""
        action = entry.effective_quota.action
        self._line(entry, resource, used, limit, action, comm, times)
        self.count(entry, EXCEEDED, times)
        if action is not Action.KILL:
            self.count(entry, EVENT_OF_ACTION[action], times)

    def reported(self, report: Report) -> None:
        """What a pushed backend saw: the kernel already acted; log, count, announce."""
        entry = report.entry
        if entry.quota is None or entry.ended not in (None, Ended.EXITED):
            return
        if report.kind is ReportKind.WARNED:
            self.warn_reported(report)
            return
        entry.over = entry.over | {report.resource.name}
        self._exceeded(entry, report.resource, report.usage, report.limit, None, report.count)
        if report.kind is ReportKind.KILLED:
            if entry.tree is not None:
                entry.tree.kill()  # the kernel killed the crossing one: the others now
            entry.killed = True
            self.count(entry, KILLED)
        self.announce(entry)

    def refused(self, report: Report) -> None:
        """Calls the kernel refused for a deny limit (ENOMEM, EMFILE): one line, counted."""
        entry = report.entry
        if entry.quota is None or entry.ended not in (None, Ended.EXITED):
            return
        refused = self._throttle.admit(entry, report.count)
        if refused is not None:
            enforcement_log.warning(
                "pid=%d comm=%s quota=%s refused=%d usage=%d limit=%d action=deny",
                entry.pid,
                escape_comm(self.comm(entry)),
                report.resource.name,
                refused,
                report.usage,
                report.limit,
            )
            self.record(entry, report.resource, report.usage, report.limit, Action.DENY)
        self.count(entry, DENIED, report.count)
        self.announce(entry)

    # ----- warnings (warn=N%): a share of a limit crossed upwards ----------------

    def kernel_warns(self, decides: Callable[[Entry], bool]) -> None:
        """`decides(entry)`: the backend's kernel warns of that entry in the crossing
        call and reports it (`warn_reported`); the samples then leave it alone, so
        one crossing is never counted by both."""
        self._kernel_warns = decides

    def warn_check(self, entry: Entry, usage: Counters, comm: str | None = None) -> bool:
        """Count each resource whose usage went over its warn threshold (limit * N // 100)
        since the last look; one that is back at or under it is re-armed. A resource not
        sampled (None) keeps its state. True when a warning was counted (to announce)."""
        quota = entry.quota
        if quota is None or quota.warn is None or self._kernel_warns(entry):
            return False
        warned = set(entry.warned)
        crossed: list[tuple[Resource, int, int]] = []
        for resource, used in zip(RESOURCES, usage, strict=True):
            limit = resource.limit(quota)
            threshold = quota.warn_threshold(limit)
            if used is None or limit is None or threshold is None:
                continue
            if used <= threshold:
                warned.discard(resource.name)
            elif resource.name not in warned:
                warned.add(resource.name)
                crossed.append((resource, used, limit))
        entry.warned = frozenset(warned)
        for resource, used, limit in crossed:
            self._warned(entry, resource, used, limit, comm)
        return bool(crossed)

    def warn_reported(self, report: Report) -> None:
        """The kernel's warnings of an entry (counted in the crossing call): counted,
        logged, announced; the resource is warned of until a sample or the kernel
        sees it back under its threshold."""
        entry = report.entry
        entry.warned = entry.warned | {report.resource.name}
        self._warned(entry, report.resource, report.usage, report.limit, None, report.count)
        self.announce(entry)

    def _warned(
        self,
        entry: Entry,
        resource: Resource,
        used: int,
        limit: int,
        comm: str | None,
        times: int = 1,
    ) -> None:
        """One line as an enforcement's (action=warn, throttled with them), counted."""
        self._line(entry, resource, used, limit, WARN, comm, times)
        self.count(entry, WARNED, times)

    def _line(
        self,
        entry: Entry,
        resource: Resource,
        used: int,
        limit: int,
        action: str,
        comm: str | None,
        times: int,
    ) -> None:
        """The log line and the record of an action (or warning), throttled together:
        LINES_PER_WINDOW a window per entry, the next saying how many went unlogged."""
        unlogged = self._throttle.admit(entry, times)
        if unlogged is None:
            return
        name = escape_comm(self.comm(entry) if comm is None else comm)  # only when logged
        crossings = f" crossings={unlogged}" if unlogged > 1 else ""
        if action == WARN:
            enforcement_log.warning(
                "pid=%d comm=%s quota=%s usage=%d limit=%d action=%s warn=%d%%%s",
                entry.pid, name, resource.name, used, limit, action,
                entry.effective_quota.warn or 0, crossings,
            )  # fmt: skip
        else:
            enforcement_log.warning(
                "pid=%d comm=%s quota=%s usage=%d limit=%d action=%s%s",
                entry.pid, name, resource.name, used, limit, action, crossings,
            )  # fmt: skip
        self.record(entry, resource, used, limit, action, comm)

    def record(
        self,
        entry: Entry,
        resource: Resource,
        used: int,
        limit: int,
        action: str,
        comm: str | None = None,
    ) -> None:
        """The `enforcements` record of an action just logged (`action`: its word)."""
        self.records.add(
            entry, resource, used, limit, action, self.comm(entry) if comm is None else comm
        )

    @staticmethod
    def comm(entry: Entry) -> str:
        """The name now (an exec changes it); a zombie's, read by number; else the
        one at registration."""
        try:
            return entry.process.comm()
        except (NoSuchProcess, AccessDenied):
            return name_after_exit(entry) or entry.comm

    def count(self, entry: Entry, event: str, times: int = 1) -> None:
        entry.events[event] += times
        self.events[event] += times

    def announce(self, entry: Entry) -> None:
        for listener in self._listeners:
            listener(entry)
