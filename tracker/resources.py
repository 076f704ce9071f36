"""The resources a quota limits, one row each: a third resource is one more row.

A row says what the resource is called (the quota's field, the `Counters`
field, the log's `quota=` word), which soft rlimit deny mode lowers for it and
how that limit is computed from the baseline and the quota. `Counters` holds
one value per resource: a sample (absolute, as the kernel counts) or a
baseline; `since` makes a sample relative to the baseline, the usage a quota
is compared with. A resource not sampled is None, and keeps its state.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from tracker import limits
from tracker.process import Process, Usage
from tracker.vocabulary import FILES, HEAP


@dataclass(frozen=True, slots=True)
class Counters:
    """One value per resource (bytes of VmData, open descriptors); None: not read."""

    heap: int | None = None
    files: int | None = None

    def of(self, resource: Resource) -> int | None:
        return getattr(self, resource.name)  # type: ignore[no-any-return]

    def since(self, baseline: Counters) -> Counters:
        """Usage relative to `baseline`, never below 0 (a process may give back more)."""
        return Counters(
            *(
                None if now is None else max(0, now - (base or 0))
                for now, base in zip(self._values(), baseline._values(), strict=True)
            )
        )

    def _values(self) -> tuple[int | None, ...]:
        return tuple(self.of(resource) for resource in RESOURCES)

    @classmethod
    def of_usage(cls, usage: Usage) -> Counters:
        return cls(heap=usage.vm_data, files=usage.open_fds)


def _data_soft(process: Process, baseline: int, quota: int) -> int:
    """RLIMIT_DATA is compared with VmData itself: the absolute limit."""
    return baseline + quota


def _nofile_soft(process: Process, baseline: int, quota: int) -> int:
    """RLIMIT_NOFILE is compared with the next fd number: depends on the open ones."""
    fds = process.fds()
    return limits.nofile_soft_limit(fds, baseline + quota - len(fds))


@dataclass(frozen=True, slots=True)
class Resource:
    name: str  # the quota's field and the Counters' one
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


HEAP_RESOURCE = Resource(HEAP, limits.DATA, _data_soft)
FILES_RESOURCE = Resource(FILES, limits.NOFILE, _nofile_soft)
RESOURCES = (HEAP_RESOURCE, FILES_RESOURCE)
BY_RLIMIT = {resource.rlimit: resource for resource in RESOURCES}


def sample(process: Process, wanted: Collection[Resource]) -> Counters:
    """Read only the `wanted` resources, through the pidfd-guarded process."""
    heap, files = HEAP_RESOURCE in wanted, FILES_RESOURCE in wanted
    vm_data, open_fds = process.sample(heap=heap, files=files)
    return Counters(vm_data if heap else None, open_fds if files else None)
