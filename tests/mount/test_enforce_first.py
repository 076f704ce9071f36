"""procfs engine: a command about a process under quota enforces the quota first.

With the periodic check slowed to 10 s, nothing but the command itself can see the
breach: a reset, a deregister or a new quota that reaches the daemon right after the
crossing must find the process killed, not save it.
"""

from __future__ import annotations

import errno
import signal
import subprocess
import sys

import pytest

from restrackfs import client
from tests.support.build import compile_c
from tests.support.paths import C_SOURCES
from tests.support.procs import MiB
from tests.support.users import sh

SLOW = ("--interval", "10000")


@pytest.fixture
def slow(daemon_factory):
    return daemon_factory(*SLOW)


@pytest.fixture(scope="module")
def reset_escape(bin_dir):
    return compile_c(C_SOURCES / "reset_escape.c", bin_dir / "reset_escape")


def over_kill_quota(daemon, spawn):
    """A tracked process 2 MiB over `heap=8M files=5 action=kill`, not yet seen over."""
    w = spawn()
    daemon.register(w.pid)
    daemon.write("heap=8M files=5 action=kill\n", w.pid, "quota")
    w.do("mmap", 10 * MiB)
    return w


def killed(w) -> bool:
    return w.wait(5) == -signal.SIGKILL


def test_the_kernel_patch_program_dies_in_its_reset_not_after(slow, reset_escape):
    for _ in range(3):
        argv = [sys.executable, "-m", "restrackfs.cli", "--mount", str(slow.mountpoint), "run"]
        result = subprocess.run(
            [*argv, "--", str(reset_escape)], capture_output=True, text=True, timeout=30
        )
        assert result.stdout.split("\n")[:2] == ["register 0", "cap 0"], result
        assert "escaped" not in result.stdout, result.stdout
        assert result.returncode == 128 + signal.SIGKILL, result


@pytest.mark.parametrize(
    "command",
    [
        "echo 1 > {m}/{pid}/reset",
        "echo quota > {m}/{pid}/reset",
        "echo usage > {m}/{pid}/reset",
        "echo {pid} > {m}/deregister",
        "rmdir {m}/{pid}",
        "echo {pid} > {m}/register",
    ],
)
def test_a_shell_command_right_after_the_crossing_finds_it_killed(slow, spawn, command):
    w = over_kill_quota(slow, spawn)
    result = sh(command.format(m=slow.mountpoint, pid=w.pid))
    assert result.returncode != 0
    assert "No such process" in result.stderr, result.stderr
    assert killed(w)
    assert slow.read("events").split("\n")[1] == "killed 1"


@pytest.mark.parametrize("call", ["resource_reset", "deregister", "register"])
def test_a_client_call_right_after_the_crossing_finds_it_killed(slow, spawn, call):
    w = over_kill_quota(slow, spawn)
    with pytest.raises(ProcessLookupError) as raised:
        getattr(client, call)(w.pid, mount=str(slow.mountpoint))
    assert raised.value.errno == errno.ESRCH
    assert killed(w)


def test_a_new_quota_after_reset_quota_does_not_forget_the_breach(slow, spawn):
    w = spawn()
    slow.register(w.pid)
    slow.write("heap=8M action=kill\n", w.pid, "quota")
    slow.write("quota\n", w.pid, "reset")  # no quota now: growth is allowed
    w.do("mmap", 10 * MiB)
    slow.write("heap=9M action=kill\n", w.pid, "quota")  # already exceeded: enforced at once
    assert killed(w)


def test_notify_is_counted_once_by_the_command_and_the_periodic_check(daemon_factory, spawn):
    d = daemon_factory("--interval", "50")
    w = spawn()
    d.register(w.pid)
    d.write("heap=8M action=notify\n", w.pid, "quota")
    w.do("mmap", 10 * MiB)
    with pytest.raises(OSError) as busy:
        d.write("heap=1M\n", w.pid, "quota")  # a command: samples first, counts the breach
    assert busy.value.errno == errno.EBUSY
    once = "exceeded 1\nkilled 0\ndenied 0\nnotified 1\nwarned 0\n"
    assert d.read(w.pid, "events") == once
    # A sentinel registered after it, over a kill quota only the periodic check sees:
    # when it dies, a whole pass of the check has looked at the notify process too.
    sentinel = spawn()
    d.register(sentinel.pid)
    d.write("files=1 action=kill\n", sentinel.pid, "quota")
    sentinel.do("open", 3)
    assert killed(sentinel)
    assert d.read(w.pid, "events") == once
    assert d.log_text().count(f"pid={w.pid} comm=workload quota=heap") == 1
    assert w.alive()
