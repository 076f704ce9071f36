"""`restrack run --heap/--files/--action`: a program under a quota from its first
instruction, its status passed through, the record of a quota kill on stderr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.support.bpf import needs_bpf
from tests.support.cli import restrack_run
from tests.support.daemon import Daemon
from tests.support.mount import events_of
from tests.support.tree import is_dead
from tests.support.users import NOBODY
from tests.support.waiting import wait_until

KILLED = 128 + signal.SIGKILL


def test_over_its_heap_quota_the_program_is_killed_with_a_record(engine_daemon, runquota):
    result = restrack_run(engine_daemon, runquota, "heap", 256, options=["--heap", "16M"])
    assert result.returncode == KILLED
    record = result.stderr.splitlines()
    assert record[0].startswith("restrack run: runquota (pid ")
    assert record[0].endswith("was killed by its quota: heap=16M files=max action=kill")
    # and the daemon's own record of the kill (tests/commands/test_enforcements_command.py)
    assert record[1].startswith("restrack run: the daemon's record: {")
    assert len(record) == 2


def test_the_program_gets_its_whole_quota_beyond_where_it_starts(engine_daemon, runquota):
    """Taken before the exec, the baseline is the waiting child's VmData (restrack run's
    own Python): the bpf engine lowers it to the program's at the exec; procfs keeps it,
    which only gives more. Either way the program's 28 MiB of a 32 MiB quota fit."""
    result = restrack_run(engine_daemon, runquota, "heap", 28, options=["--heap", "32M"])
    assert (result.returncode, result.stdout) == (0, "mapped 28\n")


@needs_bpf
def test_under_bpf_the_quota_counts_from_the_programs_start(bpf_daemon, runquota):
    result = restrack_run(bpf_daemon, runquota, "heap", 36, options=["--heap", "32M"])
    assert (result.returncode, result.stdout) == (KILLED, "")


@needs_bpf
def test_the_quota_is_in_place_before_the_first_instruction(bpf_daemon, runquota, tmp_path):
    """The constructor's mapping, before main, already crosses: killed in that mmap."""
    mark = tmp_path / "got-past"
    env = {**os.environ, "RUNQUOTA_EARLY_MIB": "64"}
    options = ["--heap", "16M"]
    result = restrack_run(bpf_daemon, runquota, "early", mark, options=options, env=env)
    assert result.returncode == KILLED
    assert not mark.exists()
    env["RUNQUOTA_EARLY_MIB"] = "8"  # under the quota: it gets past
    result = restrack_run(bpf_daemon, runquota, "early", mark, options=options, env=env)
    assert result.returncode == 0 and mark.exists()


def test_a_files_quota_under_deny_gives_emfile(engine_daemon, runquota):
    options = ["--files", "5", "--action", "deny"]
    result = restrack_run(engine_daemon, runquota, "files", 50, 3, options=options)
    assert (result.returncode, result.stdout) == (3, "opened 5\nEMFILE\n")
    assert "killed" not in result.stderr


def test_the_exit_status_passes_through(daemon):
    options = ["--heap", "64M", "--files", "100"]
    assert restrack_run(daemon, "sh", "-c", "exit 3", options=options).returncode == 3
    result = restrack_run(daemon, "sh", "-c", "kill -TERM $$", options=options)
    assert result.returncode == 128 + signal.SIGTERM
    assert result.stderr == ""  # no record: not killed by a quota


@pytest.mark.parametrize(
    ("options", "code", "message"),
    [
        (["--heap", "nonsense"], 2, "restrack: run: --heap: bad size 'nonsense'"),
        (["--files", "-1"], 2, "restrack: run: --files: bad count '-1'"),
        (["--action", "deny"], 2, "restrack: run: --action needs --heap or --files"),
        (["--warn", "50%"], 2, "restrack: run: --warn needs --heap or --files"),
        (["--heap", "1M", "--warn", "150%"], 2, "restrack: run: --warn: bad warn '150%'"),
        (["--heap", "max", "--warn", "50"], 2, "restrack: run: quota: warn needs a heap"),
    ],
)
def test_a_refused_quota_never_runs_the_program(daemon, tmp_path, options, code, message):
    mark = tmp_path / "ran"
    result = restrack_run(daemon, "touch", mark, options=options)
    assert result.returncode == code
    assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1
    assert not mark.exists()


def test_without_a_daemon_the_program_never_runs(tmp_path):
    mark = tmp_path / "ran"
    argv = [sys.executable, "-m", "restrackfs.cli", "--mount", str(tmp_path), "run"]
    result = subprocess.run([*argv, "--heap", "1M", "--", "touch", mark], capture_output=True)
    assert result.returncode == 8 and not mark.exists()


REFUSING_CLIENT = """
import errno, sys
from restrackfs import client, cli

def refuse(pid, **kw):
    raise PermissionError(errno.EPERM, f"{pid}: operation not permitted")

client.set_quota = refuse
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_quota_write_the_daemon_refuses_leaves_the_program_unstarted(daemon, tmp_path):
    """Registered, then refused its quota (here by a client made to fail): the child
    that waited for it is killed before it execs, and restrack run says why."""
    mark = tmp_path / "ran"
    argv = [sys.executable, "-c", REFUSING_CLIENT, "--mount", str(daemon.mountpoint), "run"]
    result = subprocess.run(
        [*argv, "--heap", "1M", "--", "touch", mark], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 6
    assert result.stderr.endswith(": operation not permitted\n")
    assert len(result.stderr.splitlines()) == 1
    assert not mark.exists()
    wait_until(lambda: not _tracked(daemon), what="the killed child's entry ended")


def _tracked(daemon: Daemon) -> list[str]:
    return [name for name in os.listdir(daemon.mountpoint) if name.isdigit()]


def test_an_unprivileged_user_caps_their_own_program(daemon, runquota, tmp_path):
    result = restrack_run(
        daemon, runquota, "heap", 256, uid=NOBODY, options=["--heap", "16M"], cwd="/"
    )
    assert result.returncode == KILLED, result.stderr
    assert "was killed by its quota: heap=16M" in result.stderr
    deny = ["--files", "5", "--action", "deny"]
    result = restrack_run(daemon, runquota, "files", 50, 0, uid=NOBODY, options=deny, cwd="/")
    assert (result.returncode, result.stdout) == (0, "opened 5\nEMFILE\n")


def test_the_record_says_when_the_daemon_did_not_kill_it(daemon):
    result = restrack_run(daemon, "sh", "-c", "kill -KILL $$", options=["--heap", "1G"])
    assert result.returncode == KILLED
    assert "not counted by the daemon as its quota" in result.stderr


def test_warn_is_set_with_the_quota(engine_daemon):
    """The program reads its own quota back: the warning is in it from the start."""
    quota = f"{engine_daemon.mountpoint}/$$/quota"
    options = ["--heap", "16M", "--warn", "50"]
    result = restrack_run(engine_daemon, "sh", "-c", f"cat {quota}", options=options)
    assert (result.returncode, result.stdout) == (
        0,
        "heap=16777216 files=max action=kill warn=50%\n",
    )


@needs_bpf
def test_a_program_past_its_warning_is_warned_of_and_runs_on(bpf_daemon, runquota):
    """12 MiB of 16 over the program's own start (bpf rebases the baseline, and the
    warning with it, at the exec; procfs keeps restrack run's larger one): warned,
    not killed."""
    before = events_of(bpf_daemon)
    options = ["--heap", "16M", "--warn", "50%"]
    result = restrack_run(bpf_daemon, runquota, "heap", 12, options=options)
    assert (result.returncode, result.stdout) == (0, "mapped 12\n")
    wait_until(lambda: events_of(bpf_daemon)["warned"] == before["warned"] + 1, 2, "warned")
    assert events_of(bpf_daemon)["killed"] == before["killed"]


def _children(stdout: str) -> set[int]:
    return {int(line.split()[1]) for line in stdout.splitlines() if line.startswith("child ")}


def test_run_tree_kills_the_whole_job_of_sh_children(engine_daemon, fanout_binary):
    """`sh -c` starts the job: four children of 2 MiB steps, none near 24 MiB alone.
    Their sum crosses; the job dies whole, and restrack run says so."""
    job = f"{fanout_binary} 4 mmap {2 * 1024 * 1024} 8"
    options = ["--heap", "24M", "--tree"]
    result = restrack_run(engine_daemon, "sh", "-c", job, options=options)
    assert result.returncode == KILLED
    assert "was killed by its quota: heap=24M files=max action=kill scope=tree" in result.stderr
    assert '"action": "kill", ' in result.stderr and '"scope": "tree"}' in result.stderr
    children = _children(result.stdout)
    assert len(children) == 4
    wait_until(lambda: all(is_dead(pid) for pid in children), what="every member killed")


def test_run_tree_as_an_unprivileged_user(daemon, fanout_binary):
    job = f"{fanout_binary} 2 open 4 8"  # 2 x 32 descriptors: each under 40, not the sum
    options = ["--files", "40", "--tree"]
    result = restrack_run(daemon, "sh", "-c", job, uid=NOBODY, options=options, cwd="/")
    assert result.returncode == KILLED, result.stderr
    assert "scope=tree" in result.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--heap", "1G", "--tree", "--action", "deny"], "restrack: run: --tree: scope=tree"),
        (["--tree"], "restrack: run: --tree needs --heap or --files"),
    ],
)
def test_run_tree_refusals_never_run_the_program(daemon, tmp_path, options, message):
    mark = tmp_path / "ran"
    result = restrack_run(daemon, "touch", mark, options=options)
    assert result.returncode == 2
    assert result.stderr.startswith(message)
    assert not mark.exists()
