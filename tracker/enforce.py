"""Acting on usage: a quota newly exceeded is logged, counted, announced and,
for a kill quota, answered with SIGKILL.

Shared by every backend: the procfs one hands fresh samples (`enforce`), a
pushed one hands what the kernel already did (`reported`). The counters move
here only, so the `events` files and the metrics agree with the log.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from tracker.backend import Report
from tracker.entry import Entry
from tracker.errors import AccessDenied, NoSuchProcess
from tracker.procfs import escape_comm
from tracker.quota import Action
from tracker.resources import RESOURCES, Counters, Resource
from tracker.vocabulary import DENIED, EVENTS, EXCEEDED, KILLED, NOTIFIED

enforcement_log = logging.getLogger("restrackfs.enforce")

EVENT_OF_ACTION = {Action.KILL: KILLED, Action.DENY: DENIED, Action.NOTIFY: NOTIFIED}


class Enforcer:
    def __init__(self) -> None:
        self.events: Counter[str] = Counter(dict.fromkeys(EVENTS, 0))  # since the start
        self._listeners: list[Callable[[Entry], None]] = []

    @property
    def enforcements(self) -> dict[Action, int]:
        """Enforcement actions taken since the start, by action."""
        return {action: self.events[event] for action, event in EVENT_OF_ACTION.items()}

    def on_event(self, listener: Callable[[Entry], None]) -> None:
        """Call `listener(entry)` whenever one of the entry's event counters moves."""
        self._listeners.append(listener)

    def enforce(self, entry: Entry, usage: Counters, comm: str | None = None) -> None:
        """Act on quotas newly exceeded; a resource not sampled (None) keeps its state."""
        setting = entry.setting
        if setting is None:
            return
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
            return
        comm = self.comm(entry) if comm is None else comm
        for resource in RESOURCES:
            if resource.name in newly_over:
                used, limit = usage.of(resource), resource.limit(quota)
                assert used is not None and limit is not None
                self._exceeded(entry, resource, used, limit, comm)
        if quota.action is Action.KILL:
            entry.process.kill()
            entry.killed = True
            self.count(entry, KILLED)
        self.announce(entry)

    def _exceeded(self, entry: Entry, resource: Resource, used: int, limit: int, comm: str) -> None:
        action = entry.effective_quota.action
        enforcement_log.warning(
            "pid=%d comm=%s quota=%s usage=%d limit=%d action=%s",
            entry.pid,
            escape_comm(comm),
            resource.name,
            used,
            limit,
            action,
        )
        self.count(entry, EXCEEDED)
        if action is not Action.KILL:
            self.count(entry, EVENT_OF_ACTION[action])

    def reported(self, report: Report) -> None:
        """What a pushed backend saw: the kernel already acted; log, count, announce."""
        entry = report.entry
        if entry.quota is None or entry.ended is not None:
            return
        entry.over = entry.over | {report.resource.name}
        self._exceeded(entry, report.resource, report.usage, report.limit, self.comm(entry))
        if report.kind == KILLED:
            entry.killed = True
            self.count(entry, KILLED)
        self.announce(entry)

    @staticmethod
    def comm(entry: Entry) -> str:
        """The name now (an exec changes it); the one at registration if it is gone."""
        try:
            return entry.process.comm()
        except (NoSuchProcess, AccessDenied):
            return entry.comm

    def count(self, entry: Entry, event: str) -> None:
        entry.events[event] += 1
        self.events[event] += 1

    def announce(self, entry: Entry) -> None:
        for listener in self._listeners:
            listener(entry)
