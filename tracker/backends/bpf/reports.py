"""What the kernel counted for an entry, handed to the policy as `Report`s (see
backend.py): an event only says that an entry changed; its counts are taken
from the map once (`KernelWatch.take`) and reported with a count each."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from tracker.backends.base import Report, ReportKind
from tracker.backends.bpf.loader import KernelWatch, Taken, TreeTaken
from tracker.engine.entry import Entry
from tracker.engine.resources import FILES_RESOURCE, HEAP_RESOURCE, Resource
from tracker.quota import Action
from tracker.vocabulary import EXCEEDED

if TYPE_CHECKING:
    from tracker.engine.policy import Policy

log = logging.getLogger("restrackfs.engine")

PAGE = os.sysconf("SC_PAGE_SIZE")


class Reporter:
    """Takes an entry's counts from the kernel and reports them to the policy,
    each crossing once whoever saw it first (a sample or the kernel)."""

    def __init__(self, policy: Policy, kw: KernelWatch, shrunk: Callable[[Entry], None]) -> None:
        self.policy = policy
        self.kw = kw
        self._shrunk = shrunk  # a deny entry whose descriptor table got smaller
        # pid -> its "exceeded" count when the kernel's last crossing was handed over
        # (or it was watched): a count beyond it was a sample's (see _counted_already)
        self._exceeded_seen: dict[int, int] = {}

    def watching(self, entry: Entry) -> None:
        """`entry` is watched from now: crossings counted so far are not the kernel's."""
        self._exceeded_seen[entry.pid] = entry.events[EXCEEDED]

    def forget(self, pid: int) -> None:
        self._exceeded_seen.pop(pid, None)

    def take(self, entry: Entry) -> None:
        """Hand the policy what the kernel counted for `entry` since the last take."""
        taken = self.kw.take(entry.pid)
        if taken is not None:
            self.apply(entry, taken)

    def apply(self, entry: Entry, taken: Taken) -> None:
        if taken.empty:
            return
        if taken.execs:
            self.policy.heap_rebased(entry, taken.heap_base_pages * PAGE)
        if taken.shrunk:
            self._shrunk(entry)
        if taken.kill_failed:
            log.warning("bpf: the kernel could not signal pid=%d; killing it", entry.pid)
            self.policy.check(entry)  # a sample over the quota kills through the pidfd
        self._hand(entry, self._reports(entry, taken))

    def apply_tree(self, entry: Entry, taken: TreeTaken) -> None:
        """What the kernel counted for `entry`'s tree: crossings of its sums and its
        kill. Before the kill is handed on (which kills every member the engine
        knows), the engine's members are brought up to the kernel's."""
        tree = entry.tree
        if tree is None or not (any(taken.crossings) or any(taken.warnings) or taken.killed):
            return
        if taken.killed:
            tree.follow_kernel(self.kw.tree_identities(entry.pid))
        self._hand(entry, _tree_reports(entry, taken))

    def _hand(self, entry: Entry, reports: list[Report]) -> None:
        for report in reports:
            if report.kind in (ReportKind.NOTIFIED, ReportKind.EXCEEDED) and self._counted_already(
                entry, report
            ):
                if report.count == 1:
                    continue
                report = dataclasses.replace(report, count=report.count - 1)
            self.policy.reported(report)
        self._exceeded_seen[entry.pid] = entry.events[EXCEEDED]

    def _reports(self, entry: Entry, taken: Taken) -> list[Report]:
        notify = entry.effective_quota.action is Action.NOTIFY
        crossing = ReportKind.NOTIFIED if notify else ReportKind.EXCEEDED
        reports = _warnings(entry, taken)  # first: a warning comes before the action
        for index, (resource, usage, limit) in enumerate(_scaled(entry, taken)):
            if taken.crossings[index]:
                reports.append(
                    Report(entry, crossing, resource, usage, limit, taken.crossings[index])
                )
            if taken.denied[index]:
                reports.append(
                    Report(entry, ReportKind.REFUSED, resource, usage, limit, taken.denied[index])
                )
        if taken.killed and not entry.killed:  # else a read's sample killed it first and counted it
            reports.append(_kill_report(entry, taken))
        if taken.raised:
            reports.append(Report(entry, ReportKind.RAISED, HEAP_RESOURCE, 0, 0, taken.raised))
        return reports

    def _counted_already(self, entry: Entry, report: Report) -> bool:
        """This crossing was counted by a sample (a read of the process's files, the
        check when the quota was set) before its report came through the ring: the
        entry's "exceeded" moved since the kernel's last report, and the resource
        is over. Once per crossing, whoever saw it first."""
        seen = self._exceeded_seen.get(entry.pid, entry.events[EXCEEDED])
        if entry.events[EXCEEDED] > seen and report.resource.name in entry.over:
            self._exceeded_seen[entry.pid] = entry.events[EXCEEDED]
            return True
        return False


def _scaled(entry: Entry, taken: Taken) -> list[tuple[Resource, int, int]]:
    """(resource, usage at the last crossing relative to the baseline, quota) of
    heap and files: the kernel's absolute pages and descriptors as the policy's."""
    quota = entry.effective_quota
    heap = max(0, taken.usage_at[0] * PAGE - entry.heap_base)
    files = max(0, taken.usage_at[1] - entry.files_base)
    return [(HEAP_RESOURCE, heap, quota.heap or 0), (FILES_RESOURCE, files, quota.files or 0)]


def _warnings(entry: Entry, taken: Taken) -> list[Report]:
    """The kernel's warnings (warn=N%), each resource's with its count, its usage at
    the last one relative to the baseline, and its quota as the limit."""
    quota = entry.effective_quota
    heap = max(0, taken.warned_at[0] * PAGE - entry.heap_base)
    files = max(0, taken.warned_at[1] - entry.files_base)
    return [
        Report(entry, ReportKind.WARNED, resource, usage, limit or 0, count)
        for resource, usage, limit, count in (
            (HEAP_RESOURCE, heap, quota.heap, taken.warnings[0]),
            (FILES_RESOURCE, files, quota.files, taken.warnings[1]),
        )
        if count
    ]


def _tree_reports(entry: Entry, taken: TreeTaken) -> list[Report]:
    """The tree's crossings (notify) and its kill, relative to the tree's baseline."""
    tree, quota = entry.tree, entry.effective_quota
    assert tree is not None
    heap = max(0, taken.usage_at[0] * PAGE - tree.baseline.heap)
    files = max(0, taken.usage_at[1] - tree.baseline.files)
    scaled = [(HEAP_RESOURCE, heap, quota.heap or 0), (FILES_RESOURCE, files, quota.files or 0)]
    crossing = ReportKind.NOTIFIED if quota.action is Action.NOTIFY else ReportKind.EXCEEDED
    warned = [  # the warning comes first, as the kernel judged it
        Report(entry, ReportKind.WARNED, resource, usage, limit, count)
        for resource, usage, limit, count in _tree_warnings(entry, taken)
    ]
    reports = warned + [
        Report(entry, crossing, resource, usage, limit, count)
        for (resource, usage, limit), count in zip(scaled, taken.crossings, strict=True)
        if count
    ]
    if taken.killed and not entry.killed:
        heap_over = quota.heap is not None and heap > quota.heap
        files_over = quota.files is not None and files > quota.files
        over = scaled[1] if files_over and not heap_over else scaled[0]
        reports.append(Report(entry, ReportKind.KILLED, *over))
    return reports


def _tree_warnings(entry: Entry, taken: TreeTaken) -> list[tuple[Resource, int, int, int]]:
    """(resource, the sum at the last warning over the baseline, its quota, warnings)."""
    tree, quota = entry.tree, entry.effective_quota
    assert tree is not None
    heap = max(0, taken.warned_at[0] * PAGE - tree.baseline.heap)
    files = max(0, taken.warned_at[1] - tree.baseline.files)
    return [
        (resource, usage, limit or 0, count)
        for resource, usage, limit, count in (
            (HEAP_RESOURCE, heap, quota.heap, taken.warnings[0]),
            (FILES_RESOURCE, files, quota.files, taken.warnings[1]),
        )
        if count
    ]


def _kill_report(entry: Entry, taken: Taken) -> Report:
    """The kill, with the resource that crossed: the one over its quota."""
    heap, files = _scaled(entry, taken)
    quota = entry.effective_quota
    heap_over = quota.heap is not None and heap[1] > heap[2]
    files_over = quota.files is not None and files[1] > files[2]
    return Report(entry, ReportKind.KILLED, *(files if files_over and not heap_over else heap))
