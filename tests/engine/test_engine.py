"""The tracking engine without FUSE: real processes, real /proc, real rlimits.

Every test drives a real workload process (see workload.c) and checks the
engine against what the kernel says, read here independently of `tracker`.
Synchronisation is by polling with a deadline, never by sleeping a guess.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.support.procs import MiB, data_soft, nofile_soft, start_time
from tests.support.users import NOBODY
from tracker.engine import state
from tracker.engine.engine import Engine, open_engine
from tracker.engine.entry import Entry
from tracker.errors import (
    AlreadyTracked,
    Deregistered,
    InvalidArgument,
    NoSuchProcess,
    NotPermitted,
    NotTracked,
    QuotaBusy,
)
from tracker.quota import Action, Quota

PAGE = 4096
INTERVAL = 0.01
ROOT = 0
OTHER_USER = 1000

# Deny mode must work whether or not the daemon shares the target's uid: root
# here lacks CAP_SYS_RESOURCE, so a nobody-owned process is the hard case.
OWNERS = [pytest.param(None, id="root-owned"), pytest.param(NOBODY, id="nobody-owned")]


# ----- independent views of the kernel --------------------------------------------------


def vm_data(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmData for {pid}")


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        raw = stat.read()
    return raw[raw.rindex(b")") + 2 :].split()[0].decode()


# ----- helpers --------------------------------------------------------------------------


async def wait_for(condition, timeout: float = 2.0):
    """Poll `condition` every millisecond; fail the test after `timeout` s."""
    with trio.fail_after(timeout):
        while not (result := condition()):
            await trio.sleep(0.001)
    return result


async def settle() -> None:
    """Let the engine's tasks (exit watchers) start before the test goes on."""
    await trio.testing.wait_all_tasks_blocked()


def count_checks(engine: Engine) -> list[Entry]:
    """Record every periodic quota check from now on."""
    checked: list[Entry] = []
    original = engine.check

    def check(entry: Entry) -> None:
        checked.append(entry)
        original(entry)

    engine.check = check  # type: ignore[method-assign]
    return checked


async def wait_checks(engine_checks: list[Entry], more: int) -> None:
    """Wait until `more` further periodic checks have run."""
    target = len(engine_checks) + more
    await wait_for(lambda: len(engine_checks) >= target)


def send(workload, *words: object) -> None:
    """Send a command without waiting for the answer (the process may die on it)."""
    workload.proc.stdin.write(" ".join(map(str, words)) + "\n")
    workload.proc.stdin.flush()


async def wait_dead(workload) -> int:
    await wait_for(lambda: not workload.alive())
    return workload.wait()


def engine_at(tmp_path: Path, name: str = "s.json", interval: float = INTERVAL):
    return open_engine(state_path=tmp_path / name, interval=interval)


def saved_records(path: Path) -> list[dict]:
    return state.load(path)


# ----- measurement ----------------------------------------------------------------------


async def test_heapsize_counts_mmap_exactly(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        assert entry.pid == w.pid
        assert [e.pid for e in engine.entries()] == [w.pid]
        assert engine.get(w.pid) is entry
        first = engine.measure(entry)
        assert first.heapsize == 0
        assert first.heap_total == vm_data(w.pid)

        w.do("mmap", 20 * MiB)
        now = engine.measure(entry)
        assert abs(now.heapsize - 20 * MiB) <= PAGE
        assert now.heap_total == vm_data(w.pid)
        assert now.heap_total - entry.heap_base == now.heapsize

        w.do("mmap", 3 * MiB)
        assert abs(engine.measure(entry).heapsize - 23 * MiB) <= PAGE
        w.do("munmap")
        assert abs(engine.measure(entry).heapsize - 20 * MiB) <= PAGE


async def test_heapsize_counts_sbrk(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        before = engine.measure(entry).heapsize
        w.do("sbrk", 4 * MiB)
        grown = engine.measure(entry).heapsize - before
        assert abs(grown - 4 * MiB) <= PAGE
        w.do("sbrk", 2 * MiB)
        assert abs(engine.measure(entry).heapsize - before - 6 * MiB) <= PAGE


async def test_openfile_count_follows_open_and_close(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        assert engine.measure(entry).openfile_count == 0
        assert w.do("open", 3) == "ok 3"
        m = engine.measure(entry)
        assert m.openfile_count == 3
        assert m.openfile_total == len(os.listdir(f"/proc/{w.pid}/fd"))
        w.do("close", 2)
        assert engine.measure(entry).openfile_count == 1
        w.do("close", 1)
        assert engine.measure(entry).openfile_count == 0


async def test_usage_is_floored_at_zero(spawn, tmp_path):
    """Memory and files that existed before registration may go: never negative."""
    w = spawn()
    w.do("mmap", 20 * MiB)
    w.do("open", 4)
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        w.do("munmap")
        w.do("close", 4)
        m = engine.measure(entry)
        assert m.heapsize == 0
        assert m.openfile_count == 0
        assert m.heap_total == vm_data(w.pid)
        assert m.heap_total <= entry.heap_base - 20 * MiB + PAGE
        # growth from the lower level still only counts above the baseline
        w.do("mmap", 12 * MiB)
        assert engine.measure(entry).heapsize == 0
        w.do("mmap", 10 * MiB)
        assert abs(engine.measure(entry).heapsize - 2 * MiB) <= PAGE


async def test_thread_stack_counts_as_heap(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        w.thread()
        assert engine.measure(entry).heapsize >= 8 * MiB  # glibc's default stack


# ----- registration ---------------------------------------------------------------------


async def test_register_thread_gives_its_thread_group(spawn, tmp_path):
    w = spawn()
    tid = w.thread()
    assert tid != w.pid
    async with engine_at(tmp_path) as engine:
        entry = engine.register(tid, ROOT)
        await settle()
        assert entry.pid == w.pid
        assert engine.get(w.pid) is entry
        assert engine.get(tid) is None
        assert [e.pid for e in engine.entries()] == [w.pid]
        assert saved_records(tmp_path / "s.json")[0]["pid"] == w.pid
        for again in (w.pid, tid):
            with pytest.raises(AlreadyTracked) as info:
                engine.register(again, ROOT)
            assert info.value.errno == errno.EEXIST
        assert list(engine.entries()) == [entry]


@pytest.fixture
def zombie():
    """A child that was killed and is not waited for: state Z until the test ends."""
    child = subprocess.Popen(["sleep", "100"])
    os.kill(child.pid, signal.SIGKILL)
    try:
        yield child.pid
    finally:
        child.wait()


async def test_register_zombie_is_esrch(zombie, tmp_path):
    await wait_for(lambda: proc_state(zombie) == "Z")
    async with engine_at(tmp_path) as engine:
        with pytest.raises(NoSuchProcess) as info:
            engine.register(zombie, ROOT)
        assert info.value.errno == errno.ESRCH
        assert list(engine.entries()) == []
        assert proc_state(zombie) == "Z"  # still unreaped: the test was meaningful


def pid_max() -> int:
    with open("/proc/sys/kernel/pid_max") as file:
        return int(file.read())


@pytest.mark.parametrize(
    ("pid", "error", "code"),
    [
        (0, InvalidArgument, errno.EINVAL),
        (-1, InvalidArgument, errno.EINVAL),
        (-4242, InvalidArgument, errno.EINVAL),
        (None, NoSuchProcess, errno.ESRCH),  # pid_max: never a pid
        (2**31, NoSuchProcess, errno.ESRCH),
        (10**300, NoSuchProcess, errno.ESRCH),
    ],
)
async def test_register_bad_pid(pid, error, code, tmp_path):
    pid = pid_max() if pid is None else pid
    async with engine_at(tmp_path) as engine:
        with pytest.raises(error) as info:
            engine.register(pid, ROOT)
        assert info.value.errno == code
        assert list(engine.entries()) == []


@pytest.mark.parametrize(
    ("pid", "error", "code"),
    [(0, InvalidArgument, errno.EINVAL), (-1, InvalidArgument, errno.EINVAL)],
)
async def test_deregister_bad_pid(pid, error, code, tmp_path):
    async with engine_at(tmp_path) as engine:
        with pytest.raises(error) as info:
            engine.deregister(pid, ROOT)
        assert info.value.errno == code


async def test_deregister_untracked_is_esrch(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        with pytest.raises(NotTracked) as info:
            engine.deregister(w.pid, ROOT)
        assert info.value.errno == errno.ESRCH


async def test_deregister_removes_and_allows_registering_again(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        removed: list[Entry] = []
        engine.on_removal(removed.append)
        first = engine.register(w.pid, ROOT)
        await settle()
        engine.deregister(w.pid, ROOT)
        assert removed == [first]
        assert list(engine.entries()) == []
        assert saved_records(tmp_path / "s.json") == []
        # the old entry now answers "deregistered", not "exited"
        with pytest.raises(Deregistered) as info:
            engine.measure(first)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(Deregistered):
            engine.set_quota(first, Quota(files=1), ROOT)
        second = engine.register(w.pid, ROOT)
        await settle()
        assert second is not first
        assert second.serial != first.serial
        assert engine.get(w.pid) is second


# ----- exit -----------------------------------------------------------------------------


async def test_exit_removes_entry_promptly(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        removed: list[Entry] = []
        engine.on_removal(removed.append)
        entry = engine.register(w.pid, ROOT)
        await settle()
        w.proc.kill()  # not waited for: a zombie must count as gone too
        start = trio.current_time()
        await wait_for(lambda: engine.get(w.pid) is None)
        assert trio.current_time() - start < 0.1  # within 100 ms
        assert list(engine.entries()) == []
        assert removed == [entry]
        assert entry.ended == "exited"
        with pytest.raises(NoSuchProcess) as info:
            engine.measure(entry)
        assert info.value.errno == errno.ESRCH
        await wait_for(lambda: saved_records(tmp_path / "s.json") == [])
        await trio.sleep(10 * INTERVAL)  # nothing else may call the listener later
        assert removed == [entry]


async def test_exit_of_one_leaves_the_others(spawn, tmp_path):
    a, b = spawn(), spawn()
    async with engine_at(tmp_path) as engine:
        removed: list[Entry] = []
        engine.on_removal(removed.append)
        engine.register(a.pid, ROOT)
        kept = engine.register(b.pid, ROOT)
        await settle()
        send(a, "exit")
        await wait_dead(a)
        await wait_for(lambda: engine.get(a.pid) is None)
        assert [e.pid for e in removed] == [a.pid]
        assert list(engine.entries()) == [kept]
        b.do("open", 1)
        assert engine.measure(kept).openfile_count == 1


# ----- kill -----------------------------------------------------------------------------


async def test_kill_on_files_quota(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        engine.set_quota(entry, Quota(files=2), ROOT)
        assert w.do("open", 2) == "ok 2"  # at the quota: allowed
        checks = count_checks(engine)
        await wait_checks(checks, 3)
        assert w.alive()
        assert engine.enforcements[Action.KILL] == 0
        send(w, "open", 1)
        assert await wait_dead(w) == -signal.SIGKILL
        assert engine.enforcements[Action.KILL] == 1
        await wait_for(lambda: engine.get(w.pid) is None)
        assert engine.enforcements[Action.KILL] == 1


async def test_kill_on_heap_quota(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        engine.set_quota(entry, Quota(heap=10 * MiB), ROOT)
        w.do("mmap", 8 * MiB)
        checks = count_checks(engine)
        await wait_checks(checks, 3)
        assert w.alive()
        send(w, "mmap", 4 * MiB)
        assert await wait_dead(w) == -signal.SIGKILL
        assert engine.enforcements[Action.KILL] == 1
        assert engine.enforcements[Action.DENY] == engine.enforcements[Action.NOTIFY] == 0


async def test_quota_already_exceeded_kills_at_once(spawn, tmp_path):
    w = spawn()
    # an hour between periodic checks: only set_quota itself can act
    async with engine_at(tmp_path, interval=3600) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        w.do("open", 3)
        engine.set_quota(entry, Quota(files=2), ROOT)
        assert engine.enforcements[Action.KILL] == 1
        assert await wait_dead(w) == -signal.SIGKILL


async def test_measure_enforces_between_checks(spawn, tmp_path):
    """A read that sees the breach acts on it, even before the periodic check."""
    w = spawn()
    async with engine_at(tmp_path, interval=3600) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        engine.set_quota(entry, Quota(heap=MiB), ROOT)
        w.do("mmap", 2 * MiB)
        assert w.alive()
        engine.measure(entry)
        assert engine.enforcements[Action.KILL] == 1
        assert await wait_dead(w) == -signal.SIGKILL


# ----- notify ---------------------------------------------------------------------------


async def test_notify_counts_once_per_episode(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        engine.set_quota(entry, Quota(files=2, action=Action.NOTIFY), ROOT)
        checks = count_checks(engine)
        w.do("open", 3)
        await wait_for(lambda: engine.enforcements[Action.NOTIFY] == 1)
        await wait_checks(checks, 10)
        for _ in range(5):
            engine.measure(entry)  # reads do not count again either
        assert engine.enforcements[Action.NOTIFY] == 1
        assert w.alive()
        assert engine.enforcements[Action.KILL] == engine.enforcements[Action.DENY] == 0

        # back under the quota: the episode ends; breaking it again is a new one
        w.do("close", 1)
        await wait_checks(checks, 2)
        assert engine.enforcements[Action.NOTIFY] == 1
        w.do("open", 1)
        await wait_for(lambda: engine.enforcements[Action.NOTIFY] == 2)
        await wait_checks(checks, 5)
        assert engine.enforcements[Action.NOTIFY] == 2
        assert w.alive()


async def test_notify_heap_and_files_each_count(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        engine.set_quota(entry, Quota(heap=MiB, files=1, action=Action.NOTIFY), ROOT)
        checks = count_checks(engine)
        w.do("mmap", 2 * MiB)
        await wait_for(lambda: engine.enforcements[Action.NOTIFY] == 1)
        w.do("open", 2)
        await wait_for(lambda: engine.enforcements[Action.NOTIFY] == 2)
        await wait_checks(checks, 5)
        assert engine.enforcements[Action.NOTIFY] == 2
        assert w.alive()
        m = engine.measure(entry)
        assert m.heapsize > MiB and m.openfile_count == 2


# ----- deny -----------------------------------------------------------------------------


@pytest.mark.parametrize("owner", OWNERS)
async def test_deny_heap(spawn, tmp_path, owner):
    w = spawn(uid=owner)
    original = data_soft(w.pid)
    baseline = vm_data(w.pid)
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        assert entry.heap_base == baseline
        engine.set_quota(entry, Quota(heap=10 * MiB, action=Action.DENY), ROOT)
        assert data_soft(w.pid) == baseline + 10 * MiB
        assert w.ask("mmap", 20 * MiB) == f"err {errno.ENOMEM}"
        assert w.do("mmap", 5 * MiB) == "ok"
        assert w.ask("mmap", 6 * MiB) == f"err {errno.ENOMEM}"
        assert w.alive()
        assert engine.measure(entry).heapsize <= 10 * MiB
        assert engine.enforcements[Action.KILL] == 0

        # a usage reset recomputes the limit from the new baseline
        engine.reset(entry, quota=False, usage=True, caller_uid=ROOT)
        assert data_soft(w.pid) == vm_data(w.pid) + 10 * MiB
        assert w.do("mmap", 8 * MiB) == "ok"

        # a quota reset gives the original soft limit back
        engine.reset(entry, quota=True, usage=False, caller_uid=ROOT)
        assert data_soft(w.pid) == original
        assert w.do("mmap", 20 * MiB) == "ok"


@pytest.mark.parametrize("owner", OWNERS)
async def test_deny_files(spawn, tmp_path, owner):
    w = spawn(uid=owner)
    original = nofile_soft(w.pid)
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        engine.set_quota(entry, Quota(files=3, action=Action.DENY), ROOT)
        lowered = nofile_soft(w.pid)
        assert lowered < original
        assert w.do("open", 5) == f"ok 3 {errno.EMFILE}"
        assert engine.measure(entry).openfile_count == 3
        assert w.alive()

        # the process takes its soft limit back up: the check lowers it again, once
        checks = count_checks(engine)
        w.do("setrlimit", "nofile", -1)
        await wait_for(lambda: nofile_soft(w.pid) == lowered)
        assert engine.enforcements[Action.DENY] == 1
        assert w.do("open", 1) == f"ok 0 {errno.EMFILE}"
        await wait_checks(checks, 5)
        assert engine.enforcements[Action.DENY] == 1
        assert nofile_soft(w.pid) == lowered

        # closing makes room again, up to the quota
        w.do("close", 2)
        await wait_checks(checks, 2)
        assert w.do("open", 5) == f"ok 2 {errno.EMFILE}"
        assert engine.enforcements[Action.KILL] == 0
        assert engine.enforcements[Action.DENY] == 1  # lowering after a close is no breach

        # a usage reset gives 3 more from here
        engine.reset(entry, quota=False, usage=True, caller_uid=ROOT)
        assert w.do("open", 5) == f"ok 3 {errno.EMFILE}"

        engine.reset(entry, quota=True, usage=False, caller_uid=ROOT)
        assert nofile_soft(w.pid) == original
        assert w.do("open", 5) == "ok 5"


@pytest.mark.parametrize("owner", OWNERS)
async def test_deny_limits_restored_by_deregister(spawn, tmp_path, owner):
    w = spawn(uid=owner)
    original = (data_soft(w.pid), nofile_soft(w.pid))
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        engine.set_quota(entry, Quota(heap=MiB, files=1, action=Action.DENY), ROOT)
        assert (data_soft(w.pid), nofile_soft(w.pid)) != original
        engine.deregister(w.pid, ROOT)
        assert (data_soft(w.pid), nofile_soft(w.pid)) == original


@pytest.mark.parametrize("owner", OWNERS)
async def test_deny_limits_kept_at_shutdown_and_at_start(spawn, tmp_path, owner):
    w = spawn(uid=owner)
    original = (data_soft(w.pid), nofile_soft(w.pid))
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        engine.set_quota(entry, Quota(heap=2 * MiB, files=2, action=Action.DENY), ROOT)
        applied = (data_soft(w.pid), nofile_soft(w.pid))
        assert applied[0] == entry.heap_base + 2 * MiB
    assert (data_soft(w.pid), nofile_soft(w.pid)) == applied  # no gap while none runs
    async with engine_at(tmp_path) as engine:
        assert engine.get(w.pid) is not None
        await settle()
        assert (data_soft(w.pid), nofile_soft(w.pid)) == applied
        assert w.ask("mmap", 4 * MiB) == f"err {errno.ENOMEM}"
        assert engine.release_all() == 1
        assert (data_soft(w.pid), nofile_soft(w.pid)) == original


async def test_deny_keeps_a_lower_limit_of_the_process(spawn, tmp_path):
    """Deny mode only ever lowers: a soft limit already below the quota stays."""
    w = spawn()
    w.do("setrlimit", "nofile", 5)
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        engine.set_quota(entry, Quota(files=100, action=Action.DENY), ROOT)
        assert nofile_soft(w.pid) == 5
        engine.reset(entry, quota=True, usage=False, caller_uid=ROOT)
        assert nofile_soft(w.pid) == 5


# ----- permissions ----------------------------------------------------------------------


async def test_unprivileged_cannot_register_root_process(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        before = (tmp_path / "s.json").read_bytes()
        with pytest.raises(NotPermitted) as info:
            engine.register(w.pid, NOBODY)
        assert info.value.errno == errno.EPERM
        assert list(engine.entries()) == []
        assert (tmp_path / "s.json").read_bytes() == before


async def test_owner_controls_its_own_process(spawn, tmp_path):
    w = spawn(uid=NOBODY)
    async with engine_at(tmp_path) as engine:
        with pytest.raises(NotPermitted):
            engine.register(w.pid, OTHER_USER)
        entry = engine.register(w.pid, NOBODY)
        await settle()
        assert entry.owner_uid == NOBODY
        with pytest.raises(NotPermitted):
            engine.set_quota(entry, Quota(files=5), OTHER_USER)
        assert entry.quota is None
        engine.set_quota(entry, Quota(files=5), NOBODY)
        with pytest.raises(NotPermitted):
            engine.reset(entry, quota=True, usage=True, caller_uid=OTHER_USER)
        with pytest.raises(NotPermitted):
            engine.deregister(w.pid, OTHER_USER)
        # a quota the owner set, the owner may lift
        engine.reset(entry, quota=True, usage=True, caller_uid=NOBODY)
        assert entry.quota is None
        engine.set_quota(entry, Quota(files=5), NOBODY)
        engine.deregister(w.pid, NOBODY)
        assert engine.get(w.pid) is None


@pytest.mark.parametrize(
    ("quota", "usage"), [(True, True), (True, False), (False, True)], ids=["all", "quota", "usage"]
)
async def test_root_quota_binds_the_owner(spawn, tmp_path, quota, usage):
    w = spawn(uid=NOBODY)
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, NOBODY)
        await settle()
        engine.set_quota(entry, Quota(heap=100 * MiB, files=50), ROOT)
        w.do("open", 2)
        state_before = (tmp_path / "s.json").read_bytes()
        with pytest.raises(NotPermitted) as info:
            engine.reset(entry, quota=quota, usage=usage, caller_uid=NOBODY)
        assert info.value.errno == errno.EPERM
        with pytest.raises(NotPermitted):
            engine.deregister(w.pid, NOBODY)
        # nothing changed
        assert entry.quota == Quota(heap=100 * MiB, files=50)
        assert engine.measure(entry).openfile_count == 2
        assert engine.get(w.pid) is entry
        assert (tmp_path / "s.json").read_bytes() == state_before
        # root may
        engine.reset(entry, quota=quota, usage=usage, caller_uid=ROOT)
        assert (entry.quota is None) == quota
        assert engine.measure(entry).openfile_count == (0 if usage else 2)
        engine.deregister(w.pid, ROOT)
        assert engine.get(w.pid) is None


# ----- quota busy -----------------------------------------------------------------------


async def test_second_quota_is_ebusy_until_reset(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        engine.set_quota(entry, Quota(), ROOT)  # heap=max files=max defines a quota too
        with pytest.raises(QuotaBusy) as info:
            engine.set_quota(entry, Quota(files=1), ROOT)
        assert info.value.errno == errno.EBUSY
        assert entry.quota == Quota()

        # a usage reset does not free the quota
        engine.reset(entry, quota=False, usage=True, caller_uid=ROOT)
        with pytest.raises(QuotaBusy):
            engine.set_quota(entry, Quota(files=1), ROOT)

        engine.reset(entry, quota=True, usage=False, caller_uid=ROOT)
        engine.set_quota(entry, Quota(files=7, action=Action.NOTIFY), ROOT)
        assert entry.quota == Quota(files=7, action=Action.NOTIFY)
        assert engine.measure(entry).quota == Quota(files=7, action=Action.NOTIFY)


async def test_rejected_calls_change_nothing(spawn, tmp_path):
    w, other = spawn(), spawn(uid=NOBODY)
    path = tmp_path / "s.json"
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        engine.set_quota(entry, Quota(heap=50 * MiB, files=20, action=Action.NOTIFY), ROOT)
        w.do("open", 2)
        snapshot = (
            path.read_bytes(),
            list(engine.entries()),
            entry.quota,
            entry.quota_uid,
            entry.heap_base,
            entry.files_base,
            dict(engine.enforcements),
        )

        def unchanged() -> bool:
            return snapshot == (
                path.read_bytes(),
                list(engine.entries()),
                entry.quota,
                entry.quota_uid,
                entry.heap_base,
                entry.files_base,
                dict(engine.enforcements),
            )

        with pytest.raises(QuotaBusy):
            engine.set_quota(entry, Quota(files=1, action=Action.KILL), ROOT)
        assert unchanged()
        with pytest.raises(NotPermitted):
            engine.set_quota(entry, Quota(files=1), NOBODY)
        assert unchanged()
        with pytest.raises(NotPermitted):
            engine.reset(entry, quota=True, usage=True, caller_uid=NOBODY)
        assert unchanged()
        with pytest.raises(AlreadyTracked):
            engine.register(w.pid, ROOT)
        assert unchanged()
        with pytest.raises((AlreadyTracked, NotPermitted)):
            engine.register(w.pid, NOBODY)  # tracked already, and not theirs
        assert unchanged()
        with pytest.raises(NotPermitted):
            engine.register(other.pid, OTHER_USER)
        assert unchanged()
        with pytest.raises(NotPermitted):
            engine.deregister(w.pid, NOBODY)
        assert unchanged()
        with pytest.raises(NotTracked):
            engine.deregister(other.pid, ROOT)
        assert unchanged()
        assert engine.measure(entry).openfile_count == 2
        assert w.alive()


# ----- state ----------------------------------------------------------------------------


async def test_state_resumes_entries_with_their_counters(spawn, tmp_path):
    w = spawn(uid=NOBODY)
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, NOBODY)
        await settle()
        engine.set_quota(entry, Quota(heap=100 * MiB, files=50, action=Action.NOTIFY), ROOT)
        w.do("mmap", 4 * MiB)
        w.do("open", 1)
        saved = (entry.heap_base, entry.files_base, entry.quota, entry.registered)
    w.do("mmap", 20 * MiB)  # while no engine runs
    w.do("open", 2)
    async with engine_at(tmp_path) as engine:
        back = engine.get(w.pid)
        assert back is not None
        await settle()
        assert (back.heap_base, back.files_base, back.quota, back.registered) == saved
        assert back.quota_uid == ROOT
        assert back.owner_uid == NOBODY
        m = engine.measure(back)
        assert abs(m.heapsize - 24 * MiB) <= PAGE
        assert m.openfile_count == 3
        # the root-set quota still binds the owner after the restart
        with pytest.raises(NotPermitted):
            engine.reset(back, quota=True, usage=True, caller_uid=NOBODY)
        with pytest.raises(QuotaBusy):
            engine.set_quota(back, Quota(files=1), ROOT)
        # and the resumed entry is watched: exit removes it
        w.proc.kill()
        await wait_for(lambda: engine.get(w.pid) is None)
        await wait_for(lambda: saved_records(tmp_path / "s.json") == [])


async def test_state_resumed_quota_is_enforced(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        engine.set_quota(entry, Quota(files=2), ROOT)
    w.do("open", 3)  # over the quota while no engine runs
    async with engine_at(tmp_path) as engine:
        assert await wait_dead(w) == -signal.SIGKILL
        assert engine.enforcements[Action.KILL] == 1


async def test_state_drops_recycled_pid(spawn, tmp_path):
    w, kept = spawn(), spawn()
    path = tmp_path / "s.json"
    async with engine_at(tmp_path) as engine:
        engine.register(w.pid, ROOT)
        engine.register(kept.pid, ROOT)
        await settle()
    records = state.load(path)
    for record in records:
        if record["pid"] == w.pid:
            assert record["start_time"] == start_time(w.pid)
            record["start_time"] += 1  # another process that had the same pid
    state.Journal(path).rewrite(records)
    async with engine_at(tmp_path) as engine:
        assert [e.pid for e in engine.entries()] == [kept.pid]
        await settle()
        assert [r["pid"] for r in saved_records(path)] == [kept.pid]


async def test_state_drops_dead_pid(spawn, tmp_path):
    w, kept = spawn(), spawn()
    path = tmp_path / "s.json"
    async with engine_at(tmp_path) as engine:
        engine.register(w.pid, ROOT)
        engine.register(kept.pid, ROOT)
        await settle()
    w.stop()  # killed and reaped
    async with engine_at(tmp_path) as engine:
        assert [e.pid for e in engine.entries()] == [kept.pid]
        await settle()
        assert [r["pid"] for r in saved_records(path)] == [kept.pid]


async def test_state_records_identity_and_quota(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        engine.set_quota(entry, Quota(heap=3 * MiB, files=4, action=Action.NOTIFY), ROOT)
        (record,) = saved_records(tmp_path / "s.json")
        assert record["pid"] == w.pid
        assert record["start_time"] == start_time(w.pid)
        assert record["heap_base"] == entry.heap_base
        assert record["files_base"] == entry.files_base
        assert record["quota"] == {"heap": 3 * MiB, "files": 4, "action": "notify"}
        assert record["quota_uid"] == ROOT
        assert (tmp_path / "s.json").stat().st_mode & 0o077 == 0


# ----- state file cannot be written -----------------------------------------------------


def break_state_dir(state_dir: Path) -> None:
    """Replace the state file's directory with a plain file: every save fails."""
    for child in state_dir.iterdir():
        child.unlink()
    state_dir.rmdir()
    state_dir.write_text("not a directory\n")


def state_is_a_directory(state_dir: Path) -> None:
    (state_dir / "s.json").unlink()
    (state_dir / "s.json").mkdir()


@pytest.mark.parametrize("breaker", [break_state_dir, state_is_a_directory])
async def test_unsaved_state_rejects_register(spawn, tmp_path, breaker):
    w = spawn()
    state_dir = tmp_path / "state"
    removed: list[Entry] = []
    async with open_engine(state_path=state_dir / "s.json", interval=INTERVAL) as engine:
        engine.on_removal(removed.append)
        breaker(state_dir)
        with pytest.raises(OSError) as info:
            engine.register(w.pid, ROOT)
        assert info.value.errno not in (None, 0)
        assert list(engine.entries()) == []
        assert engine.get(w.pid) is None
        await settle()  # the engine keeps running after the failure
        assert removed == []  # nobody is told about an entry that never was


async def test_unsaved_state_rejects_quota_and_deregister(spawn, tmp_path):
    w = spawn()
    state_dir = tmp_path / "state"
    async with open_engine(state_path=state_dir / "s.json", interval=INTERVAL) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        original = nofile_soft(w.pid)
        state_is_a_directory(state_dir)
        with pytest.raises(OSError) as info:
            engine.set_quota(entry, Quota(files=1, action=Action.DENY), ROOT)
        assert info.value.errno not in (None, 0)
        assert entry.quota is None
        assert nofile_soft(w.pid) == original  # the limit lowered on the way is given back
        with pytest.raises(OSError):
            engine.deregister(w.pid, ROOT)
        assert engine.get(w.pid) is entry
        w.do("open", 2)
        assert engine.measure(entry).openfile_count == 2
        # repaired: everything works again
        (state_dir / "s.json").rmdir()
        engine.set_quota(entry, Quota(files=10), ROOT)
        assert saved_records(state_dir / "s.json")[0]["quota"]["files"] == 10


async def test_engine_survives_register_rolled_back_by_state_save(spawn, tmp_path):
    w = spawn()
    state_dir = tmp_path / "state"
    async with open_engine(state_path=state_dir / "s.json", interval=INTERVAL) as engine:
        state_is_a_directory(state_dir)
        with pytest.raises(OSError):
            engine.register(w.pid, ROOT)
        await settle()  # the engine keeps serving
        (state_dir / "s.json").rmdir()
        entry = engine.register(w.pid, ROOT)
        await settle()
        assert engine.measure(entry).openfile_count == 0


async def test_deregister_right_after_register(spawn, tmp_path):
    """No checkpoint between the two: the exit watcher has not started yet."""
    w = spawn()
    async with engine_at(tmp_path) as engine:
        engine.register(w.pid, ROOT)
        engine.deregister(w.pid, ROOT)
        await settle()
        assert list(engine.entries()) == []


# ----- known bugs -----------------------------------------------------------------------


async def test_shutdown_right_after_register(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        engine.register(w.pid, ROOT)
    async with engine_at(tmp_path) as engine:  # resumed entry, engine left at once
        assert engine.get(w.pid) is not None


async def test_quota_reset_then_restart_leaves_process_limits_alone(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, ROOT)
        await settle()
        engine.set_quota(entry, Quota(files=3, action=Action.DENY), ROOT)
        engine.reset(entry, quota=True, usage=False, caller_uid=ROOT)
    w.do("setrlimit", "nofile", 100)  # the process's own choice, no quota in force
    async with engine_at(tmp_path) as engine:
        assert engine.get(w.pid) is not None
        await settle()
    assert nofile_soft(w.pid) == 100


async def test_state_with_a_malformed_record_is_dropped(spawn, tmp_path):
    w = spawn()
    path = tmp_path / "s.json"
    async with engine_at(tmp_path) as engine:
        engine.register(w.pid, ROOT)
        await settle()
    with open(path, "ab") as journal:  # lines no engine could have written
        journal.write(b'42\n{"put": 42}\n{"put": {"pid": "x"}}\n{"drop"\n')
    async with engine_at(tmp_path) as engine:
        assert [e.pid for e in engine.entries()] == [w.pid]
        await settle()
