"""Attacks of issue 17 by what a user controls: their threads' lifetimes under
`restrack run`, their main thread, their process names, the bytes they write, and
how many handles they hold open. Real uids (setpriv), a real mount, real kernels.
"""

from __future__ import annotations

import os
import subprocess
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


# ----- a files quota with the main thread gone (issue 17, point 4) -----------------------


@pytest.fixture(scope="module")
def leaderless(bin_dir: Path) -> Path:
    return compile_c(HERE / "c" / "leaderless.c", bin_dir / "leaderless")


def test_a_files_quota_holds_when_the_main_thread_has_exited(daemon, leaderless):
    """Found in issue 17: with the leader a zombie, /proc/PID/fd reports st_size 0 and
    no error, so the count read 0 and the fallback to a live thread never ran: under
    root's `files=2 action=kill` a process opened 10 fds and lived until something
    else happened to read its memory. Now the count is read through a live thread: the
    file shows it, and the periodic check alone kills the process."""
    proc = subprocess.Popen(
        as_nobody(leaderless), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        pid = int(proc.stdout.readline())
        daemon.register(pid)
        daemon.write("files=2 action=kill", pid, "quota")  # root's
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "ready\n"
        assert Path(f"/proc/{pid}/status").read_text().count("VmData") == 0  # a zombie leader
        proc.stdin.write("open 1\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "opened 1\n"
        assert daemon.read(pid, "openfile_count") == "1\n"
        proc.stdin.write("open 10\n")
        proc.stdin.flush()
        proc.stdout.readline()
        # nothing reads it now: the periodic check (100 ms) must see it on its own
        assert proc.wait(timeout=2) == -9
    finally:
        proc.kill()
        proc.wait()
