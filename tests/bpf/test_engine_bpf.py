"""The bpf engine through the real daemon and mount.

The daemons here poll every 2 s (`--interval 2000`): whatever holds a quota
within milliseconds is the kernel's doing, not the polling. Each daemon's
state file is unique, so is its pin directory; a finaliser removes it even
when a test fails. Where BPF cannot load, these tests skip with the reason,
and the root conftest.py's summary says how many BPF tests ran.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.bpf import BPF, needs_bpf, pin_dir
from tests.support.daemon import Daemon, DaemonFactory
from tests.support.mount import (
    SPIKE,
    capped,
    enforcement_line,
    events_from_fd,
    events_of,
    peak,
    spike_is_caught,
    top_events,
)
from tests.support.paths import CHECKOUT, DATA
from tests.support.procs import MiB, data_soft, nofile_soft
from tests.support.waiting import wait_until
from tests.support.workload import Workload
from tracker.backends.bpf import loader

QUOTA = 64 * MiB

pytestmark = needs_bpf
# ----- the engine in force --------------------------------------------------------------


def test_engine_file_metric_and_log_line(bpf_daemon: Daemon) -> None:
    assert bpf_daemon.read("engine") == "bpf\n"
    assert 'restrack_engine_info{engine="bpf"} 1' in bpf_daemon.read("metrics")
    assert "\nrestrack_kernel_events_dropped_total 0\n" in bpf_daemon.read("metrics")
    assert "engine bpf (--engine bpf)" in bpf_daemon.log_text()
    status = subprocess.run(
        [sys.executable, "-m", "restrackfs.cli", "--mount", str(bpf_daemon.mountpoint), "status"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert status.endswith("\nengine: bpf\n")


def test_auto_takes_bpf_where_it_loads(bpf_factory: DaemonFactory) -> None:
    daemon = bpf_factory("--engine", "auto")  # the default, named: the harness adds procfs
    assert daemon.read("engine") == "bpf\n"
    assert [line for line in daemon.log_text().splitlines() if "engine bpf" in line][0].endswith(
        "engine bpf (auto)"
    )
    assert pin_dir(daemon).is_dir() and not (pin_dir(daemon) / "links").exists()  # no quota


def test_procfs_engine_still_polls(bpf_factory: DaemonFactory, spawn) -> None:
    daemon = bpf_factory("--engine", "procfs", "--interval", "20")
    assert daemon.read("engine") == "procfs\n"
    assert 'restrack_engine_info{engine="procfs"} 1' in daemon.read("metrics")
    w: Workload = spawn()
    daemon.register(w.pid)
    daemon.write("files=2 action=kill", w.pid, "quota")
    w.do("open", 5)
    assert w.wait() == -signal.SIGKILL
    assert not pin_dir(daemon).exists()


def test_auto_falls_back_to_procfs_with_the_reason(bpf_factory: DaemonFactory) -> None:
    """auto where the BPF object cannot load (here: missing) mounts with procfs."""
    daemon = bpf_factory(start=False)
    wrapper = DATA / "no_bpf_object.py"
    argv = [sys.executable, str(wrapper), "--foreground", "--state", str(daemon.state)]
    with open(daemon.log, "ab") as log:
        daemon.proc = subprocess.Popen([*argv, str(daemon.mountpoint)], stdout=log, stderr=log)
    wait_until(lambda: daemon._serving() or daemon.proc.poll() is not None, 20, "mount")
    assert daemon.read("engine") == "procfs\n"
    lines = [line for line in daemon.log_text().splitlines() if "engine procfs" in line]
    assert len(lines) == 1 and "(auto; bpf unavailable: BPF object missing:" in lines[0]
    assert 'restrack_engine_info{engine="procfs"} 1' in daemon.read("metrics")


def test_engine_bpf_that_cannot_load_exits_with_the_reason(tmp_path: Path) -> None:
    """A real privilege drop: root without CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN."""
    drop = "-bpf,-perfmon,-sys_admin"
    mountpoint = tmp_path / "m"
    mountpoint.mkdir()
    result = subprocess.run(
        ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-m",
         "restrackfs.daemon", "--foreground", "--engine", "bpf", "--state",
         str(tmp_path / "s.json"), str(mountpoint)],
        capture_output=True, text=True, cwd=CHECKOUT, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "engine bpf unavailable: no CAP_BPF/CAP_PERFMON (nor CAP_SYS_ADMIN)" in result.stderr
    assert not os.path.ismount(mountpoint)


# ----- a 64 MiB kill quota holds, polling every 2 s -------------------------------------

MEMORY_PATHS = [
    ("mmap", MiB),
    ("touch", MiB),
    ("brk", MiB),
    ("mprotect", MiB),
    ("thread", MiB),
    ("leader", MiB),  # from a second thread after the leader exited
]


@pytest.mark.parametrize(("mode", "step"), MEMORY_PATHS, ids=[p[0] for p in MEMORY_PATHS])
def test_heap_kill_quota_holds(bpf_daemon: Daemon, grower, mode: str, step: int) -> None:
    before = top_events(bpf_daemon)
    child = capped(bpf_daemon, grower(mode, step, 300), "heap=64M action=kill")
    started = time.monotonic()
    child.go()
    sig, steps = child.finish()
    assert sig == signal.SIGKILL
    assert steps * step <= QUOTA, "a call that crossed the quota returned"
    wait_until(lambda: enforcement_line(bpf_daemon, child.pid), 2, "the enforcement line")
    assert time.monotonic() - started < 1.5, "not faster than the 2 s polling"
    usage, limit = enforcement_line(bpf_daemon, child.pid) or (0, 0)
    assert limit == QUOTA and 0 < usage - limit <= step, f"overshoot {usage - limit}"
    after = top_events(bpf_daemon)
    assert after["killed"] == before["killed"] + 1
    assert after["exceeded"] == before["exceeded"] + 1


def test_a_quota_already_exceeded_when_set_kills_at_once(bpf_daemon: Daemon, spawn) -> None:
    """The kernel looks at the next growth call only: the check at set time decides."""
    w: Workload = spawn()
    bpf_daemon.register(w.pid)
    w.do("mmap", 8 * MiB)
    bpf_daemon.write("heap=4M action=kill", w.pid, "quota")
    assert w.wait() == -signal.SIGKILL


def test_populate_killed_before_its_pages(bpf_daemon: Daemon, grower) -> None:
    child = capped(bpf_daemon, grower("populate", 512 * MiB, 1), "heap=64M action=kill")
    child.go()
    assert child.finish() == (signal.SIGKILL, 0)
    assert child.maxrss_kib * 1024 < 8 * MiB, f"{child.maxrss_kib} KiB were resident"


FD_PATHS = [("open", 1), ("socket", 1), ("pipe", 2), ("dup", 1)]


@pytest.mark.parametrize(("mode", "per_call"), FD_PATHS, ids=[p[0] for p in FD_PATHS])
def test_fd_kill_quota_holds(bpf_daemon: Daemon, grower, mode: str, per_call: int) -> None:
    child = capped(bpf_daemon, grower(mode, 0, 300), "files=100 action=kill")
    child.go()
    sig, steps = child.finish()
    assert sig == signal.SIGKILL and steps * per_call <= 100
    wait_until(lambda: enforcement_line(bpf_daemon, child.pid), 2, "the enforcement line")
    usage, limit = enforcement_line(bpf_daemon, child.pid) or (0, 0)
    assert limit == 100 and 0 < usage - limit <= per_call


def test_under_quota_nothing_happens(bpf_daemon: Daemon, grower) -> None:
    child = capped(bpf_daemon, grower("touch", MiB, 32), "heap=64M files=100 action=kill")
    child.go()
    assert child.finish() == (0, 32)


# ----- notify and deny, pushed ----------------------------------------------------------


def test_notify_once_per_crossing_and_pollers_wake_at_once(bpf_daemon: Daemon, spawn) -> None:
    w: Workload = spawn()
    bpf_daemon.register(w.pid)
    bpf_daemon.write("heap=4M action=notify", w.pid, "quota")
    own = os.open(bpf_daemon.path(w.pid, "events"), os.O_RDONLY)
    try:
        poller = select.poll()
        poller.register(own, select.POLLPRI | select.POLLIN)
        assert poller.poll(0) == []
        for _ in range(4):
            w.do("mmap", MiB)
        assert poller.poll(0) == []  # 4 MiB: not over yet
        crossed = time.monotonic()
        w.do("mmap", MiB)
        assert poller.poll(500) != [], "no wake-up within 500 ms (the polling is 2 s)"
        woke = time.monotonic() - crossed
        for _ in range(3):
            w.do("mmap", MiB)  # still over: the same crossing
        assert events_from_fd(own) == {"exceeded": 1, "killed": 0, "denied": 0, "notified": 1}
        for _ in range(8):
            w.do("munmap")
        w.do("mmap", MiB)  # back under, then over again: a second crossing
        for _ in range(5):
            w.do("mmap", MiB)
        wait_until(lambda: events_from_fd(own)["notified"] >= 2, 1, "the second crossing")
        # the ring is ordered: a count for the calls still over would have come first
        assert events_from_fd(own) == {"exceeded": 2, "killed": 0, "denied": 0, "notified": 2}
        assert w.alive()
        assert woke < 0.5
    finally:
        os.close(own)


def test_notify_over_when_set_is_counted_once(bpf_daemon: Daemon, spawn) -> None:
    """The check at set time counts it; the kernel's report of the same crossing,
    at the next growth call, is not counted again."""
    w: Workload = spawn()
    bpf_daemon.register(w.pid)
    w.do("mmap", 8 * MiB)
    bpf_daemon.write("heap=4M action=notify", w.pid, "quota")
    assert events_of(bpf_daemon, w.pid)["notified"] == 1
    w.do("mmap", MiB)  # 9 MiB: the kernel sees it over now, its first look
    w.do("munmap")  # 8 MiB: still over, the same crossing
    w.do("munmap")  # 0: back under
    w.do("mmap", 5 * MiB)  # a new crossing
    wait_until(lambda: events_of(bpf_daemon, w.pid)["notified"] >= 2, 1, "the crossing")
    assert events_of(bpf_daemon, w.pid) == {
        "exceeded": 2,
        "killed": 0,
        "denied": 0,
        "notified": 2,
    }


def test_deny_raise_lowered_back_at_once(bpf_daemon: Daemon, spawn) -> None:
    w: Workload = spawn()
    bpf_daemon.register(w.pid)
    bpf_daemon.write("heap=64M action=deny", w.pid, "quota")
    wanted = data_soft(w.pid)
    assert wanted != -1
    raised = time.monotonic()
    assert w.ask("setrlimit", "data", -1) == "ok"
    wait_until(lambda: data_soft(w.pid) == wanted, 1.5, "the soft limit lowered back")
    assert time.monotonic() - raised < 1.5, "not before the 2 s polling"
    wait_until(lambda: events_of(bpf_daemon, w.pid)["denied"] >= 1, 1, "counted denied")


# ----- restart without a gap, clean stop ------------------------------------------------


def _link_ids(directory: Path) -> list[int]:
    """The kernel ids of the links pinned in `directory`."""
    lib = loader.library()
    ids = []
    for path in sorted((directory / "links").iterdir()):
        fd = lib.bpf_obj_get(str(path).encode())
        assert fd >= 0, path
        try:
            ids.append(loader._object_id(lib, fd))
        finally:
            os.close(fd)
    return ids


def test_killed_daemon_leaves_quotas_enforced_and_is_adopted(
    bpf_factory: DaemonFactory, grower, spawn
) -> None:
    daemon = bpf_factory(*BPF)
    victim = capped(daemon, grower("touch", MiB, 300), "heap=64M action=kill")
    survivor: Workload = spawn()
    daemon.register(survivor.pid)
    daemon.write("files=3 action=notify", survivor.pid, "quota")
    links = _link_ids(pin_dir(daemon))
    assert links
    daemon.stop(signal.SIGKILL)
    victim.go()
    assert victim.finish()[0] == signal.SIGKILL, "not enforced while no daemon ran"
    survivor.do("open", 5)  # a notify crossing while no daemon ran
    daemon.start(*BPF)
    assert daemon.read("engine") == "bpf\n"
    text = daemon.log_text()
    assert f"while no daemon ran: pid={victim.pid} killed heap" in text
    assert events_of(daemon, survivor.pid)["notified"] == 1  # counted on adoption
    assert sorted(_link_ids(pin_dir(daemon))) == sorted(links)  # the same links, adopted
    survivor.do("close", 5)
    survivor.do("open", 5)
    wait_until(lambda: events_of(daemon, survivor.pid)["notified"] == 2, 1, "live again")


def test_restart_unwatches_what_the_state_file_lost(bpf_factory: DaemonFactory, grower) -> None:
    daemon = bpf_factory(*BPF)
    child = capped(daemon, grower("touch", MiB, 100), "heap=64M action=kill")
    daemon.stop(signal.SIGKILL)
    daemon.state.unlink()  # the state is gone: nothing may stay enforced for it
    daemon.start(*BPF)
    assert f"bpf: unwatched pid={child.pid} (not in the state file)" in daemon.log_text()
    child.go()
    assert child.finish() == (0, 100)


@pytest.mark.parametrize("deny", [False, True], ids=["kill", "deny"])
def test_a_clean_stop_lifts_nothing_and_release_lifts_all(
    bpf_factory: DaemonFactory, grower, deny: bool
) -> None:
    """A restart (SIGTERM, as a rolling update sends it) is no window: the quota
    holds while no daemon runs; `--release` detaches and gives the limits back."""
    daemon = bpf_factory(*BPF)
    child = capped(
        daemon, grower("touch", MiB, 300), "heap=64M action=" + ("deny" if deny else "kill")
    )
    soft_before = data_soft(child.pid)
    links = _link_ids(pin_dir(daemon))
    assert daemon.stop() == 0
    assert "stay enforced" in daemon.log_text()
    assert sorted(_link_ids(pin_dir(daemon))) == sorted(links)
    assert data_soft(child.pid) == soft_before
    if not deny:
        child.go()
        sig, steps = child.finish()
        assert sig == signal.SIGKILL and steps <= 64, "a stopped daemon's quota lifted"
    released = subprocess.run(
        [sys.executable, "-m", "restrackfs.daemon", "--release", "--state", str(daemon.state)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "pins removed" in released.stderr
    assert not pin_dir(daemon).exists()
    wait_until(lambda: not any(loader.object_exists("link", i) for i in links), 10, "links gone")
    if deny:
        assert data_soft(child.pid) != soft_before  # given back
        child.go()
        assert child.finish() == (0, 300)


def test_a_stop_with_nothing_watched_leaves_nothing(bpf_factory: DaemonFactory, spawn) -> None:
    daemon = bpf_factory(*BPF)
    w: Workload = spawn()
    daemon.register(w.pid)
    assert daemon.stop() == 0
    assert not pin_dir(daemon).exists()


def test_attached_only_while_a_quota_is_set(bpf_factory: DaemonFactory, spawn) -> None:
    daemon = bpf_factory(*BPF)
    w: Workload = spawn()
    daemon.register(w.pid)
    links = pin_dir(daemon) / "links"
    assert not links.exists(), "attached with no quota"
    daemon.write("files=50 action=notify", w.pid, "quota")
    assert links.is_dir() and any(links.iterdir())
    daemon.write("quota", w.pid, "reset")
    wait_until(lambda: "bpf: detached (nothing watched)" in daemon.log_text(), 25, "detached")
    assert not links.exists()


# ----- exact peaks: the kernel raises them at the syscall -------------------------------


def test_a_spike_between_two_reads_shows_in_the_peak(bpf_daemon: Daemon, spawn) -> None:
    """Mapped and unmapped with no read between: only the kernel saw it (under
    procfs, tests/mount/test_peaks.py shows the same spike missed without a quota)."""
    spike_is_caught(bpf_daemon, spawn(), exact=True)


def test_an_fd_spike_shows_and_reset_usage_restarts_the_peaks(bpf_daemon: Daemon, spawn) -> None:
    w = spawn()
    bpf_daemon.register(w.pid)
    bpf_daemon.write("files=1000 action=notify", w.pid, "quota")
    w.do("open", 40)
    w.do("close", 40)
    assert peak(bpf_daemon, w.pid, "openfile_peak") == 40
    bpf_daemon.write("usage", w.pid, "reset")
    assert peak(bpf_daemon, w.pid, "openfile_peak") == 0
    w.do("open", 3)
    w.do("close", 3)
    assert peak(bpf_daemon, w.pid, "openfile_peak") == 3


def test_the_pinned_map_keeps_the_peak_across_a_kill_of_the_daemon(
    bpf_factory: DaemonFactory, spawn
) -> None:
    """Under procfs a kill -9 loses the peaks since the last journaled change; under
    bpf the kernel kept raising them meanwhile, and the restarted daemon adopts them."""
    daemon = bpf_factory(*BPF)
    w = spawn()
    daemon.register(w.pid)
    daemon.write(f"heap={4 * SPIKE} action=notify", w.pid, "quota")
    daemon.stop(signal.SIGKILL)
    w.do("mmap", SPIKE)  # while no daemon runs
    w.do("munmap")
    daemon.start(*BPF)
    assert peak(daemon, w.pid) >= SPIKE
    assert daemon.read(w.pid, "heapsize") == "0\n"


def test_a_raise_through_a_thread_id_is_lowered_back_at_once(bpf_daemon: Daemon, spawn) -> None:
    """prlimit64 names the process by any of its thread ids, as the kernel reads it."""
    w: Workload = spawn()
    tid = w.thread()
    assert tid != w.pid
    bpf_daemon.register(w.pid)
    bpf_daemon.write("files=10 action=deny", w.pid, "quota")
    wanted = nofile_soft(w.pid)
    raised = time.monotonic()
    subprocess.run(["prlimit", "--pid", str(tid), "--nofile=4000:"], check=True)
    wait_until(lambda: nofile_soft(w.pid) == wanted, 1.5, "the soft limit lowered back")
    assert time.monotonic() - raised < 1.5, "not before the 2 s polling"
    wait_until(lambda: events_of(bpf_daemon, w.pid)["denied"] >= 1, 1, "counted denied")
    opened = int(w.ask("open", 300).split()[1])
    assert opened <= 10


def test_a_quota_the_full_map_cannot_take_is_refused(bpf_factory: DaemonFactory, spawn) -> None:
    """Never accepted unenforced: ENOSPC, logged, and the process has no quota."""
    daemon = bpf_factory(*BPF)
    w: Workload = spawn()
    daemon.register(w.pid)
    lib = loader.library()
    fd = lib.bpf_obj_get(str(pin_dir(daemon) / "watched").encode())
    assert fd >= 0
    notify = loader.KernelAction.NOTIFY
    filler = loader.WatchState(0, None, None, 0, 0, None, None, notify, 0).pack()
    keys = range(5_000_000, 5_000_000 + loader.WATCHED_MAX)  # above any pid_max: no process
    try:
        for key in keys:  # the map full: 65,536 entries no process matches
            if lib.bpf_map_update_elem(fd, loader._KEY.pack(key), filler, 0):
                break
        with pytest.raises(OSError) as refused:
            daemon.write("files=10 action=kill", w.pid, "quota")
        assert refused.value.errno == errno.ENOSPC
        assert daemon.read(w.pid, "quota") == "heap=max files=max action=kill\n"
        assert "refused: " in daemon.log_text() and "map is full" in daemon.log_text()
    finally:
        for key in keys:
            lib.bpf_map_delete_elem(fd, loader._KEY.pack(key))
        os.close(fd)
    daemon.write("files=10 action=kill", w.pid, "quota")  # room again


HOLES_TARGET = """
import os, sys
from tests.support.paths import DATA, CHECKOUT
fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(40)]
for fd in fds[:20]:
    os.close(fd)  # a table with its high descriptors open and low holes
print(os.getpid(), flush=True)
for line in sys.stdin:
    if line.startswith("close"):
        for fd in fds[20:]:
            os.close(fd)
        print("closed", flush=True)
    elif line.startswith("try"):
        opened = 0
        try:
            for _ in range(int(line.split()[1])):
                os.open("/dev/null", os.O_RDONLY)
                opened += 1
        except OSError:
            pass
        print(opened, flush=True)
"""


def test_a_deny_limit_follows_the_table_when_descriptors_close(bpf_daemon: Daemon) -> None:
    """RLIMIT_NOFILE counts fd numbers: with its 20 high descriptors closed, a
    process under files=10 deny may open up to baseline + 10 again, exactly, at
    once (under bpf nothing polls: the kernel says the table shrank)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLES_TARGET], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdin and proc.stdout
    try:
        pid = int(proc.stdout.readline())
        bpf_daemon.register(pid)
        bpf_daemon.write("files=10 action=deny", pid, "quota")
        base = len(os.listdir(f"/proc/{pid}/fd"))
        assert nofile_soft(pid) < base  # fd numbers: the holes come first
        proc.stdin.write("close\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "closed\n"
        now = len(os.listdir(f"/proc/{pid}/fd"))
        started = time.monotonic()
        wait_until(lambda: nofile_soft(pid) == base + 10, 1.5, "the limit set anew")
        assert time.monotonic() - started < 1.5, "not before the 2 s polling"
        proc.stdin.write("try 100\n")
        proc.stdin.flush()
        opened = int(proc.stdout.readline())
        assert now + opened == base + 10, (now, opened, base)
    finally:
        proc.kill()
        proc.wait()


def test_a_quota_whose_programs_cannot_attach_is_refused(bpf_factory: DaemonFactory, spawn) -> None:
    """Never accepted unenforced: where the programs do not attach (here the first
    link cannot be pinned: a directory holds its name), the quota write is ENOSPC."""
    daemon = bpf_factory(*BPF)
    w: Workload = spawn()
    daemon.register(w.pid)
    program, _, tracepoint = loader._hook_list()[0]
    blocker = pin_dir(daemon) / "links" / loader._pin_name(program, tracepoint)
    blocker.mkdir(mode=0o700, parents=True)
    try:
        with pytest.raises(OSError) as refused:
            daemon.write("files=10 action=kill", w.pid, "quota")
        assert refused.value.errno == errno.ENOSPC
        assert "did not attach" in daemon.log_text()
        assert daemon.read(w.pid, "quota") == "heap=max files=max action=kill\n"
    finally:
        blocker.rmdir()
    daemon.write("files=10 action=kill", w.pid, "quota")  # attaches now
