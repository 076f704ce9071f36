"""An unprivileged user cannot take the daemon down, stall it, grow it without bound,
or make it follow a symlink or trust a file they control."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from restrackfs import handles
from tests.support.build import compile_c
from tests.support.daemon import Daemon
from tests.support.mount import opened
from tests.support.paths import C_SOURCES
from tests.support.procs import has_cap_sys_resource
from tests.support.tempdirs import shared_tempdir
from tests.support.users import NOBODY, as_user, run_as, sh
from tests.support.workload import Workload
from tracker.engine import state as state_file

# ----- paths and files a user controls --------------------------------------------------


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
    start (tests/attacks/test_deny.py); a file another user owns is not trusted
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


# ----- the daemon itself ----------------------------------------------------------------


def under_own_deny_quota(daemon: Daemon, spawn) -> Workload:
    """A process of nobody's, registered by nobody under nobody's own deny quota: each
    `usage` reset then runs a limit helper as nobody."""
    w = spawn(uid=NOBODY)
    m = daemon.mountpoint
    assert sh(f"echo {w.pid} > {m}/register", uid=NOBODY).returncode == 0
    assert sh(f"echo heap=1G files=100 action=deny > {m}/{w.pid}/quota", uid=NOBODY).returncode == 0
    return w


@pytest.mark.parametrize(
    "seconds", [pytest.param(2, id="short"), pytest.param(20, id="long", marks=pytest.mark.slow)]
)
def test_a_user_cannot_kill_the_daemon(daemon, spawn, bin_dir, seconds):
    """Found here: for deny mode the daemon's main thread (the thread-group leader,
    whose credentials kill(2) checks) took the target's real uid around each prlimit();
    a user keeping it at that (a deny quota and `usage` resets in a loop) while another
    of their processes spun on kill(daemon, SIGKILL) got through in about 0.1 s."""
    spin = bin_dir / "spin"
    compile_c(C_SOURCES / "spin.c", spin, optimize="-O2", threads=False)
    w = under_own_deny_quota(daemon, spawn)
    m = daemon.mountpoint
    hammer = subprocess.Popen(
        as_user(NOBODY, ["sh", "-c", f"while echo usage > {m}/{w.pid}/reset; do :; done"]),
        stderr=subprocess.DEVNULL,
    )
    try:
        result = run_as(NOBODY, spin, daemon.proc.pid, seconds)
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


def test_a_user_cannot_freeze_the_daemon(daemon, spawn, bin_dir):
    if has_cap_sys_resource(daemon.proc.pid):
        pytest.skip("the daemon has CAP_SYS_RESOURCE: no helper runs")
    stopper = bin_dir / "stopper"
    compile_c(C_SOURCES / "stopper.c", stopper, optimize="-O2", threads=False)
    w = under_own_deny_quota(daemon, spawn)
    m = daemon.mountpoint
    attack = [
        subprocess.Popen(
            as_user(NOBODY, argv),
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


# ----- memory per open handle -----------------------------------------------------------


# As nobody: open `metrics` up to N times, read one byte of each (so each handle's
# rendering is kept), report, and hold them all until stdin closes.
HOARDER = textwrap.dedent(
    """
    import collections, json, os, resource, sys
    path, n = sys.argv[1], int(sys.argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fds, refused = [], collections.Counter()
    for _ in range(n):
        try:
            fds.append(os.open(path, os.O_RDONLY))
        except OSError as error:
            refused[errno.errorcode[error.errno]] += 1
    first = sorted({os.read(fd, 1).decode() for fd in fds})
    print(json.dumps({"opened": len(fds), "refused": refused, "first": first}), flush=True)
    sys.stdin.read()
    """
).replace("import collections,", "import collections, errno,")


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) * 1024


def test_what_one_user_holds_open_cannot_grow_the_daemon_past_the_bound(daemon, spawn):
    """Found by a review: each open handle kept its own rendered text, so one user
    holding 15,000 open `metrics` handles, 200 processes tracked, took the daemon from
    35 to 225 MB. Now a uid holds at most 4096 handles (then ENFILE) and 8 MiB of kept
    texts (README, Security): the daemon grows by less than 16 MiB (9 MiB measured)."""
    for _ in range(60):  # with quotas: 12 KiB of metrics, as 200 without in the report
        pid = spawn().pid
        daemon.register(pid)
        daemon.write("heap=1G files=1000 action=notify", pid, "quota")
    text = daemon.read("metrics")
    assert len(text) > 12_000  # 4096 kept renderings of it would be 48 MiB
    before = rss(daemon.proc.pid)
    hoarder = subprocess.Popen(
        as_user(NOBODY, ["/usr/bin/python3", "-c", HOARDER, daemon.path("metrics"), 15_000]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        report = json.loads(hoarder.stdout.readline())
        during = rss(daemon.proc.pid)
        assert report["opened"] == handles.MAX_HANDLES_PER_UID
        assert report["refused"] == {"ENFILE": 15_000 - handles.MAX_HANDLES_PER_UID}
        assert report["first"] == ["#"]  # every handle read its first byte
        assert during - before < 16 << 20, f"{before >> 20} -> {during >> 20} MiB"
        # root is not held back by the user's handles, nor are its reads
        assert daemon.read("metrics").count("\n") == text.count("\n")
    finally:
        hoarder.kill()
        hoarder.wait()


def test_reads_past_offset_0_still_continue_the_same_rendering(daemon, spawn):
    """The bound keeps the seq_file rule: a reader part way through `metrics` reads
    the rest of the text it started, though a process was registered meanwhile."""
    daemon.register(spawn().pid)
    with opened(daemon, "metrics") as fd:
        start = os.read(fd, 10)
        late = spawn()
        daemon.register(late.pid)
        text = start + b"".join(iter(lambda: os.read(fd, 7), b""))
    assert b"restrack_tracked_processes 1\n" in text
    assert f'pid="{late.pid}"'.encode() not in text
    assert f'pid="{late.pid}"' in daemon.read("metrics")
