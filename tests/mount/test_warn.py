"""warn=N%: a share of a quota crossed upwards is warned of once, under both engines.

Real daemons (procfs polling every 50 ms; bpf with its polling at 2 s, so the
kernel alone can have warned in time), real workloads mapping and opening on
command. Each crossing: `warned` in the process's and the top-level `events`,
pollers woken, one log line (action=warn), `restrack_enforcements_total{action="warn"}`;
re-armed when usage is back at or under the threshold (limit * N // 100).
"""

from __future__ import annotations

import contextlib
import errno
import re
import select
import signal
from collections.abc import Iterator

import pytest

from tests.support.bpf import BPF, needs_bpf, pin_dir, prerequisites_missing, scrub
from tests.support.daemon import Daemon, DaemonFactory
from tests.support.mount import events_from_fd, events_of, opened
from tests.support.procs import MiB
from tests.support.waiting import wait_until
from tests.support.workload import Workload

PROCFS = ("--engine", "procfs", "--interval", "50")
ENGINES = {"procfs": PROCFS, "bpf": BPF}
QUIET = {"exceeded": 0, "killed": 0, "denied": 0, "notified": 0}


@pytest.fixture(scope="module", params=list(ENGINES))
def engine_daemon(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Daemon]:
    """One daemon per engine for the module (a bpf daemon's stop detaches: ~3 s)."""
    engine = request.param
    if engine == "bpf" and prerequisites_missing():
        pytest.skip(f"BPF unavailable: {prerequisites_missing()}")
    factory = DaemonFactory(tmp_path_factory.mktemp(f"warn-{engine}"))
    try:
        daemon = factory(*ENGINES[engine])
        assert daemon.read("engine") == f"{engine}\n"
        yield daemon
    finally:
        factory.cleanup()
        if engine == "bpf":
            scrub(pin_dir(factory.daemons[0]))


def enforcement_lines(daemon: Daemon, pid: int) -> list[str]:
    """The daemon's enforcement (and warning) lines for `pid`, in order."""
    lines = daemon.log_text().splitlines()
    return [line for line in lines if f"pid={pid} comm=" in line and " usage=" in line]


def warn_lines(daemon: Daemon, pid: int) -> list[str]:
    return [line for line in enforcement_lines(daemon, pid) if " action=warn " in line]


def warn_metric(daemon: Daemon) -> int:
    found = re.search(r'^restrack_enforcements_total\{action="warn"\} (\d+)$',
                      daemon.read("metrics"), re.MULTILINE)  # fmt: skip
    assert found, "no warn count in the metrics"
    return int(found[1])


def sampled(daemon: Daemon, w: Workload) -> None:
    """A read of the process: the procfs engine samples (and warns or re-arms) at
    every read; under bpf the kernel already did at the call."""
    daemon.read(w.pid, "heapsize")
    daemon.read(w.pid, "openfile_count")


def registered(daemon: Daemon, w: Workload, quota: str) -> Workload:
    daemon.register(w.pid)
    daemon.write(quota, w.pid, "quota")
    return w


def test_a_crossing_is_warned_once_wakes_pollers_and_rearms(engine_daemon: Daemon, spawn) -> None:
    daemon = engine_daemon
    top, metric = events_of(daemon)["warned"], warn_metric(daemon)
    w = registered(daemon, spawn(), "heap=10M action=notify warn=50%")
    assert daemon.read(w.pid, "quota") == "heap=10485760 files=max action=notify warn=50%\n"
    with opened(daemon, w.pid, "events") as own:
        poller = select.poll()
        poller.register(own, select.POLLPRI | select.POLLIN)
        w.do("mmap", 5 * MiB)  # exactly the threshold: not over it
        sampled(daemon, w)
        assert poller.poll(300) == [], "woken at the threshold itself (300 ms: 6 checks)"
        assert events_from_fd(own) == QUIET | {"warned": 0}
        w.do("mmap", MiB)  # 6 MiB > 5 MiB: the crossing
        assert poller.poll(2000) != [], "no wake-up within 2 s"
        wait_until(lambda: events_from_fd(own)["warned"] == 1, 2, "the warning")
        w.do("mmap", MiB)  # 7 MiB: still past it, the same crossing
        sampled(daemon, w)
        w.do("munmap")  # 6 MiB: still past it
        sampled(daemon, w)
        assert events_from_fd(own) == QUIET | {"warned": 1}
        w.do("munmap")  # 5 MiB: back at the threshold, re-armed
        sampled(daemon, w)
        w.do("mmap", 2 * MiB)  # 7 MiB: a second crossing
        wait_until(lambda: events_from_fd(own)["warned"] == 2, 2, "the second warning")
        sampled(daemon, w)
        assert events_from_fd(own) == QUIET | {"warned": 2}
    assert events_of(daemon)["warned"] == top + 2
    assert warn_metric(daemon) == metric + 2
    lines = warn_lines(daemon, w.pid)
    assert len(lines) == 2, lines
    usage, limit = re.search(
        r"quota=heap usage=(\d+) limit=(\d+) action=warn warn=50%", lines[0]
    ).groups()
    assert int(limit) == 10 * MiB and 5 * MiB < int(usage) <= 10 * MiB
    assert w.alive()


def test_files_are_warned_of_apart_from_heap(engine_daemon: Daemon, spawn) -> None:
    daemon = engine_daemon
    w = registered(daemon, spawn(), "heap=100M files=10 action=notify warn=80%")
    w.do("open", 8)  # 8: the threshold (10 * 80 // 100)
    sampled(daemon, w)
    w.do("mmap", 10 * MiB)  # heap far under its 80 MiB threshold
    sampled(daemon, w)
    assert events_of(daemon, w.pid) == QUIET | {"warned": 0}
    w.do("open", 1)  # 9 > 8
    wait_until(lambda: events_of(daemon, w.pid)["warned"] == 1, 2, "the files warning")
    w.do("close", 2)  # 7: re-armed
    sampled(daemon, w)
    w.do("open", 2)  # 9: again
    wait_until(lambda: events_of(daemon, w.pid)["warned"] == 2, 2, "the second files warning")
    sampled(daemon, w)
    assert events_of(daemon, w.pid) == QUIET | {"warned": 2}
    assert all("quota=files " in line for line in warn_lines(daemon, w.pid))


def test_warn_comes_before_the_kill(engine_daemon: Daemon, spawn) -> None:
    daemon = engine_daemon
    before = events_of(daemon)
    w = registered(daemon, spawn(), "heap=10M action=kill warn=60%")
    w.do("mmap", 7 * MiB)  # 7 MiB > 6 MiB: warned, alive
    wait_until(lambda: events_of(daemon, w.pid)["warned"] == 1, 2, "the warning")
    assert events_of(daemon, w.pid)["killed"] == 0 and w.alive()
    with contextlib.suppress(ProcessLookupError):  # under bpf: killed in this very call
        w.ask("mmap", 4 * MiB)  # 11 MiB
    assert w.wait(5) == -signal.SIGKILL
    wait_until(lambda: events_of(daemon)["killed"] == before["killed"] + 1, 2, "the kill counted")
    assert events_of(daemon)["warned"] == before["warned"] + 1
    lines = enforcement_lines(daemon, w.pid)
    assert " action=warn " in lines[0] and " action=kill" in lines[-1], lines


def test_one_call_past_both_warns_then_kills(engine_daemon: Daemon, spawn) -> None:
    daemon = engine_daemon
    before = events_of(daemon)
    w = registered(daemon, spawn(), "heap=10M action=kill warn=50%")
    with contextlib.suppress(ProcessLookupError):
        w.ask("mmap", 20 * MiB)  # past the threshold and the limit at once
    assert w.wait(5) == -signal.SIGKILL
    wait_until(lambda: events_of(daemon)["killed"] == before["killed"] + 1, 2, "the kill counted")
    assert events_of(daemon)["warned"] == before["warned"] + 1
    lines = enforcement_lines(daemon, w.pid)
    assert " action=warn " in lines[0] and " action=kill" in lines[1], lines


def test_a_usage_reset_rearms(engine_daemon: Daemon, spawn) -> None:
    daemon = engine_daemon
    w = registered(daemon, spawn(), "heap=10M action=notify warn=50%")
    w.do("mmap", 6 * MiB)
    wait_until(lambda: events_of(daemon, w.pid)["warned"] == 1, 2, "the warning")
    daemon.write("usage", w.pid, "reset")  # heapsize back to 0 at 6 MiB of VmData
    assert daemon.read(w.pid, "heapsize") == "0\n"
    w.do("mmap", 4 * MiB)  # 4 MiB over the new baseline: under
    sampled(daemon, w)
    assert events_of(daemon, w.pid)["warned"] == 1
    w.do("mmap", 2 * MiB)  # 6 MiB over it: a crossing again
    wait_until(lambda: events_of(daemon, w.pid)["warned"] == 2, 2, "the warning after the reset")


def test_a_quota_set_past_the_threshold_warns_at_once_and_once(
    engine_daemon: Daemon, spawn
) -> None:
    daemon = engine_daemon
    w: Workload = spawn()
    daemon.register(w.pid)
    w.do("mmap", 8 * MiB)
    daemon.write("heap=10M action=notify warn=50%", w.pid, "quota")
    wait_until(lambda: events_of(daemon, w.pid)["warned"] == 1, 2, "the warning at set time")
    w.do("mmap", MiB)  # the kernel's first look at it: past, the same crossing
    sampled(daemon, w)
    w.do("munmap")
    sampled(daemon, w)
    assert events_of(daemon, w.pid) == QUIET | {"warned": 1}


@pytest.mark.parametrize(
    "quota",
    [
        "heap=10M warn=100%",
        "heap=10M warn=0%",
        "heap=10M warn=50",
        "heap=10M warn=50% warn=60%",
        "warn=50%",
        "heap=max files=max action=notify warn=50%",
    ],
)
def test_a_bad_warn_is_einval_and_changes_nothing(engine_daemon: Daemon, spawn, quota: str) -> None:
    daemon = engine_daemon
    w: Workload = spawn()
    daemon.register(w.pid)
    with pytest.raises(OSError) as info:
        daemon.write(quota, w.pid, "quota")
    assert info.value.errno == errno.EINVAL
    assert daemon.read(w.pid, "quota") == "heap=max files=max action=kill\n"
    daemon.write("files=5 warn=20%", w.pid, "quota")  # no quota was set: this one takes
    assert daemon.read(w.pid, "quota") == "heap=max files=5 action=kill warn=20%\n"


# ----- a restart keeps the setting ---------------------------------------------------------


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_restart_keeps_the_warning(daemon_factory: DaemonFactory, spawn, engine: str) -> None:
    if engine == "bpf" and prerequisites_missing():
        pytest.skip(f"BPF unavailable: {prerequisites_missing()}")
    daemon = daemon_factory(*ENGINES[engine])
    try:
        w = registered(daemon, spawn(), "heap=10M action=notify warn=50%")
        w.do("mmap", 6 * MiB)
        wait_until(lambda: events_of(daemon, w.pid)["warned"] == 1, 2, "the warning")
        daemon.stop()
        daemon.start(*ENGINES[engine])
        assert daemon.read(w.pid, "quota") == "heap=10485760 files=max action=notify warn=50%\n"
        if engine == "bpf":  # the kernel kept its flag: the same crossing is not counted again
            sampled(daemon, w)
            assert events_of(daemon, w.pid)["warned"] == 0
        w.do("munmap")  # back under: re-armed
        sampled(daemon, w)
        base = events_of(daemon, w.pid)["warned"]
        w.do("mmap", 6 * MiB)
        wait_until(lambda: events_of(daemon, w.pid)["warned"] == base + 1, 2, "a warning again")
    finally:
        daemon_factory.stop_all()
        if engine == "bpf":
            scrub(pin_dir(daemon))


# ----- bpf: counted in the kernel's map ------------------------------------------------------

FLIPS = 100_000


@needs_bpf
def test_bpf_counts_every_crossing_in_the_map(bpf_daemon: Daemon, grower) -> None:
    """One descriptor opened and closed FLIPS times over a threshold of 0: the
    kernel sends one event while one waits, and keeps the count in the map, so
    every crossing is counted, none lost, however fast they come."""
    before = events_of(bpf_daemon)
    flipper = grower("flip", 0, FLIPS)
    bpf_daemon.register(flipper.pid)
    bpf_daemon.write("files=1 action=notify warn=50%", flipper.pid, "quota")  # threshold 0
    flipper.go()
    assert flipper.finish()[0] == 0
    want = before["warned"] + FLIPS
    wait_until(lambda: events_of(bpf_daemon)["warned"] >= want, 10, f"{FLIPS} warnings")
    after = events_of(bpf_daemon)
    assert after["warned"] == want
    assert after["exceeded"] == before["exceeded"]  # 1 descriptor: not over files=1


@needs_bpf
def test_bpf_a_crossing_while_no_daemon_runs_is_counted_on_adoption(
    bpf_factory: DaemonFactory, spawn
) -> None:
    daemon = bpf_factory(*BPF)
    w = registered(daemon, spawn(), "files=10 action=notify warn=50%")
    daemon.stop(signal.SIGKILL)
    w.do("open", 6)  # 6 > 5 while no daemon runs: the kernel counts it
    daemon.start(*BPF)
    assert events_of(daemon, w.pid)["warned"] == 1
    assert f"while no daemon ran: pid={w.pid} warned files" in daemon.log_text()


def test_a_tree_is_warned_of_on_its_sum(engine_daemon: Daemon, spawn) -> None:
    """The threshold of a tree quota is on its sum: sampled by the engine at each
    check under procfs, judged by the kernel in the crossing call under bpf."""
    daemon = engine_daemon
    w = registered(daemon, spawn(), "heap=20M action=notify warn=50% scope=tree")
    assert (
        daemon.read(w.pid, "quota") == "heap=20971520 files=max action=notify warn=50% scope=tree\n"
    )
    w.do("mmap", 8 * MiB)
    daemon.read(w.pid, "tree_heapsize")
    assert events_of(daemon, w.pid)["warned"] == 0
    w.do("mmap", 3 * MiB)  # 11 MiB > 10 MiB
    wait_until(lambda: int(daemon.read(w.pid, "tree_heapsize")) > 10 * MiB, 2, "the tree's sum")
    wait_until(lambda: events_of(daemon, w.pid)["warned"] == 1, 2, "the tree's warning")
    daemon.read(w.pid, "tree_heapsize")
    assert events_of(daemon, w.pid) == QUIET | {"warned": 1}
