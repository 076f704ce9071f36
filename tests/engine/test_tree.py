"""Tree quotas under both engines: one quota over a process and everything it
starts (real processes: a shell as the root, c/fanout.c as its job). Under procfs
the engine finds the members in /proc; under bpf the kernel adds them at their
fork and kills the crossing member in its call, the engine the rest."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from tests.support.bpf import needs_bpf
from tests.support.engine import (
    count_checks,
    engine_at,
    registered,
    saved_records,
    wait_checks,
    wait_for,
)
from tests.support.procs import MiB
from tests.support.tree import is_dead
from tracker.backends.bpf.backend import release_pins
from tracker.engine import state
from tracker.engine.engine import Engine
from tracker.engine.entry import Entry
from tracker.linux import procfs
from tracker.quota import Action, Quota, Scope
from tracker.vocabulary import KILLED, NOTIFIED

STEP = 2 * MiB


@pytest.fixture(params=["procfs", pytest.param("bpf", marks=needs_bpf)])
def kind(request, tmp_path) -> Iterator[str]:
    """The engine: every scenario runs under both; the pins a bpf engine left go."""
    yield request.param
    if request.param == "bpf":
        release_pins(tmp_path / "s.json")


def members(engine: Engine, entry: Entry) -> list[int]:
    """The tree's members as a read of its files finds them (root first)."""
    assert entry.tree is not None
    engine.reader.tree(entry)
    return entry.tree.pids()


async def quiet(engine: Engine, kind: str, entry: Entry) -> None:
    """Let the engine look again: five periodic checks (procfs), or the kernel's
    events handled and the tree read three times (bpf, where nothing polls)."""
    if kind == "procfs":
        await wait_checks(count_checks(engine), 5)
        return
    engine.backend.flush()
    for _ in range(3):
        engine.reader.tree(entry)


async def children_of(root, n: int) -> list[int]:
    """The pids of the first `n` children that reported a step."""
    pids: list[int] = []
    while len(pids) < n:
        pid = int((await root.line("child"))[1])
        if pid not in pids:
            pids.append(pid)
    return pids


async def test_a_fan_out_over_its_tree_quota_is_killed_with_every_member(
    shell_root, tmp_path, kind
):
    root = shell_root()
    async with engine_at(tmp_path, backend=kind) as engine:
        # four children of 10 MiB each: none alone near 24 MiB, their sum over it
        quota = Quota(heap=24 * MiB, scope=Scope.TREE)
        entry = await registered(engine, root.pid, quota)
        root.run(f"{{fanout}} 4 mmap {STEP} 5")
        job = int((await root.line("fanout"))[1])
        children = await children_of(root, 4)
        await wait_for(lambda: not root.alive(), timeout=5)
        assert root.proc.returncode == -signal.SIGKILL
        await wait_for(lambda: all(is_dead(pid) for pid in [job, *children]))
        assert engine.enforcements[Action.KILL] == 1
        assert entry.events[KILLED] == 1


async def test_grandchildren_and_an_exec_are_members_and_notify_counts_each_crossing_once(
    shell_root, tmp_path, kind
):
    root = shell_root(FANOUT_HOLD_MS="300")
    async with engine_at(tmp_path, backend=kind) as engine:
        quota = Quota(heap=24 * MiB, action=Action.NOTIFY, scope=Scope.TREE)
        entry = await registered(engine, root.pid, quota)
        root.run(f"{{fanout}} 4 mmap {STEP} 5")  # sh forks, the child execs fanout
        job = int((await root.line("fanout"))[1])
        children = await children_of(root, 4)  # the root's grandchildren
        assert entry.tree is not None
        await wait_for(lambda: {root.pid, job, *children} <= set(members(engine, entry)))
        assert entry.tree.pids()[0] == root.pid
        await wait_for(lambda: entry.events[NOTIFIED] == 1, timeout=5)
        await root.line("done")  # the children held for a while, then exited
        await wait_for(lambda: members(engine, entry) == [root.pid])  # the exited left
        await quiet(engine, kind, entry)
        assert entry.events[NOTIFIED] == 1  # one crossing, however many checks saw it
        root.run(f"{{fanout}} 4 mmap {STEP} 5")  # a second crossing
        await wait_for(lambda: entry.events[NOTIFIED] == 2, timeout=5)
        assert root.alive()


async def test_a_member_whose_parent_exits_stays_a_member(shell_root, tmp_path, kind):
    root = shell_root(FANOUT_PAUSE_MS="100")
    async with engine_at(tmp_path, backend=kind) as engine:
        entry = await registered(engine, root.pid, Quota(heap=32 * MiB, scope=Scope.TREE))
        # the job's parent (a second sh) exits after 0.3 s: the job is reparented,
        # then its three children grow to 16 MiB each, 48 MiB together
        root.run(f"sh -c '{{fanout}} 3 mmap {STEP} 8 & sleep 0.3'")
        job = int((await root.line("fanout"))[1])
        assert entry.tree is not None
        await wait_for(lambda: job in members(engine, entry))
        await wait_for(lambda: procfs.read_stat(job).ppid not in entry.tree.pids(), timeout=3)
        assert job in members(engine, entry)  # reparented: still a member
        await wait_for(lambda: is_dead(job), timeout=5)
        assert entry.events[KILLED] == 1


async def test_a_tree_files_quota_kills_though_each_member_stays_under_it(
    shell_root, tmp_path, kind
):
    root = shell_root()
    async with engine_at(tmp_path, backend=kind) as engine:
        # each member holds its 3 inherited descriptors and opens 8 at most: far
        # under 30 alone; the job's sum (its copies of them counted) is over
        entry = await registered(engine, root.pid, Quota(files=30, scope=Scope.TREE))
        root.run("{fanout} 4 open 2 4")
        job = int((await root.line("fanout"))[1])
        await wait_for(lambda: not root.alive(), timeout=5)
        await wait_for(lambda: is_dead(job))
        assert entry.events[KILLED] == 1


async def test_a_process_started_before_the_quota_never_joins(shell_root, tmp_path, kind):
    root = shell_root(FANOUT_HOLD_MS="100")
    async with engine_at(tmp_path, backend=kind) as engine:
        entry = await registered(engine, root.pid)
        root.run(f"{{fanout}} 2 mmap {STEP} 5")  # 20 MiB, started before the quota
        job = int((await root.line("fanout"))[1])
        await engine.set_quota(entry, Quota(heap=8 * MiB, scope=Scope.TREE), 0)
        await root.line("done")
        assert root.alive() and engine.enforcements[Action.KILL] == 0
        assert entry.tree is not None and members(engine, entry) == [root.pid]
        assert job not in entry.tree.pids()


async def test_a_restart_resumes_the_tree_and_a_recycled_pid_never_joins(
    shell_root, tmp_path, kind
):
    root = shell_root()
    async with engine_at(tmp_path, backend=kind) as engine:
        quota = Quota(heap=64 * MiB, action=Action.NOTIFY, scope=Scope.TREE)
        entry = await registered(engine, root.pid, quota)
        # the job's parent exits: no scan after the restart could find the job again
        root.run(f"sh -c '{{fanout}} 2 mmap {STEP} 2 & sleep 0.2'")
        job = int((await root.line("fanout"))[1])
        children = await children_of(root, 2)
        assert entry.tree is not None
        await wait_for(lambda: {job, *children} <= set(members(engine, entry)))
        await wait_for(lambda: procfs.read_stat(job).ppid not in entry.tree.pids(), timeout=3)
        before = engine.reader.tree(entry)
    (record,) = saved_records(tmp_path / "s.json")
    # a member whose pid now names another process: the start time says so
    me = os.getpid()
    record["tree"]["members"].append([me, procfs.read_start_time(me) + 1])
    state.Journal(tmp_path / "s.json").rewrite([record])
    async with engine_at(tmp_path, backend=kind) as engine:
        entry = engine.get(root.pid)
        assert entry is not None and entry.quota == quota and entry.tree is not None
        assert set(members(engine, entry)) == {root.pid, job, *children}
        after = engine.reader.tree(entry)  # the same members over the same baseline
        assert after.members == before.members == 4
        assert abs(after.tree_heapsize - before.tree_heapsize) < MiB
        assert me not in entry.tree.pids()


async def test_a_tree_outlives_its_root(shell_root, tmp_path, kind):
    """The root starts a job and exits: its entry goes, its tree goes on to its last
    member, and a crossing after the root's exit still kills the whole job."""
    root = shell_root(FANOUT_PAUSE_MS="400")  # 2 steps in the root's 0.5 s: 16 MiB
    async with engine_at(tmp_path, backend=kind) as engine:
        entry = await registered(engine, root.pid, Quota(heap=32 * MiB, scope=Scope.TREE))
        # procfs finds members at its checks: the root lives on long enough for one
        root.run(f"{{fanout}} 4 mmap {STEP} 8 & sleep 0.5; exit 0")
        job = int((await root.line("fanout"))[1])
        children = await children_of(root, 4)
        assert {job, *children} <= set(members(engine, entry))
        await wait_for(lambda: not root.alive())
        assert root.proc.returncode == 0
        await wait_for(lambda: engine.get(root.pid) is None)
        await wait_for(lambda: all(is_dead(pid) for pid in [job, *children]), timeout=10)
        assert entry.events[KILLED] == 1 or kind == "bpf"  # bpf: an orphan's kill is logged
