"""The quota `restrack run --heap/--files` puts on its program before the program
runs, and the record it prints when the program was killed under it.

The program's process is registered and capped while it waits between fork and
exec (its pid stays the same across the exec), so the quota is in force from
the program's first instruction. When it dies of SIGKILL, the daemon has
already ended its entry (an exit ends it at once): `PID/stat` and `PID/events`
are gone, but the daemon's `enforcements` file keeps its record of the kill:
the record `restrack run` prints is that one (its pid, made after the program
started, action kill), waited for up to KILL_RECORD_WAIT. Where there is none
(a daemon without the file, a kill that was not the quota's, a record already
pushed out by 1,000 newer ones, or one `--hidepid` hides), it falls back to what
it knows for certain: the quota it wrote, the signal, whether the daemon's kill
count rose meanwhile (the top-level `events`: the daemon's own word, though not
per process), and the last reading of `PID/stat` it took while the program ran.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from restrackfs import client
from tracker.quota import TREE_CANNOT_DENY, Action, parse_action, parse_count, parse_size
from tracker.vocabulary import KILLED, UNLIMITED

READING_INTERVAL = 0.25  # seconds between the readings of PID/stat while the program runs
KILL_COUNT_WAIT = 1.0  # seconds the daemon may take to count a kill after the exit
KILL_RECORD_WAIT = 1.0  # seconds the daemon may take to record it (bpf: from its ring)


@dataclass(frozen=True, slots=True)
class StartQuota:
    """`--heap SIZE --files N --action A [--tree]` as the mount's grammar spells them."""

    heap: str | None = None
    files: str | None = None
    action: str = Action.KILL
    tree: bool = False  # one quota over the program and everything it starts

    def __post_init__(self) -> None:
        """Refuse what the daemon would refuse, before any program is started."""
        for option, parse, text in (
            ("--heap", parse_size, self.heap),
            ("--files", parse_count, self.files),
            ("--action", parse_action, self.action),
        ):
            if text is None:
                continue
            try:
                parse(text)
            except OSError as error:
                raise OSError(errno.EINVAL, f"run: {option}: {error.strerror}") from None
        if self.tree and self.action == Action.DENY:
            raise OSError(errno.EINVAL, f"run: --tree: {TREE_CANNOT_DENY}")

    def text(self) -> str:
        """`heap=64M files=max action=kill`, as written to `PID/quota`."""
        text = f"heap={self.heap or UNLIMITED} files={self.files or UNLIMITED} action={self.action}"
        return text + (" scope=tree" if self.tree else "")


@dataclass(slots=True)
class Reading:
    stat: client.Stat
    at: float  # time.monotonic() of the reading


class QuotaWatch:
    """The program's quota, from its writing to the record of its end."""

    def __init__(self, pid: int, quota: StartQuota, root: Path) -> None:
        self.pid = pid
        self.quota = quota
        self.root = root
        self.kills_before = 0
        self.started = 0.0  # time.time() before the quota was written
        self.last: Reading | None = None
        self._next_reading = 0.0

    def put_in_place(self) -> None:
        """Register the waiting child and write its quota; an OSError leaves it unstarted."""
        self.kills_before = self._kills()
        self.started = time.time()
        client.register(self.pid, mount=self.root)
        client.set_quota(
            self.pid,
            heap=self.quota.heap,
            files=self.quota.files,
            action=self.quota.action,
            scope="tree" if self.quota.tree else None,
            mount=self.root,
        )

    def read_if_due(self) -> None:
        """A reading of `PID/stat` every READING_INTERVAL while the program runs (a
        failed one keeps the last), however many emulated calls come between."""
        now = time.monotonic()
        if now < self._next_reading:
            return
        self._next_reading = now + READING_INTERVAL
        with contextlib.suppress(OSError):
            self.last = Reading(client.stat(self.pid, mount=self.root), now)

    def report_kill(self, program: str) -> None:
        """On stderr: the record of a program that died of SIGKILL (the caller holds
        it unreaped, so its pid names no other process meanwhile)."""
        died = time.monotonic()
        record = self._kill_record()
        if record is not None:
            print(
                f"restrack run: {program} (pid {self.pid}) was killed by its quota:"
                f" {self.quota.text()}\nrestrack run: the daemon's record: {record.line}",
                file=sys.stderr,
            )
            return
        counted = self._kill_counted()
        cause = "by its quota" if counted else "(SIGKILL, not counted by the daemon as its quota)"
        print(
            f"restrack run: {program} (pid {self.pid}) was killed {cause}: {self.quota.text()}",
            file=sys.stderr,
        )
        if self.last is not None:
            s, age = self.last.stat, died - self.last.at
            if s.is_tree:  # the quota is on the tree's sums
                usage = (
                    f"tree_heapsize={s.tree_heapsize} "
                    f"tree_openfile_count={s.tree_openfile_count} members={s.members}"
                )
            else:
                usage = (
                    f"heapsize={s.heapsize} heap_peak={s.heap_peak} "
                    f"openfile_count={s.openfile_count} openfile_peak={s.openfile_peak}"
                )
            print(
                f"restrack run: last reading, {age:.2f} s before its end: {usage}", file=sys.stderr
            )

    def _kill_record(self) -> client.Enforcement | None:
        """The daemon's record of this program's kill, once it is in the file."""
        records = client.follow_enforcements(mount=self.root, timeout=KILL_RECORD_WAIT)
        with (
            contextlib.suppress(OSError, ValueError, KeyError, TypeError),
            contextlib.closing(records),
        ):
            for record in records:
                ours = record.pid == self.pid and record.time >= self.started
                if ours and record.action == Action.KILL:
                    return record
        return None

    def _kills(self) -> int:
        return client.events(mount=self.root).get(KILLED, 0)

    def _kill_counted(self) -> bool:
        """Whether the daemon's kill count rose since the quota was written (it counts
        a kill it made before it ends the entry, or moments after under bpf)."""
        deadline = time.monotonic() + KILL_COUNT_WAIT
        while True:
            try:
                if self._kills() > self.kills_before:
                    return True
            except OSError:
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def program_name(program: list[str]) -> str:
    """What the kernel will call it (`comm`): the file name, 15 bytes at most."""
    return os.path.basename(program[0])[:15]
