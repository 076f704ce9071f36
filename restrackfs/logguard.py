"""What stands between the daemon's log calls and the log file: one line per
record whatever a user put in it, and no flood of identical lines.

Users control some of what reaches the log (process names, the rate of their
requests), and the default log sits on the /run tmpfs, so the log must stay
readable and bounded. The kernel's habit is followed (`printk_ratelimited`):
at most `burst` identical warnings (or errors) per `interval`; the next one
after that window carries the count of what was suppressed. Lines below
WARNING are the audit trail of changes (one per register, quota, reset...)
and are never dropped.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tracker.linux.procfs import escape_unprintable

BURST = 10
INTERVAL = 5.0  # seconds, the kernel's DEFAULT_RATELIMIT_INTERVAL
MAX_KEYS = 4096  # distinct messages remembered; the oldest are forgotten first
LIMITED_FROM = logging.WARNING


@dataclass
class _Window:
    start: float
    shown: int = 0
    suppressed: int = 0


class LogGuard(logging.Filter):
    """A handler filter: escapes each message, and rate-limits identical warnings
    and errors (same logger, level and text, arguments filled in)."""

    def __init__(
        self,
        burst: int = BURST,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._windows: OrderedDict[tuple[str, int, str], _Window] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            # names are escaped where they are logged; this is the net under the rest
            message = escape_unprintable(record.getMessage())
        except Exception:  # a malformed call: let the handler report it as usual
            return True
        record.msg, record.args = message, None
        return record.levelno < LIMITED_FROM or self._allowed(record, message)

    def _allowed(self, record: logging.LogRecord, message: str) -> bool:
        key = (record.name, record.levelno, message)
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= self.interval:
            if window is not None and window.suppressed:
                record.msg = f"{message} [{window.suppressed} identical messages suppressed]"
            window = self._windows[key] = _Window(now)
            self._forget_old()
        self._windows.move_to_end(key)
        if window.shown >= self.burst:
            window.suppressed += 1
            return False
        window.shown += 1
        return True

    def _forget_old(self) -> None:
        while len(self._windows) > MAX_KEYS:
            self._windows.popitem(last=False)


def install(logger: logging.Logger | None = None) -> LogGuard:
    """Guard every handler of `logger` (the root logger by default)."""
    guard = LogGuard()
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(guard)
    return guard
