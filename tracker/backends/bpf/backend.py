"""The bpf backend: the kernel checks each watched process at its own syscalls
(tracker/backends/bpf/, see its README) and this steers it (see tracker/backends/base.py).

What it does with what the engine tells it:

- a quota confirmed (`quota_set`), a baseline reset, an adopted entry: the
  process's `watched` map entry with absolute limits (baseline + quota; heap in
  pages), deny's soft limits in force, and the action; a quota the kernel
  cannot take (its map full, its programs not attaching) is `QuotaNotKept`;
- a quota cleared, an entry removed: the map entry deleted;
- the programs are attached while at least one entry is watched (or children
  are to be watched at fork), at once, on the loop (5-10 ms), and detached when
  none has been for `IDLE_DETACH` seconds, in a thread: detaching waits ~3 s
  for RCU grace periods (attachment.py);
- its task waits on the ring buffer's fd; an event only says which entry
  changed, and the entry's counts (crossings, refusals, raises, a kill, an
  exec) are taken from the map once (`KernelWatch.take`) and handed to the
  policy as `Report`s with a count (reports.py): a process flipping over and
  back a hundred thousand times is one event, and a full ring loses no count
  (the kernel counts its drops; `_reconcile` takes every entry then).

Nothing polls a watched process. The periodic things are cheap: every
`RETRY_PERIOD` the deny entries whose last limit set failed get one
`policy.check`, and the kernel's drop count is looked at; a deny entry whose
descriptor table shrank gets one `policy.check` within `RECHECK_GAP`.

The maps and links are pinned in one directory per state file under
/sys/fs/bpf/restrackfs/, checked at every start (root's, no symlink: see
loader.check_pins). A daemon that stops with quotas watched, whatever stopped
it, leaves them pinned and enforcing; the next one adopts the directory
(`adopt`: entries the state file no longer has are unwatched, what happened
meanwhile counted). `release_pins` (restrackfs --release) removes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import trio

from tracker.backends.base import BackendUnavailable, Report, ReportKind
from tracker.backends.bpf.attachment import Attachment
from tracker.backends.bpf.counters import CounterReader
from tracker.backends.bpf.loader import (
    FLAG_FILES_WARNED,
    FLAG_HEAP_WARNED,
    BpfUnavailable,
    Event,
    KernelAction,
    KernelWatch,
    Kind,
    TreeTaken,
    WatchState,
    remove_tree,
)
from tracker.backends.bpf.reports import Reporter
from tracker.backends.readers import KernelReader, ProcReader
from tracker.deny import limits
from tracker.engine.entry import Ended, Entry
from tracker.engine.resources import FILES_RESOURCE, HEAP_RESOURCE, RESOURCES, Counters
from tracker.errors import AccessDenied, NoSuchProcess, QuotaNotKept
from tracker.linux.process import Process
from tracker.quota import Action, Quota

if TYPE_CHECKING:
    from tracker.engine.policy import Policy

log = logging.getLogger("restrackfs.engine")
T = TypeVar("T")

PIN_ROOT = Path("/sys/fs/bpf/restrackfs")
PAGE = os.sysconf("SC_PAGE_SIZE")
RETRY_PERIOD = 1.0  # seconds between looks for deny limit sets due a retry, and for drops
BATCH = 64  # events handled between two looks at the FUSE requests
RECHECK_GAP = 0.05  # seconds between two rounds of deny limits set anew after a close
EXITED_KEPT = 4096  # exited entries whose exit event (with its last counts) may still come
WARNED_FLAG = {HEAP_RESOURCE.name: FLAG_HEAP_WARNED, FILES_RESOURCE.name: FLAG_FILES_WARNED}


def pin_name(state_path: Path) -> str:
    """A bpffs name for the state file (one per mount point): its path without
    the suffix, escaped as the state file's own name is (bpffs refuses ".")."""
    text = str(state_path.with_suffix("")).strip("/")
    name = text.replace("-", "--").replace("/", "-").replace(".", "_") or "root"
    return name[-200:]


def pin_dir_of(state_path: Path | None) -> Path:
    """The pin directory of a daemon with this state file (none: one per process)."""
    if state_path is None:
        return PIN_ROOT / f"pid-{os.getpid()}"
    return PIN_ROOT / pin_name(state_path)


class Backend:
    name = "bpf"

    def __init__(self, policy: Policy, interval: float) -> None:
        self.policy = policy
        state_path = policy.state_path
        try:
            self.kw = KernelWatch.open(pin_dir_of(state_path))
        except BpfUnavailable as why:
            with contextlib.suppress(OSError):  # made for this one, left empty by the failure
                PIN_ROOT.rmdir()
            raise BackendUnavailable(str(why)) from None
        self._watched: dict[int, Entry] = {}  # pid -> the entry its map entry is for
        self._attachment = Attachment(self.kw, needed=lambda: self._needed)
        self._reporter = Reporter(policy, self.kw, shrunk=self._recheck)
        self._closed = False
        self._counters = _open_counters()
        self.reader = ProcReader() if self._counters is None else KernelReader(self._counters)
        self._dropped = 0  # the kernel's count of events it could not queue, when last seen
        self._exited: dict[int, Entry] = {}  # pid -> an entry the engine removed at its exit
        self._inheriting = False  # an inherit rule set for a process not tracked
        self._trees: dict[int, Entry] = {}  # root pid -> the entry of its tree quota
        # roots whose tree the kernel keeps after the root's exit, to its last member
        self._orphans: set[int] = set()
        self._rechecks: dict[int, Entry] = {}  # deny entries whose table shrank
        self._recheck_due = trio.Event()

    # ----- the engine's notifications (synchronous, cheap) ------------------

    def adopt(self, entries: Iterable[Entry]) -> None:
        """At start: keep what the kernel holds for the restored entries (peaks and
        crossing flags included), watch the rest, unwatch what the state lost,
        and count what happened while no daemon ran."""
        restored = {entry.pid: entry for entry in entries if entry.quota is not None}
        held = self.kw.entries()
        for pid in held.keys() - restored.keys():
            if held[pid].tree and self.kw.tree(held[pid].tree) is not None:
                continue  # a member of a tree: the tree's, whoever its root is
            self.kw.unwatch(pid)
            log.info("bpf: unwatched pid=%d (not in the state file)", pid)
        for pid, entry in restored.items():
            old = held.get(pid)
            if entry.tree is not None:
                self._adopt_tree(entry)
            elif old is not None and old.setting == watch_state_of(entry).setting:
                self._watched[pid] = entry  # its warned flags too: a crossing counts once
            else:
                self._report_warned(entry, self._watch(entry))
        self._orphans = {root for root in self._tree_roots_held() if root not in self._trees}
        if held:
            log.info("bpf: adopted %d pinned entries in %s", len(held), self.kw.pin_dir)
        self._handle_all(self.kw.drain(), meanwhile=True)
        for entry in list(self._watched.values()):  # counts whose events the ring dropped
            self._reporter.take(entry)
        for entry in list(self._trees.values()):
            self._take_tree(entry.pid)
        self._dropped = self.kw.dropped()
        self._attachment.sync()

    def quota_set(self, entry: Entry) -> None:
        """QuotaNotKept when the kernel cannot take the entry (its map is full) or
        its programs cannot attach: a quota is never accepted unenforced."""
        warned = []
        if entry.tree is not None:
            self._watch_tree(entry)
        else:
            warned = self._watch(entry, refuse=True)
        why = self._attachment.sync()
        if why is not None:
            self._unwatch(entry)
            raise QuotaNotKept(f"{entry.pid}: the kernel programs did not attach: {why}")
        self._report_warned(entry, warned)

    def baseline_reset(self, entry: Entry) -> None:
        warned = []
        if entry.tree is not None:
            with contextlib.suppress(QuotaNotKept):  # gone meanwhile: its exit removes it
                self._watch_tree(entry)  # the bases re-taken; sums and members stay
        else:
            warned = self._watch(entry)  # flags cleared: the next crossing counts afresh
        self._attachment.sync()
        self._report_warned(entry, warned)

    def warns_in_kernel(self, entry: Entry) -> bool:
        """The kernel warns in the crossing call of a watched process, and of a tree's
        sums in the call of the member that moved them."""
        if self._closed:
            return False
        if entry.tree is not None:
            return self._trees.get(entry.pid) is entry
        return self._watched.get(entry.pid) is entry

    def quota_cleared(self, entry: Entry) -> None:
        self._unwatch(entry)

    def removed(self, entry: Entry) -> None:
        self._unwatch(entry)

    def peaks(self, entry: Entry) -> Counters | None:
        """The kernel's watermarks: raised at every checked syscall,
        so a spike between two reads shows. Absolute, as a sample is; restarted by
        `baseline_reset` (re-watched with zero peaks) and kept across a restart (adopt
        keeps the pinned entry)."""
        if self._closed or self._watched.get(entry.pid) is not entry:
            return None
        state = self.kw.entry(entry.pid)
        if state is None or state.start_time != entry.process.start_time:
            return None
        return Counters(heap=state.heap_peak_pages * PAGE, files=state.fd_peak)

    @property
    def unloaded(self) -> str | None:
        if self._closed:
            return "bpf: the engine is closed"
        if self._needed and not self.kw.attached:
            return f"bpf: programs not attached while {len(self._watched)} quotas are watched"
        return None

    @property
    def events_dropped(self) -> int:
        """Events the kernel's ring could not take since the maps were made."""
        return self._dropped if self._closed else self.kw.dropped()

    def flush(self) -> None:
        if not self._closed:
            self._handle_all(self.kw.drain())

    def close(self) -> None:
        """A stop of the daemon: with quotas watched, the programs and maps stay pinned
        and enforcing for the next daemon (`release_pins` lifts them); with none,
        everything is detached and unpinned (waits for a detach under way)."""
        self._closed = True
        with contextlib.suppress(RuntimeError):  # outside trio: no task waits on it
            trio.lowlevel.notify_closing(self.kw.ring_fd())  # run() returns, not EBADF
        if self._counters is not None:
            if isinstance(self.reader, KernelReader):
                self.reader.stop()
            self._counters.close()
            self._counters = None
        keep = self._needed
        self._attachment.close(unpin=not keep)
        if keep:
            log.info(
                "bpf: %d quotas and %d trees stay enforced, pinned in %s",
                len(self._watched), len(self._trees) + len(self._orphans), self.kw.pin_dir,
            )  # fmt: skip
            return
        with contextlib.suppress(OSError):  # others' directories still there: keep it
            PIN_ROOT.rmdir()
        log.info("bpf: detached and unpinned %s", self.kw.pin_dir)

    def tree_members(self, entry: Entry) -> list[tuple[int, int]] | None:
        """The kernel's members (added at their fork, removed at their exit)."""
        if self._closed or self._trees.get(entry.pid) is not entry:
            return None
        return self.kw.tree_identities(entry.pid)

    # ----- the map: one entry per process with a quota ---------------------

    def inherit(self, pid: int, start_time: int, quota: Quota) -> bool:
        """The children `pid` forks from now on (at any depth) are watched from their
        fork with `quota` over their usage then; False where the kernel cannot."""
        heap = None if quota.heap is None else quota.heap // PAGE  # as watch_state_of: floor
        try:
            self.kw.inherit(pid, start_time, heap, quota.files, quota.action.name.lower())
        except OSError as error:
            log.error("bpf: children of pid=%d not watched at fork: %s", pid, error)
            return False
        self._inheriting = True  # the fork hook must run: attached from now on
        self._attachment.sync()
        return True

    def _watch(self, entry: Entry, refuse: bool = False) -> list[Report]:
        """Write the entry's `watched` value; the warnings its usage is already past
        (their flags set in it), for the caller to report once the quota holds."""
        if self._watched.get(entry.pid) is entry:
            self._reporter.take(entry)  # the counts of the setting being replaced
        state = watch_state_of(entry)
        held = None if entry.pid in self._watched else self.kw.entry(entry.pid)
        if held is not None and held.setting == state.setting:
            self._watched[entry.pid] = entry  # made by the kernel at fork: kept as it is
            self._reporter.watching(entry)
            self._reporter.take(entry)
            return []
        warned = self._past_warning(entry, state)
        flags = sum(WARNED_FLAG[report.resource.name] for report in warned)
        try:
            self.kw.watch_state(entry.pid, dataclasses.replace(state, flags=flags))
        except ProcessLookupError:
            self._watched.pop(entry.pid, None)  # exited: its exit watcher removes it
            return []
        except OSError as error:  # the map is full (65,536): a quota the kernel cannot keep
            log.error("bpf: cannot watch pid=%d: %s", entry.pid, error)
            if refuse:
                raise QuotaNotKept(
                    f"{entry.pid}: the kernel's map is full ({error.strerror})"
                ) from None
            return []
        self._watched[entry.pid] = entry
        self._reporter.watching(entry)
        return warned

    def _past_warning(self, entry: Entry, state: WatchState) -> list[Report]:
        """The resources whose usage is over its warn threshold now (a quota set over
        it): the kernel, which sees crossings only, starts with them warned of."""
        quota = entry.quota
        if quota is None or state.heap_warn_pages is None and state.fd_warn is None:
            return []
        try:
            usage = Counters.of_usage(self.reader.usage(entry.process)).since(entry.baseline)
        except (NoSuchProcess, AccessDenied):
            return []  # gone: nothing to warn of; its exit watcher removes it
        past = []
        for resource, used in zip(RESOURCES, usage, strict=True):
            limit = resource.limit(quota)
            threshold = quota.warn_threshold(limit)
            over = used is not None and threshold is not None and used > threshold
            if over and limit is not None:
                past.append(Report(entry, ReportKind.WARNED, resource, used, limit))  # type: ignore[arg-type]
        return past

    def _report_warned(self, entry: Entry, warned: list[Report]) -> None:
        for report in warned:
            self.policy.reported(report)

    def _unwatch(self, entry: Entry) -> None:
        if self._trees.get(entry.pid) is entry:
            self._unwatch_tree(entry)
            return
        if self._watched.get(entry.pid) is entry:
            if entry.ended is Ended.EXITED and not self._closed:
                self._reporter.take(entry)  # the kernel's entry if its exit hook has not run yet
                self._exited[entry.pid] = entry  # for the counts its exit event carries
                while len(self._exited) > EXITED_KEPT:
                    del self._exited[next(iter(self._exited))]
            del self._watched[entry.pid]
            self._reporter.forget(entry.pid)
            if not self._closed:
                self.kw.unwatch(entry.pid)
                self._attachment.sync()

    @property
    def _needed(self) -> bool:
        """The programs must be attached: a quota is watched, or children are to be
        watched at fork (--track-children)."""
        return bool(self._watched or self._trees or self._orphans) or self._inheriting

    # ----- trees: one quota on the sum over a root and what it starts ---------

    def _watch_tree(self, entry: Entry) -> None:
        """The tree in the kernel with absolute limits (the tree's baseline + quota);
        from now on each child a member forks is a member before it runs."""
        quota, tree = entry.quota, entry.tree
        assert quota is not None and tree is not None
        base = tree.baseline
        heap = None if quota.heap is None else (base.heap + quota.heap) // PAGE
        files = None if quota.files is None else base.files + quota.files
        heap_share = quota.warn_threshold(quota.heap)
        files_share = quota.warn_threshold(quota.files)
        heap_warn = None if heap_share is None else (base.heap + heap_share) // PAGE
        fd_warn = None if files_share is None else base.files + files_share
        if self._trees.get(entry.pid) is entry:
            self._take_tree(entry.pid)  # the counts of the setting being replaced
        try:
            self.kw.watch_tree(
                entry.pid, entry.process.start_time, heap, files,
                quota.action.name.lower(), base.heap // PAGE, base.files, heap_warn, fd_warn,
            )  # fmt: skip
        except ProcessLookupError:
            self._trees.pop(entry.pid, None)  # exited: its exit watcher removes it
            return
        except OSError as error:  # a map full, or the pid a member of another tree
            log.error("bpf: cannot watch the tree of pid=%d: %s", entry.pid, error)
            raise QuotaNotKept(f"{entry.pid}: the kernel cannot keep this tree: "
                               f"{error.strerror}") from None  # fmt: skip
        self._trees[entry.pid] = entry

    def _adopt_tree(self, entry: Entry) -> None:
        """A restored tree quota: the kernel's tree kept when it is this quota's (its
        members added while no daemon ran stay members), else set anew."""
        held = self.kw.tree(entry.pid)
        if held is not None and held.start_time == entry.process.start_time:
            self._trees[entry.pid] = entry
            self._watch_tree(entry)  # the same settings: sums and members stay
            return
        with contextlib.suppress(QuotaNotKept):
            self._watch_tree(entry)

    def _unwatch_tree(self, entry: Entry) -> None:
        """The tree's entry leaves the engine. A quota reset or a deregistration ends
        the tree; the root's exit does not: the kernel keeps the tree, and its
        quota, until its last member exits (an orphan: killed whole if it crosses)."""
        del self._trees[entry.pid]
        if self._closed:
            return
        self._take_tree(entry.pid, entry)
        if entry.ended is Ended.EXITED and self.kw.tree(entry.pid) is not None:
            self._orphans.add(entry.pid)
            log.info("bpf: the tree of pid=%d outlives its root, to its last member", entry.pid)
        else:
            self.kw.unwatch_tree(entry.pid)
        self._attachment.sync()

    def _take_tree(self, root: int, entry: Entry | None = None) -> None:
        """Hand what the kernel counted for the tree of `root` to its entry, or act
        for an orphan (kill the rest of a tree whose member was killed)."""
        entry = entry or self._trees.get(root)
        taken = self.kw.take_tree(root)
        if taken is None:
            return
        if entry is not None:
            self._reporter.apply_tree(entry, taken)
        elif taken.killed:
            self._kill_orphan(root)

    def _kill_orphan(self, root: int) -> None:
        """A tree whose root has exited crossed its kill quota: the kernel killed the
        crossing member in its call; the rest now, each checked to be the member."""
        members = self.kw.tree_identities(root)
        for pid, start_time in members:
            with contextlib.suppress(NoSuchProcess, AccessDenied):
                process = Process.open(pid, start_time)
                try:
                    process.kill()
                finally:
                    process.close()
        log.warning("bpf: the tree of pid=%d (its root exited) crossed its kill quota:"
                    " killed its %d members", root, len(members))  # fmt: skip

    def _tree_roots_held(self) -> set[int]:
        return {state.tree for state in self.kw.entries().values() if state.tree}

    # ----- events -----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._closed:  # the engine stopped before this task first ran
            task_status.started()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._attachment.run)
            nursery.start_soon(self._retries)
            nursery.start_soon(self._recheck_shrunk)
            task_status.started()
            fd = self.kw.ring_fd()
            while True:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except trio.ClosedResourceError:
                    return  # closed (the engine stops): cancelled right after
                events = self.kw.drain()  # at most one per entry, plus exits (coalesced)
                for start in range(0, len(events), BATCH):
                    self._handle_all(events[start : start + BATCH])
                    await trio.lowlevel.checkpoint()  # FUSE requests between batches

    def _handle_all(self, events: list[Event], meanwhile: bool = False) -> None:
        for event in events:
            try:
                self._handle(event, meanwhile)
            except Exception:  # a bug must not stop the events of all the others
                log.exception("bpf: event %s failed", event)

    def _handle(self, event: Event, meanwhile: bool) -> None:
        entry = self._watched.get(event.tgid)
        if event.kind in (Kind.TREE_KILLED, Kind.TREE_NOTIFIED, Kind.TREE_WARNED):
            self._take_tree(event.tgid)
            return
        if event.kind is Kind.TREE_ENDED:
            self._tree_ended(event)
            return
        if event.kind is Kind.EXITED:
            gone = entry or self._exited.pop(event.tgid, None)  # the engine saw it first
            if gone is not None and event.final is not None:  # counted, not taken yet
                self._reporter.apply(gone, event.final)
            elif gone is None and event.final is not None and event.final.killed:
                pages, fds = event.final.usage_at  # a child watched since its fork
                log.warning(
                    "bpf: pid=%d killed in its crossing call before it was registered"
                    " (heap %d bytes, %d descriptors at the kill)", event.tgid, pages * PAGE, fds,
                )  # fmt: skip
            if entry is not None:
                self._removed_in_kernel(event.tgid)
            return
        if meanwhile:
            kind, which = event.kind.name.lower(), event.which.name.lower()
            log.warning("bpf: while no daemon ran: pid=%d %s %s usage=%d limit=%d",
                        event.tgid, kind, which, event.usage, event.limit)  # fmt: skip
        if event.kind is Kind.FORKED and entry is None:
            # watched by the kernel since its fork (an inherit rule): the engine
            # registers it with the kernel's baseline, then quota_set adopts it
            self.policy.forked(event.tgid, Counters(heap=event.usage * PAGE, files=event.limit))
            return
        if entry is None:
            return  # an entry gone meanwhile (reaped, deregistered)
        self._reporter.take(entry)

    def _tree_ended(self, event: Event) -> None:
        """The tree's last member exited and the kernel deleted the tree, with what no
        take collected."""
        self._orphans.discard(event.tgid)
        entry = self._trees.get(event.tgid)
        if entry is not None and isinstance(event.final, TreeTaken):
            self._reporter.apply_tree(entry, event.final)
        self._attachment.changed()

    def _removed_in_kernel(self, pid: int) -> None:
        """The kernel deleted the process's entry (it exited): no longer watched."""
        del self._watched[pid]
        self._reporter.forget(pid)
        self._attachment.changed()

    def _recheck(self, entry: Entry) -> None:
        """A deny entry's table shrank: its limit set anew, soon (throttled)."""
        self._rechecks[entry.pid] = entry
        self._recheck_due.set()

    def _reconcile(self) -> None:
        """The ring dropped events (it was full): every count is still in the map, and
        an entry missing there has exited. Costs one run per watched entry."""
        dropped = self.kw.dropped()
        if dropped == self._dropped or self._closed:
            return
        log.warning("bpf: %d events dropped by a full ring; reconciling from the map",
                    dropped - self._dropped)  # fmt: skip
        self._dropped = dropped
        for pid, entry in list(self._watched.items()):
            if self.kw.entry(pid) is None:
                self._removed_in_kernel(pid)
            else:
                self._reporter.take(entry)
        for root in [*self._trees, *self._orphans]:
            self._take_tree(root)
        self._orphans = {root for root in self._orphans if self.kw.tree(root) is not None}

    async def _recheck_shrunk(self) -> None:
        """A deny quota's soft RLIMIT_NOFILE counts fd numbers: when its table shrank,
        the limit is computed anew (lower where holes closed, higher where the
        process is short of its quota). At most one round every RECHECK_GAP, so a
        process closing in a loop costs one /proc listing per round."""
        while True:
            await self._recheck_due.wait()
            self._recheck_due = trio.Event()
            due, self._rechecks = self._rechecks, {}
            for pid, entry in due.items():
                if self._watched.get(pid) is entry:
                    self.policy.check(entry)
            await trio.sleep(RECHECK_GAP)

    async def _retries(self) -> None:
        """Deny limit sets that failed are retried when due (no /proc read otherwise),
        and what a full ring dropped is taken from the map."""
        while True:
            await trio.sleep(RETRY_PERIOD)
            self._reconcile()
            now = time.monotonic()
            for entry in list(self._watched.values()):
                deny = entry.deny
                if deny.failures and deny.retry_at <= now:
                    self.policy.check(entry)


def release_pins(state_path: Path | None) -> Path | None:
    """Remove the pins the daemons of this state file left: the links detach (each
    waits for RCU: seconds), the maps go. The directory removed, or None."""
    pin_dir = pin_dir_of(state_path)
    if not os.path.lexists(pin_dir):
        return None
    if pin_dir.is_symlink():
        pin_dir.unlink()  # never followed: someone else's pins behind it
    else:
        links = pin_dir / "links"
        if links.is_dir() and not links.is_symlink():
            with ThreadPoolExecutor(max_workers=16) as pool:
                list(pool.map(lambda path: path.unlink(missing_ok=True), links.iterdir()))
        remove_tree(pin_dir)
    with contextlib.suppress(OSError):  # others' directories still there: keep it
        PIN_ROOT.rmdir()
    return pin_dir


def _open_counters() -> CounterReader | None:
    """The kernel reader of heapsize (counters.bpf.c), or None with the reason logged:
    reads then go through /proc, as under procfs; enforcement is not affected."""
    try:
        reader = CounterReader.open()
    except BpfUnavailable as why:
        log.info("bpf: heapsize read through /proc (counters.bpf.o: %s)", why)
        return None
    log.info("bpf: heapsize read in the kernel (counters.bpf.o)")
    return reader


def watch_state_of(entry: Entry) -> WatchState:
    """The `watched` entry for `entry`'s quota: absolute limits (baseline + quota;
    heap in pages, rounded down), deny's soft limits in force, peaks from 0, and
    the warn thresholds (baseline + limit * N // 100, as the engine's; none for a
    tree, whose warnings are on its sums)."""
    quota = entry.quota
    assert quota is not None
    heap = None if quota.heap is None else (entry.heap_base + quota.heap) // PAGE
    files = None if quota.files is None else entry.files_base + quota.files
    soft = entry.deny.applied_soft if quota.action is Action.DENY else {}
    heap_warn = fd_warn = None
    if entry.tree is None:
        heap_share, files_share = (
            quota.warn_threshold(quota.heap),
            quota.warn_threshold(quota.files),
        )
        heap_warn = None if heap_share is None else (entry.heap_base + heap_share) // PAGE
        fd_warn = None if files_share is None else entry.files_base + files_share
    return WatchState(
        entry.process.start_time, heap, files, 0, 0, soft.get(limits.DATA),
        soft.get(limits.NOFILE), KernelAction[quota.action.name], 0,
        heap_base_pages=entry.heap_base // PAGE, heap_warn_pages=heap_warn, fd_warn=fd_warn,
    )  # fmt: skip
