"""The tracking engine: the commands on the registry, and its lifecycle.

The engine decides what a command changes and who may give it, and composes
the rooms it relies on: the registry and its exit watchers (registry.py), the
readings with enforcement (reading.py: `Reader`), what a backend calls and the
rules every command applies first (policy.py: `Policy`), acting on usage
(enforce.py), deny mode's limits (tracker/deny/), the state file (state.py),
and the backend that watches the processes under quota (tracker/backends/).
`register` is synchronous; `deregister`, `set_quota` and `reset` are async and
await the deny-mode limit work they started, so only their own request waits.
Background tasks run in the engine's nursery: the exit watchers, the backend's
task, and the finishing of limit work nobody awaits. Callers (the filesystem)
hold `Entry` objects and call the engine with them; the engine never knows it
is behind FUSE.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import trio

from tracker.backends.base import Backend, choose
from tracker.deny.helpers import LimitChange, settled
from tracker.deny.keeper import DenyKeeper
from tracker.engine import access, state
from tracker.engine.enforce import Enforcer
from tracker.engine.entry import Ended, Entry, QuotaSetting
from tracker.engine.policy import Policy
from tracker.engine.reading import Reader, check_current
from tracker.engine.registry import Registry
from tracker.engine.resources import Counters
from tracker.engine.tree import Tree
from tracker.errors import (
    AccessDenied,
    AlreadyTracked,
    InvalidArgument,
    LimitNotInForce,
    NoSuchProcess,
    NotPermitted,
    NotTracked,
    QuotaBusy,
    QuotaNotKept,
    StateNotSaved,
)
from tracker.linux import procfs
from tracker.linux.process import Process
from tracker.linux.procfs import escape_comm
from tracker.quota import Action, Quota, Reset

log = logging.getLogger("restrackfs.engine")


class Engine:
    """The registry's commands and lifecycle; it composes the rooms it relies on
    (`reader` for the files' readings, `policy` for what backends call)."""

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
        self.reader = Reader(self.registry, self.enforcer)
        self.policy = Policy(self.registry, self.enforcer, self.deny, self.reader, self.store)
        self.backend: Backend = choose(backend, self.policy, interval)
        backend = self.backend
        self.reader.use(backend.reader, backend.peaks, backend.tree_members)
        self.registry.on_removal(self._removed)
        self.registry.before_exit(self.backend.flush)

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

    def on_removal(self, listener: Callable[[Entry], None]) -> None:
        """Call `listener(entry)` whenever an entry leaves the registry."""
        self.registry.on_removal(listener)

    def on_event(self, listener: Callable[[Entry], None]) -> None:
        """Call `listener(entry)` whenever one of the entry's event counters moves."""
        self.enforcer.on_event(listener)

    # ----- commands ------------------------------------------------------

    def register(self, pid: int, caller_uid: int, baseline: Counters | None = None) -> Entry:
        """Track `pid`; `baseline` (absolute) in place of its usage now, for a child
        a backend watched since its fork (its usage at fork)."""
        if pid < 1:
            raise InvalidArgument(f"{pid}: not a valid pid")
        # By number, before pinning: only to name the thread group and refuse early;
        # the reads through the pidfd (`_new_entry`) decide.
        status = procfs.read_status(pid)
        tgid = status.tgid  # a thread's TID names its thread group
        if tgid == os.getpid():
            # a kill quota on the daemon would take the mount down with it
            raise NotPermitted(f"{tgid}: the daemon does not track itself")
        # Permission first: EEXIST would tell a user that another's process is tracked.
        access.check_control(caller_uid, status.real_uid, tgid)
        known = self.registry.get(tgid)
        if known is not None:
            self.policy.enforce_first(known)
            raise AlreadyTracked(f"{tgid}: already tracked")
        entry = new_entry(Process.open(tgid), caller_uid, self.registry.next_serial(), baseline)
        try:
            self.store.put(entry)
        except StateNotSaved:
            entry.process.close()
            raise
        self.registry.add(entry)
        log.info("registered pid=%d comm=%s by uid=%d", tgid, escape_comm(entry.comm), caller_uid)
        return entry

    async def deregister(self, pid: int, caller_uid: int) -> Entry:
        """Stop tracking `pid`: answered once deny's soft limits are given back (or
        given up on); the entry removed."""
        if pid < 1:
            raise InvalidArgument(f"{pid}: not a valid pid")
        entry = self.registry.get(pid)
        if entry is None:
            # EPERM for another's process, tracked or not: the errno tells nothing
            # (a bare-pid read: it decides only which of two errors to answer)
            with suppress(NoSuchProcess, AccessDenied):
                access.check_control(caller_uid, procfs.read_status(pid).real_uid, pid)
            raise NotTracked(f"{pid}: not tracked")
        self.policy.enforce_first(entry)
        self.policy.check_may_lift(entry, caller_uid)
        self.store.drop(entry)
        changes = self.deny.restore(entry)
        self.registry.remove(entry, Ended.DEREGISTERED)
        log.info("deregistered pid=%d by uid=%d", pid, caller_uid)
        await settled(changes)
        return entry

    async def set_quota(self, entry: Entry, quota: Quota, caller_uid: int) -> None:
        """Set the quota; a deny quota holds only once the kernel shows its limits.

        Where a helper sets them, the quota is answered when they are done (only
        this request waits, HELPER_TIMEOUT at most): if the kernel does not show a
        limit then, the quota is undone and the request fails with EAGAIN
        (LimitNotInForce)."""
        setting, changes = self._begin_quota(entry, quota, caller_uid)
        await settled(changes)
        self._confirm_quota(entry, setting, changes)

    def _begin_quota(
        self, entry: Entry, quota: Quota, caller_uid: int
    ) -> tuple[QuotaSetting, list[LimitChange]]:
        """The quota set and saved, deny's limits started; confirmed once they are done."""
        self.policy.enforce_first(entry)
        access.check_control(caller_uid, self.policy.owner(entry), entry.pid)
        if entry.setting is not None:
            raise QuotaBusy(f"{entry.pid}: a quota is already set; reset it first")
        setting = entry.setting = QuotaSetting(quota, caller_uid)
        changes: list[LimitChange] = []
        try:
            if quota.is_tree:
                entry.tree = Tree.start(entry.process, entry.baseline)
            if quota.action is Action.DENY:
                changes = self.deny.apply(entry)
            self.store.put(entry)
        except BaseException:
            self._undo_quota(entry)
            raise
        self.registry.quota_changed(entry)
        return setting, changes

    def _confirm_quota(
        self, entry: Entry, setting: QuotaSetting, changes: list[LimitChange]
    ) -> None:
        """The quota's limits are set or given up on: keep the quota, or undo it."""
        if entry.ended is not None:
            check_current(entry)  # deregistered or exited meanwhile: say which
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
        try:
            self.backend.quota_set(entry)
        except QuotaNotKept as refused:
            self._undo_quota(entry)
            with suppress(StateNotSaved):
                self.store.put(entry)
            log.error("quota pid=%d %s by uid=%d refused: %s", entry.pid, quota, uid, refused)
            raise
        log.info("quota pid=%d %s by uid=%d", entry.pid, quota, uid)
        self.enforcer.records.workload(entry)  # read while it lives: a kill may take it
        self.policy.check(entry)

    def _undo_quota(self, entry: Entry) -> None:
        saved_soft = dict(entry.deny.saved_soft)
        entry.setting = None
        entry.over = frozenset()
        end_tree(entry)
        self.deny.forget(entry)
        self.registry.quota_changed(entry)
        self.deny.restore(entry, saved_soft)

    def inherit(self, pid: int, start_time: int, quota: Quota) -> bool:
        """Have the backend watch the children `pid` forks from now on, from their
        fork, with `quota`, where it can (bpf); False where it cannot (the next
        scan finds them)."""
        return self.backend.inherit(pid, start_time, quota)

    async def reset(self, entry: Entry, what: Reset, caller_uid: int) -> None:
        """Clear the quota, restart the usage counters, or both: answered once deny's
        soft limits are given back or set anew (or given up on)."""
        quota, usage = what.clears_quota, what.restarts_usage
        self.policy.enforce_first(entry)
        self.policy.check_may_lift(entry, caller_uid)
        if quota:
            self.reader.fold_exact_peaks(entry)  # the backend forgets them with the quota
        before = (entry.setting, entry.baseline, entry.high)
        saved_soft = dict(entry.deny.saved_soft)
        tree_baseline = None if entry.tree is None else entry.tree.baseline
        if usage:
            now = self.reader.usage_now(entry)
            entry.baseline = entry.high = Counters.of_usage(now)  # the peaks restart too
            if entry.tree is not None and not quota:  # the tree's usage restarts at 0
                entry.tree.baseline = self.reader.tree_sums(entry)
        if quota:
            entry.setting = None
            entry.deny.saved_soft = {}
        try:
            self.store.put(entry)
        except StateNotSaved:
            entry.setting, entry.baseline, entry.high = before
            entry.deny.saved_soft = saved_soft
            if entry.tree is not None and tree_baseline is not None:
                entry.tree.baseline = tree_baseline
            raise
        entry.over = frozenset()
        changes: list[LimitChange] = []
        if quota:
            end_tree(entry)
            self.deny.forget(entry)
            changes = self.deny.restore(entry, saved_soft)
            self.registry.quota_changed(entry)
            self.backend.quota_cleared(entry)
        elif entry.quota is not None:
            if entry.quota.action is Action.DENY:
                changes = self.deny.apply_and_keep(entry)
            self.backend.baseline_reset(entry)
        log.info("reset pid=%d %s by uid=%d", entry.pid, what, caller_uid)
        await settled(changes)

    # ----- lifecycle -----------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        """Run in `nursery`: resume the state file, then the backend's task."""
        self.registry.start(nursery)
        self.deny.start(nursery)
        self.enforcer.records.start(nursery)
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
            self.registry.add(entry)
            if entry.quota is not None and entry.quota.action is Action.DENY:
                self.deny.apply_and_keep(entry)
            log.info("state: resumed pid=%d comm=%s", entry.pid, escape_comm(entry.comm))
            restored.append(entry)
        return restored

    def shutdown(self) -> None:
        """Stop without lifting anything: deny's soft limits stay lowered and the bpf
        backend leaves its programs and maps pinned, so every quota stays enforced
        until the next daemon with this state file adopts it (`release` lifts them).
        The state file keeps the entries, with the peaks as they are now."""
        self.deny.helpers.stop_all()
        for entry in self.registry.entries():
            self.reader.fold_exact_peaks(entry)  # before the backend closes
        try:
            self.store.save_at_stop()
        except OSError as error:
            log.error("state file %s: peaks not saved at stop: %s", self.state_path, error)
        self.backend.close()  # first: the entries' removal below must not unwatch them
        for entry in list(self.registry.entries()):
            entry.ended = Ended.STOPPED
        self.registry.close_all()
        self.store.close()

    async def release_all(self) -> int:
        """Deregister every entry as root would (soft limits restored, the state file
        emptied): what `restrackfs --release` does. The number released."""
        released = 0
        for entry in list(self.registry.entries()):
            with suppress(NoSuchProcess, NotTracked, StateNotSaved):
                await self.deregister(entry.pid, caller_uid=0)
                released += 1
        return released

    def _removed(self, entry: Entry) -> None:
        """An entry left the registry: the state file forgets an exited one, the backend all."""
        if entry.ended is Ended.EXITED:
            with suppress(StateNotSaved):  # nobody to tell; the next start drops it anyway
                self.store.drop(entry)
        self.backend.removed(entry)
        end_tree(entry)


def end_tree(entry: Entry) -> None:
    """The entry's tree quota ends (reset, undone, or the entry left): unpin its members."""
    if entry.tree is not None:
        entry.tree.close()
        entry.tree = None


def new_entry(
    process: Process, caller_uid: int, serial: int, baseline: Counters | None = None
) -> Entry:
    """An entry for the pinned `process`, its baselines read now (the pinned reads decide)."""
    try:
        status = process.status()
        access.check_control(caller_uid, status.real_uid, process.pid)
        usage = process.usage()
        workload = process.workload()
    except BaseException:
        process.close()
        raise
    return Entry(
        process=process,
        serial=serial,
        owner_uid=status.real_uid,
        owner_gid=status.real_gid,
        baseline=Counters.of_usage(usage) if baseline is None else baseline,
        registered=time.time(),
        comm=usage.comm,
        workload=workload,
    )


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


async def release_state(state_path: Path) -> int:
    """Deregister every entry of the state file (soft limits restored), without
    the bpf backend: `restrackfs --release`. The number released."""
    async with open_engine(state_path=state_path, backend="procfs") as engine:
        return await engine.release_all()
