"""The engine's state file: what it records, resumes and drops, and a file it cannot write."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.support.engine import (
    INTERVAL,
    ROOT,
    engine_at,
    registered,
    saved_records,
    settle,
    wait_dead,
    wait_for,
)
from tests.support.procs import PAGE, MiB, nofile_soft, start_time
from tests.support.users import NOBODY
from tracker.engine import state
from tracker.engine.engine import open_engine
from tracker.engine.entry import Entry
from tracker.errors import (
    NotPermitted,
    QuotaBusy,
)
from tracker.quota import Action, Quota, Reset

# ----- resuming -------------------------------------------------------------------------


async def test_state_resumes_entries_with_their_counters(spawn, tmp_path):
    w = spawn(uid=NOBODY)
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, NOBODY)
        await settle()
        await engine.set_quota(entry, Quota(heap=100 * MiB, files=50, action=Action.NOTIFY), ROOT)
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
        m = engine.reader.measure(back)
        assert abs(m.heapsize - 24 * MiB) <= PAGE
        assert m.openfile_count == 3
        # the root-set quota still binds the owner after the restart
        with pytest.raises(NotPermitted):
            await engine.reset(back, Reset.ALL, NOBODY)
        with pytest.raises(QuotaBusy):
            await engine.set_quota(back, Quota(files=1), ROOT)
        # and the resumed entry is watched: exit removes it
        w.proc.kill()
        await wait_for(lambda: engine.get(w.pid) is None)
        await wait_for(lambda: saved_records(tmp_path / "s.json") == [])


async def test_state_resumed_quota_is_enforced(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        await registered(engine, w.pid, Quota(files=2))
    w.do("open", 3)  # over the quota while no engine runs
    async with engine_at(tmp_path) as engine:
        assert await wait_dead(w) == -signal.SIGKILL
        assert engine.enforcements[Action.KILL] == 1


def recycle_in_state(path: Path, w) -> None:
    """The state file's record of `w` now names another process that had its pid."""
    records = state.load(path)
    for record in records:
        if record["pid"] == w.pid:
            assert record["start_time"] == start_time(w.pid)
            record["start_time"] += 1
    state.Journal(path).rewrite(records)


@pytest.mark.parametrize(
    "lose",
    [
        pytest.param(recycle_in_state, id="recycled_pid"),
        pytest.param(lambda path, w: w.stop(), id="dead_pid"),  # killed and reaped
    ],
)
async def test_state_drops_a_process_that_is_not_the_one_saved(spawn, tmp_path, lose):
    w, kept = spawn(), spawn()
    path = tmp_path / "s.json"
    async with engine_at(tmp_path) as engine:
        engine.register(w.pid, ROOT)
        engine.register(kept.pid, ROOT)
        await settle()
    lose(path, w)
    async with engine_at(tmp_path) as engine:
        assert [e.pid for e in engine.entries()] == [kept.pid]
        await settle()
        assert [r["pid"] for r in saved_records(path)] == [kept.pid]


async def test_state_records_identity_and_quota(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = await registered(engine, w.pid, Quota(heap=3 * MiB, files=4, action=Action.NOTIFY))
        (record,) = saved_records(tmp_path / "s.json")
        assert record["pid"] == w.pid
        assert record["start_time"] == start_time(w.pid)
        assert record["heap_base"] == entry.heap_base
        assert record["files_base"] == entry.files_base
        assert record["quota"] == {"heap": 3 * MiB, "files": 4, "action": "notify"}
        assert record["quota_uid"] == ROOT
        assert (tmp_path / "s.json").stat().st_mode & 0o077 == 0


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


async def test_shutdown_right_after_register(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        engine.register(w.pid, ROOT)
    async with engine_at(tmp_path) as engine:  # resumed entry, engine left at once
        assert engine.get(w.pid) is not None


async def test_quota_reset_then_restart_leaves_process_limits_alone(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = await registered(engine, w.pid, Quota(files=3, action=Action.DENY))
        await engine.reset(entry, Reset.QUOTA, ROOT)
    w.do("setrlimit", "nofile", 100)  # the process's own choice, no quota in force
    async with engine_at(tmp_path) as engine:
        assert engine.get(w.pid) is not None
        await settle()
    assert nofile_soft(w.pid) == 100


# ----- a state file that cannot be written ----------------------------------------------


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
        entry = await registered(engine, w.pid)
        original = nofile_soft(w.pid)
        state_is_a_directory(state_dir)
        with pytest.raises(OSError) as info:
            await engine.set_quota(entry, Quota(files=1, action=Action.DENY), ROOT)
        assert info.value.errno not in (None, 0)
        assert entry.quota is None
        assert nofile_soft(w.pid) == original  # the limit lowered on the way is given back
        with pytest.raises(OSError):
            await engine.deregister(w.pid, ROOT)
        assert engine.get(w.pid) is entry
        w.do("open", 2)
        assert engine.reader.measure(entry).openfile_count == 2
        # repaired: everything works again
        (state_dir / "s.json").rmdir()
        await engine.set_quota(entry, Quota(files=10), ROOT)
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
        entry = await registered(engine, w.pid)
        assert engine.reader.measure(entry).openfile_count == 0


async def test_a_compaction_keeps_the_change_that_made_it(spawn, tmp_path, monkeypatch):
    """A registration is journaled before the registry holds it, a deregistration
    before the registry lets go: a compaction made by either must write the entries
    as they are after it (not lose the new one, not keep the removed one)."""
    monkeypatch.setattr(state.Journal, "wants_compaction", lambda journal, live: True)
    first, second = spawn(), spawn()
    async with engine_at(tmp_path) as engine:
        engine.register(first.pid, ROOT)
        engine.register(second.pid, ROOT)
        assert sorted(r["pid"] for r in saved_records(tmp_path / "s.json")) == sorted(
            [first.pid, second.pid]
        )
        await engine.deregister(first.pid, ROOT)
        assert [r["pid"] for r in saved_records(tmp_path / "s.json")] == [second.pid]
