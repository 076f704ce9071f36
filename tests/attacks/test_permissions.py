"""Who may act on a process, with real unprivileged uids (setpriv).

- A user manages their own processes with nothing installed (`cat`, `echo`).
- No user can register, cap, reset, deregister (or so kill) another user's process by
  any path: the files, mkdir/rmdir (aliases included), the client library, the
  `restrack` command, and `restrack run` with a root supervisor answering an
  unprivileged program (which never acts as root for a caller it cannot be sure of).
- A quota root set binds the owner by every one of those paths, and deny mode takes
  back a limit the owner raises; setuid processes get what kill(2) allows.
- --hidepid hides other users' processes from listings, lookups under any name,
  every file and metrics, and its errno tells nothing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.build import compile_c
from tests.support.cli import restrack_run
from tests.support.daemon import Daemon
from tests.support.mount import opened
from tests.support.paths import C_SOURCES
from tests.support.procs import limits_of, tracked
from tests.support.users import NOBODY, as_user, run_as, sh
from tests.support.waiting import wait_until
from tests.support.workload import Workload
from tracker.engine import state as state_file

OTHER = 65533


PYTHON = str(Path(sys.executable).parent / "python")


NO_QUOTA = "heap=max files=max action=kill\n"


CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from restrackfs import client
    pid, mount = int(sys.argv[1]), sys.argv[2]
    calls = {
        "register": lambda: client.register(pid, mount=mount),
        "resource_cap": lambda: client.resource_cap(pid, 1, 1, mount=mount),
        "uncap": lambda: client.resource_cap(pid, None, None, mount=mount),
        "resource_reset": lambda: client.resource_reset(pid, mount=mount),
        "reset quota": lambda: client.reset(pid, "quota", mount=mount),
        "reset usage": lambda: client.reset(pid, "usage", mount=mount),
        "deregister": lambda: client.deregister(pid, mount=mount),
    }
    out = {}
    for name in sys.argv[3:]:
        try:
            calls[name]()
            out[name] = 0
        except OSError as error:
            out[name] = error.errno
    print(json.dumps(out))
    """
)


def refused_to_nobody(*commands: str) -> None:
    """Each shell command, run as nobody, fails with EPERM."""
    for command in commands:
        code, err = shell_as(NOBODY, command)
        assert code != 0 and "Operation not permitted" in err, command


def shell_as(uid: int, command: str) -> tuple[int, str]:
    result = sh(command, uid=uid)
    return result.returncode, result.stderr


# ----- a user and their own processes ---------------------------------------------------


def test_user_manages_own_process(daemon, spawn):
    w = spawn(uid=NOBODY)
    m = daemon.mountpoint
    assert shell_as(NOBODY, f"echo {w.pid} > {m}/register") == (0, "")
    assert shell_as(NOBODY, f"echo files=5 > {m}/{w.pid}/quota") == (0, "")
    assert shell_as(NOBODY, f"echo 1 > {m}/{w.pid}/reset") == (0, "")
    assert shell_as(NOBODY, f"rmdir {m}/{w.pid}") == (0, "")
    assert shell_as(NOBODY, f"mkdir {m}/{w.pid}") == (0, "")
    assert shell_as(NOBODY, f"echo {w.pid} > {m}/deregister") == (0, "")


def test_plain_shell_needs_no_install(daemon, spawn):
    """The README's promise: `cat` and `echo` work for every user with nothing installed,
    nothing on PATH but the system's, no environment at all."""
    w = spawn(uid=NOBODY)
    m = daemon.mountpoint
    script = (
        f"cd / && echo {w.pid} > {m}/register && echo files=7 > {m}/{w.pid}/quota"
        f" && cat {m}/{w.pid}/heapsize {m}/{w.pid}/quota && ls {m}"
    )
    argv = as_user(NOBODY, ["/usr/bin/env", "-i", "PATH=/usr/bin:/bin", "/bin/sh", "-c", script])
    result = subprocess.run(argv, capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.split("\n")[:2] == ["0", "heap=max files=7 action=kill"]
    assert str(w.pid) in result.stdout.split()


def test_owner_quota_can_be_lifted_by_owner(daemon, spawn):
    w = spawn(uid=NOBODY)
    m = daemon.mountpoint
    daemon.register(w.pid)
    assert shell_as(NOBODY, f"echo files=2 > {m}/{w.pid}/quota") == (0, "")
    assert shell_as(NOBODY, f"echo quota > {m}/{w.pid}/reset") == (0, "")
    assert daemon.read(w.pid, "quota") == "heap=max files=max action=kill\n"


def test_permission_is_checked_with_the_openers_uid(daemon, spawn):
    """An fd opened by root and handed to a user keeps root's rights, as in /proc."""
    w = spawn()
    daemon.register(w.pid)
    with opened(daemon, w.pid, "quota", flags=os.O_WRONLY) as fd:
        os.write(fd, b"files=3")
    assert daemon.read(w.pid, "quota").startswith("heap=max files=3")


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


# ----- another user's processes, by every path ------------------------------------------


def test_user_cannot_touch_another_users_process(daemon, spawn):
    root_proc, other = spawn(), spawn(uid=OTHER)
    m = daemon.mountpoint
    for target in (root_proc, other):
        code, err = shell_as(NOBODY, f"echo {target.pid} > {m}/register")
        assert code != 0 and "Operation not permitted" in err
        code, err = shell_as(NOBODY, f"mkdir {m}/{target.pid}")
        assert code != 0 and "Operation not permitted" in err
        daemon.register(target.pid)
        refused_to_nobody(
            f"echo files=1 > {m}/{target.pid}/quota",
            f"echo 1 > {m}/{target.pid}/reset",
            f"echo usage > {m}/{target.pid}/reset",
            f"echo {target.pid} > {m}/deregister",
            f"rmdir {m}/{target.pid}",
        )
        assert daemon.read(target.pid, "quota") == "heap=max files=max action=kill\n"
        assert os.path.isdir(daemon.path(target.pid))
        # reading is allowed to everybody without --hidepid, like /proc/PID/status
        code, _ = shell_as(NOBODY, f"cat {m}/{target.pid}/stat")
        assert code == 0


def test_root_quota_binds_the_owner(daemon, spawn):
    w = spawn(uid=NOBODY)
    m = daemon.mountpoint
    daemon.register(w.pid)
    daemon.write("files=2", w.pid, "quota")
    refused_to_nobody(
        f"echo 1 > {m}/{w.pid}/reset",
        f"echo quota > {m}/{w.pid}/reset",
        f"echo usage > {m}/{w.pid}/reset",
        f"echo {w.pid} > {m}/deregister",
        f"rmdir {m}/{w.pid}",
    )
    code, err = shell_as(NOBODY, f"echo files=100 > {m}/{w.pid}/quota")
    assert "Device or resource busy" in err
    assert daemon.read(w.pid, "quota") == "heap=max files=2 action=kill\n"
    daemon.write("1", w.pid, "reset")  # root may
    assert shell_as(NOBODY, f"echo files=100 > {m}/{w.pid}/quota") == (0, "")


def by_files(daemon: Daemon, uid: int, pid: int, ops: list[str]) -> dict[str, int]:
    m = daemon.mountpoint
    commands = {
        "register": f"echo {pid} > {m}/register",
        "mkdir": f"mkdir {m}/{pid}",
        "mkdir alias": f"mkdir {m}/0{pid}",
        "cap": f"echo files=1 > {m}/{pid}/quota",
        "uncap": f"echo heap=max files=max > {m}/{pid}/quota",
        "reset": f"echo 1 > {m}/{pid}/reset",
        "reset quota": f"echo quota > {m}/{pid}/reset",
        "reset usage": f"echo usage > {m}/{pid}/reset",
        "deregister": f"echo {pid} > {m}/deregister",
        "rmdir": f"rmdir {m}/{pid}",
        "rmdir alias": f"rmdir {m}/00{pid}",
    }
    script = "; ".join(f"{commands[op]} 2>/dev/null; echo $?" for op in ops)
    codes = run_as(uid, "bash", "-c", script).stdout.split()
    return dict(zip(ops, map(int, codes), strict=True))


def by_client(daemon: Daemon, uid: int, pid: int, calls: list[str]) -> dict[str, int]:
    result = run_as(uid, PYTHON, "-c", CLIENT_SCRIPT, pid, daemon.mountpoint, *calls)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


CLI = {
    "register": ["register", "{pid}"],
    "cap": ["cap", "{pid}", "--files", "1"],
    "uncap": ["cap", "{pid}", "--heap", "max", "--files", "max"],
    "reset": ["reset", "{pid}"],
    "reset quota": ["reset", "{pid}", "--quota"],
    "reset usage": ["reset", "{pid}", "--usage"],
    "deregister": ["deregister", "{pid}"],
}


def by_cli(daemon: Daemon, uid: int, pid: int, commands: list[str]) -> dict[str, int]:
    """Exit codes of `restrack` (6: not permitted, 7: quota already set)."""
    out = {}
    for name in commands:
        args = [a.format(pid=pid) for a in CLI[name]]
        argv = [PYTHON, "-m", "restrackfs.cli", "--mount", daemon.mountpoint, *args]
        out[name] = run_as(uid, *argv).returncode
    return out


def by_abi(daemon: Daemon, abi_ops: Path, uid: int, pid: int, ops: list[str]) -> dict[str, str]:
    """`restrack run` as root, serving a program that runs as `uid`."""
    program = as_user(uid, [abi_ops])
    argv = [sys.executable, "-m", "restrackfs.cli", "--mount", str(daemon.mountpoint), "run"]
    result = subprocess.run(
        [*argv, "--", *map(str, program), str(pid), *ops],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


def world(daemon: Daemon, *workloads: Workload) -> dict[str, object]:
    tracked = sorted(n for n in os.listdir(daemon.mountpoint) if n.isdigit())
    return {
        "tracked": tracked,
        "quotas": {p: daemon.read(p, "quota") for p in tracked},
        "limits": {w.pid: Path(f"/proc/{w.pid}/limits").read_text() for w in workloads},
        "state": sorted(json.dumps(r, sort_keys=True) for r in state_file.load(daemon.state)),
    }


@pytest.mark.parametrize("owner", [0, OTHER], ids=["root's", "another user's"])
def test_no_path_lets_a_user_control_another_users_process(daemon, spawn, abi_ops, owner):
    target = spawn(uid=owner or None)
    bystander = spawn(uid=NOBODY)  # the attacker's own process, to compare with
    pid = target.pid

    before = world(daemon, target)
    files = by_files(daemon, NOBODY, pid, ["register", "mkdir", "mkdir alias"])
    client = by_client(daemon, NOBODY, pid, ["register"])
    cli = by_cli(daemon, NOBODY, pid, ["register"])
    abi = by_abi(daemon, abi_ops, NOBODY, pid, ["register"])
    assert files == {"register": 1, "mkdir": 1, "mkdir alias": 1}
    assert client == {"register": errno.EPERM}
    assert cli == {"register": 6}
    assert abi == {"register": "-1 EPERM"}
    assert world(daemon, target) == before

    daemon.register(pid)
    target.do("open", 2)
    daemon.register(bystander.pid)
    before = world(daemon, target, bystander)
    ops = ["cap", "uncap", "reset", "reset quota", "reset usage", "deregister", "rmdir"]
    files = by_files(daemon, NOBODY, pid, [*ops, "rmdir alias"])
    client_calls = ["resource_cap", "uncap", "resource_reset", "reset quota", "reset usage"]
    client = by_client(daemon, NOBODY, pid, [*client_calls, "deregister"])
    cli = by_cli(daemon, NOBODY, pid, [op for op in ops if op != "rmdir"])
    abi = by_abi(daemon, abi_ops, NOBODY, pid, ["cap", "uncap", "reset", "deregister", "fetch"])
    assert files == dict.fromkeys([*ops, "rmdir alias"], 1)
    assert client == dict.fromkeys([*client_calls, "deregister"], errno.EPERM)
    assert cli == dict.fromkeys([op for op in ops if op != "rmdir"], 6)
    expected_abi = dict.fromkeys(["cap", "uncap", "reset", "deregister"], "-1 EPERM")
    assert abi == {**expected_abi, "fetch": "0 0"}  # reading is everybody's right
    assert world(daemon, target, bystander) == before
    assert target.alive()
    # the same calls on the attacker's own process all work (the test is not vacuous)
    assert by_client(daemon, NOBODY, bystander.pid, ["resource_cap", "resource_reset"]) == {
        "resource_cap": 0,
        "resource_reset": 0,
    }


def test_a_root_quota_binds_the_owner_by_every_path(daemon, spawn, abi_ops):
    w = spawn(uid=NOBODY)
    pid = w.pid
    daemon.register(pid)
    w.do("open", 1)
    daemon.write("heap=512M files=4 action=deny", pid, "quota")  # root's
    before = world(daemon, w)
    files = by_files(
        daemon, NOBODY, pid, ["uncap", "reset", "reset quota", "reset usage", "deregister",
                              "rmdir", "rmdir alias"]
    )  # fmt: skip
    client = by_client(
        daemon, NOBODY, pid, ["uncap", "resource_reset", "reset quota", "reset usage", "deregister"]
    )
    cli = by_cli(
        daemon, NOBODY, pid, ["uncap", "reset", "reset quota", "reset usage", "deregister"]
    )
    abi = by_abi(daemon, abi_ops, NOBODY, pid, ["uncap", "reset", "deregister"])
    assert files == dict.fromkeys(files, 1)
    assert client == {
        "uncap": errno.EBUSY,  # a second quota is refused to everybody
        "resource_reset": errno.EPERM,
        "reset quota": errno.EPERM,
        "reset usage": errno.EPERM,
        "deregister": errno.EPERM,
    }
    assert cli == {"uncap": 7, "reset": 6, "reset quota": 6, "reset usage": 6, "deregister": 6}
    assert abi == {"uncap": "-1 ENFILE", "reset": "-1 EPERM", "deregister": "-1 EPERM"}
    assert world(daemon, w) == before
    # nor by raising its own soft limit: the next check lowers it back
    lowered = limits_of(pid, "Max open files")
    w.do("setrlimit", "nofile", -1)
    wait_until(lambda: limits_of(pid, "Max open files") == lowered, what="lowered back")
    assert w.ask("open", 9) == f"ok 3 {errno.EMFILE}"


# ----- restrack run fails closed --------------------------------------------------------


@pytest.fixture(scope="module")
def thread_exit_race(bin_dir: Path) -> Path:
    return compile_c(C_SOURCES / "thread_exit_race.c", bin_dir / "thread_exit_race")


def test_restrack_run_never_acts_as_root_for_a_thread_that_exits(daemon, spawn, thread_exit_race):
    """Found by a review: the root supervisor read the caller's ids from
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
    program = as_user(NOBODY, [thread_exit_race, unregistered.pid, uncapped.pid, capped.pid, 300])
    result = restrack_run(daemon, *program)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1:] == ["done"], result.stdout
    assert not [line for line in result.stdout.splitlines() if line.startswith("won")]
    assert tracked(daemon.mountpoint) == sorted([uncapped.pid, capped.pid])
    assert daemon.read(uncapped.pid, "quota") == NO_QUOTA
    assert all(w.alive() for w in (unregistered, uncapped, capped))
    assert "by uid=0" not in daemon.log_text()[log_before:]


# ----- setuid processes -----------------------------------------------------------------


@pytest.fixture
def setuid_workload(bin_dir: Path, workload_binary: Path):
    """A setuid-root copy of the workload, removed after the test."""
    binary = bin_dir / "workload-setuid"
    shutil.copy(workload_binary, binary)
    os.chown(binary, 0, 0)
    binary.chmod(0o4755)
    yield binary
    binary.unlink()


def test_a_setuid_process_is_killable_by_its_user_as_kill2_allows(daemon, setuid_workload):
    """A setuid-root program run by a user keeps the user's real uid: the user may
    register it and give it a kill quota (kill(2) lets them signal it too)."""
    w = Workload(setuid_workload, NOBODY)
    try:
        status = Path(f"/proc/{w.pid}/status").read_text()
        assert "Uid:\t65534\t0\t0" in status  # real nobody, effective and saved root
        m = daemon.mountpoint
        assert sh(f"echo {w.pid} > {m}/register", uid=NOBODY).returncode == 0
        assert sh(f"echo files=1 > {m}/{w.pid}/quota", uid=NOBODY).returncode == 0
        w.ask("open", 2)
        assert w.wait() == -9
    finally:
        w.stop()


def test_a_user_cannot_set_deny_limits_on_a_setuid_root_process(daemon, setuid_workload):
    """README: ids that differ (a setuid program) make a deny quota EPERM; the user's
    kill quota above is as kill(2) would allow, but rlimits are not the user's to set."""
    w = Workload(setuid_workload, NOBODY)
    try:
        before = limits_of(w.pid, "Max open files")
        m = daemon.mountpoint
        assert sh(f"echo {w.pid} > {m}/register", uid=NOBODY).returncode == 0
        result = sh(f"echo files=1 action=deny > {m}/{w.pid}/quota", uid=NOBODY)
        assert limits_of(w.pid, "Max open files") == before
        assert "Operation not permitted" in result.stderr
    finally:
        w.stop()


# ----- hidepid --------------------------------------------------------------------------


@pytest.fixture
def hidden(daemon_factory):
    return daemon_factory("--hidepid")


def test_hidepid_hides_by_every_name_and_file(hidden, spawn):
    theirs, mine = spawn(), spawn(uid=NOBODY)
    hidden.register(theirs.pid)
    hidden.register(mine.pid)
    m = hidden.mountpoint
    names = os.listdir(hidden.path(theirs.pid))
    for name in names:  # root looks first: nothing of it may stay cached for the user
        if os.stat(hidden.path(theirs.pid, name)).st_mode & 0o444:
            hidden.read(theirs.pid, name)
    paths = [f"{theirs.pid}", f"0{theirs.pid}", f"{theirs.pid} ", f"000{theirs.pid}"]
    paths += [f"{theirs.pid}/{name}" for name in names] + [f"0{theirs.pid}/stat"]
    script = textwrap.dedent(
        f"""
        import json, os
        out = {{}}
        for path in {paths!r}:
            try:
                os.stat({str(m)!r} + "/" + path)
                out[path] = "visible"
            except OSError as error:
                out[path] = error.errno
        out["ls"] = sorted(os.listdir({str(m)!r}))
        out["scandir"] = sorted(e.name for e in os.scandir({str(m)!r}))
        out["metrics"] = open({str(m)!r} + "/metrics").read()
        print(json.dumps(out))
        """
    )
    result = run_as(NOBODY, PYTHON, "-c", script)
    seen = json.loads(result.stdout)
    for path in paths:
        assert seen[path] == errno.ENOENT, path
    for listing in ("ls", "scandir"):
        assert str(theirs.pid) not in seen[listing] and str(mine.pid) in seen[listing]
    assert f'pid="{theirs.pid}"' not in seen["metrics"]
    assert f'pid="{mine.pid}"' in seen["metrics"]


def test_hidepid_errno_does_not_tell_whether_a_hidden_process_is_tracked(hidden, spawn):
    """Found here: register/mkdir answered EEXIST for another user's tracked process
    and EPERM for an untracked one (deregister: EPERM and ESRCH), telling a user which
    hidden processes are tracked."""
    tracked, untracked = spawn(), spawn()
    hidden.register(tracked.pid)
    m = str(hidden.mountpoint)
    script = textwrap.dedent(
        f"""
        import json, os, sys
        def errno_of(action):
            try:
                action()
                return 0
            except OSError as error:
                return error.errno
        def write(name, text):
            fd = os.open({m!r} + "/" + name, os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        out = {{}}
        for pid in sys.argv[1:]:
            out[pid] = [
                errno_of(lambda: write("register", pid)),
                errno_of(lambda: os.mkdir({m!r} + "/" + pid)),
                errno_of(lambda: write("deregister", pid)),
                errno_of(lambda: os.rmdir({m!r} + "/" + pid)),
            ]
        print(json.dumps(out))
        """
    )
    result = run_as(NOBODY, PYTHON, "-c", script, tracked.pid, untracked.pid)
    answers = json.loads(result.stdout)
    assert answers[str(tracked.pid)] == answers[str(untracked.pid)]


def test_hidepid_hides_other_users_processes(hidden, spawn):
    mine, theirs = spawn(uid=NOBODY), spawn()
    m = hidden.mountpoint
    hidden.register(mine.pid)
    hidden.register(theirs.pid)
    listing = sh(f"ls {m}", uid=NOBODY).stdout.split()
    assert str(mine.pid) in listing and str(theirs.pid) not in listing
    code, err = shell_as(NOBODY, f"cat {m}/{theirs.pid}/heapsize")
    assert code != 0 and "No such file or directory" in err
    assert shell_as(NOBODY, f"cat {m}/{mine.pid}/heapsize")[0] == 0
    metrics = sh(f"cat {m}/metrics", uid=NOBODY).stdout
    assert f'pid="{mine.pid}"' in metrics and f'pid="{theirs.pid}"' not in metrics
    assert "restrack_tracked_processes 1" in metrics
    # root still sees everything, and a lookup by root does not leak to the user
    assert str(theirs.pid) in os.listdir(m)
    os.stat(hidden.path(theirs.pid, "stat"))
    code, _ = shell_as(NOBODY, f"stat {m}/{theirs.pid}")
    assert code != 0


def test_hidepid_rmdir_of_hidden_is_enoent(hidden, spawn):
    theirs = spawn()
    hidden.register(theirs.pid)
    code, err = shell_as(NOBODY, f"rmdir {hidden.mountpoint}/{theirs.pid}")
    assert code != 0 and "No such file or directory" in err
