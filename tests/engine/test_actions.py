"""The engine acts on a crossed quota: kill, notify, deny (real rlimits)."""

from __future__ import annotations

import errno
import signal

import pytest

from tests.support.engine import (
    ROOT,
    count_checks,
    engine_at,
    registered,
    send,
    settle,
    wait_checks,
    wait_dead,
    wait_for,
)
from tests.support.procs import MiB, data_soft, nofile_soft, proc_vm_data
from tests.support.users import NOBODY
from tracker.quota import Action, Quota, Reset

# Deny mode must work whether or not the daemon shares the target's uid: root
# here lacks CAP_SYS_RESOURCE, so a nobody-owned process is the hard case.
OWNERS = [pytest.param(None, id="root-owned"), pytest.param(NOBODY, id="nobody-owned")]


# ----- kill -----------------------------------------------------------------------------


async def test_kill_on_files_quota(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        await registered(engine, w.pid, Quota(files=2))
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
        await registered(engine, w.pid, Quota(heap=10 * MiB))
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
        entry = await registered(engine, w.pid)
        w.do("open", 3)
        await engine.set_quota(entry, Quota(files=2), ROOT)
        assert engine.enforcements[Action.KILL] == 1
        assert await wait_dead(w) == -signal.SIGKILL


async def test_measure_enforces_between_checks(spawn, tmp_path):
    """A read that sees the breach acts on it, even before the periodic check."""
    w = spawn()
    async with engine_at(tmp_path, interval=3600) as engine:
        entry = await registered(engine, w.pid, Quota(heap=MiB))
        w.do("mmap", 2 * MiB)
        assert w.alive()
        engine.reader.measure(entry)
        assert engine.enforcements[Action.KILL] == 1
        assert await wait_dead(w) == -signal.SIGKILL


# ----- notify ---------------------------------------------------------------------------


async def test_notify_counts_once_per_episode(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = await registered(engine, w.pid, Quota(files=2, action=Action.NOTIFY))
        checks = count_checks(engine)
        w.do("open", 3)
        await wait_for(lambda: engine.enforcements[Action.NOTIFY] == 1)
        await wait_checks(checks, 10)
        for _ in range(5):
            engine.reader.measure(entry)  # reads do not count again either
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
        entry = await registered(engine, w.pid, Quota(heap=MiB, files=1, action=Action.NOTIFY))
        checks = count_checks(engine)
        w.do("mmap", 2 * MiB)
        await wait_for(lambda: engine.enforcements[Action.NOTIFY] == 1)
        w.do("open", 2)
        await wait_for(lambda: engine.enforcements[Action.NOTIFY] == 2)
        await wait_checks(checks, 5)
        assert engine.enforcements[Action.NOTIFY] == 2
        assert w.alive()
        m = engine.reader.measure(entry)
        assert m.heapsize > MiB and m.openfile_count == 2


# ----- deny -----------------------------------------------------------------------------


@pytest.mark.parametrize("owner", OWNERS)
async def test_deny_heap(spawn, tmp_path, owner):
    w = spawn(uid=owner)
    original = data_soft(w.pid)
    baseline = proc_vm_data(w.pid)
    async with engine_at(tmp_path) as engine:
        entry = await registered(engine, w.pid)
        assert entry.heap_base == baseline
        await engine.set_quota(entry, Quota(heap=10 * MiB, action=Action.DENY), ROOT)
        assert data_soft(w.pid) == baseline + 10 * MiB
        assert w.ask("mmap", 20 * MiB) == f"err {errno.ENOMEM}"
        assert w.do("mmap", 5 * MiB) == "ok"
        assert w.ask("mmap", 6 * MiB) == f"err {errno.ENOMEM}"
        assert w.alive()
        assert engine.reader.measure(entry).heapsize <= 10 * MiB
        assert engine.enforcements[Action.KILL] == 0

        # a usage reset recomputes the limit from the new baseline
        await engine.reset(entry, Reset.USAGE, ROOT)
        assert data_soft(w.pid) == proc_vm_data(w.pid) + 10 * MiB
        assert w.do("mmap", 8 * MiB) == "ok"

        # a quota reset gives the original soft limit back
        await engine.reset(entry, Reset.QUOTA, ROOT)
        assert data_soft(w.pid) == original
        assert w.do("mmap", 20 * MiB) == "ok"


@pytest.mark.parametrize("owner", OWNERS)
async def test_deny_files(spawn, tmp_path, owner):
    w = spawn(uid=owner)
    original = nofile_soft(w.pid)
    async with engine_at(tmp_path) as engine:
        entry = await registered(engine, w.pid, Quota(files=3, action=Action.DENY))
        lowered = nofile_soft(w.pid)
        assert lowered < original
        assert w.do("open", 5) == f"ok 3 {errno.EMFILE}"
        assert engine.reader.measure(entry).openfile_count == 3
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
        await engine.reset(entry, Reset.USAGE, ROOT)
        assert w.do("open", 5) == f"ok 3 {errno.EMFILE}"

        await engine.reset(entry, Reset.QUOTA, ROOT)
        assert nofile_soft(w.pid) == original
        assert w.do("open", 5) == "ok 5"


@pytest.mark.parametrize("owner", OWNERS)
async def test_deny_limits_restored_by_deregister(spawn, tmp_path, owner):
    w = spawn(uid=owner)
    original = (data_soft(w.pid), nofile_soft(w.pid))
    async with engine_at(tmp_path) as engine:
        await registered(engine, w.pid, Quota(heap=MiB, files=1, action=Action.DENY))
        assert (data_soft(w.pid), nofile_soft(w.pid)) != original
        await engine.deregister(w.pid, ROOT)
        assert (data_soft(w.pid), nofile_soft(w.pid)) == original


@pytest.mark.parametrize("owner", OWNERS)
async def test_deny_limits_kept_at_shutdown_and_at_start(spawn, tmp_path, owner):
    w = spawn(uid=owner)
    original = (data_soft(w.pid), nofile_soft(w.pid))
    async with engine_at(tmp_path) as engine:
        entry = await registered(engine, w.pid, Quota(heap=2 * MiB, files=2, action=Action.DENY))
        applied = (data_soft(w.pid), nofile_soft(w.pid))
        assert applied[0] == entry.heap_base + 2 * MiB
    assert (data_soft(w.pid), nofile_soft(w.pid)) == applied  # no gap while none runs
    async with engine_at(tmp_path) as engine:
        assert engine.get(w.pid) is not None
        await settle()
        assert (data_soft(w.pid), nofile_soft(w.pid)) == applied
        assert w.ask("mmap", 4 * MiB) == f"err {errno.ENOMEM}"
        assert await engine.release_all() == 1
        assert (data_soft(w.pid), nofile_soft(w.pid)) == original


async def test_deny_keeps_a_lower_limit_of_the_process(spawn, tmp_path):
    """Deny mode only ever lowers: a soft limit already below the quota stays."""
    w = spawn()
    w.do("setrlimit", "nofile", 5)
    async with engine_at(tmp_path) as engine:
        entry = await registered(engine, w.pid, Quota(files=100, action=Action.DENY))
        assert nofile_soft(w.pid) == 5
        await engine.reset(entry, Reset.QUOTA, ROOT)
        assert nofile_soft(w.pid) == 5
