"""Deny mode's bookkeeping for one entry, kept on the entry and written by the
keeper alone: the soft limits saved, in force and under way, and the defeats."""

from __future__ import annotations

from dataclasses import dataclass, field

from tracker.deny.helpers import LimitChange


@dataclass(eq=False)
class DenyState:
    """Deny mode's bookkeeping for one entry."""

    # the soft limits the process had before, the ones last seen in force after
    # a set (verified in /proc/PID/limits), the sets under way
    saved_soft: dict[int, int] = field(default_factory=dict)
    applied_soft: dict[int, int] = field(default_factory=dict)
    pending: dict[int, LimitChange] = field(default_factory=dict)
    defeats: int = 0  # of this deny quota: limits found raised, or not in force after a set
    failures: int = 0  # sets failed in a row: retries back off
    retry_at: float = 0.0  # monotonic time before which no set is retried
