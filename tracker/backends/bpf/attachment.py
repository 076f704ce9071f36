"""When the bpf backend's programs are attached: at once when a process needs
them, detached after `IDLE_DETACH` seconds when none does (see backend.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import trio

from tracker.backends.bpf.loader import BpfUnavailable, KernelWatch

log = logging.getLogger("restrackfs.engine")

IDLE_DETACH = 10.0  # seconds with nothing watched before the programs are detached


class Attachment:
    """The programs attached exactly while `needed()`: every syscall of the machine
    pays for them while they are. Attaching is quick (5-10 ms, on the loop);
    detaching waits ~3 s for RCU grace periods, so it runs in a thread, and
    only after IDLE_DETACH seconds idle."""

    def __init__(self, kw: KernelWatch, needed: Callable[[], bool]) -> None:
        self.kw = kw
        self._needed = needed
        self._lock = threading.Lock()  # attach/detach/close: never two at once
        self._detaching = False
        self._changed = trio.Event()
        self._closed = False

    def sync(self) -> str | None:
        """Attach at once when needed (a detach waits for the task); the reason
        when the programs would not attach."""
        failed = None
        if self._needed() and not self.kw.attached and not self._detaching:
            with self._lock:
                try:
                    self.kw.attach()
                except BpfUnavailable as why:
                    log.error("bpf: attach failed, quotas not enforced in the kernel: %s", why)
                    failed = str(why)
        self._changed.set()
        return failed

    def changed(self) -> None:
        """What is watched changed (a process the kernel removed): look again."""
        self._changed.set()

    async def run(self) -> None:
        """Detach after IDLE_DETACH seconds with nothing needed; reattach after
        a detach if a quota came meanwhile."""
        while True:
            await self._wait_changed()
            if self._needed() or not self.kw.attached:
                continue
            with trio.move_on_after(IDLE_DETACH):
                while not self._needed():
                    await self._wait_changed()
            if self._needed() or self._closed:
                continue
            self._detaching = True
            try:
                started = time.monotonic()
                await trio.to_thread.run_sync(self._detach)
                log.info("bpf: detached (nothing watched), %.1f s", time.monotonic() - started)
            finally:
                self._detaching = False
            self.sync()  # a quota set while detaching is attached now

    def close(self, unpin: bool) -> None:
        """Close the kernel watch (waits for a detach under way)."""
        self._closed = True
        with self._lock:
            self.kw.close(unpin=unpin)

    async def _wait_changed(self) -> None:
        await self._changed.wait()
        self._changed = trio.Event()

    def _detach(self) -> None:
        with self._lock:
            if not self._closed:
                self.kw.detach()
