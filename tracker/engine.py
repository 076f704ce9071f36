"""The tracking engine: the registry of tracked processes and what acts on them.

Everything here is synchronous except the two kinds of background task, which
live in the engine's nursery: one exit watcher per tracked process (waiting on
its pidfd, so an exit is seen at once) and the periodic quota check. Callers
(the filesystem) hold `Entry` objects and call the engine with them; the engine
never knows it is behind FUSE.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from tracker import access, limits, procfs, state
from tracker.errors import (
    AccessDenied,
    AlreadyTracked,
    Deregistered,
    InvalidArgument,
    NoSuchProcess,
    NotPermitted,
    NotTracked,
    QuotaBusy,
    StateNotSaved,
)
from tracker.helpers import HelperRunner
from tracker.process import Process, Usage
from tracker.procfs import escape_comm
from tracker.quota import NO_QUOTA, Action, Quota

T = TypeVar("T")

log = logging.getLogger("restrackfs.engine")
enforcement_log = logging.getLogger("restrackfs.enforce")

HEAP = "heap"
FILES = "files"
# Counters in the manner of cgroup v2's memory.events: a quota crossed (from
# under to over), and what was done about it.
EXCEEDED, KILLED, DENIED, NOTIFIED = EVENTS = ("exceeded", "killed", "denied", "notified")
_EVENT_OF_ACTION = {Action.KILL: KILLED, Action.DENY: DENIED, Action.NOTIFY: NOTIFIED}


@dataclass(eq=False)
class Entry:
    """One tracked process: its identity, baselines, quota and deny-mode limits."""

    process: Process
    serial: int  # unique for each registration: a re-registered pid is a new entry
    owner_uid: int
    owner_gid: int
    heap_base: int
    files_base: int
    registered: float
    comm: str
    quota: Quota | None = None
    quota_uid: int | None = None
    # deny mode: the soft limits the process had before, and the ones last set
    saved_soft: dict[int, int] = field(default_factory=dict)
    applied_soft: dict[int, int] = field(default_factory=dict)
    over: frozenset[str] = frozenset()  # quotas exceeded at the last check
    killed: bool = False  # SIGKILL sent for a kill quota: answers as exited from then on
    events: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(EVENTS, 0)))
    ended: str | None = None  # "exited" or "deregistered" once it left the registry

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def effective_quota(self) -> Quota:
        return self.quota or NO_QUOTA

    def to_record(self) -> state.Record:
        quota = self.quota
        return {
            "pid": self.pid,
            "start_time": self.process.start_time,
            "pidfd_inode": self.process.inode,
            "heap_base": self.heap_base,
            "files_base": self.files_base,
            "registered": self.registered,
            "quota": None
            if quota is None
            else {"heap": quota.heap, "files": quota.files, "action": str(quota.action)},
            "quota_uid": self.quota_uid,
            "saved_soft": {str(k): v for k, v in self.saved_soft.items()},
        }


@dataclass(frozen=True, slots=True)
class Measurement:
    """One fresh reading of a tracked process, relative to its baselines."""

    pid: int
    comm: str
    heapsize: int
    openfile_count: int
    heap_total: int
    openfile_total: int
    quota: Quota
    registered: float


class Engine:
    def __init__(
        self,
        *,
        state_path: Path | None = None,
        interval: float = 0.1,
        helpers_in_background: bool = False,
    ) -> None:
        self.state_path = state_path
        self._journal = None if state_path is None else state.Journal(state_path)
        self.interval = interval
        self.events: Counter[str] = Counter(dict.fromkeys(EVENTS, 0))  # since the start
        self._entries: dict[int, Entry] = {}
        self._with_quota: dict[int, Entry] = {}
        self._serials = itertools.count(1)
        self._removal_listeners: list[Callable[[Entry], None]] = []
        self._event_listeners: list[Callable[[Entry], None]] = []
        self._nursery: trio.Nursery | None = None
        self._helpers = HelperRunner(in_background=helpers_in_background)

    # ----- queries -------------------------------------------------------

    def entries(self) -> Iterable[Entry]:
        """The tracked entries in registration order, which is `serial` order."""
        return self._entries.values()

    def get(self, pid: int) -> Entry | None:
        return self._entries.get(pid)

    def measure(self, entry: Entry) -> Measurement:
        """Read the process now; enforce its quota if the reading breaks it."""
        usage = self._usage(entry)
        measurement = self._measurement(entry, usage)
        if entry.quota is not None:
            self._enforce(entry, measurement.heapsize, measurement.openfile_count, measurement.comm)
        return measurement

    def heapsize(self, entry: Entry) -> int:
        """heapsize alone: reads VmData and nothing else (the hot path of `cat`)."""
        vm_data, _ = self._sample(entry, heap=True, files=False)
        heapsize = max(0, vm_data - entry.heap_base)
        self._enforce(entry, heapsize, None)
        return heapsize

    def openfile_count(self, entry: Entry) -> int:
        """openfile_count alone: one stat() of /proc/PID/fd."""
        _, open_fds = self._sample(entry, heap=False, files=True)
        openfile_count = max(0, open_fds - entry.files_base)
        self._enforce(entry, None, openfile_count)
        return openfile_count

    @property
    def enforcements(self) -> dict[Action, int]:
        """Enforcement actions taken since the start, by action."""
        return {action: self.events[event] for action, event in _EVENT_OF_ACTION.items()}

    def on_removal(self, listener: Callable[[Entry], None]) -> None:
        """Call `listener(entry)` whenever an entry leaves the registry."""
        self._removal_listeners.append(listener)

    def on_event(self, listener: Callable[[Entry], None]) -> None:
        """Call `listener(entry)` whenever one of the entry's event counters moves."""
        self._event_listeners.append(listener)

    # ----- commands ------------------------------------------------------

    def register(self, pid: int, caller_uid: int) -> Entry:
        if pid < 1:
            raise InvalidArgument(f"{pid}: not a valid pid")
        status = procfs.read_status(pid)
        tgid = status.tgid  # a thread's TID names its thread group
        if tgid == os.getpid():
            # a kill quota on the daemon would take the mount down with it
            raise NotPermitted(f"{tgid}: the daemon does not track itself")
        # Permission first: EEXIST would tell a user that another's process is tracked.
        access.check_control(caller_uid, status.real_uid, tgid)
        if tgid in self._entries:
            self._enforce_before_command(self._entries[tgid])
            raise AlreadyTracked(f"{tgid}: already tracked")
        process = Process.open(tgid)
        try:
            status = process.status()
            access.check_control(caller_uid, status.real_uid, tgid)
            usage = process.usage()
        except BaseException:
            process.close()
            raise
        entry = Entry(
            process=process,
            serial=next(self._serials),
            owner_uid=status.real_uid,
            owner_gid=status.real_gid,
            heap_base=usage.vm_data,
            files_base=usage.open_fds,
            registered=time.time(),
            comm=usage.comm,
        )
        try:
            self._persist(entry)
        except StateNotSaved:
            process.close()
            raise
        self._add(entry)
        log.info("registered pid=%d comm=%s by uid=%d", tgid, escape_comm(entry.comm), caller_uid)
        return entry

    def deregister(self, pid: int, caller_uid: int) -> None:
        if pid < 1:
            raise InvalidArgument(f"{pid}: not a valid pid")
        entry = self._entries.get(pid)
        if entry is None:
            # EPERM for another's process, tracked or not: the errno tells nothing
            with suppress(NoSuchProcess, AccessDenied):
                access.check_control(caller_uid, procfs.read_status(pid).real_uid, pid)
            raise NotTracked(f"{pid}: not tracked")
        self._enforce_before_command(entry)
        self._check_may_lift(entry, caller_uid)
        self._persist_removal(entry)
        self._restore_limits(entry)
        self._remove(entry, "deregistered")
        log.info("deregistered pid=%d by uid=%d", pid, caller_uid)

    def set_quota(self, entry: Entry, quota: Quota, caller_uid: int) -> None:
        self._enforce_before_command(entry)
        access.check_control(caller_uid, entry.owner_uid, entry.pid)
        if entry.quota is not None:
            raise QuotaBusy(f"{entry.pid}: a quota is already set; reset it first")
        entry.quota, entry.quota_uid = quota, caller_uid
        try:
            if quota.action is Action.DENY:
                self._apply_limits(entry)
            self._persist(entry)
        except BaseException:
            self._restore_limits(entry)
            entry.quota = entry.quota_uid = None
            raise
        self._with_quota[entry.pid] = entry
        log.info("quota pid=%d %s by uid=%d", entry.pid, quota.format(), caller_uid)
        self._check(entry)

    def reset(self, entry: Entry, *, quota: bool, usage: bool, caller_uid: int) -> None:
        """Clear the quota, restart the usage counters, or both."""
        self._enforce_before_command(entry)
        access.check_control(caller_uid, entry.owner_uid, entry.pid)
        self._check_may_lift(entry, caller_uid)
        before = (entry.quota, entry.quota_uid, entry.heap_base, entry.files_base)
        saved_soft = dict(entry.saved_soft)
        if usage:
            now = self._usage(entry)
            entry.heap_base, entry.files_base = now.vm_data, now.open_fds
        if quota:
            entry.quota = entry.quota_uid = None
            entry.saved_soft.clear()
        try:
            self._persist(entry)
        except StateNotSaved:
            entry.quota, entry.quota_uid, entry.heap_base, entry.files_base = before
            entry.saved_soft = saved_soft
            raise
        entry.over = frozenset()
        if quota:
            self._restore_limits(entry, saved_soft)
            self._with_quota.pop(entry.pid, None)
        elif entry.quota is not None and entry.quota.action is Action.DENY:
            self._apply_limits(entry)
        what = "all" if quota and usage else "quota" if quota else "usage"  # the file's words
        log.info("reset pid=%d %s by uid=%d", entry.pid, what, caller_uid)

    # ----- lifecycle -----------------------------------------------------

    async def _check_loop(self) -> None:
        while True:
            await trio.sleep(self.interval)
            for entry in list(self._with_quota.values()):
                try:
                    self._check(entry)
                except Exception:  # a bug must not stop the checks of all the others
                    log.exception("check of pid=%d failed", entry.pid)

    async def _watch_exit(self, entry: Entry) -> None:
        if entry.ended is not None:
            return  # removed before this task got to run
        try:
            await trio.lowlevel.wait_readable(entry.process.pidfd)
        except trio.ClosedResourceError:
            return  # deregistered: the pidfd was closed under us
        if entry.ended is None:
            self._remove(entry, "exited")

    def _restore_state(self) -> None:
        if self._journal is None:
            return
        self._helpers.inline = True  # nothing is served yet: helpers run synchronously
        try:
            self._restore_entries()
        finally:
            self._helpers.inline = False

    def _restore_entries(self) -> None:
        assert self._journal is not None
        for record in state.load(self._journal.path):
            try:
                entry = self._entry_from_record(record)
            except (NoSuchProcess, AccessDenied):
                log.info("state: dropped pid=%s (gone or recycled)", record.get("pid"))
                continue
            except (AttributeError, KeyError, TypeError, ValueError):
                log.error("state: dropped a malformed record: %.200r", record)
                continue
            self._add(entry)
            if entry.quota is not None:
                self._with_quota[entry.pid] = entry
                if entry.quota.action is Action.DENY:
                    self._apply_limits(entry)
            log.info("state: resumed pid=%d comm=%s", entry.pid, escape_comm(entry.comm))
        try:
            self._compact()
        except OSError as error:
            log.error("state file %s not writable: changes will fail: %s", self.state_path, error)

    def _entry_from_record(self, record: state.Record) -> Entry:
        inode = record.get("pidfd_inode")
        process = Process.open(
            int(record["pid"]), int(record["start_time"]), None if inode is None else int(inode)
        )
        try:
            status = process.status()
            quota = record.get("quota")
            return Entry(
                process=process,
                serial=next(self._serials),
                owner_uid=status.real_uid,
                owner_gid=status.real_gid,
                heap_base=int(record["heap_base"]),
                files_base=int(record["files_base"]),
                registered=float(record["registered"]),
                comm=status.name,
                quota=None
                if quota is None
                else Quota(quota["heap"], quota["files"], Action(quota["action"])),
                quota_uid=record.get("quota_uid"),
                saved_soft={int(k): int(v) for k, v in record.get("saved_soft", {}).items()},
            )
        except BaseException:
            process.close()
            raise

    def shutdown(self) -> None:
        """Give back every soft limit deny mode lowered; keep the state file."""
        self._helpers.inline = True
        self._helpers.stop_all()
        for entry in list(self._entries.values()):
            self._restore_limits(entry)
            entry.ended = "stopped"
            trio.lowlevel.notify_closing(entry.process.pidfd)
            entry.process.close()
        self._entries.clear()
        self._with_quota.clear()
        if self._journal is not None:
            self._journal.close()

    # ----- internals -----------------------------------------------------

    def _add(self, entry: Entry) -> None:
        self._entries[entry.pid] = entry
        assert self._nursery is not None, "the engine is not running"
        self._nursery.start_soon(self._watch_exit, entry)

    def _remove(self, entry: Entry, why: str) -> None:
        if self._entries.get(entry.pid) is not entry:
            return
        entry.ended = why
        del self._entries[entry.pid]
        if why == "exited":
            with suppress(StateNotSaved):  # nobody to tell; the next start drops it anyway
                self._persist_removal(entry)
        self._with_quota.pop(entry.pid, None)
        trio.lowlevel.notify_closing(entry.process.pidfd)
        entry.process.close()
        log.info("removed pid=%d (%s)", entry.pid, why)
        for listener in self._removal_listeners:
            listener(entry)

    def check_current(self, entry: Entry) -> None:
        """Raise unless the entry is still registered and its process alive."""
        if entry.ended == "deregistered":
            raise Deregistered(f"{entry.pid}: deregistered")
        if entry.ended is not None or entry.killed or not entry.process.is_alive():
            raise NoSuchProcess(entry.pid, "process exited")

    def _enforce_before_command(self, entry: Entry) -> None:
        """Enforce the quota on the usage of this moment, then let the command act.

        Every command that names a tracked process (register again, deregister, quota,
        reset) comes through here first: a process that crossed its kill quota a moment
        ago must not be saved by a reset or a deregister that reaches the daemon before
        the next periodic check (the kernel patch killed in the crossing call). A process
        this kills answers as one that exited. Costs one sample per such command.
        """
        self.check_current(entry)
        if entry.quota is not None:
            self._check(entry)
            self.check_current(entry)

    def _check_may_lift(self, entry: Entry, caller_uid: int) -> None:
        access.check_control(caller_uid, entry.owner_uid, entry.pid)
        access.check_lift_quota(caller_uid, entry.quota_uid if entry.quota else None, entry.pid)

    def _usage(self, entry: Entry) -> Usage:
        return self._read_counters(entry, entry.process.usage)

    def _sample(self, entry: Entry, *, heap: bool, files: bool) -> tuple[int, int]:
        return self._read_counters(entry, lambda: entry.process.sample(heap=heap, files=files))

    def _read_counters(self, entry: Entry, read: Callable[[], T]) -> T:
        """Read through the entry's pidfd; an exit seen on the way removes the entry."""
        if entry.ended is not None:
            self.check_current(entry)  # says deregistered or exited
        try:
            return read()  # checks the pidfd after reading
        except NoSuchProcess:
            self._remove(entry, "exited")
            raise

    @staticmethod
    def _measurement(entry: Entry, usage: Usage) -> Measurement:
        return Measurement(
            pid=entry.pid,
            comm=usage.comm,
            heapsize=max(0, usage.vm_data - entry.heap_base),
            openfile_count=max(0, usage.open_fds - entry.files_base),
            heap_total=usage.vm_data,
            openfile_total=usage.open_fds,
            quota=entry.effective_quota,
            registered=entry.registered,
        )

    def _check(self, entry: Entry) -> None:
        """One periodic check: sample what the quota limits, enforce, keep deny limits."""
        quota = entry.quota
        if quota is None or entry.ended is not None:
            return
        try:
            deny = quota.action is Action.DENY
            heap, files = quota.heap is not None or deny, quota.files is not None or deny
            vm_data, open_fds = self._sample(entry, heap=heap, files=files)
            self._enforce(
                entry,
                max(0, vm_data - entry.heap_base) if heap else None,
                max(0, open_fds - entry.files_base) if files else None,
            )
            if deny:
                self._recheck_limits(entry, vm_data, open_fds)
        except NoSuchProcess:
            pass
        except AccessDenied as error:
            log.warning("check pid=%d: %s", entry.pid, error)

    def _enforce(
        self,
        entry: Entry,
        heapsize: int | None,
        openfile_count: int | None,
        comm: str | None = None,
    ) -> None:
        """Act on quotas newly exceeded; a usage not sampled (None) keeps its state."""
        quota = entry.quota
        if quota is None:
            return
        over = set(entry.over)
        for which, usage, limit in (
            (HEAP, heapsize, quota.heap),
            (FILES, openfile_count, quota.files),
        ):
            if usage is not None:
                over.discard(which)
                if limit is not None and usage > limit:
                    over.add(which)
        newly_over = over - entry.over
        entry.over = frozenset(over)
        if not newly_over:
            return
        if comm is None:
            comm = self._comm(entry)
        for which in sorted(newly_over):
            usage, limit = (
                (heapsize, quota.heap) if which == HEAP else (openfile_count, quota.files)
            )
            enforcement_log.warning(
                "pid=%d comm=%s quota=%s usage=%d limit=%d action=%s",
                entry.pid,
                escape_comm(comm),
                which,
                usage,
                limit,
                quota.action,
            )
            self._count(entry, EXCEEDED)
            if quota.action is not Action.KILL:
                self._count(entry, _EVENT_OF_ACTION[quota.action])
        if quota.action is Action.KILL:
            entry.process.kill()
            entry.killed = True
            self._count(entry, KILLED)
        self._announce(entry)

    @staticmethod
    def _comm(entry: Entry) -> str:
        """The name now (an exec changes it); the one at registration if it is gone."""
        try:
            return procfs.read_comm(entry.pid)
        except (NoSuchProcess, AccessDenied):
            return entry.comm

    def _count(self, entry: Entry, event: str) -> None:
        entry.events[event] += 1
        self.events[event] += 1

    def _announce(self, entry: Entry) -> None:
        for listener in self._event_listeners:
            listener(entry)

    # ----- deny mode -----------------------------------------------------

    def _wanted_limits(self, entry: Entry) -> dict[int, int]:
        """The soft limits that make the kernel refuse what the quota forbids."""
        quota = entry.effective_quota
        wanted = {}
        if quota.heap is not None:
            wanted[limits.DATA] = entry.heap_base + quota.heap
        if quota.files is not None:
            fds = procfs.list_fds(entry.pid, entry.process.via)
            allowance = entry.files_base + quota.files - len(fds)
            wanted[limits.NOFILE] = limits.nofile_soft_limit(fds, allowance)
        return {
            which: limits.lower(
                limits.clamp(soft), entry.saved_soft.get(which, procfs.RLIM_INFINITY)
            )
            for which, soft in wanted.items()
        }

    def _apply_limits(self, entry: Entry) -> None:
        """Lower the soft limits; the first time, remember the process's own."""
        wanted = self._wanted_limits(entry)
        if not entry.saved_soft:
            current = procfs.read_limits(entry.pid)
            for which in wanted:
                entry.saved_soft[which] = current[limits.PROC_LIMIT_NAMES[which]][0]
            wanted = {
                which: limits.lower(soft, entry.saved_soft[which]) for which, soft in wanted.items()
            }
        try:
            for which, soft in wanted.items():
                self._set_soft(entry, which, soft)
        except AccessDenied:
            raise NotPermitted(
                f"{entry.pid}: cannot change its rlimits (its uids or gids differ)"
            ) from None

    def _set_soft(self, entry: Entry, which: int, soft: int) -> None:
        entry.applied_soft[which] = self._prlimit(entry, which, soft)

    def _prlimit(self, entry: Entry, which: int, soft: int) -> int:
        """Set a soft limit, now or through a helper process; the value it gets."""
        entry.process.check_alive()  # prlimit goes by number: never to a recycled pid
        try:
            return limits.set_soft_limit(entry.pid, entry.owner_uid, entry.owner_gid, which, soft)
        except limits.NeedsHelper as needed:
            self._helpers.start(entry.pid, needed.argv)
            return needed.soft

    def limit_changes(self) -> AbstractContextManager[list[trio.Event]]:
        """Collect the rlimit helpers a call starts, for its caller to await."""
        return self._helpers.collect()

    def _recheck_limits(self, entry: Entry, vm_data: int, open_fds: int) -> None:
        current = procfs.read_limits(entry.pid)
        for which, wanted in self._wanted_limits(entry).items():
            soft = current[limits.PROC_LIMIT_NAMES[which]][0]
            applied = entry.applied_soft.get(which)
            if soft == wanted:
                continue
            raised = soft != applied and limits.lower(soft, wanted) == wanted
            if raised:
                self._count(entry, DENIED)
                self._announce(entry)
                enforcement_log.warning(
                    "pid=%d comm=%s quota=%s usage=%s limit=%d action=deny"
                    " (process raised its soft limit to %s; lowered back)",
                    entry.pid,
                    escape_comm(entry.comm),
                    HEAP if which == limits.DATA else FILES,
                    vm_data if which == limits.DATA else open_fds,
                    wanted,
                    "unlimited" if soft == procfs.RLIM_INFINITY else soft,
                )
            if raised or soft == applied:
                self._set_soft(entry, which, wanted)

    def _restore_limits(self, entry: Entry, saved_soft: dict[int, int] | None = None) -> None:
        """Give back the soft limits deny mode saved (by default, the entry's)."""
        for which, soft in (entry.saved_soft if saved_soft is None else saved_soft).items():
            try:
                self._prlimit(entry, which, soft)
            except (NoSuchProcess, AccessDenied) as error:
                log.info("pid=%d: limits not restored: %s", entry.pid, error)
        entry.saved_soft.clear()
        entry.applied_soft.clear()

    # ----- persistence ---------------------------------------------------

    def _persist(self, entry: Entry) -> None:
        """Journal the entry as it is now; StateNotSaved (nothing saved) if impossible."""
        self._journal_change(lambda journal: journal.put(entry.to_record()))

    def _persist_removal(self, entry: Entry) -> None:
        self._journal_change(lambda journal: journal.drop(entry.pid))

    def _journal_change(self, change: Callable[[state.Journal], None]) -> None:
        journal = self._journal
        if journal is None:
            return
        try:
            if not journal.is_attached():
                # deleted or replaced under us: appending to the old inode would lose it all
                log.warning("state file %s was replaced or removed: writing it anew", journal.path)
                self._compact()
            change(journal)
        except OSError as error:
            log.error("state file %s not saved: %s", journal.path, error)
            raise StateNotSaved(error) from error
        if journal.wants_compaction(len(self._entries)):
            try:
                self._compact()
            except OSError as error:
                log.error("state file %s not compacted: %s", journal.path, error)

    def _compact(self) -> None:
        assert self._journal is not None
        self._journal.rewrite([entry.to_record() for entry in self._entries.values()])


@asynccontextmanager
async def open_engine(
    *, state_path: Path | None = None, interval: float = 0.1, helpers_in_background: bool = False
) -> AsyncIterator[Engine]:
    """Run an engine for the duration of the block: resume state, watch, check."""
    engine = Engine(
        state_path=state_path, interval=interval, helpers_in_background=helpers_in_background
    )
    async with trio.open_nursery() as nursery:
        engine._nursery = engine._helpers.nursery = nursery
        engine._restore_state()
        nursery.start_soon(engine._check_loop)
        try:
            yield engine
        finally:
            engine.shutdown()
            nursery.cancel_scope.cancel()
