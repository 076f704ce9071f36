"""SPEC §5 with real unprivileged uids: who may register, cap, reset, deregister, see."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.users import NOBODY, sh

OTHER = 65533


def as_user(uid: int, command: str) -> tuple[int, str]:
    result = sh(command, uid=uid)
    return result.returncode, result.stderr


def test_user_manages_own_process(daemon, spawn):
    w = spawn(uid=NOBODY)
    m = daemon.mountpoint
    assert as_user(NOBODY, f"echo {w.pid} > {m}/register") == (0, "")
    assert as_user(NOBODY, f"echo files=5 > {m}/{w.pid}/quota") == (0, "")
    assert as_user(NOBODY, f"echo 1 > {m}/{w.pid}/reset") == (0, "")
    assert as_user(NOBODY, f"rmdir {m}/{w.pid}") == (0, "")
    assert as_user(NOBODY, f"mkdir {m}/{w.pid}") == (0, "")
    assert as_user(NOBODY, f"echo {w.pid} > {m}/deregister") == (0, "")


def test_plain_shell_needs_no_install(daemon, spawn):
    """The README's promise: `cat` and `echo` work for every user with nothing installed,
    nothing on PATH but the system's, no environment at all (issue 25)."""
    w = spawn(uid=NOBODY)
    m = daemon.mountpoint
    script = (
        f"cd / && echo {w.pid} > {m}/register && echo files=7 > {m}/{w.pid}/quota"
        f" && cat {m}/{w.pid}/heapsize {m}/{w.pid}/quota && ls {m}"
    )
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    argv += ["/usr/bin/env", "-i", "PATH=/usr/bin:/bin", "/bin/sh", "-c", script]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.split("\n")[:2] == ["0", "heap=max files=7 action=kill"]
    assert str(w.pid) in result.stdout.split()


def test_user_cannot_touch_another_users_process(daemon, spawn):
    root_proc, other = spawn(), spawn(uid=OTHER)
    m = daemon.mountpoint
    for target in (root_proc, other):
        code, err = as_user(NOBODY, f"echo {target.pid} > {m}/register")
        assert code != 0 and "Operation not permitted" in err
        code, err = as_user(NOBODY, f"mkdir {m}/{target.pid}")
        assert code != 0 and "Operation not permitted" in err
        daemon.register(target.pid)
        for command in [
            f"echo files=1 > {m}/{target.pid}/quota",
            f"echo 1 > {m}/{target.pid}/reset",
            f"echo usage > {m}/{target.pid}/reset",
            f"echo {target.pid} > {m}/deregister",
            f"rmdir {m}/{target.pid}",
        ]:
            code, err = as_user(NOBODY, command)
            assert code != 0 and "Operation not permitted" in err, command
        assert daemon.read(target.pid, "quota") == "heap=max files=max action=kill\n"
        assert os.path.isdir(daemon.path(target.pid))
        # reading is allowed to everybody without --hidepid, like /proc/PID/status
        code, _ = as_user(NOBODY, f"cat {m}/{target.pid}/stat")
        assert code == 0


def test_root_quota_binds_the_owner(daemon, spawn):
    w = spawn(uid=NOBODY)
    m = daemon.mountpoint
    daemon.register(w.pid)
    daemon.write("files=2", w.pid, "quota")
    for command in [
        f"echo 1 > {m}/{w.pid}/reset",
        f"echo quota > {m}/{w.pid}/reset",
        f"echo usage > {m}/{w.pid}/reset",
        f"echo {w.pid} > {m}/deregister",
        f"rmdir {m}/{w.pid}",
    ]:
        code, err = as_user(NOBODY, command)
        assert code != 0 and "Operation not permitted" in err, command
    code, err = as_user(NOBODY, f"echo files=100 > {m}/{w.pid}/quota")
    assert "Device or resource busy" in err
    assert daemon.read(w.pid, "quota") == "heap=max files=2 action=kill\n"
    daemon.write("1", w.pid, "reset")  # root may
    assert as_user(NOBODY, f"echo files=100 > {m}/{w.pid}/quota") == (0, "")


def test_owner_quota_can_be_lifted_by_owner(daemon, spawn):
    w = spawn(uid=NOBODY)
    m = daemon.mountpoint
    daemon.register(w.pid)
    assert as_user(NOBODY, f"echo files=2 > {m}/{w.pid}/quota") == (0, "")
    assert as_user(NOBODY, f"echo quota > {m}/{w.pid}/reset") == (0, "")
    assert daemon.read(w.pid, "quota") == "heap=max files=max action=kill\n"


def test_permission_is_checked_with_the_openers_uid(daemon, spawn):
    """An fd opened by root and handed to a user keeps root's rights, as in /proc."""
    w = spawn()
    daemon.register(w.pid)
    fd = os.open(daemon.path(w.pid, "quota"), os.O_WRONLY)
    try:
        os.write(fd, b"files=3")
    finally:
        os.close(fd)
    assert daemon.read(w.pid, "quota").startswith("heap=max files=3")


@pytest.fixture
def hidden(daemon_factory):
    return daemon_factory("--hidepid")


def test_hidepid_hides_other_users_processes(hidden, spawn):
    mine, theirs = spawn(uid=NOBODY), spawn()
    m = hidden.mountpoint
    hidden.register(mine.pid)
    hidden.register(theirs.pid)
    listing = sh(f"ls {m}", uid=NOBODY).stdout.split()
    assert str(mine.pid) in listing and str(theirs.pid) not in listing
    code, err = as_user(NOBODY, f"cat {m}/{theirs.pid}/heapsize")
    assert code != 0 and "No such file or directory" in err
    assert as_user(NOBODY, f"cat {m}/{mine.pid}/heapsize")[0] == 0
    metrics = sh(f"cat {m}/metrics", uid=NOBODY).stdout
    assert f'pid="{mine.pid}"' in metrics and f'pid="{theirs.pid}"' not in metrics
    assert "restrack_tracked_processes 1" in metrics
    # root still sees everything, and a lookup by root does not leak to the user
    assert str(theirs.pid) in os.listdir(m)
    os.stat(hidden.path(theirs.pid, "stat"))
    code, _ = as_user(NOBODY, f"stat {m}/{theirs.pid}")
    assert code != 0


def test_hidepid_rmdir_of_hidden_is_enoent(hidden, spawn):
    theirs = spawn()
    hidden.register(theirs.pid)
    code, err = as_user(NOBODY, f"rmdir {hidden.mountpoint}/{theirs.pid}")
    assert code != 0 and "No such file or directory" in err


def test_inodes_do_not_count_other_users_registrations(daemon_factory, spawn):
    """Under --hidepid a user sees only its own directories; their inode numbers
    must not tell how many registrations of others came between them."""
    daemon = daemon_factory("--hidepid")
    gaps = []
    for _ in range(3):
        first, second = spawn(uid=NOBODY), spawn(uid=NOBODY)
        daemon.register(first.pid)
        for _ in range(5):  # root's, hidden from nobody
            daemon.register(spawn().pid)
        daemon.register(second.pid)
        gaps.append(
            os.stat(daemon.path(second.pid)).st_ino - os.stat(daemon.path(first.pid)).st_ino
        )
    stride = gaps[0] // 6 if gaps[0] % 6 == 0 else None
    assert not (stride and all(gap == 6 * stride for gap in gaps)), gaps
    listing = [name for name in os.listdir(daemon.mountpoint) if name.isdigit()]
    assert len(listing) == 21  # every directory still listed once
