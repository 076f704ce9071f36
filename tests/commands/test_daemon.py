"""The daemon's life: start, stop, crash, restart, stale mounts, the error boundary."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyfuse3
import pytest

from restrackfs.fs import boundary
from tests.support.paths import CHECKOUT
from tests.support.procs import MiB, errno_of, limits_of
from tests.support.tempdirs import shared_tempdir
from tests.support.users import NOBODY
from tests.support.waiting import wait_until
from tracker.engine import state
from tracker.linux.procfs import NoSuchProcess


def test_sigterm_unmounts_cleanly(daemon):
    assert os.path.ismount(daemon.mountpoint)
    assert daemon.stop(signal.SIGTERM) == 0
    assert not os.path.ismount(daemon.mountpoint)
    assert os.listdir(daemon.mountpoint) == []


def test_sigint_unmounts_cleanly(daemon):
    assert daemon.stop(signal.SIGINT) == 0
    assert not os.path.ismount(daemon.mountpoint)


def test_restart_after_kill_resumes_counters_and_quotas(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    w.do("mmap", 3 * MiB)
    w.do("open", 2)
    daemon.write("files=5 action=notify", w.pid, "quota")
    daemon.stop(signal.SIGKILL)
    # the dead daemon leaves "Transport endpoint is not connected" behind
    assert errno_of(lambda: os.listdir(daemon.mountpoint)) == errno.ENOTCONN
    daemon.start()
    assert daemon.read(w.pid, "heapsize") == f"{3 * MiB}\n"
    assert daemon.read(w.pid, "openfile_count") == "2\n"
    assert daemon.read(w.pid, "quota") == "heap=max files=5 action=notify\n"
    assert errno_of(lambda: daemon.write("files=1", w.pid, "quota")) == errno.EBUSY


def test_restart_drops_exited_and_recycled(daemon, spawn):
    alive, exited, recycled = spawn(), spawn(), spawn()
    for w in (alive, exited, recycled):
        daemon.register(w.pid)
    daemon.stop()
    exited.stop()
    # Same pid, other start time: what a recycled pid looks like in the state file.
    records = state.load(daemon.state)
    for record in records:
        if record["pid"] == recycled.pid:
            record["start_time"] -= 1
    state.Journal(daemon.state).rewrite(records)
    daemon.start()
    assert sorted(n for n in os.listdir(daemon.mountpoint) if n.isdigit()) == [str(alive.pid)]
    assert [record["pid"] for record in state.load(daemon.state)] == [alive.pid]


@pytest.mark.parametrize("uid", [None, NOBODY])
def test_deny_limits_survive_any_stop_and_release_restores_them(daemon, spawn, uid):
    """A stop of any kind (a crash, a restart, an upgrade) lifts no quota; only
    `restrackfs --release` gives the soft limits back."""
    w = spawn(uid=uid)
    original = limits_of(w.pid, "Max open files")
    daemon.register(w.pid)
    daemon.write("files=2 action=deny", w.pid, "quota")
    lowered = limits_of(w.pid, "Max open files")
    assert lowered != original
    daemon.stop(signal.SIGKILL)
    daemon.start()
    assert limits_of(w.pid, "Max open files") == lowered
    assert w.ask("open", 3) == f"ok 2 {errno.EMFILE}"
    daemon.stop(signal.SIGTERM)
    assert limits_of(w.pid, "Max open files") == lowered, "a clean stop lifted the quota"
    assert w.ask("open", 1) == f"ok 0 {errno.EMFILE}"
    daemon.start()  # the quota is still there
    assert daemon.read(w.pid, "quota") == "heap=max files=2 action=deny\n"
    daemon.stop(signal.SIGTERM)
    released = subprocess.run(
        [sys.executable, "-m", "restrackfs.daemon", "--release", "--state", str(daemon.state)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "released 1 registrations" in released.stderr
    assert limits_of(w.pid, "Max open files") == original
    daemon.start()  # nothing left to adopt
    assert not [name for name in os.listdir(daemon.mountpoint) if name.isdigit()]


def test_state_file_is_saved_on_every_change(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    (record,) = state.load(daemon.state)
    assert record["pid"] == w.pid and record["quota"] is None
    daemon.write("heap=1G", w.pid, "quota")
    (record,) = state.load(daemon.state)
    assert record["quota"] == {"heap": 1 << 30, "files": None, "action": "kill"}
    assert record["quota_uid"] == 0
    daemon.write(str(w.pid), "deregister")
    assert state.load(daemon.state) == []
    # one JSON line per change, each whole
    lines = daemon.state.read_bytes().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) == 4


def test_state_file_replaced_under_the_daemon_is_written_anew(daemon, spawn):
    a, b = spawn(), spawn()
    daemon.register(a.pid)
    daemon.state.unlink()
    daemon.register(b.pid)
    assert sorted(r["pid"] for r in state.load(daemon.state)) == sorted([a.pid, b.pid])
    assert "written anew" in daemon.log_text() or "writing it anew" in daemon.log_text()


def test_unwritable_state_fails_the_write_and_changes_nothing(daemon, spawn):
    w = spawn()
    daemon.state.unlink()
    daemon.state.mkdir()  # rename() over a directory fails
    try:
        code = errno_of(lambda: daemon.register(w.pid))
        assert code == errno.EIO  # rename() over a directory: EISDIR would mislead
        assert str(w.pid) not in os.listdir(daemon.mountpoint)
        assert "not saved" in daemon.log_text()
    finally:
        daemon.state.rmdir()
    daemon.register(w.pid)


def test_background_mode_detaches_after_mounting(daemon_factory, tmp_path):
    daemon = daemon_factory(start=False)
    argv = [sys.executable, "-m", "restrackfs.daemon", "--state", str(daemon.state)]
    result = subprocess.run(
        [*argv, str(daemon.mountpoint)], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    try:
        assert os.path.ismount(daemon.mountpoint)  # mounted before the parent returned
        assert "restrack_tracked_processes 0" in daemon.read("metrics")
        # detached, it logs next to its state file, and says so (it once did not)
        log = daemon.state.with_suffix(".log")
        said = re.fullmatch(
            rf"restrackfs: mounted on {re.escape(str(daemon.mountpoint))} \(pid (\d+)\); "
            rf"log: {re.escape(str(log))}\n",
            result.stderr,
        )
        assert said, result.stderr
        assert "mounted on" in log.read_text()
        cmdline = Path(f"/proc/{said[1]}/cmdline").read_bytes().split(b"\0")
        assert b"restrackfs.daemon" in cmdline  # the pid it gave is the daemon's
    finally:
        subprocess.run(["umount", str(daemon.mountpoint)], check=True)
    wait_until(lambda: not os.path.ismount(daemon.mountpoint))


def test_background_mode_says_why_it_did_not_start(daemon_factory, tmp_path):
    """Detached, the reason went to the log file alone; now to stderr as well, with
    where the log is."""
    daemon = daemon_factory(start=False)
    missing = daemon.mountpoint / "missing"
    argv = [sys.executable, "-m", "restrackfs.daemon", "--state", str(daemon.state)]
    result = subprocess.run([*argv, str(missing)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    log = daemon.state.with_suffix(".log")
    assert result.stderr == (
        f"restrackfs: {missing}: not a directory\nrestrackfs: not started; log: {log}\n"
    )
    assert f"{missing}: not a directory" in log.read_text()


def second_daemon(mountpoint: Path, state: Path) -> subprocess.CompletedProcess[str]:
    """Another daemon started in the foreground on `mountpoint`, run to its exit."""
    argv = [sys.executable, "-m", "restrackfs.daemon", "--foreground"]
    argv += ["--state", str(state), str(mountpoint)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=20)


def test_refuses_a_live_mount(daemon, tmp_path):
    result = second_daemon(daemon.mountpoint, tmp_path / "other.json")
    assert result.returncode == 1, result.stderr
    assert f"{daemon.mountpoint}: already mounted (fuse.restrackfs, served by pid " in result.stderr
    assert f"stop that daemon first (kill {daemon.proc.pid})" in result.stderr
    assert "restrack_tracked_processes" in daemon.read("metrics")


def test_refuses_a_mount_of_something_else(daemon_factory, tmp_path):
    daemon = daemon_factory(start=False)
    tmpfs = ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", daemon.mountpoint]
    subprocess.run(tmpfs, check=True)
    try:
        result = second_daemon(daemon.mountpoint, tmp_path / "other.json")
        assert result.returncode == 1, result.stderr
        assert f"{daemon.mountpoint}: already mounted (tmpfs, " in result.stderr
        assert f"umount {daemon.mountpoint} if it is not wanted" in result.stderr
    finally:
        subprocess.run(["umount", daemon.mountpoint], check=True)


async def test_boundary_turns_unexpected_errors_into_eio(caplog):
    @boundary
    async def broken() -> None:
        raise RuntimeError("bug")

    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as info:
        await broken()
    assert info.value.errno == errno.EIO
    assert "RuntimeError: bug" in caplog.text


async def test_boundary_serves_plain_handlers_as_coroutines(caplog):
    """A handler that never waits is a plain function; pyfuse3 still gets a coroutine
    and the same errno mapping."""

    @boundary
    def broken() -> None:
        raise RuntimeError("plain bug")

    @boundary
    def gone() -> None:
        raise NoSuchProcess(4242, "process exited")

    @boundary
    def fine(value: int) -> int:
        return value + 1

    assert await fine(41) == 42
    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as info:
        await broken()
    assert info.value.errno == errno.EIO
    assert "RuntimeError: plain bug" in caplog.text
    with pytest.raises(pyfuse3.FUSEError) as info:
        await gone()
    assert info.value.errno == errno.ESRCH


def test_daemon_survives_every_kind_of_request(daemon, spawn):
    """A burst of odd requests, then the mount still answers."""
    w = spawn()
    daemon.register(w.pid)
    m = daemon.mountpoint
    for command in [
        f"truncate -s 0 {m}/register",
        f"touch {m}/{w.pid}/quota",
        f"setfattr -n user.x -v 1 {m}/metrics",
        f"ls -laR {m}",
        f"cat {m}/{w.pid}/reset",
        f"dd if=/dev/zero of={m}/register bs=8192 count=1",
        f"cd {m}/{w.pid} && cat stat",
    ]:
        subprocess.run(["bash", "-c", command], capture_output=True, timeout=10)
    assert daemon.read(w.pid, "openfile_count") == "0\n"
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_the_daemon_does_not_track_itself(daemon):
    assert daemon.proc is not None
    assert errno_of(lambda: daemon.register(daemon.proc.pid)) == errno.EPERM
    assert str(daemon.proc.pid) not in os.listdir(daemon.mountpoint)


@pytest.mark.parametrize("attempt", range(3))
def test_a_stop_right_after_exits_logs_no_traceback(daemon, spawn, attempt):
    """Found by a newcomer (2 of 2 tries): a tracked process that exits just before
    SIGTERM left an invalidation queued that ran after the unmount, and pyfuse3 logged
    `Failed to submit invalidate_entry request` with a traceback at a clean stop."""
    workloads = [spawn() for _ in range(4)]
    for w in workloads:
        daemon.register(w.pid)
    for w in workloads:
        w.proc.kill()
    for w in workloads:
        w.proc.wait()
    assert daemon.stop(signal.SIGTERM) == 0
    log = daemon.log_text()
    after = log[log.index("SIGTERM: unmounting") :]
    assert "unmounted" in after
    assert "Traceback" not in after and " ERROR " not in after, after


@pytest.mark.parametrize("first", [None, "--hidepid"])
def test_scripts_run_takes_options_without_a_mount_point(tmp_path, first):
    """`scripts/run --hidepid` mounted nothing (`mkdir: unrecognized option`): options
    alone mean the default mount point, $RESTRACK_MOUNT (here) or /restrack."""
    mount = shared_tempdir("restrack-mnt-")
    script = CHECKOUT / "scripts" / "run"
    options = ["--hidepid", "--state", str(tmp_path / "state.json")]
    argv = [str(script), *options] if first else [str(script), str(mount), *options]
    env = {**os.environ, "RESTRACK_MOUNT": str(mount)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: os.path.ismount(mount) or proc.poll() is not None, 60, "the mount")
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        # scripts/run execs the daemon: its command line is what scripts/run passed
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[:-1]
        assert cmdline[-4:] == [b"--hidepid", b"--state", os.fsencode(options[-1]), bytes(mount)]
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stdout:
            proc.stdout.close()
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        mount.rmdir()
