"""Driving the tracking engine in-process (no FUSE): opening it, waiting on it."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from tracker.engine import state
from tracker.engine.engine import Engine, open_engine
from tracker.engine.entry import Entry
from tracker.quota import Quota

INTERVAL = 0.01  # s between periodic checks: short, so the tests wait little
ROOT = 0
OTHER_USER = 1000


def proc_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, Z...)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        raw = stat.read()
    return raw[raw.rindex(b")") + 2 :].split()[0].decode()


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
    original = engine.policy.check

    def check(entry: Entry) -> None:
        checked.append(entry)
        original(entry)

    engine.policy.check = check  # type: ignore[method-assign]
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


def engine_at(
    tmp_path: Path, name: str = "s.json", interval: float = INTERVAL, backend: str = "procfs"
):
    return open_engine(state_path=tmp_path / name, interval=interval, backend=backend)


def saved_records(path: Path) -> list[dict]:
    return state.load(path)


async def registered(engine: Engine, pid: int, quota: Quota | None = None) -> Entry:
    """`pid` registered by root, its exit watcher started, and root's `quota` set if given."""
    entry = engine.register(pid, ROOT)
    await settle()
    if quota is not None:
        await engine.set_quota(entry, quota, ROOT)
    return entry


def removals(engine: Engine) -> list[Entry]:
    """Every entry the engine removes from now on, in order."""
    removed: list[Entry] = []
    engine.on_removal(removed.append)
    return removed
