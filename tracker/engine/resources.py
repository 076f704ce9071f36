"""The resources a quota limits, one row each: a third resource is one more row.

A row says what the resource is called (the quota's field, the `Counters`
field, the log's `quota=` word), how it is sampled alone, which soft rlimit
deny mode lowers for it and how that limit is computed from the baseline and
the quota. `Counters` holds
one value per resource: a sample (absolute, as the kernel counts) or a
baseline; `since` makes a sample relative to the baseline, the usage a quota
is compared with. A resource not sampled is None, and keeps its state.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import NamedTuple

from tracker.deny import limits
from tracker.linux.process import Process, Usage
from tracker.vocabulary import FILES, HEAP


class Counters(NamedTuple):
    """One value per resource (bytes of VmData, open descriptors); None: not read.

    Immutable, and a tuple: cheap to make on the hot path of every read."""

    heap: int | None = None
    files: int | None = None

    def of(self, resource: Resource) -> int | None:
        return getattr(self, resource.name)  # type: ignore[no-any-return]

    def since(self, baseline: Counters) -> Counters:
        """Usage relative to `baseline`, never below 0 (a process may give back more)."""
        return tuple.__new__(Counters, map(_relative, self, baseline))

    def highest(self, other: Counters) -> Counters:
        """Each value the higher of the two (a high-water mark raised by a sample);
        None (not read) gives way to a value."""
        return tuple.__new__(Counters, map(_higher, self, other))

    def exceeds(self, other: Counters) -> bool:
        """Is any value read here higher than `other`'s (would `highest` change it)?"""
        pairs = zip(self, other, strict=True)
        return any(now is not None and now > (was or 0) for now, was in pairs)

    @classmethod
    def of_usage(cls, usage: Usage) -> Counters:
        return tuple.__new__(cls, (usage.vm_data, usage.open_fds))  # heap, files


def _higher(one: int | None, other: int | None) -> int | None:
    if one is None:
        return other
    return one if other is None or one > other else other


def _relative(now: int | None, base: int | None) -> int | None:
    """`now` over `base`, never below 0; None (not read) stays None."""
    if now is None or not base:
        return now
    return now - base if now > base else 0


def _data_soft(process: Process, baseline: int, quota: int) -> int:
    """RLIMIT_DATA is compared with VmData itself: the absolute limit."""
    return baseline + quota


def _nofile_soft(process: Process, baseline: int, quota: int) -> int:
    """RLIMIT_NOFILE is compared with the next fd number: depends on the open ones."""
    fds = process.fds()
    return limits.nofile_soft_limit(fds, baseline + quota - len(fds))


@dataclass(frozen=True, slots=True, eq=False)  # one object per resource: compared by identity
class Resource:
    name: str  # the quota's field and the Counters' one
    # its sampler: the absolute value now, read through the pidfd-guarded process
    read: Callable[[Process], int]
    rlimit: int  # the soft limit deny mode lowers
    # deny mode's soft limit for (process, baseline, quota): refuses what the quota forbids
    soft_limit: Callable[[Process, int, int], int]

    @property
    def proc_limit_name(self) -> str:
        """Its line in /proc/PID/limits."""
        return limits.PROC_LIMIT_NAMES[self.rlimit]

    def limit(self, quota: object) -> int | None:
        """This resource's limit in a `Quota` (None: no limit)."""
        return getattr(quota, self.name)  # type: ignore[no-any-return]

    def alone(self, value: int) -> Counters:
        """Counters with this resource's value alone (the others not read)."""
        return Counters._make([value if other is self else None for other in RESOURCES])


def _vm_data(process: Process) -> int:
    return process.sample(heap=True, files=False)[0]


def _open_fds(process: Process) -> int:
    return process.sample(heap=False, files=True)[1]


HEAP_RESOURCE = Resource(HEAP, _vm_data, limits.DATA, _data_soft)
FILES_RESOURCE = Resource(FILES, _open_fds, limits.NOFILE, _nofile_soft)
RESOURCES = (HEAP_RESOURCE, FILES_RESOURCE)
BY_RLIMIT = {resource.rlimit: resource for resource in RESOURCES}


def sample(process: Process, wanted: Collection[Resource]) -> Counters:
    """Read only the `wanted` resources, through the pidfd-guarded process, at once
    (one live-thread fallback, one pidfd check for them all)."""
    heap, files = HEAP_RESOURCE in wanted, FILES_RESOURCE in wanted
    vm_data, open_fds = process.sample(heap=heap, files=files)
    return Counters(vm_data if heap else None, open_fds if files else None)
