"""Running deny mode's `setpriv … prlimit` helpers without blocking the daemon.

A helper runs with the target process's uid, so that process's owner may
SIGSTOP it. A server therefore never waits for one in its event loop: each
helper runs in the background and only the request that asked for it awaits
it (`collect`). Before start-up has finished and at shutdown nothing else is
served, and callers outside a server (scripts, tests) want plain synchronous
calls: then helpers run inline.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from tracker import limits

log = logging.getLogger("restrackfs.engine")


class HelperRunner:
    def __init__(self, *, in_background: bool) -> None:
        self.in_background = in_background
        self.inline = False  # forced inline for a while (start-up, shutdown)
        self.nursery: trio.Nursery | None = None
        self._running: set[subprocess.Popen[bytes]] = set()
        self._of_request: list[trio.Event] | None = None

    def start(self, pid: int, argv: list[str]) -> None:
        if self.nursery is None or self.inline or not self.in_background:
            failure = limits.run_helper(argv)
            if failure:
                log.error("pid=%d: rlimit helper failed: %s", pid, failure)
            return
        done = trio.Event()
        if self._of_request is not None:
            self._of_request.append(done)
        self.nursery.start_soon(self._run, pid, argv, done)

    @contextmanager
    def collect(self) -> Iterator[list[trio.Event]]:
        """The helpers a (synchronous) call starts, for its caller to await."""
        self._of_request = pending = []
        try:
            yield pending
        finally:
            self._of_request = None

    def stop_all(self) -> None:
        """Before the final restore: no helper still under way may lower a limit after it."""
        for helper in list(self._running):
            helper.kill()
            helper.wait()

    async def _run(self, pid: int, argv: list[str], done: trio.Event) -> None:
        try:
            helper = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as error:
            log.error("pid=%d: rlimit helper not started: %s", pid, error)
            done.set()
            return
        self._running.add(helper)
        exited = os.pidfd_open(helper.pid)
        try:
            with trio.move_on_after(limits.HELPER_TIMEOUT) as timeout:
                await trio.lowlevel.wait_readable(exited)
            if timeout.cancelled_caught:
                helper.kill()
                log.error(
                    "pid=%d: rlimit helper did not finish within %ss", pid, limits.HELPER_TIMEOUT
                )
            helper.wait()
            stderr = helper.stderr.read().decode(errors="replace") if helper.stderr else ""
            if failure := limits.helper_failure(helper.returncode, stderr):
                log.error("pid=%d: rlimit helper failed: %s", pid, failure)
        finally:
            trio.lowlevel.notify_closing(exited)
            os.close(exited)
            if helper.stderr:
                helper.stderr.close()
            self._running.discard(helper)
            done.set()
