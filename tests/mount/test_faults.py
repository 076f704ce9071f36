"""Faults: the daemon killed, stopped, starved of disk; processes dying and pids recycled.

- `kill -9` of the daemon with deny quotas in force: the state comes back, the
  rlimits are consistent, and nothing acknowledged is lost, at whatever moment
  the kill lands.
- A graceful stop gives back every soft limit deny mode lowered.
- A process exiting while its files are read: ESRCH, never EIO.
- PID recycling, forced with /proc/sys/kernel/ns_last_pid: the engine never
  acts on the process that got the number.
- A full disk or a read-only state file: writes fail with ENOSPC/EROFS, one
  explicit log line each, and nothing changes; once there is room, all is well.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, DaemonFactory, release
from tests.support.pids import force_pids, spawn_at
from tests.support.procs import MiB, errno_of, limits_of, start_time, tracked
from tests.support.tempdirs import shared_tempdir
from tests.support.users import NOBODY, as_user
from tests.support.waiting import wait_until
from tests.support.workload import Workload
from tracker.engine import state as state_file

NOFILE, DATA = "Max open files", "Max data size"
FIGURES: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_figures() -> Iterator[None]:
    yield
    print(f"\nfault figures: {dict(FIGURES)}")


def kill9(daemon: Daemon) -> None:
    daemon.stop(signal.SIGKILL)
    FIGURES["daemon kill -9"] += 1


def both_limits(pid: int) -> dict[str, tuple[str, str]]:
    return {NOFILE: limits_of(pid, NOFILE), DATA: limits_of(pid, DATA)}


# ----- kill -9 with deny quotas ------------------------------------------------------------


def test_kill9_with_deny_quotas_keeps_state_and_rlimits(daemon, spawn):
    root_both, nobody_files, nobody_own, notify, plain = (
        spawn(), spawn(NOBODY), spawn(NOBODY), spawn(), spawn()
    )  # fmt: skip
    exits, raises = spawn(), spawn(NOBODY)
    everyone = [root_both, nobody_files, nobody_own, notify, plain, exits, raises]
    original = {w.pid: both_limits(w.pid) for w in everyone}
    for w in everyone:
        daemon.register(w.pid)
    for w in everyone:
        w.do("mmap", 2 * MiB)
        w.do("open", 1)
    daemon.write("heap=8M files=3 action=deny", root_both.pid, "quota")
    daemon.write("files=2 action=deny", nobody_files.pid, "quota")  # root's: binds the owner
    own_quota = daemon.path(nobody_own.pid, "quota")
    code = subprocess.run(
        as_user(NOBODY, ["sh", "-c", f"echo 'heap=16M action=deny' > {own_quota}"])
    ).returncode
    assert code == 0
    daemon.write("heap=1G files=100 action=notify", notify.pid, "quota")
    daemon.write("files=4 action=deny", exits.pid, "quota")
    daemon.write("files=5 action=deny", raises.pid, "quota")
    lowered = {w.pid: both_limits(w.pid) for w in everyone}
    counters = {w.pid: daemon.read(w.pid, "stat").splitlines()[2:4] for w in everyone}
    quotas = {w.pid: daemon.read(w.pid, "quota") for w in everyone}

    kill9(daemon)
    # the limits stay lowered while no daemon runs (README: applied again at restart)
    assert {w.pid: both_limits(w.pid) for w in everyone} == lowered
    exits.stop()
    raises.do("setrlimit", "nofile", -1)  # given back to itself while nobody watches
    assert limits_of(raises.pid, NOFILE) != lowered[raises.pid][NOFILE]
    daemon.start()

    alive = [w for w in everyone if w is not exits]
    assert tracked(daemon.mountpoint) == sorted(w.pid for w in alive)
    for w in alive:
        assert daemon.read(w.pid, "stat").splitlines()[2:4] == counters[w.pid]
        assert daemon.read(w.pid, "quota") == quotas[w.pid]
        assert both_limits(w.pid) == lowered[w.pid], w.pid
        if w is not plain:
            assert errno_of(lambda w=w: daemon.write("files=9", w.pid, "quota")) == errno.EBUSY
    assert root_both.ask("open", 5) == f"ok 2 {errno.EMFILE}"  # 1 of 3 already used
    assert root_both.ask("mmap", 8 * MiB) == f"err {errno.ENOMEM}"
    assert raises.ask("open", 9) == f"ok 4 {errno.EMFILE}"
    assert [r["pid"] for r in state_file.load(daemon.state)] == [w.pid for w in alive]

    # a graceful stop lifts nothing either; --release gives every process its own back
    assert daemon.stop(signal.SIGTERM) == 0
    for w in alive:
        assert both_limits(w.pid) == lowered[w.pid], w.pid
    release(daemon.state)
    for w in alive:
        assert both_limits(w.pid) == original[w.pid], w.pid


@pytest.mark.parametrize(
    "cycles",
    [pytest.param(4, id="short"), pytest.param(30, id="long", marks=pytest.mark.slow)],
)
def test_kill9_at_any_moment_loses_nothing_acknowledged(daemon, spawn, cycles):
    """A writer registers, caps and deregisters while the daemon is killed at a random
    moment: after the restart every acknowledged change is there (it was journaled
    before it was answered) and the rest of the world is consistent."""
    rng = random.Random(5)
    acknowledged = 0
    for _ in range(cycles):
        pool = [spawn() for _ in range(10)]
        ops: list[tuple[str, int]] = []
        for index, w in enumerate(pool):
            ops += [("register", w.pid), ("quota", w.pid)]
            if index % 3 == 2:
                ops.append(("deregister", w.pid))
        acks: list[tuple[str, int]] = []
        stop_after = rng.randrange(1, len(ops))

        def writer(ops: list = ops, acks: list = acks) -> None:
            try:
                for what, pid in ops:
                    if what == "register":
                        daemon.register(pid)
                    elif what == "quota":
                        daemon.write("heap=1G files=100 action=notify", pid, "quota")
                    else:
                        daemon.write(str(pid), "deregister")
                    acks.append((what, pid))
            except OSError as error:  # the daemon died under this write
                assert error.errno in (errno.ENOTCONN, errno.ECONNABORTED), error

        thread = threading.Thread(target=writer)
        thread.start()
        wait_until(
            lambda a=acks, n=stop_after, t=thread: len(a) >= n or not t.is_alive(), 10, "acks"
        )
        kill9(daemon)
        thread.join(10)
        daemon.start()
        done = len(acks)
        # the acknowledged changes, and perhaps the one in flight when the kill landed
        allowed = [_apply(ops[:done]), _apply(ops[: done + 1])]
        pids = {w.pid for w in pool}
        got = {p: daemon.read(p, "quota") for p in tracked(daemon.mountpoint) if p in pids}
        assert got in allowed, f"after {done} acknowledged changes: {got}"
        acknowledged += done
        for pid in got:
            daemon.write(str(pid), "deregister")
        for w in pool:
            w.stop()
    FIGURES["acknowledged changes verified after kill -9"] += acknowledged


def _apply(ops: list[tuple[str, int]]) -> dict[int, str]:
    world: dict[int, str] = {}
    for what, pid in ops:
        if what == "register":
            world[pid] = "heap=max files=max action=kill\n"
        elif what == "quota":
            world[pid] = "heap=1073741824 files=100 action=notify\n"
        else:
            del world[pid]
    return world


# ----- graceful stop ---------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_stop_keeps_and_release_restores_every_lowered_rlimit(daemon, spawn, sig):
    """Root's and users' processes, heap and files, limits recomputed by usage resets,
    raised by the process and lowered back, a process that had its own lower limit:
    a stop (a restart, an upgrade) lifts none; `restrackfs --release` gives all back."""
    ws = [spawn(), spawn(NOBODY), spawn(), spawn(NOBODY), spawn(), spawn(NOBODY)]
    ws[4].do("setrlimit", "nofile", 40)  # its own limit, below what the quota would give
    original = {w.pid: both_limits(w.pid) for w in ws}
    for w in ws:
        daemon.register(w.pid)
        w.do("open", 2)
    daemon.write("heap=64M files=10 action=deny", ws[0].pid, "quota")
    daemon.write("heap=32M files=3 action=deny", ws[1].pid, "quota")
    daemon.write("files=7 action=deny", ws[2].pid, "quota")
    daemon.write("heap=4M action=deny", ws[3].pid, "quota")
    daemon.write("files=1000 action=deny", ws[4].pid, "quota")
    daemon.write("files=2 action=deny", ws[5].pid, "quota")
    for w in ws[:4]:
        w.do("open", 1)
        w.do("mmap", MiB)
        daemon.write("usage", w.pid, "reset")  # the limits follow the new baseline
    lowered = limits_of(ws[5].pid, NOFILE)
    ws[5].do("setrlimit", "nofile", -1)
    wait_until(lambda: limits_of(ws[5].pid, NOFILE) == lowered, what="raised limit lowered back")
    assert limits_of(ws[4].pid, NOFILE)[0] == "40"
    changed = [w for w in ws if both_limits(w.pid) != original[w.pid]]
    assert len(changed) == 5  # all but the one whose own limit was already lower
    kept = {w.pid: both_limits(w.pid) for w in ws}
    assert daemon.stop(sig) == 0
    FIGURES["graceful stops"] += 1
    assert {w.pid: both_limits(w.pid) for w in ws} == kept
    # the quotas are still in the state file: a new daemon keeps them
    daemon.start()
    assert {w.pid: both_limits(w.pid) for w in ws} == kept
    assert daemon.stop(sig) == 0
    release(daemon.state)
    for w in ws:
        assert both_limits(w.pid) == original[w.pid], w.pid


# ----- a process exiting during reads -----------------------------------------------------


def test_exit_during_reads_is_esrch_never_eio(daemon, spawn):
    """Readers loop on every readable file of processes that die under them (some with
    threads, so their exit takes a while): each read succeeds or says ESRCH."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    for round_ in range(12):
        w = spawn()
        daemon.register(w.pid)
        w.do("mmap", MiB)
        for _ in range(round_ % 4 * 4):
            w.thread()
        names = [
            n
            for n in os.listdir(daemon.path(w.pid))
            if os.stat(daemon.path(w.pid, n)).st_mode & 0o444
        ]
        fds = [os.open(daemon.path(w.pid, name), os.O_RDONLY) for name in names]
        metrics_fd = os.open(daemon.path("metrics"), os.O_RDONLY)
        done = threading.Event()

        def reader(fd: int, stop_on_error: bool = True, done=done) -> None:
            while True:
                try:
                    os.pread(fd, 65536, 0)
                    key = "ok" if stop_on_error else "metrics ok"
                except OSError as error:
                    key = errno.errorcode[error.errno]
                    key = key if stop_on_error else f"metrics {key}"
                with lock:
                    outcomes[key] += 1
                if key != "ok" and stop_on_error:
                    return
                if done.is_set() and (key != "ok" or not stop_on_error):
                    return

        threads = [threading.Thread(target=reader, args=(fd,)) for fd in fds]
        threads.append(threading.Thread(target=reader, args=(metrics_fd, False)))
        for thread in threads:
            thread.start()
        wait_until(lambda n=20 * (round_ + 1): outcomes["ok"] > n, what="reads going")
        w.proc.kill()
        w.proc.wait()
        FIGURES["processes killed during reads"] += 1
        for thread in threads[:-1]:
            thread.join(10)
        done.set()
        threads[-1].join(10)
        for fd in [*fds, metrics_fd]:
            os.close(fd)
    assert set(outcomes) == {"ok", "ESRCH", "metrics ok"}, outcomes
    FIGURES["reads racing an exit"] += sum(outcomes.values())


async def test_esrch_from_proc_fd_during_an_exit_is_no_such_process(spawn, monkeypatch):
    """Found by test_load: stat() of /proc/PID/fd can fail with ESRCH while the process
    exits; only ENOENT was taken for 'no such process', so a read of `metrics` (anyone's)
    or of the process's files was answered EIO, with a traceback in the log."""
    from restrackfs.files import Caller, read_metrics
    from tracker.engine.engine import open_engine
    from tracker.linux import procfs

    w = spawn()
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # what the kernel answers in the exit's window
        if str(path) == f"/proc/{w.pid}/fd":
            raise ProcessLookupError(errno.ESRCH, "No such process")
        return real_stat(path, *args, **kwargs)

    async with open_engine() as engine:
        entry = engine.register(w.pid, 0)
        monkeypatch.setattr(procfs.os, "stat", stat)
        try:
            text = read_metrics(engine, None, Caller(0, False))
            with pytest.raises(procfs.NoSuchProcess):
                engine.reader.measure(entry)
        finally:
            monkeypatch.undo()
    assert "restrack_tracked_processes" in text


# ----- PID recycling ----------------------------------------------------------------------


@force_pids
@pytest.mark.parametrize("action", ["kill", "deny", "notify"])
def test_recycled_pid_is_never_acted_upon(daemon, spawn, action):
    old = spawn()
    pid = old.pid
    daemon.register(pid)
    daemon.write(f"heap=1M files=1 action={action}", pid, "quota")
    old.stop()
    new = spawn_at(pid, spawn)
    new.do("setrlimit", "nofile", 77)
    mine = both_limits(pid)
    new.do("open", 5)
    new.do("mmap", 8 * MiB)  # far over the old process's quota
    wait_until(lambda: str(pid) not in os.listdir(daemon.mountpoint), what="gone")
    watch_until = time.monotonic() + 0.5
    while time.monotonic() < watch_until:  # several check intervals: no kill, no limit
        assert str(pid) not in os.listdir(daemon.mountpoint)
        assert errno_of(lambda: daemon.read(pid, "stat")) == errno.ENOENT
        assert f'pid="{pid}"' not in daemon.read("metrics")
        assert new.alive() and both_limits(pid) == mine
        new.do("pid")
        daemon.read("metrics")
    # registering the number now tracks the new process from zero
    daemon.register(pid)
    assert daemon.read(pid, "quota") == "heap=max files=max action=kill\n"
    assert daemon.read(pid, "openfile_count") == "0\n"


@force_pids
def test_pid_recycled_while_the_daemon_was_dead_is_dropped(daemon, spawn):
    old, other = spawn(NOBODY), spawn()
    pid = old.pid
    daemon.register(pid)
    daemon.register(other.pid)
    daemon.write("heap=4M files=2 action=deny", pid, "quota")
    kill9(daemon)
    old.stop()
    new = spawn_at(pid, lambda: spawn(NOBODY))
    (record,) = [r for r in state_file.load(daemon.state) if r["pid"] == pid]
    if start_time(pid) == record["start_time"]:
        pytest.skip("recycled within the same clock tick: see the test below")
    mine = both_limits(pid)
    daemon.start()
    assert tracked(daemon.mountpoint) == [other.pid]
    assert both_limits(pid) == mine and new.alive()
    assert [r["pid"] for r in state_file.load(daemon.state)] == [other.pid]
    assert new.ask("open", 5) == "ok 5"


@force_pids
def test_pid_recycled_within_one_clock_tick_is_not_adopted(daemon, spawn, workload_binary):
    """Found here: identity in the state file was pid + start time in clock ticks
    (10 ms), so a pid recycled within one tick (forced with ns_last_pid) was adopted at
    restart with the old process's deny quota. The pidfd's inode (pidfs) tells them
    apart."""
    daemon.register(spawn().pid)
    daemon.stop(signal.SIGKILL)
    template = state_file.load(daemon.state)[0]
    for _ in range(50):
        old = Workload(workload_binary)
        pid, born = old.pid, start_time(old.pid)
        pidfd = os.pidfd_open(pid)
        inode = os.fstat(pidfd).st_ino  # the daemon records it too, where pidfs has it
        os.close(pidfd)
        old.stop()
        new = spawn_at(pid, spawn)
        if start_time(pid) == born:
            break
        new.stop()
    else:
        pytest.skip("no recycling within one tick")
    FIGURES["same-tick recycles"] += 1
    # the record the daemon wrote for the old process (the template's layout)
    record = {**template, "pid": pid, "start_time": born, "quota_uid": 0}
    if "pidfd_inode" in template:
        record["pidfd_inode"] = inode
    record["quota"] = {"heap": None, "files": 1, "action": "deny"}
    record["saved_soft"] = {"7": 1024}  # RLIMIT_NOFILE as the old process had it
    daemon.state.write_text(
        json.dumps(state_file.HEADER) + "\n" + json.dumps({"put": record}) + "\n"
    )
    mine = both_limits(pid)
    daemon.start()
    assert str(pid) not in os.listdir(daemon.mountpoint), "the new process was adopted"
    assert both_limits(pid) == mine


@force_pids
def test_deregister_racing_an_exit_never_touches_the_recycled_pid(daemon_factory, spawn):
    """Found here: deregister (and shutdown) gave saved rlimits back with prlimit(pid)
    by number; when the tracked process had exited but its exit watcher had not run
    yet, the process that recycled the pid got the old one's soft RLIMIT_NOFILE (in
    about half of the rounds)."""
    # Both are woken by the same epoll_wait() and trio runs either first, when nothing
    # else interferes: no periodic check (it would notice the exit first), no request
    # left in FUSE's queue when the daemon stops (files stay open: a close sends an
    # asynchronous RELEASE), and a fresh daemon every few rounds (a long-lived one
    # lets the watcher win more and more often, for reasons not looked into).
    daemon = daemon_factory(start=False)
    rounds, touched, fds = 20, [], []
    for round_ in range(rounds):
        if round_ % 5 == 0:
            for fd in fds:
                os.close(fd)
            fds.clear()
            if daemon.proc is not None:
                daemon.stop()
            daemon.start("--interval", "600000")
            fds += [os.open(daemon.path(name), os.O_WRONLY) for name in ("register", "deregister")]
            fds.append(os.open(daemon.path("metrics"), os.O_RDONLY))
        register, deregister, metrics = fds[:3]
        old = spawn()
        pid = old.pid
        os.write(register, str(pid).encode())
        fds.append(os.open(daemon.path(pid, "quota"), os.O_WRONLY))
        os.write(fds[-1], b"files=50 action=deny")
        os.pread(metrics, 65536, 0)  # answered after whatever was queued before
        result: list[int] = []
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: _state(daemon.proc.pid) == "T", what="daemon stopped")
            old.stop()
            new = spawn_at(pid, spawn)
            new.do("setrlimit", "nofile", 77)

            def write(pid: int = pid, result: list = result, fd: int = deregister) -> None:
                try:
                    os.write(fd, str(pid).encode())
                    result.append(0)
                except OSError as error:
                    result.append(error.errno)

            thread = threading.Thread(target=write)
            thread.start()
            wait_until(lambda t=thread: _blocked_in_fuse(t.native_id), what="write queued")
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        thread.join(10)
        FIGURES["exit/deregister races"] += 1
        if limits_of(pid, NOFILE)[0] != "77":
            touched.append((round_, result, limits_of(pid, NOFILE)))
            break  # shown
        new.stop()
    for fd in fds:
        os.close(fd)
    assert touched == [], f"a recycled process had its limit changed: {touched}"


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _blocked_in_fuse(tid: int) -> bool:
    try:
        return Path(f"/proc/self/task/{tid}/wchan").read_text() == "request_wait_answer"
    except OSError:
        return False


# ----- a full disk, a read-only state file ---------------------------------------------------


@pytest.fixture
def small_disk(daemon_factory: DaemonFactory) -> Iterator[Path]:
    """A 64 KiB tmpfs, mounted for this test only.

    Its daemons are stopped first: torn down before them, the directory was
    recreated by a daemon writing its state file anew (as workloads exited),
    and left in /tmp by every run."""
    path = shared_tempdir("restrack-disk-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        daemon_factory.stop_all()
        subprocess.run(["umount", "-l", path], check=True)
        shutil.rmtree(path, ignore_errors=True)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def world_of(daemon: Daemon, workloads: list[Workload]) -> dict[str, object]:
    return {
        "tracked": tracked(daemon.mountpoint),
        "quotas": {p: daemon.read(p, "quota") for p in tracked(daemon.mountpoint)},
        "limits": {w.pid: both_limits(w.pid) for w in workloads},
        "journal": daemon.state.read_bytes(),
    }


def attempts(daemon: Daemon, registered: Workload, quota_set: Workload, fresh: Workload):
    """Every kind of write that changes state, each with its own journal line."""
    p, q, f = registered.pid, quota_set.pid, fresh.pid
    return {
        "register": lambda: daemon.register(f),
        "mkdir": lambda: os.mkdir(daemon.path(f)),
        "quota": lambda: daemon.write("files=3 action=deny", p, "quota"),
        "reset quota": lambda: daemon.write("quota", q, "reset"),
        "reset usage": lambda: daemon.write("usage", q, "reset"),
        "deregister": lambda: daemon.write(str(p), "deregister"),
        "rmdir": lambda: os.rmdir(daemon.path(p)),
    }


def on_disk(daemon_factory, disk: Path) -> Daemon:
    daemon = daemon_factory(start=False)
    daemon.state = disk / "state.json"
    daemon.start()
    return daemon


def use_up_the_journals_page(daemon: Daemon, big: Workload, extras: list[Workload]) -> Path:
    """Fill the disk so that no journal line fits any more.

    The journal's last page is allocated already, so a full disk refuses a change
    only once its line crosses into a new page: pad with long lines (a usage reset
    of `big`) until one is refused, then with the shortest (a drop, deregistering
    an extra) until one is refused. Returns the filler file."""
    while True:
        filler = fill(daemon.state.parent)
        try:
            daemon.write("usage", big.pid, "reset")
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
            break
        filler.unlink()
    for w in extras:
        try:
            daemon.write(str(w.pid), "deregister")
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
            return filler
    pytest.fail("the journal never filled its page")


def longest_pid_first(workloads: list[Workload]) -> tuple[Workload, list[Workload]]:
    """The workload whose pid has the most digits, and the others.

    Its drop line (`{"drop":PID}`) is then at least as long as any other's, so the
    journal that refused the last extra's drop refuses its too, whatever pids the
    machine hands out (taking the last spawned failed when the pids wrapped, or crossed
    a power of ten, and the extras were filtered away)."""
    ordered = sorted(workloads, key=lambda w: len(str(w.pid)), reverse=True)
    return ordered[0], ordered[1:]


def shrinking_pids(spawn: Callable[..., Workload], count: int) -> list[Workload]:
    """`count` workloads whose pids lose a digit halfway: the first ones just above
    a power of ten, the others just below it (as when the pids wrap around)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    power = 10 ** (len(str(pid_max - 1)) - 1)
    high = [spawn_at(power + i, spawn) for i in range(count // 2)]
    return high + [spawn_at(power - count + i, spawn) for i in range(count - len(high))]


@pytest.mark.parametrize(
    "fault, pids",
    [
        pytest.param("full", "given", id="full"),
        pytest.param("read-only", "given", id="read-only"),
        pytest.param("full", "shrinking", id="full-pids-shrinking", marks=force_pids),
    ],
)
def test_unsavable_state_fails_writes_loudly_and_changes_nothing(
    daemon_factory, spawn, small_disk, fault, pids
):
    daemon = on_disk(daemon_factory, small_disk)
    workloads = shrinking_pids(spawn, 15) if pids == "shrinking" else [spawn() for _ in range(15)]
    registered, extras = longest_pid_first(workloads)
    quota_set, fresh = spawn(NOBODY), spawn()
    for w in [registered, quota_set, *extras]:
        daemon.register(w.pid)
    daemon.write("heap=64M files=5 action=deny", quota_set.pid, "quota")
    registered.do("open", 2)
    quota_set.do("open", 1)
    if fault == "full":
        code = errno.ENOSPC
        filler = use_up_the_journals_page(daemon, registered, extras)
    else:
        code = errno.EROFS
        daemon.stop()
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        daemon.start()  # resumes from the read-only file, and says it cannot write it
        assert "not writable" in daemon.log_text()
    everyone = [registered, quota_set, fresh]
    before = world_of(daemon, everyone)
    log_lines = daemon.log_text().count("not saved")
    for name, action in attempts(daemon, registered, quota_set, fresh).items():
        assert errno_of(action) == code, name
        FIGURES[f"writes refused on a {fault} disk"] += 1
        assert world_of(daemon, everyone) == before, name
        now = daemon.log_text().count("not saved")
        assert now == log_lines + 1, f"{name}: want one log line saying so"
        log_lines = now
    assert os.strerror(code) in daemon.log_text()
    # reads and enforcement go on
    assert quota_set.ask("open", 9) == f"ok 4 {errno.EMFILE}"
    # room again: everything works, and a restart finds exactly what was acknowledged
    if fault == "full":
        filler.unlink()
    else:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    for name, action in attempts(daemon, registered, quota_set, fresh).items():
        if name not in ("mkdir", "rmdir"):  # the same change twice would be EEXIST/ENOENT
            action()
    expected = tracked(daemon.mountpoint)
    kill9(daemon)
    daemon.start()
    assert tracked(daemon.mountpoint) == expected
    assert registered.pid not in expected and {quota_set.pid, fresh.pid} <= set(expected)
    assert daemon.read(quota_set.pid, "quota") == "heap=max files=max action=kill\n"


def test_restart_on_a_full_disk_keeps_the_state(daemon_factory, spawn, small_disk):
    """The journal cannot be compacted at start: the daemon says so, and resumes anyway."""
    daemon = on_disk(daemon_factory, small_disk)
    ws = [spawn() for _ in range(3)]
    for w in ws:
        daemon.register(w.pid)
    daemon.write("files=2 action=deny", ws[0].pid, "quota")
    lowered = both_limits(ws[0].pid)
    kill9(daemon)
    filler = fill(small_disk)
    FIGURES["restarts on a full disk"] += 1
    daemon.start()
    assert tracked(daemon.mountpoint) == sorted(w.pid for w in ws)
    assert both_limits(ws[0].pid) == lowered
    assert errno_of(lambda: daemon.write("files=1", ws[1].pid, "quota")) == errno.ENOSPC
    filler.unlink()
    daemon.write("files=1 action=notify", ws[1].pid, "quota")
    kill9(daemon)
    daemon.start()
    assert daemon.read(ws[1].pid, "quota") == "heap=max files=1 action=notify\n"
