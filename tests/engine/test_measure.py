"""The engine measures real processes: heap, open files, registration, exit."""

from __future__ import annotations

import errno
import os
import signal
import subprocess

import pytest
import trio
import trio.testing

from tests.support.engine import (
    INTERVAL,
    ROOT,
    engine_at,
    proc_state,
    registered,
    removals,
    saved_records,
    send,
    settle,
    wait_dead,
    wait_for,
)
from tests.support.procs import PAGE, MiB, proc_vm_data
from tracker.errors import (
    AlreadyTracked,
    Deregistered,
    InvalidArgument,
    NoSuchProcess,
    NotTracked,
)
from tracker.quota import Quota

# ----- measurement ----------------------------------------------------------------------


async def test_heapsize_counts_mmap_exactly(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = await registered(engine, w.pid)
        assert entry.pid == w.pid
        assert [e.pid for e in engine.entries()] == [w.pid]
        assert engine.get(w.pid) is entry
        first = engine.reader.measure(entry)
        assert first.heapsize == 0
        assert first.heap_total == proc_vm_data(w.pid)

        w.do("mmap", 20 * MiB)
        now = engine.reader.measure(entry)
        assert abs(now.heapsize - 20 * MiB) <= PAGE
        assert now.heap_total == proc_vm_data(w.pid)
        assert now.heap_total - entry.heap_base == now.heapsize

        w.do("mmap", 3 * MiB)
        assert abs(engine.reader.measure(entry).heapsize - 23 * MiB) <= PAGE
        w.do("munmap")
        assert abs(engine.reader.measure(entry).heapsize - 20 * MiB) <= PAGE


async def test_heapsize_counts_sbrk(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = await registered(engine, w.pid)
        before = engine.reader.measure(entry).heapsize
        w.do("sbrk", 4 * MiB)
        grown = engine.reader.measure(entry).heapsize - before
        assert abs(grown - 4 * MiB) <= PAGE
        w.do("sbrk", 2 * MiB)
        assert abs(engine.reader.measure(entry).heapsize - before - 6 * MiB) <= PAGE


async def test_openfile_count_follows_open_and_close(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = await registered(engine, w.pid)
        assert engine.reader.measure(entry).openfile_count == 0
        assert w.do("open", 3) == "ok 3"
        m = engine.reader.measure(entry)
        assert m.openfile_count == 3
        assert m.openfile_total == len(os.listdir(f"/proc/{w.pid}/fd"))
        w.do("close", 2)
        assert engine.reader.measure(entry).openfile_count == 1
        w.do("close", 1)
        assert engine.reader.measure(entry).openfile_count == 0


async def test_usage_is_floored_at_zero(spawn, tmp_path):
    """Memory and files that existed before registration may go: never negative."""
    w = spawn()
    w.do("mmap", 20 * MiB)
    w.do("open", 4)
    async with engine_at(tmp_path) as engine:
        entry = await registered(engine, w.pid)
        w.do("munmap")
        w.do("close", 4)
        m = engine.reader.measure(entry)
        assert m.heapsize == 0
        assert m.openfile_count == 0
        assert m.heap_total == proc_vm_data(w.pid)
        assert m.heap_total <= entry.heap_base - 20 * MiB + PAGE
        # growth from the lower level still only counts above the baseline
        w.do("mmap", 12 * MiB)
        assert engine.reader.measure(entry).heapsize == 0
        w.do("mmap", 10 * MiB)
        assert abs(engine.reader.measure(entry).heapsize - 2 * MiB) <= PAGE


async def test_thread_stack_counts_as_heap(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = await registered(engine, w.pid)
        w.thread()
        assert engine.reader.measure(entry).heapsize >= 8 * MiB  # glibc's default stack


# ----- registration ---------------------------------------------------------------------


async def test_register_thread_gives_its_thread_group(spawn, tmp_path):
    w = spawn()
    tid = w.thread()
    assert tid != w.pid
    async with engine_at(tmp_path) as engine:
        entry = await registered(engine, tid)
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
            await engine.deregister(pid, ROOT)
        assert info.value.errno == code


async def test_deregister_untracked_is_esrch(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        with pytest.raises(NotTracked) as info:
            await engine.deregister(w.pid, ROOT)
        assert info.value.errno == errno.ESRCH


async def test_deregister_removes_and_allows_registering_again(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        removed = removals(engine)
        first = await registered(engine, w.pid)
        await engine.deregister(w.pid, ROOT)
        assert removed == [first]
        assert list(engine.entries()) == []
        assert saved_records(tmp_path / "s.json") == []
        # the old entry now answers "deregistered", not "exited"
        with pytest.raises(Deregistered) as info:
            engine.reader.measure(first)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(Deregistered):
            await engine.set_quota(first, Quota(files=1), ROOT)
        second = await registered(engine, w.pid)
        assert second is not first
        assert second.serial != first.serial
        assert engine.get(w.pid) is second


async def test_deregister_right_after_register(spawn, tmp_path):
    """No checkpoint between the two: the exit watcher has not started yet."""
    w = spawn()
    async with engine_at(tmp_path) as engine:
        engine.register(w.pid, ROOT)
        await engine.deregister(w.pid, ROOT)
        await settle()
        assert list(engine.entries()) == []


# ----- exit -----------------------------------------------------------------------------


async def test_exit_removes_entry_promptly(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        removed = removals(engine)
        entry = await registered(engine, w.pid)
        w.proc.kill()  # not waited for: a zombie must count as gone too
        start = trio.current_time()
        await wait_for(lambda: engine.get(w.pid) is None)
        assert trio.current_time() - start < 0.1  # within 100 ms
        assert list(engine.entries()) == []
        assert removed == [entry]
        assert entry.ended == "exited"
        with pytest.raises(NoSuchProcess) as info:
            engine.reader.measure(entry)
        assert info.value.errno == errno.ESRCH
        await wait_for(lambda: saved_records(tmp_path / "s.json") == [])
        await trio.sleep(10 * INTERVAL)  # nothing else may call the listener later
        assert removed == [entry]


async def test_exit_of_one_leaves_the_others(spawn, tmp_path):
    a, b = spawn(), spawn()
    async with engine_at(tmp_path) as engine:
        removed = removals(engine)
        engine.register(a.pid, ROOT)
        kept = await registered(engine, b.pid)
        send(a, "exit")
        await wait_dead(a)
        await wait_for(lambda: engine.get(a.pid) is None)
        assert [e.pid for e in removed] == [a.pid]
        assert list(engine.entries()) == [kept]
        b.do("open", 1)
        assert engine.reader.measure(kept).openfile_count == 1
