"""The seam between the engine (registry, policy, who may do what) and a backend
(what watches the processes under quota, and how).

Two kinds of backend fit it:

- **procfs** (tracker/backends/polling.py): polls. Its trio task, every
  `interval`, asks the policy to `check` each entry with a quota (one sample
  from /proc through the entry's pidfd, then enforcement and, in deny mode,
  keeping the soft limits). The engine's notifications are nothing to it: it
  reads `policy.watched()` afresh each period.
- **bpf** (`backends/bpf/`): pushed. The kernel checks each watched
  process at its own syscalls and kills in the crossing call; the backend must
  be *told* what to watch, with absolute limits (baseline + quota, so a
  baseline reset changes them): `adopt` at start (the entries restored from the
  state file; compare with the pinned map, unwatch the rest), `quota_set`,
  `quota_cleared`, `baseline_reset`, `removed` (deregistered or exited). Its
  trio task awaits the ring buffer's fd and hands each event to
  `policy.reported(Report(...))`: the kernel already acted, the engine logs,
  counts and announces (a "raised" deny limit is lowered back by the policy).
  Exact peaks: the policy samples at every read and check and
  keeps the high-water mark (`entry.high`); a backend that knows better
  offers `peaks(entry) -> Counters | None` (None where it does not): the
  highest absolute values (VmData bytes, descriptors: as a sample counts
  them, not relative to the baseline) the process reached since its
  baseline, None where it does not watch the entry or does not know. The
  policy folds them into `entry.high` (the higher wins) whenever a peak is
  read (`heap_peak`, `openfile_peak`, `stat`, `metrics`), before a quota is
  cleared (`quota_cleared` may forget them) and at a clean stop (before the
  last snapshot and `close()`). `baseline_reset` means the peaks restart
  too: from then on `peaks` must not return anything reached before it (the
  engine has already set `entry.high` to the new baseline). A `Report` of
  kind PEAK (usage relative to the baseline) is folded the same way. What it needs to fill
  the kernel's map it reads from the entry: `process.start_time`,
  `heap_base`/`files_base` + the `quota`'s limits, the action, and deny's
  soft limits in force (`entry.deny.applied_soft`). Nothing polls under it:
  deny mode's retries after a failed set (`entry.deny.retry_at`) and a quota
  already exceeded when set ride on `policy.check(entry)`, which the engine
  calls at each command and when a quota is confirmed; a pushed backend calls
  it too on a "raised" report (via `reported`) and may schedule one when a
  retry is due. `quota_cleared` may come for a quota never confirmed (one
  reset while its helpers ran): nothing to unwatch then.

What is policy stays in the engine, shared by both: enforcement when a file is
read (a fresh sample that breaks a quota is acted on at once), the "enforce
before a command" rule, deny mode's limits and their verification,
the registry and its exit watchers (pidfds), persistence, permissions. A
backend never kills nor counts on its own, and touches an `Entry` only by
reading it.

A backend is chosen by name (`open_engine(backend=...)`, later the daemon's
`--engine auto|bpf|procfs`): `BACKENDS` maps each name to its module, imported
only when chosen; "auto" tries `AUTO_ORDER` and takes the first whose
constructor does not raise `BackendUnavailable`. Adding one is one new module
with a class `Backend` and one line here.
"""

from __future__ import annotations

import enum
import importlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from tracker.backends.readers import ProcReader
from tracker.engine.entry import Entry
from tracker.engine.resources import Counters, Resource
from tracker.quota import Quota

if TYPE_CHECKING:
    from tracker.engine.policy import Policy

log = logging.getLogger("restrackfs.engine")


class ReportKind(enum.Enum):
    """What a pushed backend reports about an entry."""

    EXCEEDED = enum.auto()  # deny: usage passed the limit anyway
    KILLED = enum.auto()  # a kill quota: the kernel sent SIGKILL in the crossing call
    NOTIFIED = enum.auto()  # a notify quota crossed
    RAISED = enum.auto()  # deny: the process raised its soft limit above the one set
    PEAK = enum.auto()  # a new high-water mark
    REFUSED = enum.auto()  # deny: the kernel refused calls for the limit (counted as denied)


@dataclass(frozen=True, slots=True)
class Report:
    """One thing a backend saw happen to an entry; `usage` and `limit` relative to the baseline."""

    entry: Entry
    kind: ReportKind
    resource: Resource
    usage: int
    limit: int
    count: int = 1  # how many times it happened (crossings, refused calls) since the last


class BackendUnavailable(Exception):
    """This backend cannot run here; str() is one line saying why (for "auto" to log)."""


class Backend(Protocol):
    """What the engine asks of a backend. Each notification is synchronous and
    cheap (the engine calls them while answering a request); slow work goes to
    the backend's own task."""

    name: str
    reader: ProcReader  # how the engine reads counters: /proc, or the kernel first
    events_dropped: int | None  # events the backend lost (a full ring); None: none to lose

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The backend's trio task, for as long as the engine runs."""

    @property
    def unloaded(self) -> str | None:
        """Why this backend is not in force now (its task not running, its kernel
        programs not attached while quotas need them); None while it is. Cheap: a
        health check asks it at every probe."""

    def adopt(self, entries: Iterable[Entry]) -> None:
        """At start: the entries restored from the state file."""

    def quota_set(self, entry: Entry) -> None:
        """`entry` has a quota now (its deny limits, if any, are in force)."""

    def quota_cleared(self, entry: Entry) -> None:
        """`entry` has no quota any more."""

    def baseline_reset(self, entry: Entry) -> None:
        """`entry`'s baseline changed: its absolute limits too, and its peaks restart
        (at `entry.baseline`, which is `entry.high` now)."""

    def removed(self, entry: Entry) -> None:
        """`entry` left the registry (`entry.ended` says why)."""

    def flush(self) -> None:
        """Hand `policy.reported` every report queued now. Called when an exit is
        seen, before the entry is removed: the kernel's report of the kill that
        made it exit may still wait in the ring, and would then find no entry."""

    def peaks(self, entry: Entry) -> Counters | None:
        """The highest absolute values (VmData bytes, descriptors, as a sample counts
        them) since `entry`'s baseline, where the backend measures them exactly
        (Counters fields None where unknown); None where it does not (the policy's
        own samples are the peaks then). Cheap and synchronous: called on the
        event loop at each read of a peak."""

    def tree_members(self, entry: Entry) -> list[tuple[int, int]] | None:
        """The live members of `entry`'s tree quota (`entry.tree`) as (pid, start
        time), where the backend keeps them (the kernel adds a child at its fork);
        None: the engine finds them in /proc at each check and at each read of a
        tree file."""

    def inherit(self, pid: int, start_time: int, quota: Quota) -> bool:
        """Watch the children `pid` forks from now on, from their fork, with `quota`
        over their usage then; False where the backend cannot (the next scan finds them)."""

    def close(self) -> None:
        """The engine stops: give back what the backend holds."""


BACKENDS = {"bpf": "tracker.backends.bpf.backend", "procfs": "tracker.backends.polling"}
AUTO_ORDER = ("bpf", "procfs")


def choose(name: str, policy: Policy, interval: float) -> Backend:
    """The backend `name` ("auto": the first of AUTO_ORDER that can run here).

    Logs one line: the engine in force and, under "auto", why those before it
    were not taken. A named backend that cannot run raises BackendUnavailable."""
    if name != "auto":
        backend = _create(name, policy, interval)
        log.info("engine %s (--engine %s)", backend.name, name)
        return backend
    passed: list[str] = []
    for candidate in AUTO_ORDER:
        try:
            backend = _create(candidate, policy, interval)
        except BackendUnavailable as why:
            passed.append(f"{candidate} unavailable: {why}")
            continue
        log.info("engine %s (auto%s)", backend.name, "".join(f"; {p}" for p in passed))
        return backend
    raise BackendUnavailable("no engine can run here: " + "; ".join(passed))


def _create(name: str, policy: Policy, interval: float) -> Backend:
    try:
        module = importlib.import_module(BACKENDS[name])
    except KeyError:
        raise ValueError(f"unknown engine {name!r}: want auto or {', '.join(BACKENDS)}") from None
    return module.Backend(policy, interval)  # type: ignore[no-any-return]
