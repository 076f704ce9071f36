"""The security model under attack (SPEC §5), with real unprivileged uids (setpriv).

- No user can register, cap, reset, deregister (or so kill) another user's
  process by any path: the files, mkdir/rmdir (aliases included), the client
  library, the `restrack` command, and `restrack run` with a root supervisor
  answering an unprivileged program.
- A quota root set binds the owner by every one of those paths, and deny mode
  takes back a limit the owner raises.
- --hidepid hides other users' processes from listings, lookups under any
  name, every file and metrics.
- The daemon follows no symlink and trusts no file a user controls.
- An unprivileged user cannot take the daemon down, nor stall it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.daemon import Daemon
from tests.support.procs import has_cap_sys_resource, limits_of
from tests.support.tempdirs import shared_tempdir
from tests.support.users import NOBODY, sh
from tests.support.users import as_user as user_argv
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


def as_user(uid: int, *argv: object, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        user_argv(uid, argv), capture_output=True, text=True, cwd="/", timeout=60, **kw
    )


# ----- every path, every operation ------------------------------------------------------


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
    codes = as_user(uid, "bash", "-c", script).stdout.split()
    return dict(zip(ops, map(int, codes), strict=True))


def by_client(daemon: Daemon, uid: int, pid: int, calls: list[str]) -> dict[str, int]:
    result = as_user(uid, PYTHON, "-c", CLIENT_SCRIPT, pid, daemon.mountpoint, *calls)
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
        out[name] = as_user(uid, *argv).returncode
    return out


def by_abi(daemon: Daemon, abi_ops: Path, uid: int, pid: int, ops: list[str]) -> dict[str, str]:
    """`restrack run` as root, serving a program that runs as `uid`."""
    program = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", abi_ops]
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


ESCAPE_C = r"""
/* escape: prints its pid; on a line on stdin the main thread exits (pthread_exit)
 * while a second thread lives on, then maps and touches 64 MiB, opens 8 files and
 * prints "done". */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
static pthread_t main_thread;
static void *worker(void *arg) {
    (void)arg;
    pthread_join(main_thread, NULL);
    usleep(300000); /* three of the daemon's check intervals */
    char *p = mmap(NULL, 64 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(p, 1, 64 << 20);
    for (int i = 0; i < 8; i++) open("/dev/null", O_RDONLY);
    printf("done\n");
    fflush(stdout);
    for (;;) pause();
    return NULL;
}
int main(void) {
    char line[16];
    pthread_t t;
    main_thread = pthread_self();
    printf("%d\n", getpid());
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    pthread_create(&t, NULL, worker, NULL);
    pthread_exit(NULL);
}
"""


def test_a_process_cannot_escape_its_quota_by_ending_its_main_thread(daemon, bin_dir):
    """Found here: when a process's main thread exits (pthread_exit) and its other
    threads go on, /proc/PID/status has no VmData (the leader is a zombie); the daemon
    took the whole process for exited and dropped it within one check, so its threads
    could allocate and open past a quota root set, unseen."""
    source = bin_dir / "escape.c"
    source.write_text(ESCAPE_C)
    subprocess.run(["gcc", "-O1", "-pthread", "-o", bin_dir / "escape", source], check=True)
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    proc = subprocess.Popen(
        [*argv, bin_dir / "escape"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        pid = int(proc.stdout.readline())
        daemon.register(pid)
        daemon.write("heap=10M files=4", pid, "quota")  # root's, kill
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.stdout.readline()  # "done" once over its quota, or "" if killed first
        try:  # wait for the kill itself: stdout closes before the kernel reaps the process
            status = proc.wait(timeout=5)  # fifty check intervals
        except subprocess.TimeoutExpired:
            status = None
        assert status == -signal.SIGKILL, (
            f"over its quota and alive ({status}); "
            f"tracked: {str(pid) in os.listdir(daemon.mountpoint)}"
        )
    finally:
        proc.kill()
        proc.wait()


# ----- hidepid ------------------------------------------------------------------------------


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
    result = as_user(NOBODY, PYTHON, "-c", script)
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
    result = as_user(NOBODY, PYTHON, "-c", script, tracked.pid, untracked.pid)
    answers = json.loads(result.stdout)
    assert answers[str(tracked.pid)] == answers[str(untracked.pid)]


# ----- paths and files a user controls ---------------------------------------------------


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_nothing_planted_at_the_state_temp_path_is_followed(daemon_factory, spawn, tmp_path,
                                                            planted):  # fmt: skip
    """The journal is compacted through a temp file beside it: a symlink there must not
    be followed (its target overwritten), a FIFO must not block the daemon."""
    daemon = daemon_factory(start=False)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    temp = daemon.state.with_name(f".{daemon.state.name}.tmp")
    if planted == "symlink":
        temp.symlink_to(victim)
    else:
        os.mkfifo(temp)
    w = spawn()
    daemon.start()  # compacting the journal at start goes through the temp path
    try:
        daemon.register(w.pid)
        outcome = 0
    except OSError as error:
        outcome = error.errno
    assert outcome in (0, errno.EIO, errno.ELOOP)
    assert victim.read_text() == "precious\n"
    if temp.exists() or temp.is_symlink():
        temp.unlink()
    if outcome:
        daemon.register(w.pid)  # the way is clear again
    assert victim.read_text() == "precious\n"
    assert str(w.pid) in os.listdir(daemon.mountpoint)


def test_a_state_file_planted_by_a_user_is_not_trusted(daemon_factory, spawn):
    """Found here: with --state in a directory a user can write (a sticky,
    world-writable one, like /tmp), the daemon loaded a state file that user planted,
    and killed the process it named at start. Such a directory is now refused at
    start (tests/test_security_deny.py); a file another user owns is not trusted
    wherever it is (here one left in a root-only directory)."""
    shared = shared_tempdir("restrack-shared-")
    try:
        victim = spawn()  # root's
        victim.do("mmap", 1 << 20)
        daemon = daemon_factory(start=False)
        daemon.state = shared / "state.json"
        stat = Path(f"/proc/{victim.pid}/stat").read_text().rsplit(")", 1)[1].split()
        record = {
            "pid": victim.pid, "start_time": int(stat[19]), "heap_base": 0, "files_base": 0,
            "registered": time.time(), "quota": {"heap": 0, "files": None, "action": "kill"},
            "quota_uid": 0, "saved_soft": {},
        }  # fmt: skip
        planted = json.dumps(state_file.HEADER) + "\n" + json.dumps({"put": record}) + "\n"
        daemon.state.write_text(planted)
        os.chown(daemon.state, NOBODY, NOBODY)  # as if that user had written it
        daemon.start()
        watch_until = time.monotonic() + 1
        while victim.alive() and time.monotonic() < watch_until:
            daemon.read("metrics")  # a second, with checks every 100 ms
        assert victim.alive(), "a user-written state file made the daemon kill root's process"
        assert str(victim.pid) not in os.listdir(daemon.mountpoint)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_process_name_cannot_forge_a_log_line(daemon):
    """Found here: registration and enforcement log lines printed comm as
    /proc/PID/comm gives it, so a process named 'x\\nFORGED LINE' wrote a line of its
    choosing into the daemon's log."""
    m = daemon.mountpoint
    script = textwrap.dedent(
        f"""
        import os, sys
        with open("/proc/self/comm", "w") as comm:
            comm.write("x\\nFORGED LINE")
        pid = os.getpid()
        with open("{m}/register", "w") as f:
            f.write(str(pid))
        with open(f"{m}/{{pid}}/quota", "w") as f:
            f.write("files=0 action=notify")
        extra = os.open("/dev/null", os.O_RDONLY)
        open(f"{m}/{{pid}}/stat").read()  # a read checks the quota too
        print("done", flush=True)
        sys.stdin.read()
        """
    )
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    proc = subprocess.Popen(
        [*argv, "/usr/bin/python3", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout.readline() == b"done\n"
        wait_until(lambda: "action=notify" in daemon.log_text(), what="enforcement logged")
    finally:
        proc.kill()
        proc.wait()
    lines = daemon.log_text().splitlines()
    assert not [line for line in lines if line.startswith("FORGED")], "a forged log line"


# ----- the daemon itself ----------------------------------------------------------------------

SPIN_C = r"""
/* spin PID SECONDS: send SIGKILL to PID until it works or time is up. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(int argc, char **argv) {
    pid_t pid = atoi(argv[1]);
    double limit = atof(argv[2]);
    struct timespec t0, t;
    long tries = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        for (int i = 0; i < 1000; i++, tries++)
            if (kill(pid, SIGKILL) == 0) { printf("killed %ld\n", tries); return 0; }
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec + (t.tv_nsec - t0.tv_nsec) / 1e9 > limit) break;
    }
    printf("refused %ld\n", tries);
    return 1;
}
"""


@pytest.mark.parametrize(
    "seconds", [pytest.param(2, id="short"), pytest.param(20, id="long", marks=pytest.mark.slow)]
)
def test_a_user_cannot_kill_the_daemon(daemon, spawn, bin_dir, seconds):
    """Found here: for deny mode the daemon's main thread (the thread-group leader,
    whose credentials kill(2) checks) took the target's real uid around each prlimit();
    a user keeping it at that (a deny quota and `usage` resets in a loop) while another
    of their processes spun on kill(daemon, SIGKILL) got through in about 0.1 s."""
    spin = bin_dir / "spin"
    (bin_dir / "spin.c").write_text(SPIN_C)
    subprocess.run(["gcc", "-O2", "-o", spin, bin_dir / "spin.c"], check=True)
    w = spawn(uid=NOBODY)
    m = daemon.mountpoint
    assert sh(f"echo {w.pid} > {m}/register", uid=NOBODY).returncode == 0
    assert sh(f"echo heap=1G files=100 action=deny > {m}/{w.pid}/quota", uid=NOBODY).returncode == 0
    hammer = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sh", "-c",
         f"while echo usage > {m}/{w.pid}/reset; do :; done"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        result = as_user(NOBODY, spin, daemon.proc.pid, seconds)
        hammering = hammer.poll() is None
    finally:
        hammer.kill()
        hammer.wait()
    daemon.proc.poll()
    resets = daemon.log_text().count(f"reset pid={w.pid}")
    print(f"\ndaemon kill attack: {result.stdout.strip()} kill() calls, {resets} resets")
    assert hammering and resets > 10 * seconds, "the attack was not kept up"
    assert result.stdout.startswith("refused"), result.stdout
    assert daemon.proc.returncode is None, "the daemon was killed by an unprivileged user"


STOPPER_C = r"""
/* stopper SECONDS DAEMON: SIGSTOP each child of DAEMON of my uid named setpriv or prlimit
 * (its children only: the machine may run other suites' helpers too). */
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static long parent_of(const char *pid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%s/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *end = strrchr(buf, ')'); /* comm may hold spaces and parentheses */
    return end ? atol(end + 4) : -1; /* ") S PPID" */
}
int main(int argc, char **argv) {
    double limit = atof(argv[1]);
    long daemon = atol(argv[2]);
    struct timespec t0, t;
    long stopped = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        DIR *d = opendir("/proc");
        struct dirent *e;
        while ((e = readdir(d))) {
            char path[64], comm[32] = {0};
            if (e->d_name[0] < '1' || e->d_name[0] > '9') continue;
            snprintf(path, sizeof path, "/proc/%s/comm", e->d_name);
            FILE *f = fopen(path, "r");
            if (!f) continue;
            if (fgets(comm, sizeof comm, f)
                && (!strncmp(comm, "prlimit", 7) || !strncmp(comm, "setpriv", 7))
                && parent_of(e->d_name) == daemon && kill(atoi(e->d_name), SIGSTOP) == 0)
                stopped++;
            fclose(f);
        }
        closedir(d);
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec + (t.tv_nsec - t0.tv_nsec) / 1e9 > limit) break;
    }
    printf("stopped %ld\n", stopped);
    return 0;
}
"""


def test_a_user_cannot_freeze_the_daemon(daemon, spawn, bin_dir):
    if has_cap_sys_resource(daemon.proc.pid):
        pytest.skip("the daemon has CAP_SYS_RESOURCE: no helper runs")
    stopper = bin_dir / "stopper"
    (bin_dir / "stopper.c").write_text(STOPPER_C)
    subprocess.run(["gcc", "-O2", "-o", stopper, bin_dir / "stopper.c"], check=True)
    w = spawn(uid=NOBODY)
    m = daemon.mountpoint
    assert sh(f"echo {w.pid} > {m}/register", uid=NOBODY).returncode == 0
    assert sh(f"echo heap=1G files=100 action=deny > {m}/{w.pid}/quota", uid=NOBODY).returncode == 0
    attack = [
        subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for argv in (
            ["sh", "-c", f"while echo usage > {m}/{w.pid}/reset; do :; done"],
            [str(stopper), "1.5", str(daemon.proc.pid)],
        )
    ]
    worst, began = 0.0, time.monotonic()
    try:
        while time.monotonic() - began < 1.5:
            started = time.monotonic()
            daemon.read("metrics")  # root, about nothing of the attacker's
            worst = max(worst, time.monotonic() - started)
    finally:
        for proc in attack:
            proc.kill()
            proc.wait()
    print(f"\nfreeze attack: slowest read {worst:.3f} s")
    assert worst < 1.0, f"a read by root waited {worst:.1f} s"
