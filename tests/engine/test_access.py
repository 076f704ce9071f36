"""Who may call the engine, and what a refused or busy call leaves: unchanged."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.support.engine import OTHER_USER, ROOT, engine_at, registered, settle
from tests.support.procs import MiB
from tests.support.users import NOBODY
from tracker.engine.engine import Engine
from tracker.engine.entry import Entry
from tracker.errors import (
    AlreadyTracked,
    NotPermitted,
    NotTracked,
    QuotaBusy,
)
from tracker.quota import Action, Quota, Reset

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
            await engine.set_quota(entry, Quota(files=5), OTHER_USER)
        assert entry.quota is None
        await engine.set_quota(entry, Quota(files=5), NOBODY)
        with pytest.raises(NotPermitted):
            await engine.reset(entry, Reset.ALL, OTHER_USER)
        with pytest.raises(NotPermitted):
            await engine.deregister(w.pid, OTHER_USER)
        # a quota the owner set, the owner may lift
        await engine.reset(entry, Reset.ALL, NOBODY)
        assert entry.quota is None
        await engine.set_quota(entry, Quota(files=5), NOBODY)
        await engine.deregister(w.pid, NOBODY)
        assert engine.get(w.pid) is None


@pytest.mark.parametrize("what", list(Reset), ids=str)
async def test_root_quota_binds_the_owner(spawn, tmp_path, what):
    w = spawn(uid=NOBODY)
    async with engine_at(tmp_path) as engine:
        entry = engine.register(w.pid, NOBODY)
        await settle()
        await engine.set_quota(entry, Quota(heap=100 * MiB, files=50), ROOT)
        w.do("open", 2)
        state_before = (tmp_path / "s.json").read_bytes()
        with pytest.raises(NotPermitted) as info:
            await engine.reset(entry, what, NOBODY)
        assert info.value.errno == errno.EPERM
        with pytest.raises(NotPermitted):
            await engine.deregister(w.pid, NOBODY)
        # nothing changed
        assert entry.quota == Quota(heap=100 * MiB, files=50)
        assert engine.reader.measure(entry).openfile_count == 2
        assert engine.get(w.pid) is entry
        assert (tmp_path / "s.json").read_bytes() == state_before
        # root may
        await engine.reset(entry, what, ROOT)
        assert (entry.quota is None) == what.clears_quota
        assert engine.reader.measure(entry).openfile_count == (0 if what.restarts_usage else 2)
        await engine.deregister(w.pid, ROOT)
        assert engine.get(w.pid) is None


# ----- quota busy -----------------------------------------------------------------------


async def test_second_quota_is_ebusy_until_reset(spawn, tmp_path):
    w = spawn()
    async with engine_at(tmp_path) as engine:
        entry = await registered(engine, w.pid)
        await engine.set_quota(entry, Quota(), ROOT)  # heap=max files=max defines a quota too
        with pytest.raises(QuotaBusy) as info:
            await engine.set_quota(entry, Quota(files=1), ROOT)
        assert info.value.errno == errno.EBUSY
        assert entry.quota == Quota()

        # a usage reset does not free the quota
        await engine.reset(entry, Reset.USAGE, ROOT)
        with pytest.raises(QuotaBusy):
            await engine.set_quota(entry, Quota(files=1), ROOT)

        await engine.reset(entry, Reset.QUOTA, ROOT)
        await engine.set_quota(entry, Quota(files=7, action=Action.NOTIFY), ROOT)
        assert entry.quota == Quota(files=7, action=Action.NOTIFY)
        assert engine.reader.measure(entry).quota == Quota(files=7, action=Action.NOTIFY)


def observable(engine: Engine, entry: Entry, path: Path) -> tuple:
    """All a call could change: the state file, the entries, the quota, baselines, counts."""
    return (
        path.read_bytes(),
        list(engine.entries()),
        entry.quota,
        entry.quota_uid,
        entry.heap_base,
        entry.files_base,
        dict(engine.enforcements),
    )


async def test_rejected_calls_change_nothing(spawn, tmp_path):
    w, other = spawn(), spawn(uid=NOBODY)
    path = tmp_path / "s.json"
    async with engine_at(tmp_path) as engine:
        entry = await registered(
            engine, w.pid, Quota(heap=50 * MiB, files=20, action=Action.NOTIFY)
        )
        w.do("open", 2)
        snapshot = observable(engine, entry, path)

        def unchanged() -> bool:
            return snapshot == observable(engine, entry, path)

        with pytest.raises(QuotaBusy):
            await engine.set_quota(entry, Quota(files=1, action=Action.KILL), ROOT)
        assert unchanged()
        with pytest.raises(NotPermitted):
            await engine.set_quota(entry, Quota(files=1), NOBODY)
        assert unchanged()
        with pytest.raises(NotPermitted):
            await engine.reset(entry, Reset.ALL, NOBODY)
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
            await engine.deregister(w.pid, NOBODY)
        assert unchanged()
        with pytest.raises(NotTracked):
            await engine.deregister(other.pid, ROOT)
        assert unchanged()
        assert engine.reader.measure(entry).openfile_count == 2
        assert w.alive()
