"""Attacks of issue 17 by what a user controls: their threads' lifetimes under
`restrack run`, their main thread, their process names, the bytes they write, and
how many handles they hold open. Real uids (setpriv), a real mount, real kernels.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import NOBODY, Daemon
from tests.test_run import compile_c, restrack_run

HERE = Path(__file__).parent
NO_QUOTA = "heap=max files=max action=kill\n"


def as_nobody(*argv: object) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *map(str, argv)]


def tracked(daemon: Daemon) -> set[int]:
    return {int(name) for name in os.listdir(daemon.mountpoint) if name.isdigit()}


# ----- restrack run fails closed (issue 17, point 2) ------------------------------------


@pytest.fixture(scope="module")
def thread_exit_race(bin_dir: Path) -> Path:
    return compile_c(HERE / "c" / "thread_exit_race.c", bin_dir / "thread_exit_race")


def test_restrack_run_never_acts_as_root_for_a_thread_that_exits(daemon, spawn, thread_exit_race):
    """Found in issue 17: the root supervisor read the caller's ids from
    /proc/TID/status and, when that failed, made the call with its own (root's), so a
    program run as nobody whose calling threads exited at the right moment registered
    a root process, gave it `heap=0 files=0 action=kill`, and deregistered another
    under a root quota, in 3-51 tries. Now a call whose caller's ids are not certain
    (the thread gone, the notification no longer valid after the ids were read) is
    refused, and 300 tries win nothing."""
    unregistered, uncapped, capped = spawn(), spawn(), spawn()  # root's
    daemon.register(uncapped.pid)
    daemon.register(capped.pid)
    daemon.write("heap=max files=max", capped.pid, "quota")  # root's quota
    log_before = len(daemon.log_text())
    program = as_nobody(thread_exit_race, unregistered.pid, uncapped.pid, capped.pid, 300)
    result = restrack_run(daemon, *program)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1:] == ["done"], result.stdout
    assert not [line for line in result.stdout.splitlines() if line.startswith("won")]
    assert tracked(daemon) == {uncapped.pid, capped.pid}
    assert daemon.read(uncapped.pid, "quota") == NO_QUOTA
    assert all(w.alive() for w in (unregistered, uncapped, capped))
    assert "by uid=0" not in daemon.log_text()[log_before:]
