"""Peaks and kinds: heap_peak, openfile_peak, PID/fds, with real processes.

Under procfs the peaks are sampled: every read of a process's files (and the
metrics), every periodic check of a quota and every command's sample raises them;
a spike mapped and unmapped between two samples is not seen (the README says so).
`spike_is_caught` is the test of the other side, written for any daemon options:
the lead runs it for `--engine bpf` (exact: no sample needed) once that backend is
merged; here it runs for procfs with a quota, where the periodic check is the sample.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from restrackfs import client
from tests.support.build import compile_c
from tests.support.daemon import Daemon
from tests.support.mount import SPIKE, peak, spike_is_caught
from tests.support.paths import C_SOURCES
from tests.support.users import NOBODY, sh
from tests.support.waiting import wait_until
from tracker.vocabulary import FD_KINDS, OPENFILE_TOTAL


def fds(daemon: Daemon, pid: int) -> dict[str, int]:
    return client.fds(pid, mount=daemon.mountpoint)


def metric_samples(text: str) -> dict[tuple[str, str], float]:
    """Every per-process sample of the exposition, parsed by prometheus_client."""
    return {
        (sample.name, sample.labels["pid"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "pid" in sample.labels
    }


# ----- sampled under procfs -------------------------------------------------------------


def test_a_spike_between_two_reads_is_missed_and_one_a_read_saw_is_kept(daemon, spawn):
    """No quota, so no periodic check: the reads are the only samples."""
    w = spawn()
    daemon.register(w.pid)
    assert (peak(daemon, w.pid), peak(daemon, w.pid, "openfile_peak")) == (0, 0)
    w.do("mmap", SPIKE)
    w.do("munmap")
    w.do("open", 3)
    w.do("close", 3)
    # mapped and unmapped, opened and closed, with no read in between: not seen
    assert (peak(daemon, w.pid), peak(daemon, w.pid, "openfile_peak")) == (0, 0)

    w.do("mmap", SPIKE)
    seen = int(daemon.read(w.pid, "heapsize"))
    assert seen >= SPIKE
    w.do("munmap")
    w.do("open", 5)
    assert daemon.read(w.pid, "openfile_count") == "5\n"
    w.do("close", 5)
    assert int(daemon.read(w.pid, "heapsize")) < seen
    assert peak(daemon, w.pid) == seen  # what the read saw, exactly
    assert peak(daemon, w.pid, "openfile_peak") == 5


def test_stat_metrics_and_fds_reads_raise_the_peaks_too(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    w.do("mmap", 2 * SPIKE)
    first = client.stat(w.pid, mount=daemon.mountpoint)
    assert first.heap_peak == first.heapsize >= 2 * SPIKE
    w.do("munmap")
    w.do("open", 4)
    samples = metric_samples(daemon.read("metrics"))
    pid = str(w.pid)
    assert samples[("restrack_heap_peak_bytes", pid)] == first.heap_peak  # kept from stat
    assert samples[("restrack_open_files_peak", pid)] == 4  # the metrics' own sample
    w.do("open", 2)
    assert fds(daemon, w.pid)[OPENFILE_TOTAL] == first.openfile_total + 6
    w.do("close", 6)
    after = client.stat(w.pid, mount=daemon.mountpoint)
    assert (after.heap_peak, after.openfile_peak, after.openfile_count) == (first.heap_peak, 6, 0)
    lines = daemon.read(w.pid, "stat").splitlines()
    assert [line.split()[0] for line in lines][-2:] == ["heap_peak", "openfile_peak"]


def test_reset_usage_and_reset_all_restart_the_peaks(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    w.do("mmap", SPIKE)
    w.do("open", 3)
    assert peak(daemon, w.pid) >= SPIKE and peak(daemon, w.pid, "openfile_peak") == 3
    w.do("munmap")
    w.do("close", 3)
    daemon.write("usage", w.pid, "reset")
    assert (peak(daemon, w.pid), peak(daemon, w.pid, "openfile_peak")) == (0, 0)
    w.do("mmap", SPIKE // 3)
    w.do("open", 1)
    assert 0 < peak(daemon, w.pid) < SPIKE and peak(daemon, w.pid, "openfile_peak") == 1
    w.do("munmap")
    daemon.write("files=10 action=notify", w.pid, "quota")
    daemon.write("all", w.pid, "reset")
    assert (peak(daemon, w.pid), peak(daemon, w.pid, "openfile_peak")) == (0, 0)
    assert daemon.read(w.pid, "quota") == "heap=max files=max action=kill\n"


def test_the_peaks_survive_a_clean_restart(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    w.do("mmap", SPIKE)
    w.do("open", 4)
    before = (peak(daemon, w.pid), peak(daemon, w.pid, "openfile_peak"))
    w.do("munmap")
    w.do("close", 4)
    assert daemon.stop(signal.SIGTERM) == 0  # no change was journaled since the register
    daemon.start()
    assert (peak(daemon, w.pid), peak(daemon, w.pid, "openfile_peak")) == before
    assert before[0] >= SPIKE and before[1] == 4
    assert daemon.read(w.pid, "heapsize") == "0\n"


def test_a_kill_9_keeps_the_peaks_of_the_last_journaled_change(daemon, spawn):
    """What the README states: a daemon killed with SIGKILL loses what the peaks rose
    since the entry's last journaled line (under procfs; bpf's pinned map keeps them)."""
    w = spawn()
    daemon.register(w.pid)
    w.do("mmap", SPIKE)
    journaled = peak(daemon, w.pid)
    daemon.write("quota", w.pid, "reset")  # a change: its line carries the peak as it is
    w.do("mmap", SPIKE)
    assert peak(daemon, w.pid) >= journaled + SPIKE  # risen since: not journaled
    w.do("munmap")
    w.do("munmap")
    daemon.stop(signal.SIGKILL)
    daemon.start()
    assert peak(daemon, w.pid) == journaled


def test_a_spike_under_a_quota_is_caught_by_the_periodic_check(daemon_factory, spawn):
    spike_is_caught(daemon_factory("--interval", "20"), spawn(), exact=False)


# ----- the descriptors by kind ----------------------------------------------------------


class Holder:
    """c/fdkinds.c: holds descriptors of each kind; stdio two pipes and /dev/null."""

    def __init__(self, binary: Path, nofile: int | None = None) -> None:
        def limits() -> None:  # only ever on this child of the test's own
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, bufsize=1, preexec_fn=limits,
        )  # fmt: skip
        self.pid = self.proc.pid
        # answered only once the binary runs its loop: registered before that, the
        # baseline would be taken mid-exec (the loader's descriptor open, 40 KiB VmData)
        self.do("ready")

    def do(self, *words: object) -> str:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        assert reply.startswith("ok"), f"{words}: {reply!r}"
        return reply

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()


@pytest.fixture(scope="session")
def fdkinds_binary(bin_dir: Path) -> Path:
    return compile_c(C_SOURCES / "fdkinds.c", bin_dir / "fdkinds")


@pytest.fixture
def holder(fdkinds_binary: Path) -> Iterator[Callable[..., Holder]]:
    started: list[Holder] = []

    def start(nofile: int | None = None) -> Holder:
        started.append(Holder(fdkinds_binary, nofile))
        return started[-1]

    yield start
    for one in started:
        one.stop()


def test_fds_counts_each_kind_exactly(daemon, holder, tmp_path):
    h = holder()
    daemon.register(h.pid)
    stdio = {"file": 0, "dir": 0, "socket": 0, "pipe": 2, "anon": 0, "other": 1}
    assert fds(daemon, h.pid) == {**stdio, OPENFILE_TOTAL: 3}
    (tmp_path / "secret-name").write_text("x")
    h.do("kinds", tmp_path / "secret-name", tmp_path)
    text = daemon.read(h.pid, "fds")
    assert text == (
        "file 1\ndir 1\nsocket 2\npipe 4\nanon 2\nother 1\nopenfile_total 11\n"
    )  # socketpair, both pipe ends, eventfd + epoll
    assert str(tmp_path) not in text and "secret-name" not in text  # kinds only, never paths
    assert daemon.read(h.pid, "openfile_count") == "8\n"
    assert peak(daemon, h.pid, "openfile_peak") == 8  # the fds read sampled it


def test_fds_of_descriptors_on_the_mount_itself(daemon, holder):
    """A file and a directory of this very mount: their type is known without asking
    the filesystem (statx AT_STATX_DONT_SYNC), so the listing cannot wait on itself."""
    h = holder()
    daemon.register(h.pid)
    h.do("kinds", daemon.path(h.pid, "stat"), daemon.mountpoint)
    kinds = fds(daemon, h.pid)
    assert (kinds["file"], kinds["dir"], kinds[OPENFILE_TOTAL]) == (1, 1, 11)


def test_fds_sums_to_its_own_total_under_concurrent_open_and_close(daemon, holder):
    h = holder()
    daemon.register(h.pid)
    h.do("churn")  # a thread opening 8 descriptors and a pipe, closing them, in a loop
    totals = set()
    for _ in range(300):
        kinds = fds(daemon, h.pid)
        assert list(kinds) == [*FD_KINDS, OPENFILE_TOTAL]
        assert sum(kinds[kind] for kind in FD_KINDS) == kinds[OPENFILE_TOTAL], kinds
        totals.add(kinds[OPENFILE_TOTAL])
    assert len(totals) > 1, "the churn was never caught in the middle"  # the test can fail


def test_fds_of_another_users_process_is_hidden_under_hidepid(daemon_factory, spawn):
    hidden = daemon_factory("--hidepid")
    mine, theirs = spawn(uid=NOBODY), spawn()
    hidden.register(mine.pid)
    hidden.register(theirs.pid)
    m = hidden.mountpoint
    for name in ("fds", "heap_peak", "openfile_peak"):
        result = sh(f"cat {m}/{theirs.pid}/{name}", uid=NOBODY)
        assert result.returncode != 0 and "No such file or directory" in result.stderr, name
        assert sh(f"cat {m}/{mine.pid}/{name}", uid=NOBODY).returncode == 0, name
    assert "openfile_total" in sh(f"cat {m}/{mine.pid}/fds", uid=NOBODY).stdout
    assert oct(os.stat(hidden.path(mine.pid, "fds")).st_mode & 0o777) == "0o444"


def test_fds_of_a_process_that_exited_or_left(daemon, holder):
    h = holder()
    daemon.register(h.pid)
    with open(daemon.path(h.pid, "fds"), "rb", buffering=0) as opened:
        daemon.write(f"{h.pid}\n", "deregister")
        with pytest.raises(FileNotFoundError):
            opened.read()
    daemon.register(h.pid)
    with open(daemon.path(h.pid, "fds"), "rb", buffering=0) as opened:
        h.stop()
        with pytest.raises(ProcessLookupError):
            opened.read()


# ----- a process with very many descriptors does not stall the others -------------------


def most_descriptors() -> int:
    """100,000 where the hard RLIMIT_NOFILE allows (root here lacks CAP_SYS_RESOURCE
    to raise it), else as many as it allows, leaving room for stdio."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return min(100_000, hard - 8)


def test_a_listing_of_very_many_descriptors_does_not_stall_other_reads(daemon, holder, spawn):
    count = most_descriptors()
    h = holder(nofile=count + 8)
    assert h.do("many", count) == f"ok {count}"
    other = spawn()
    daemon.register(h.pid)
    daemon.register(other.pid)
    done = threading.Event()
    listings: list[float] = []

    def list_them() -> None:
        try:
            for _ in range(5):
                start = time.perf_counter()
                kinds = fds(daemon, h.pid)
                listings.append(time.perf_counter() - start)
                assert kinds["other"] == count + 1 and kinds[OPENFILE_TOTAL] == count + 3
        finally:
            done.set()

    lister = threading.Thread(target=list_them)
    lister.start()
    latencies = []
    while not done.is_set():
        start = time.perf_counter()
        daemon.read(other.pid, "heapsize")
        latencies.append(time.perf_counter() - start)
    lister.join()
    assert len(listings) == 5, "a listing failed"
    latencies.sort()
    slowest, median = latencies[-1], latencies[len(latencies) // 2]
    per_fd_us = min(listings) / count * 1e6
    print(
        f"{count} fds: listing {min(listings) * 1e3:.0f}-{max(listings) * 1e3:.0f} ms"
        f" ({per_fd_us:.2f} us per descriptor); meanwhile {len(latencies)} heapsize reads,"
        f" median {median * 1e3:.2f} ms, max {slowest * 1e3:.1f} ms"
    )
    # other reads went on during the listings, each far quicker than one listing
    assert len(latencies) >= 20
    assert median < min(listings) / 5


def test_fds_of_a_process_whose_leader_exited_is_read_through_a_live_thread(daemon, holder):
    h = holder()
    daemon.register(h.pid)
    h.do("many", 10)
    h.do("leader-exit")
    wait_until(lambda: b") Z " in Path(f"/proc/{h.pid}/stat").read_bytes(), what="zombie leader")
    assert fds(daemon, h.pid) == {
        "file": 0, "dir": 0, "socket": 0, "pipe": 2, "anon": 0, "other": 11,
        OPENFILE_TOTAL: 13,
    }  # fmt: skip
    assert peak(daemon, h.pid, "openfile_peak") == 10
