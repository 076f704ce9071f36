"""The seam between the engine and a backend (tracker/backends/base.py), from a pushed
backend's side: what it is told, and what the engine does with its reports.

The backend here is this module's `Backend` class, chosen by name as the BPF
one will be: it records every notification and hands the engine the reports a
test gives it, as the BPF backend hands what its ring buffer says. The
processes are real workloads and the kills real signals; only the kernel
program is not there (the test plays it, on its own process).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable

import pytest
import trio
import trio.testing

from tests.support.engine import INTERVAL, ROOT, registered, settle
from tests.support.procs import MiB
from tracker.backends import base as backends
from tracker.backends.base import Report, ReportKind
from tracker.backends.readers import ProcReader
from tracker.engine.engine import open_engine
from tracker.engine.entry import Entry
from tracker.engine.policy import Policy
from tracker.engine.reading import check_current
from tracker.engine.resources import FILES_RESOURCE, HEAP_RESOURCE, Counters
from tracker.errors import NoSuchProcess
from tracker.quota import Action, Quota, Reset

created: list[Backend] = []


class Backend:
    """A pushed backend: told every change, it reports what it is given."""

    name = "pushed"
    events_dropped = None
    unloaded = None

    def __init__(self, policy: Policy, interval: float) -> None:
        self.policy = policy
        self.reader = ProcReader()
        self.told: list[tuple[object, ...]] = []
        self.reports, self._received = trio.open_memory_channel[Report](16)
        # the exact peaks "the kernel" keeps, absolute, by pid (the test plays the kernel)
        self.exact: dict[int, Counters] = {}
        created.append(self)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for report in self._received:
            self.policy.reported(report)

    def adopt(self, entries: Iterable[Entry]) -> None:
        self.told.append(("adopt", tuple(entry.pid for entry in entries)))

    def quota_set(self, entry: Entry) -> None:
        self.told.append(("quota_set", entry.pid, entry.quota))

    def quota_cleared(self, entry: Entry) -> None:
        self.told.append(("quota_cleared", entry.pid))
        self.exact.pop(entry.pid, None)  # unwatched: the kernel's map entry is gone

    def baseline_reset(self, entry: Entry) -> None:
        self.told.append(("baseline_reset", entry.pid, entry.heap_base, entry.files_base))
        self.exact.pop(entry.pid, None)  # the peaks restart (KernelWatch.reset_peaks)

    def peaks(self, entry: Entry) -> Counters | None:
        """What the kernel's map says (None: not watched)."""
        return self.exact.get(entry.pid)

    def tree_members(self, entry: Entry) -> list[tuple[int, int]] | None:
        return None

    def inherit(self, pid: int, start_time: int, quota: Quota) -> bool:
        return False

    def removed(self, entry: Entry) -> None:
        self.told.append(("removed", entry.pid, entry.ended))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.told.append(("close",))


@pytest.fixture
def pushed(monkeypatch):
    """Make this module's backend choosable as "pushed"; the one created, by the test."""
    monkeypatch.setitem(backends.BACKENDS, "pushed", __name__)
    created.clear()
    return lambda: created[-1]


def engine(tmp_path, name="pushed"):
    return open_engine(state_path=tmp_path / "s.json", interval=INTERVAL, backend=name)


async def test_a_pushed_backend_is_told_each_change(spawn, tmp_path, pushed):
    w, other = spawn(), spawn()
    quota = Quota(heap=100 * MiB, files=50, action=Action.NOTIFY)
    async with engine(tmp_path) as eng:
        told = pushed().told
        entry = eng.register(w.pid, ROOT)
        eng.register(other.pid, ROOT)
        await settle()
        await eng.set_quota(entry, quota, ROOT)
        files_before = entry.files_base
        w.do("open", 2)
        await eng.reset(entry, Reset.USAGE, ROOT)
        await eng.reset(entry, Reset.QUOTA, ROOT)
        await eng.deregister(w.pid, ROOT)
        other.proc.kill()
        other.proc.wait()
        with trio.fail_after(2):
            while told[-1][0] != "removed" or told[-1][1] != other.pid:
                await trio.sleep(0.001)
        assert told == [
            ("adopt", ()),
            ("quota_set", w.pid, quota),
            ("baseline_reset", w.pid, entry.heap_base, files_before + 2),
            ("quota_cleared", w.pid),
            ("removed", w.pid, "deregistered"),
            ("removed", other.pid, "exited"),
        ]
    assert told[-1] == ("close",)


async def test_a_restart_hands_the_backend_the_restored_entries(spawn, tmp_path, pushed):
    w = spawn()
    async with engine(tmp_path, "procfs") as eng:
        eng.register(w.pid, ROOT)
    async with engine(tmp_path) as eng:
        assert pushed().told[0] == ("adopt", (w.pid,))
        assert eng.get(w.pid) is not None


async def test_a_report_is_logged_counted_and_announced(spawn, tmp_path, pushed, caplog):
    w = spawn()
    async with engine(tmp_path) as eng:
        announced: list[Entry] = []
        eng.on_event(announced.append)
        entry = await registered(eng, w.pid, Quota(files=1, action=Action.NOTIFY))
        caplog.set_level(logging.WARNING, "restrackfs.enforce")
        await pushed().reports.send(Report(entry, ReportKind.NOTIFIED, FILES_RESOURCE, 2, 1))
        with trio.fail_after(2):
            while not announced:
                await trio.sleep(0.001)
        assert announced == [entry]
        assert entry.events["exceeded"] == entry.events["notified"] == 1
        assert eng.enforcements[Action.NOTIFY] == 1
        assert entry.over == {"files"}
        assert f"pid={w.pid} comm=workload quota=files usage=2 limit=1 action=notify" in (
            caplog.text
        )


async def test_a_kill_the_kernel_made_answers_as_exited(spawn, tmp_path, pushed):
    w = spawn()
    async with engine(tmp_path) as eng:
        entry = await registered(eng, w.pid, Quota(heap=1 * MiB, action=Action.KILL))
        os.kill(w.pid, signal.SIGKILL)  # what bpf_send_signal did in the crossing call
        eng.policy.reported(Report(entry, ReportKind.KILLED, HEAP_RESOURCE, 2 * MiB, 1 * MiB))
        assert entry.killed
        assert entry.events["killed"] == entry.events["exceeded"] == 1
        assert eng.enforcements[Action.KILL] == 1
        with pytest.raises(NoSuchProcess):
            check_current(entry)
        w.proc.wait()


async def test_a_report_of_an_entry_gone_is_ignored(spawn, tmp_path, pushed):
    w = spawn()
    async with engine(tmp_path) as eng:
        entry = await registered(eng, w.pid, Quota(files=1, action=Action.NOTIFY))
        await eng.deregister(w.pid, ROOT)
        eng.policy.reported(Report(entry, ReportKind.NOTIFIED, FILES_RESOURCE, 2, 1))
        assert entry.events["notified"] == 0


async def test_a_backends_exact_peaks_are_folded_into_the_sampled_ones(spawn, tmp_path, pushed):
    """A spike no sample saw (mapped and unmapped between two reads), which the
    kernel's watermark caught: heap_peak shows it; a usage reset restarts it."""
    w = spawn()
    async with engine(tmp_path) as eng:
        entry = await registered(eng, w.pid, Quota(heap=1024 * MiB, action=Action.NOTIFY))
        backend = pushed()
        assert eng.reader.heap_peak(entry) == 0
        spike = Counters(entry.heap_base + 30 * MiB, entry.files_base + 7)
        backend.exact[w.pid] = spike  # what the kernel's map says now
        assert (eng.reader.heap_peak(entry), eng.reader.openfile_peak(entry)) == (30 * MiB, 7)
        m = eng.reader.measure(entry)
        assert (m.heap_peak, m.openfile_peak, m.heapsize) == (30 * MiB, 7, 0)

        w.do("mmap", 40 * MiB)  # a sample above the exact peak: the higher wins
        assert eng.reader.heapsize(entry) >= 40 * MiB
        assert eng.reader.heap_peak(entry) == eng.reader.heapsize(entry)
        w.do("munmap")

        await eng.reset(entry, Reset.USAGE, ROOT)
        assert backend.told[-1][0] == "baseline_reset"
        assert (eng.reader.heap_peak(entry), eng.reader.openfile_peak(entry)) == (0, 0)

        # a quota cleared: the peaks are taken before the backend forgets them
        backend.exact[w.pid] = Counters(entry.heap_base + 5 * MiB, None)
        await eng.reset(entry, Reset.QUOTA, ROOT)
        assert backend.told[-1] == ("quota_cleared", w.pid) and w.pid not in backend.exact
        assert eng.reader.heap_peak(entry) == 5 * MiB

        # a "peak" report (relative, as every report) is folded in too
        eng.policy.reported(Report(entry, ReportKind.PEAK, FILES_RESOURCE, 9, 0))
        assert eng.reader.openfile_peak(entry) == 9


async def test_a_clean_stop_saves_the_exact_peaks_before_the_backend_closes(
    spawn, tmp_path, pushed
):
    w = spawn()
    async with engine(tmp_path) as eng:
        entry = await registered(eng, w.pid, Quota(files=100, action=Action.NOTIFY))
        pushed().exact[w.pid] = Counters(entry.heap_base + 12 * MiB, entry.files_base + 3)
    async with engine(tmp_path, "procfs") as eng:  # nothing exact now: the saved ones
        entry = eng.get(w.pid)
        assert entry is not None
        assert (eng.reader.heap_peak(entry), eng.reader.openfile_peak(entry)) == (12 * MiB, 3)


def test_an_engine_is_chosen_by_name():
    class NoPolicy:
        state_path = None

    assert backends.choose("procfs", NoPolicy(), INTERVAL).name == "procfs"  # type: ignore[arg-type]
    chosen = backends.choose("auto", NoPolicy(), INTERVAL)  # type: ignore[arg-type]
    try:  # bpf where it loads (this machine: tests/bpf/test_engine_bpf.py), else procfs
        assert chosen.name in ("bpf", "procfs")
    finally:
        chosen.close()
    with pytest.raises(ValueError, match="unknown engine 'nope'"):
        backends.choose("nope", NoPolicy(), INTERVAL)  # type: ignore[arg-type]
