"""One tracked process as the engine keeps it, and one reading of it.

An `Entry` is written by the engine's rooms only (tracker/engine/, tracker/deny/);
the outer layers (the filesystem, the files, autotrack) read it through its
properties. The quota with its setter and the baselines
are whole immutable values, replaced at once: a command that fails puts the
old value back, nothing to undo field by field.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from tracker.deny.state import DenyState
from tracker.engine.resources import Counters
from tracker.engine.tree import Tree
from tracker.linux.cgroup import NO_WORKLOAD, Workload
from tracker.linux.process import Process
from tracker.quota import NO_QUOTA, Quota
from tracker.vocabulary import EVENTS


@dataclass(frozen=True, slots=True)
class QuotaSetting:
    """A quota and who set it (root's binds: only root lifts it)."""

    quota: Quota
    uid: int


class Ended(enum.StrEnum):
    """Why an entry left the registry (the value is the log's word)."""

    EXITED = "exited"  # its process exited (or was killed)
    DEREGISTERED = "deregistered"
    STOPPED = "stopped"  # the daemon stopped: the state file keeps it


@dataclass(eq=False)
class Entry:
    """One tracked process: its identity, baselines, quota and deny-mode limits."""

    process: Process
    serial: int  # unique for each registration: a re-registered pid is a new entry
    # the owner last read: for display and --hidepid; control checks and helpers
    # read it afresh (a process may change its uids, and kill(2) goes by the ones now)
    owner_uid: int
    owner_gid: int
    baseline: Counters  # absolute values at registration or the last usage reset
    registered: float
    comm: str
    # The high-water mark since the baseline, absolute (as the kernel counts): raised
    # by every sample the policy takes and by a backend's exact peaks; restarted at
    # the baseline by a usage reset. Never below the baseline.
    high: Counters = Counters()
    setting: QuotaSetting | None = None
    deny: DenyState = field(default_factory=DenyState)
    over: frozenset[str] = frozenset()  # resources over their quota at the last check
    killed: bool = False  # SIGKILL sent for a kill quota: answers as exited from then on
    events: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(EVENTS, 0)))
    ended: Ended | None = None  # once it left
    tree: Tree | None = None  # the members of a tree quota (scope=tree); None for a process's
    # the container and pod its cgroup named at registration (or at a restart's resume):
    # read once, not at every scrape; a process moved to another cgroup keeps its labels
    workload: Workload = NO_WORKLOAD

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def quota(self) -> Quota | None:
        return None if self.setting is None else self.setting.quota

    @property
    def quota_uid(self) -> int | None:
        return None if self.setting is None else self.setting.uid

    @property
    def effective_quota(self) -> Quota:
        return NO_QUOTA if self.setting is None else self.setting.quota

    def __post_init__(self) -> None:
        self.high = self.high.highest(self.baseline)

    @property
    def peaks(self) -> Counters:
        """heap_peak and openfile_peak: the high-water mark over the baseline, floored at 0."""
        return self.high.since(self.baseline)

    @property
    def heap_base(self) -> int:
        return self.baseline.heap or 0

    @property
    def files_base(self) -> int:
        return self.baseline.files or 0


class Measurement(NamedTuple):
    """One fresh reading of a tracked process, relative to its baselines.

    A tuple: one is made per tracked process at every render of `metrics`, and a
    frozen dataclass's `__init__` costs 5x more."""

    pid: int
    comm: str
    heapsize: int
    openfile_count: int
    heap_total: int
    openfile_total: int
    quota: Quota
    registered: float
    heap_peak: int
    openfile_peak: int
    tree: TreeReading | None = None  # a tree quota's sums; None under a process quota
    workload: Workload = NO_WORKLOAD  # the entry's, for the metrics' labels


@dataclass(frozen=True, slots=True)
class TreeReading:
    """One reading of a tree quota: the sums over its members, relative to its baseline."""

    tree_heapsize: int
    tree_openfile_count: int
    members: int  # how many live members, the root included
