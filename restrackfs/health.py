"""`/healthz`: the mount answers a read, and the engine in force is loaded.

The read goes through the mount point as any user's would (the kernel, FUSE,
this daemon's request loop), so it is made in a worker thread: the event loop
must stay free to answer it. A probe that does not answer within
`READ_TIMEOUT` is left to finish in its thread, and no second one starts
while it hangs: a stuck mount costs one thread, however often it is probed.
Probes take turns, so each waits for at most one read's deadline before it
knows.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from tracker.engine.engine import Engine

READ_TIMEOUT = 2.0  # seconds for the mount to answer a read of `engine`


def verdict(mount: str | None, engine: str | None) -> str | None:
    """None when both parts are well, else the reasons, joined."""
    reasons = [why for why in (mount, engine) if why is not None]
    return "; ".join(reasons) if reasons else None


class Health:
    """The `health` callable of `scrape.MetricsServer` for a mounted engine."""

    def __init__(self, mountpoint: Path, engine: Engine) -> None:
        self.mountpoint = mountpoint
        self.engine = engine
        self._reading_since: float | None = None  # a probe's read still in its thread
        self._one_at_a_time = trio.Lock()  # probes that come together wait for each other

    async def __call__(self) -> str | None:
        return verdict(await self.mount_problem(), self.engine.backend.unloaded)

    async def mount_problem(self) -> str | None:
        """Why the mount does not answer as this daemon's, or None. Probes that
        arrive together (a liveness and a readiness probe) take turns, so the
        second does not take the first's read for a stuck one."""
        async with self._one_at_a_time:
            return await self._probe()

    async def _probe(self) -> str | None:
        if self._reading_since is not None:
            stuck = time.monotonic() - self._reading_since
            return f"{self.mountpoint}: a read of `engine` has not been answered for {stuck:.0f} s"
        self._reading_since = time.monotonic()
        with trio.move_on_after(READ_TIMEOUT):
            return await trio.to_thread.run_sync(self._read, abandon_on_cancel=True)
        return f"{self.mountpoint}: a read of `engine` was not answered in {READ_TIMEOUT:.0f} s"

    def _read(self) -> str | None:
        try:
            text = (self.mountpoint / "engine").read_text()
        except OSError as error:
            return f"{self.mountpoint}/engine: {error.strerror or error}"
        finally:
            self._reading_since = None
        want = self.engine.backend.name
        if text.strip() != want:
            return f"{self.mountpoint}/engine reads {text.strip()[:40]!r}, not {want!r}"
        return None
