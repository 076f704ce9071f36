"""The registry: the tracked entries by pid, and a watcher on each one's exit.

Each entry's pidfd is awaited in the engine's nursery, so an exit is seen at
once and the entry leaves (`ended` is `Ended.EXITED`); every way out (exited,
deregistered) goes through `remove`, which closes the pidfd and tells the
removal listeners (the filesystem, the state file, the backend), in the order
they were added.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Collection

import trio

from tracker.engine.entry import Ended, Entry

log = logging.getLogger("restrackfs.engine")


class Registry:
    """The tracked entries by pid, in registration (`serial`) order, and those with a quota."""

    def __init__(self) -> None:
        self._entries: dict[int, Entry] = {}
        self._with_quota: dict[int, Entry] = {}
        self._serials = itertools.count(1)
        self._removal_listeners: list[Callable[[Entry], None]] = []
        self._before_exit: list[Callable[[], None]] = []
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Watch exits in `nursery` from now on."""
        self._nursery = nursery

    def entries(self) -> Collection[Entry]:
        return self._entries.values()

    def get(self, pid: int) -> Entry | None:
        return self._entries.get(pid)

    def watched(self) -> Collection[Entry]:
        """The entries with a quota."""
        return self._with_quota.values()

    def next_serial(self) -> int:
        return next(self._serials)

    def on_removal(self, listener: Callable[[Entry], None]) -> None:
        """Call `listener(entry)` whenever an entry leaves the registry."""
        self._removal_listeners.append(listener)

    def before_exit(self, hook: Callable[[], None]) -> None:
        """Call `hook()` when an exit is seen, before the entry is removed: a pushed
        backend hands over what it has queued (a kill's report is its entry's)."""
        self._before_exit.append(hook)

    def add(self, entry: Entry) -> None:
        """Take `entry` in and watch its exit."""
        self._entries[entry.pid] = entry
        self.quota_changed(entry)
        assert self._nursery is not None, "the engine is not running"
        self._nursery.start_soon(self._watch_exit, entry)

    def quota_changed(self, entry: Entry) -> None:
        """Keep `watched()` in step with the entry's quota."""
        if entry.quota is None:
            self._with_quota.pop(entry.pid, None)
        elif self._entries.get(entry.pid) is entry:
            self._with_quota[entry.pid] = entry

    async def _watch_exit(self, entry: Entry) -> None:
        if entry.ended is not None:
            return  # removed before this task got to run
        try:
            await trio.lowlevel.wait_readable(entry.process.pidfd)
        except trio.ClosedResourceError:
            return  # deregistered: the pidfd was closed under us
        if entry.ended is None:
            for hook in self._before_exit:
                hook()
            self.remove(entry, Ended.EXITED)

    def remove(self, entry: Entry, why: Ended) -> None:
        """Take `entry` out, saying why; nothing if it was not (or no longer) in."""
        if self._entries.get(entry.pid) is not entry:
            return
        entry.ended = why
        del self._entries[entry.pid]
        self._with_quota.pop(entry.pid, None)
        trio.lowlevel.notify_closing(entry.process.pidfd)
        entry.process.close()
        log.info("removed pid=%d (%s)", entry.pid, why)
        for listener in self._removal_listeners:
            listener(entry)

    def close_all(self) -> None:
        """At shutdown: close every pidfd and empty the registry (no listener is told)."""
        for entry in self._entries.values():
            trio.lowlevel.notify_closing(entry.process.pidfd)
            entry.process.close()
        self._entries.clear()
        self._with_quota.clear()
