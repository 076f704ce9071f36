"""The enforcement record: the last RECORDS_KEPT enforcement actions, one JSON line each.

The log says what the daemon did on the node; the record says it to whoever reads
the mount's `enforcements` file (and to `restrack run`, whose program it may be),
with what the log cannot carry: the process's owner, its peak, its descriptors by
kind at that moment, and the container and pod it ran in. Records live in memory
only: a daemon that restarts starts with none (the counter that outlives a
process, for alerts, is `counts`, shown in the metrics, and it too starts at 0).

Making a record never holds the event loop for long: a process with few
descriptors (FDS_IN_LOOP) is listed at once, so a kill made by the daemon
carries them (read before the SIGKILL); one with more is listed in a worker
thread, one listing at a time and LISTINGS_WAITING at most, and its record lands
when the listing is done, or with `fds` null once the process is gone.
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from tracker.engine.access import may_see
from tracker.engine.entry import Entry
from tracker.engine.resources import Resource
from tracker.errors import AccessDenied, NoSuchProcess
from tracker.linux import procfs
from tracker.linux.cgroup import NO_WORKLOAD, Workload, read_workload
from tracker.linux.process import Process

RECORDS_KEPT = 1000
FDS_IN_LOOP = 128  # descriptors listed in the event loop (~8 µs each); more: a worker thread
LISTINGS_WAITING = 16  # records waiting for a worker's listing; beyond, `fds` is null
# entries whose container and pod are remembered, the oldest forgotten first (not at
# their removal: the kernel's report of a kill may come after the entry left)
MAX_WORKLOADS = 4096
MAX_SERIES = 10_000  # label sets of `counts`; beyond, counted without comm, container, pod
SCOPE_TREE = "tree"

# (uid, action, quota, comm, container, pod): the metric's labels, and whose they are
SeriesKey = tuple[int, str, str, str, str | None, str | None]


@dataclass(frozen=True, slots=True)
class Record:
    """One enforcement record as it is kept: its line, and who may see it."""

    seq: int  # 1, 2, ... in the order records were added
    uid: int
    pid: int
    time: float
    line: str  # the JSON object and its newline


@dataclass(frozen=True, slots=True)
class Pending:
    """A record's fields but its descriptors, which are read next."""

    time: float
    pid: int
    comm: str
    uid: int
    quota: str
    usage: int
    limit: int
    peak: int
    action: str
    workload: Workload
    tree: bool

    def line(self, fds: dict[str, int] | None) -> str:
        fields: dict[str, object] = {
            "time": self.time,
            "pid": self.pid,
            "comm": self.comm,
            "uid": self.uid,
            "quota": self.quota,
            "usage": self.usage,
            "limit": self.limit,
            "peak": self.peak,
            "action": self.action,
            "fds": fds,
            "container": self.workload.container,
            "pod": self.workload.pod,
        }
        if self.tree:
            fields["scope"] = SCOPE_TREE
        return json.dumps(fields, separators=(", ", ": ")) + "\n"


def name_after_exit(entry: Entry) -> str | None:
    """The name of an entry's process once its pidfd is closed (it exited and the
    entry left before the kernel's report of its kill came), read by number while it
    is a zombie: believed only if the pid's start time is the entry's before and
    after the read (a recycled pid names another process); None otherwise."""
    pid, started = entry.pid, entry.process.start_time
    try:
        if procfs.read_stat(pid).start_time != started:
            return None
        name = procfs.read_comm(pid)
        if procfs.read_stat(pid).start_time != started:
            return None
    except (NoSuchProcess, AccessDenied):
        return None
    return name


class Records:
    """The kept records, their listeners, and the per-process counter for alerts."""

    def __init__(self, capacity: int = RECORDS_KEPT) -> None:
        self._kept: deque[Record] = deque(maxlen=capacity)
        self._seq = 0
        self._listeners: list[Callable[[], None]] = []
        self._workloads: dict[int, Workload] = {}  # entry serial -> its container and pod
        self.counts: Counter[SeriesKey] = Counter()
        self._nursery: trio.Nursery | None = None
        self._listing: trio.CapacityLimiter | None = None
        self._waiting = 0

    def start(self, nursery: trio.Nursery) -> None:
        """Run the worker listings of large descriptor tables in `nursery`."""
        self._nursery = nursery
        self._listing = trio.CapacityLimiter(1)

    def on_added(self, listener: Callable[[], None]) -> None:
        """Call `listener()` whenever a record is added."""
        self._listeners.append(listener)

    # ----- making records ----------------------------------------------------

    def workload(self, entry: Entry) -> Workload:
        """Its container and pod, read once per entry while it can be (a process
        the kernel killed may be gone by the time its record is made)."""
        known = self._workloads.get(entry.serial)
        if known is not None:
            return known
        try:
            found = read_workload(entry.pid)
            entry.process.check_alive()  # so the file read was this process's
        except (NoSuchProcess, AccessDenied):
            return NO_WORKLOAD
        if len(self._workloads) >= MAX_WORKLOADS:  # the oldest: dicts keep insertion order
            del self._workloads[next(iter(self._workloads))]
        self._workloads[entry.serial] = found
        return found

    def add(
        self, entry: Entry, resource: Resource, used: int, limit: int, action: str, comm: str
    ) -> None:
        """Record an enforcement action just taken on `entry`: a tree quota's with the
        tree's usage, and its peak that usage (the sums keep no high-water mark)."""
        try:
            uid = entry.process.status().real_uid
        except (NoSuchProcess, AccessDenied):
            uid = entry.owner_uid
        tree = entry.tree is not None
        peak = used if tree else max(used, entry.peaks.of(resource) or 0)
        pending = Pending(
            time=time.time(),
            pid=entry.pid,
            comm=comm,
            uid=uid,
            quota=resource.name,
            usage=used,
            limit=limit,
            peak=peak,
            action=str(action),
            workload=self.workload(entry),
            tree=tree,
        )
        self._count(pending)
        self._make(entry, pending)

    def _make(self, entry: Entry, pending: Pending) -> None:
        """Add `pending`'s record with the process's descriptors by kind: now when
        they are few, after a worker's listing when many, null when unreadable."""
        process = entry.process
        try:
            open_fds = process.sample(heap=False, files=True)[1]
            if open_fds <= FDS_IN_LOOP:
                self._add(pending, process.fd_kinds())
                return
            if self._nursery is None or self._waiting >= LISTINGS_WAITING:
                raise NoSuchProcess(entry.pid, "too many descriptors to list now")
            worker = process.duplicate()
        except (NoSuchProcess, AccessDenied, OSError):
            self._add(pending, None)
            return
        self._waiting += 1
        self._nursery.start_soon(self._listed, worker, pending)

    async def _listed(self, worker: Process, pending: Pending) -> None:
        fds: dict[str, int] | None = None
        try:
            fds = await trio.to_thread.run_sync(worker.fd_kinds, limiter=self._listing)
        except (NoSuchProcess, AccessDenied, OSError):
            pass
        finally:
            worker.close()
            self._waiting -= 1
            self._add(pending, fds)

    def _add(self, pending: Pending, fds: dict[str, int] | None) -> None:
        self._seq += 1
        line = pending.line(fds)
        self._kept.append(Record(self._seq, pending.uid, pending.pid, pending.time, line))
        for listener in self._listeners:
            listener()

    def _count(self, pending: Pending) -> None:
        workload = pending.workload
        key = (
            pending.uid,
            pending.action,
            pending.quota,
            pending.comm,
            workload.container,
            workload.pod,
        )
        if key not in self.counts and len(self.counts) >= MAX_SERIES:
            key = (pending.uid, pending.action, pending.quota, "", None, None)
        self.counts[key] += 1

    # ----- reading them ------------------------------------------------------

    def visible(self, uid: int, hidepid: bool) -> list[Record]:
        """The kept records `uid` may see, oldest first (hidepid's rule, by the
        process's real uid at the time of the record)."""
        return [record for record in self._kept if may_see(uid, record.uid, hidepid)]

    def text(self, uid: int, hidepid: bool) -> str:
        return "".join(record.line for record in self.visible(uid, hidepid))

    def last_seen(self, uid: int, hidepid: bool) -> int:
        """The number of the newest record `uid` may see (0: none): what a poller compares."""
        for record in reversed(self._kept):
            if may_see(uid, record.uid, hidepid):
                return record.seq
        return 0

    def series(self, uid: int, hidepid: bool) -> Counter[tuple[str, str, str, str, str]]:
        """`counts` as `uid` may see them, by (action, quota, comm, container, pod)
        (empty strings where no container or pod was found)."""
        shown: Counter[tuple[str, str, str, str, str]] = Counter()
        for (owner, action, quota, comm, container, pod), count in self.counts.items():
            if may_see(uid, owner, hidepid):
                shown[action, quota, comm, container or "", pod or ""] += count
        return shown
