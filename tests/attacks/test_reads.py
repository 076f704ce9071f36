"""No user's reads make root's wait: a user who registers many of its
own processes and reads `metrics` from many readers at once gets its renders
one at a time, measured in batches with the loop free between them."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

from bench.harness import status_kib
from tests.support.daemon import DaemonFactory
from tests.support.users import NOBODY, as_user
from tests.support.waiting import wait_until
from tests.support.workload import Workload

PROCESSES = 1000
READERS = 16
RSS_GROWTH_MAX_KIB = 50 * 1024


def test_metrics_readers_of_one_user_do_not_stall_roots_reads(
    daemon_factory: DaemonFactory, spawn
) -> None:
    daemon = daemon_factory()
    mine: Workload = spawn()
    daemon.register(mine.pid)
    register = daemon.path("register")
    script = f"for i in $(seq {PROCESSES}); do sleep 600 & echo $! > {register}; done; wait"
    owner = subprocess.Popen(as_user(NOBODY, ["sh", "-c", script]), start_new_session=True)
    readers: list[subprocess.Popen[bytes]] = []
    try:
        wait_until(lambda: len(os.listdir(daemon.mountpoint)) > PROCESSES, 60, "registrations")
        loop = f"while :; do cat {daemon.path('metrics')} > /dev/null; done"
        for _ in range(READERS):
            readers.append(
                subprocess.Popen(as_user(NOBODY, ["sh", "-c", loop]), start_new_session=True)
            )
        assert daemon.proc is not None
        daemon_pid = daemon.proc.pid
        rss_before = status_kib(daemon_pid, "VmRSS")
        time.sleep(0.5)  # the readers under way
        worst, deadline = 0.0, time.monotonic() + 4
        while time.monotonic() < deadline:
            started = time.monotonic()
            daemon.read(mine.pid, "heapsize")
            worst = max(worst, time.monotonic() - started)
        growth = status_kib(daemon_pid, "VmRSS") - rss_before
        print(f"root's worst heapsize read: {worst * 1000:.1f} ms; RSS +{growth} KiB")
        assert worst < 0.5, f"root's read took {worst:.3f} s"
        assert growth < RSS_GROWTH_MAX_KIB
    finally:
        for process in [*readers, owner]:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_fds_listings_of_one_user_do_not_stall_roots(daemon_factory: DaemonFactory, spawn) -> None:
    daemon = daemon_factory()
    mine: Workload = spawn()
    daemon.register(mine.pid)
    big = []
    for _ in range(4):
        w: Workload = spawn(uid=NOBODY)
        w.do("setrlimit", "nofile", -1)
        assert w.ask("open", 19_000).startswith("ok 19000")
        daemon.register(w.pid)
        big.append(w)
    loops = [f"while :; do cat {daemon.path(w.pid, 'fds')} > /dev/null; done" for w in big]
    readers = [
        subprocess.Popen(as_user(NOBODY, ["sh", "-c", loops[i % 4]]), start_new_session=True)
        for i in range(READERS)
    ]
    try:
        assert daemon.proc is not None
        daemon_pid = daemon.proc.pid
        rss_before = status_kib(daemon_pid, "VmRSS")
        time.sleep(0.5)  # the listings under way
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            daemon.read(mine.pid, "fds")
            latencies.append(time.monotonic() - started)
        latencies.sort()
        p50, worst = latencies[10] * 1000, latencies[-1] * 1000
        growth = status_kib(daemon_pid, "VmRSS") - rss_before
        print(f"root's fds read: p50 {p50:.1f} ms, worst {worst:.1f} ms; RSS +{growth} KiB")
        assert latencies[-1] < 1.0, f"root's fds read took {latencies[-1]:.3f} s"
        assert growth < RSS_GROWTH_MAX_KIB
    finally:
        for process in readers:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_text_dropped_for_the_budget_is_not_rendered_again_per_chunk(
    daemon_factory: DaemonFactory,
) -> None:
    """More unfinished `metrics` texts than a uid's budget holds: the oldest is
    dropped, and reading on in it is ENOBUFS, not one more render per chunk."""
    daemon = daemon_factory()
    register = daemon.path("register")
    script = f"for i in $(seq {PROCESSES}); do sleep 600 & echo $! > {register}; done; wait"
    owner = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    fds: list[int] = []
    try:
        wait_until(lambda: len(os.listdir(daemon.mountpoint)) > PROCESSES, 60, "registrations")
        text = len(daemon.read("metrics"))
        for _ in range((8 << 20) // text + 2):  # past handles.KEPT_BYTES_PER_UID
            fd = os.open(daemon.path("metrics"), os.O_RDONLY)
            fds.append(fd)
            assert len(os.pread(fd, 4096, 0)) == 4096
        try:
            os.pread(fds[0], 4096, 4096)
            raise AssertionError("the dropped text was rendered again")
        except OSError as error:
            assert error.errno == errno.ENOBUFS
        assert len(os.pread(fds[-1], 4096, 4096)) == 4096  # the newest reads on
    finally:
        for fd in fds:
            os.close(fd)
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait()
