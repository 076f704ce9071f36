"""The tracking engine: the registry of tracked processes and the policy that acts on them.

The engine decides (who may do what, when a quota is enforced, what a command
changes) and keeps the registry; what it delegates has a room of its own:
acting on usage (enforce.py), deny mode's limits (deny.py), the state file
(state.py), and watching the processes under quota (a backend: backend.py, today
procfs_backend.py). Everything here is synchronous but for the background tasks
in the engine's nursery: one exit watcher per tracked process (waiting on its
pidfd, so an exit is seen at once), the backend's task, and the finishing of
limit changes no request awaited. Callers (the filesystem) hold `Entry` objects
and call the engine with them; the engine never knows it is behind FUSE.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from contextlib import AbstractContextManager, asynccontextmanager, suppress
from pathlib import Path
from typing import TypeVar

import trio

from tracker import access, procfs, state
from tracker.backend import Backend, Report, choose
from tracker.deny import DEFEATS_BEFORE_KILL, DenyKeeper
from tracker.enforce import Enforcer
from tracker.entry import Entry, Measurement, QuotaSetting
from tracker.errors import (
    AccessDenied,
    AlreadyTracked,
    Deregistered,
    InvalidArgument,
    LimitNotInForce,
    NoSuchProcess,
    NotPermitted,
    NotTracked,
    QuotaBusy,
    StateNotSaved,
)
from tracker.helpers import LimitChange, Pending
from tracker.process import Process
from tracker.procfs import escape_comm
from tracker.quota import Action, Quota
from tracker.resources import FILES_RESOURCE, HEAP_RESOURCE, RESOURCES, Counters, Resource, sample
from tracker.vocabulary import EVENTS, FILES, HEAP

__all__ = ["DEFEATS_BEFORE_KILL", "EVENTS", "FILES", "HEAP", "Engine", "Entry", "Measurement"]

T = TypeVar("T")

log = logging.getLogger("restrackfs.engine")


class Registry:
    """The tracked entries by pid, in registration (`serial`) order, and those with a quota."""

    def __init__(self) -> None:
        self._entries: dict[int, Entry] = {}
        self._with_quota: dict[int, Entry] = {}
        self._serials = itertools.count(1)

    def entries(self) -> Collection[Entry]:
        return self._entries.values()

    def get(self, pid: int) -> Entry | None:
        return self._entries.get(pid)

    def watched(self) -> Collection[Entry]:
        """The entries with a quota."""
        return self._with_quota.values()

    def next_serial(self) -> int:
        return next(self._serials)

    def add(self, entry: Entry) -> None:
        self._entries[entry.pid] = entry
        self.quota_changed(entry)

    def quota_changed(self, entry: Entry) -> None:
        if entry.quota is None:
            self._with_quota.pop(entry.pid, None)
        elif self._entries.get(entry.pid) is entry:
            self._with_quota[entry.pid] = entry

    def remove(self, entry: Entry, why: str) -> bool:
        """Take `entry` out, saying why; False if it was not (or no longer) in."""
        if self._entries.get(entry.pid) is not entry:
            return False
        entry.ended = why
        del self._entries[entry.pid]
        self._with_quota.pop(entry.pid, None)
        return True

    def clear(self) -> list[Entry]:
        """Empty the registry; the entries it held."""
        entries = list(self._entries.values())
        self._entries.clear()
        self._with_quota.clear()
        return entries


class Engine:
    """Registry and policy: the commands, enforcement on read, and the backend's `Policy`."""

    def __init__(
        self,
        *,
        state_path: Path | None = None,
        interval: float = 0.1,
        helpers_in_background: bool = False,
        backend: str = "procfs",
    ) -> None:
        self.state_path = state_path
        self.interval = interval
        self.registry = Registry()
        self.enforcer = Enforcer()
        self.deny = DenyKeeper(
            self.enforcer, interval=interval, in_background=helpers_in_background
        )
        self.store = state.Store(state_path, self.registry.entries)
        self.backend: Backend = choose(backend, self, interval)
        self._removal_listeners: list[Callable[[Entry], None]] = []
        self._nursery: trio.Nursery | None = None

    # ----- queries -------------------------------------------------------

    def entries(self) -> Iterable[Entry]:
        """The tracked entries in registration order, which is `serial` order."""
        return self.registry.entries()

    def get(self, pid: int) -> Entry | None:
        return self.registry.get(pid)

    @property
    def events(self) -> Counter[str]:
        """The event counters since the start, of all entries."""
        return self.enforcer.events

    @property
    def enforcements(self) -> dict[Action, int]:
        """Enforcement actions taken since the start, by action."""
        return self.enforcer.enforcements

    def measure(self, entry: Entry) -> Measurement:
        """Read the process now; enforce its quota if the reading breaks it."""
        usage = self._read_counters(entry, entry.process.usage)
        absolute = Counters.of_usage(usage)
        relative = absolute.since(entry.baseline)
        if entry.quota is not None:
            self.enforcer.enforce(entry, relative, usage.comm)
        return Measurement(
            pid=entry.pid,
            comm=usage.comm,
            heapsize=relative.heap or 0,
            openfile_count=relative.files or 0,
            heap_total=usage.vm_data,
            openfile_total=usage.open_fds,
            quota=entry.effective_quota,
            registered=entry.registered,
        )

    def heapsize(self, entry: Entry) -> int:
        """heapsize alone: reads VmData and nothing else (the hot path of `cat`)."""
        return self._one(entry, HEAP_RESOURCE)

    def openfile_count(self, entry: Entry) -> int:
        """openfile_count alone: one stat() of /proc/PID/fd."""
        return self._one(entry, FILES_RESOURCE)

    def _one(self, entry: Entry, resource: Resource) -> int:
        absolute = self._sample(entry, (resource,))
        relative = absolute.since(entry.baseline)
        self.enforcer.enforce(entry, relative)
        return relative.of(resource) or 0

    def on_removal(self, listener: Callable[[Entry], None]) -> None:
        """Call `listener(entry)` whenever an entry leaves the registry."""
        self._removal_listeners.append(listener)

    def on_event(self, listener: Callable[[Entry], None]) -> None:
        """Call `listener(entry)` whenever one of the entry's event counters moves."""
        self.enforcer.on_event(listener)

    def limit_changes(self) -> AbstractContextManager[Pending]:
        """Collect the rlimit helpers a call starts, for its caller to `settle()`."""
        return self.deny.limit_changes()

    def check_current(self, entry: Entry) -> None:
        """Raise unless the entry is still registered and its process alive."""
        if entry.ended == "deregistered":
            raise Deregistered(f"{entry.pid}: deregistered")
        if entry.ended is not None or entry.killed or not entry.process.is_alive():
            raise NoSuchProcess(entry.pid, "process exited")

    # ----- commands ------------------------------------------------------

    def register(self, pid: int, caller_uid: int) -> Entry:
        if pid < 1:
            raise InvalidArgument(f"{pid}: not a valid pid")
        status = procfs.read_status(pid)  # by number, before any pidfd: the checks
        tgid = status.tgid  # a thread's TID names its thread group
        if tgid == os.getpid():
            # a kill quota on the daemon would take the mount down with it
            raise NotPermitted(f"{tgid}: the daemon does not track itself")
        # Permission first: EEXIST would tell a user that another's process is tracked.
        access.check_control(caller_uid, status.real_uid, tgid)
        known = self.registry.get(tgid)
        if known is not None:
            self._enforce_before_command(known)
            raise AlreadyTracked(f"{tgid}: already tracked")
        entry = self._new_entry(Process.open(tgid), caller_uid)
        try:
            self.store.put(entry)
        except StateNotSaved:
            entry.process.close()
            raise
        self._add(entry)
        log.info("registered pid=%d comm=%s by uid=%d", tgid, escape_comm(entry.comm), caller_uid)
        return entry

    def _new_entry(self, process: Process, caller_uid: int) -> Entry:
        """An entry for the pinned `process`, its baselines read now (the pinned reads decide)."""
        try:
            status = process.status()
            access.check_control(caller_uid, status.real_uid, process.pid)
            usage = process.usage()
        except BaseException:
            process.close()
            raise
        return Entry(
            process=process,
            serial=self.registry.next_serial(),
            owner_uid=status.real_uid,
            owner_gid=status.real_gid,
            baseline=Counters.of_usage(usage),
            registered=time.time(),
            comm=usage.comm,
        )

    def deregister(self, pid: int, caller_uid: int) -> None:
        if pid < 1:
            raise InvalidArgument(f"{pid}: not a valid pid")
        entry = self.registry.get(pid)
        if entry is None:
            # EPERM for another's process, tracked or not: the errno tells nothing
            # (a bare-pid read: it decides only which of two errors to answer)
            with suppress(NoSuchProcess, AccessDenied):
                access.check_control(caller_uid, procfs.read_status(pid).real_uid, pid)
            raise NotTracked(f"{pid}: not tracked")
        self._enforce_before_command(entry)
        self._check_may_lift(entry, caller_uid)
        self.store.drop(entry)
        self.deny.restore(entry)
        self._remove(entry, "deregistered")
        log.info("deregistered pid=%d by uid=%d", pid, caller_uid)

    def set_quota(self, entry: Entry, quota: Quota, caller_uid: int) -> None:
        """Set the quota; a deny quota holds only once the kernel shows its limits.

        Where a helper sets them, the quota is answered when the request's helpers
        are done (`limit_changes`): if the kernel does not show a limit then, the
        quota is undone and the request fails with EAGAIN (LimitNotInForce)."""
        self._enforce_before_command(entry)
        access.check_control(caller_uid, self._owner(entry), entry.pid)
        if entry.setting is not None:
            raise QuotaBusy(f"{entry.pid}: a quota is already set; reset it first")
        setting = entry.setting = QuotaSetting(quota, caller_uid)
        changes: list[LimitChange] = []
        try:
            if quota.action is Action.DENY:
                changes = self.deny.apply(entry)
            self.store.put(entry)
        except BaseException:
            self._undo_quota(entry)
            raise
        self.registry.quota_changed(entry)
        self.deny.after(changes, lambda: self._confirm_quota(entry, setting, changes))

    def _confirm_quota(
        self, entry: Entry, setting: QuotaSetting, changes: list[LimitChange]
    ) -> None:
        """The quota's limits are set or given up on: keep the quota, or undo it."""
        if entry.ended is not None:
            self.check_current(entry)  # deregistered or exited meanwhile: say which
        if entry.setting is not setting:
            return  # reset meanwhile: nothing left to keep or undo
        quota, uid = setting.quota.format(), setting.uid
        error = next((change.error for change in changes if change.error is not None), None)
        if error is not None:
            self._undo_quota(entry)
            with suppress(StateNotSaved):  # logged; a restart finds the limits given back
                self.store.put(entry)
            log.warning("quota pid=%d %s by uid=%d not set: %s", entry.pid, quota, uid, error)
            if isinstance(error, NoSuchProcess):
                raise error
            raise LimitNotInForce(f"{entry.pid}: deny limits not in force: {error}")
        log.info("quota pid=%d %s by uid=%d", entry.pid, quota, uid)
        self.backend.quota_set(entry)
        self.check(entry)

    def _undo_quota(self, entry: Entry) -> None:
        saved_soft = dict(entry.deny.saved_soft)
        entry.setting = None
        entry.over = frozenset()
        self.deny.forget(entry)
        self.registry.quota_changed(entry)
        self.deny.restore(entry, saved_soft)

    def reset(self, entry: Entry, *, quota: bool, usage: bool, caller_uid: int) -> None:
        """Clear the quota, restart the usage counters, or both."""
        self._enforce_before_command(entry)
        self._check_may_lift(entry, caller_uid)
        before = (entry.setting, entry.baseline)
        saved_soft = dict(entry.deny.saved_soft)
        if usage:
            now = self._read_counters(entry, entry.process.usage)
            entry.baseline = Counters.of_usage(now)
        if quota:
            entry.setting = None
            entry.deny.saved_soft = {}
        try:
            self.store.put(entry)
        except StateNotSaved:
            entry.setting, entry.baseline = before
            entry.deny.saved_soft = saved_soft
            raise
        entry.over = frozenset()
        if quota:
            self.deny.forget(entry)
            self.deny.restore(entry, saved_soft)
            self.registry.quota_changed(entry)
            self.backend.quota_cleared(entry)
        elif entry.quota is not None:
            if entry.quota.action is Action.DENY:
                self.deny.apply_and_keep(entry)
            self.backend.baseline_reset(entry)
        what = "all" if quota and usage else "quota" if quota else "usage"  # the file's words
        log.info("reset pid=%d %s by uid=%d", entry.pid, what, caller_uid)

    # ----- policy (what every backend shares) ------------------------------

    def watched(self) -> Iterable[Entry]:
        return self.registry.watched()

    def check(self, entry: Entry) -> None:
        """One check: sample what the quota limits, enforce, keep deny limits."""
        quota = entry.quota
        if quota is None or entry.ended is not None:
            return
        try:
            deny = quota.action is Action.DENY
            wanted = [r for r in RESOURCES if deny or r.limit(quota) is not None]
            absolute = self._sample(entry, wanted)
            self.enforcer.enforce(entry, absolute.since(entry.baseline))
            if deny:
                self.deny.recheck(entry, absolute)
        except NoSuchProcess:
            pass
        except AccessDenied as error:
            log.warning("check pid=%d: %s", entry.pid, error)

    def reported(self, report: Report) -> None:
        """A pushed backend's report: the kernel acted; log, count, announce (or keep limits)."""
        entry = report.entry
        if self.registry.get(entry.pid) is not entry:
            return
        if report.kind == "raised":
            self.check(entry)  # lowers it back, counts it denied, a defeat
        elif report.kind != "peak":
            self.enforcer.reported(report)

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
            self.check(entry)
            self.check_current(entry)

    def _owner(self, entry: Entry) -> int:
        """The process's real uid now: kill(2) judges by it, not by who it was at registration."""
        try:
            status = entry.process.status()
        except NoSuchProcess:
            return entry.owner_uid  # reaped: its ids cannot change any more
        entry.owner_uid, entry.owner_gid = status.real_uid, status.real_gid
        return status.real_uid

    def _check_may_lift(self, entry: Entry, caller_uid: int) -> None:
        access.check_control(caller_uid, self._owner(entry), entry.pid)
        access.check_lift_quota(caller_uid, entry.quota_uid, entry.pid)

    def _sample(self, entry: Entry, wanted: Collection[Resource]) -> Counters:
        return self._read_counters(entry, lambda: sample(entry.process, wanted))

    def _read_counters(self, entry: Entry, read: Callable[[], T]) -> T:
        """Read through the entry's pidfd; an exit seen on the way removes the entry."""
        if entry.ended is not None:
            self.check_current(entry)  # says deregistered or exited
        try:
            return read()  # checks the pidfd after reading
        except NoSuchProcess:
            self._remove(entry, "exited")
            raise

    # ----- lifecycle -----------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        """Run in `nursery`: resume the state file, then the backend's task."""
        self._nursery = nursery
        self.deny.start(nursery)
        with self.deny.helpers.batch():  # nothing is served yet: helpers run synchronously
            restored = self._restore_entries()
            try:
                self.store.compact()
            except OSError as error:
                log.error(
                    "state file %s not writable: changes will fail: %s", self.state_path, error
                )
        self.backend.adopt(restored)
        nursery.start_soon(self.backend.run)

    def _restore_entries(self) -> list[Entry]:
        restored = []
        for record in self.store.load():
            try:
                entry = state.entry_of(record, self.registry.next_serial())
            except (NoSuchProcess, AccessDenied):
                log.info("state: dropped pid=%s (gone or recycled)", record.get("pid"))
                continue
            except (AttributeError, KeyError, TypeError, ValueError):
                log.error("state: dropped a malformed record: %.200r", record)
                continue
            self._add(entry)
            if entry.quota is not None and entry.quota.action is Action.DENY:
                self.deny.apply_and_keep(entry)
            log.info("state: resumed pid=%d comm=%s", entry.pid, escape_comm(entry.comm))
            restored.append(entry)
        return restored

    def shutdown(self) -> None:
        """Give back every soft limit deny mode lowered; keep the state file."""
        self.deny.helpers.stop_all()
        with self.deny.helpers.batch():
            for entry in list(self.registry.entries()):
                self.deny.restore(entry)
                entry.ended = "stopped"
        self.deny.helpers.inline = True
        for entry in self.registry.clear():
            trio.lowlevel.notify_closing(entry.process.pidfd)
            entry.process.close()
        self.backend.close()
        self.store.close()

    def _add(self, entry: Entry) -> None:
        self.registry.add(entry)
        assert self._nursery is not None, "the engine is not running"
        self._nursery.start_soon(self._watch_exit, entry)

    async def _watch_exit(self, entry: Entry) -> None:
        if entry.ended is not None:
            return  # removed before this task got to run
        try:
            await trio.lowlevel.wait_readable(entry.process.pidfd)
        except trio.ClosedResourceError:
            return  # deregistered: the pidfd was closed under us
        if entry.ended is None:
            self._remove(entry, "exited")

    def _remove(self, entry: Entry, why: str) -> None:
        if not self.registry.remove(entry, why):
            return
        if why == "exited":
            with suppress(StateNotSaved):  # nobody to tell; the next start drops it anyway
                self.store.drop(entry)
        self.backend.removed(entry)
        trio.lowlevel.notify_closing(entry.process.pidfd)
        entry.process.close()
        log.info("removed pid=%d (%s)", entry.pid, why)
        for listener in self._removal_listeners:
            listener(entry)


@asynccontextmanager
async def open_engine(
    *,
    state_path: Path | None = None,
    interval: float = 0.1,
    helpers_in_background: bool = False,
    backend: str = "procfs",
) -> AsyncIterator[Engine]:
    """Run an engine for the duration of the block: resume state, watch, check."""
    engine = Engine(
        state_path=state_path,
        interval=interval,
        helpers_in_background=helpers_in_background,
        backend=backend,
    )
    async with trio.open_nursery() as nursery:
        engine.start(nursery)
        try:
            yield engine
        finally:
            engine.shutdown()
            nursery.cancel_scope.cancel()
