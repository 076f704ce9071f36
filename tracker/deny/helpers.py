"""Running deny mode's `setpriv … prlimit` helpers so that no user can stall the daemon.

A helper runs with the target process's ids, so that process's owner may
signal it, ptrace it and, through ptrace, make it do anything it can do:
stop, fork children that keep its stderr open, never exit. Hence:

- the event loop never waits for a helper: each is watched through its pidfd
  in the nursery, and only the request that asked for it awaits the outcome;
- a helper still running after `HELPER_TIMEOUT` is killed through its pidfd
  and given up on;
- it is reaped with WNOHANG only (a traced zombie cannot be reaped before its
  tracer lets go of it): a background task retries until it can;
- its stderr is read once, after it exited, without blocking and at most
  `STDERR_MAX` bytes (a grandchild may hold the pipe open for ever).

What a helper says is only a hint: the engine believes /proc/PID/limits.
Before start-up has finished and at shutdown nothing else is served, and
callers outside a server (scripts, tests) want plain synchronous calls: then
helpers run inline, with the same bounds.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

log = logging.getLogger("restrackfs.engine")

HELPER_TIMEOUT = 2.0  # a helper takes about 3 ms; past this it is stopped or traced
STDERR_MAX = 4096
_REAP_RETRY_MAX = 1.0  # seconds between tries to reap a helper a tracer holds


@dataclass(eq=False)
class LimitChange:
    """One soft limit being set: `done` once the kernel shows it (`error` None) or not."""

    pid: int
    which: int
    soft: int
    restore: bool = False  # giving back the process's own limit, not keeping a quota
    done: trio.Event = field(default_factory=trio.Event)
    error: OSError | None = None
    superseded: bool = False

    def finish(self, error: OSError | None) -> None:
        self.error = error
        self.done.set()


class Helper:
    """One started helper process, held by a pidfd, its stderr a non-blocking pipe."""

    def __init__(self, argv: list[str]) -> None:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            os.set_blocking(read_end, False)
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=write_end
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self.stderr_fd = read_end
        try:
            # our unreaped child: its pid cannot have been reused
            self.pidfd = os.pidfd_open(self.proc.pid)
        except OSError:
            self.proc.kill()
            os.close(read_end)
            raise

    def has_exited(self) -> bool:
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def wait_exit(self, timeout: float) -> bool:
        """Block up to `timeout` for the exit (inline mode only); did it exit?"""
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(int(timeout * 1000)))

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def reap(self) -> bool:
        """Reap without waiting (WNOHANG); False while a tracer holds the zombie."""
        return self.proc.poll() is not None

    def failure(self, killed: bool) -> str | None:
        """Why it failed, or None if it exited 0; reads what stderr holds, bounded."""
        if killed:
            return f"did not finish within {HELPER_TIMEOUT:g} s (stopped or traced?): killed"
        code = self.proc.returncode
        if code == 0:
            return None
        try:
            said = os.read(self.stderr_fd, STDERR_MAX).decode(errors="replace").strip()
        except BlockingIOError:
            said = ""
        if said:
            return said.splitlines()[-1][:200]
        return "not reaped" if code is None else f"exit status {code}"

    def close_pipe(self) -> None:
        if self.stderr_fd >= 0:
            os.close(self.stderr_fd)
            self.stderr_fd = -1

    def close(self) -> None:
        self.close_pipe()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def run_inline(argv: list[str]) -> str | None:
    """Run a helper synchronously, bounded (start-up, shutdown, no server); why it failed."""
    try:
        helper = Helper(argv)
    except OSError as error:
        return f"not started: {error}"
    killed = not helper.wait_exit(HELPER_TIMEOUT)
    if killed:
        helper.kill()
    helper.reap()
    failure = helper.failure(killed)
    helper.close()  # an unreaped one is left to subprocess's own WNOHANG clean-up
    return failure


class HelperRunner:
    def __init__(self, *, in_background: bool) -> None:
        self.in_background = in_background
        self.inline = False  # forced inline for a while (start-up, shutdown)
        self.nursery: trio.Nursery | None = None
        self._running: dict[LimitChange, Helper] = {}
        self._stopped = False
        self._batch: list[tuple[Helper, Callable[[str | None], None]]] | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Run helpers in `nursery` from now on (where `in_background`)."""
        self.nursery = nursery

    def start(
        self, change: LimitChange, argv: list[str], verify: Callable[[str | None], None]
    ) -> None:
        """Run `argv` for `change`; `verify(failure)` once it has exited or been given up on."""
        if self.nursery is None or self.inline or not self.in_background:
            if self._batch is None:
                verify(run_inline(argv))
                return
            try:
                self._batch.append((Helper(argv), verify))
            except OSError as error:
                verify(f"not started: {error}")
            return
        self.nursery.start_soon(self._run, change, argv, verify)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Run the helpers started meanwhile side by side, all within one HELPER_TIMEOUT.

        For start-up and shutdown, when nothing else is served: a user who stops
        the helpers of many processes delays them by 2 s in all, not 2 s each."""
        self.inline, self._batch = True, []
        try:
            yield
        finally:
            batch, self._batch = self._batch, None
            self.inline = False
            deadline = time.monotonic() + HELPER_TIMEOUT
            for helper, verify in batch:
                killed = not helper.wait_exit(max(0.0, deadline - time.monotonic()))
                if killed:
                    helper.kill()
                helper.reap()
                failure = helper.failure(killed)
                helper.close()  # an unreaped one is left to subprocess's WNOHANG clean-up
                verify(failure)

    def cancel(self, change: LimitChange) -> None:
        """Kill the helper of `change`, if it still runs: a later change replaces it."""
        change.superseded = True
        helper = self._running.get(change)
        if helper is not None:
            helper.kill()

    def stop_all(self) -> None:
        """Before the final restore: no helper still under way may lower a limit after
        it; from now on helpers run inline (nothing else is served)."""
        self._stopped = True  # nor one whose task has not run yet
        self.inline = True
        for change in list(self._running):
            self.cancel(change)

    async def _run(
        self, change: LimitChange, argv: list[str], verify: Callable[[str | None], None]
    ) -> None:
        if self._stopped:
            verify("not started: the daemon is stopping")
            return
        try:
            helper = Helper(argv)
        except OSError as error:
            verify(f"not started: {error}")
            return
        self._running[change] = helper
        killed = False
        try:
            with trio.move_on_after(HELPER_TIMEOUT):
                await trio.lowlevel.wait_readable(helper.pidfd)
            if not helper.has_exited():
                helper.kill()
                killed = True
            reaped = helper.reap()
            failure = helper.failure(killed)
        finally:
            trio.lowlevel.notify_closing(helper.pidfd)
            del self._running[change]
            helper.close_pipe()
        try:
            verify(failure)
        except Exception:  # a bug: the request that awaits it must not wait for ever
            log.exception("pid=%d: checking a helper's outcome failed", change.pid)
            if not change.done.is_set():
                change.finish(OSError(errno.EIO, "checking the helper's outcome failed"))
        if reaped:
            helper.close()
        else:
            self.nursery.start_soon(self._reap, helper)  # type: ignore[union-attr]

    @staticmethod
    async def _reap(helper: Helper) -> None:
        """A killed helper a tracer holds as a zombie: reap it once it is let go."""
        delay = 0.01
        try:
            while not helper.reap():
                await trio.sleep(delay)
                delay = min(delay * 2, _REAP_RETRY_MAX)
        finally:
            helper.close()


async def settled(changes: list[LimitChange]) -> None:
    """Wait until `changes` are done (each helper bounded by HELPER_TIMEOUT).
    Shielded: a cancelled request must not leave a quota half set."""
    pending = [change for change in changes if not change.done.is_set()]
    if not pending:
        return  # Event.wait() on a set event still yields to the scheduler
    with trio.CancelScope(shield=True):
        for change in pending:
            await change.done.wait()
