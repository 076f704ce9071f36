"""The mounted filesystem: layout, measurement, quotas, errno, through a real mount."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.daemon import Daemon
from tests.support.mount import opened
from tests.support.paths import CHECKOUT
from tests.support.procs import MiB, errno_of, limits_of, proc_vm_data
from tests.support.users import sh
from tests.support.waiting import wait_until

PAGE = os.sysconf("SC_PAGE_SIZE")
PROCESS_FILES = [
    "heapsize", "openfile_count", "quota", "reset", "stat", "events", "heap_peak",
    "openfile_peak", "fds",
]  # fmt: skip


def stat_fields(daemon: Daemon, pid: int) -> dict[str, str]:
    lines = daemon.read(pid, "stat").splitlines()
    return dict(line.split(" ", 1) for line in lines)


def snapshot(daemon: Daemon) -> dict[str, object]:
    """Everything a rejected write must leave unchanged."""
    pids = sorted(name for name in os.listdir(daemon.mountpoint) if name.isdigit())
    return {pid: (daemon.read(pid, "quota"), daemon.read(pid, "heapsize")) for pid in pids}


# ----- layout ---------------------------------------------------------------------------


def test_layout_and_modes(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    assert sorted(os.listdir(daemon.mountpoint)) == sorted(
        ["register", "deregister", "metrics", "events", "engine", "enforcements", str(w.pid)]
    )
    assert sorted(os.listdir(daemon.path(w.pid))) == sorted(PROCESS_FILES)
    modes = {
        name: stat.S_IMODE(os.stat(daemon.path(name)).st_mode)
        for name in os.listdir(daemon.mountpoint)
    }
    assert modes["register"] == modes["deregister"] == 0o222
    assert modes["metrics"] == 0o444
    assert stat.S_ISDIR(os.stat(daemon.path(w.pid)).st_mode)
    assert stat.S_IMODE(os.stat(daemon.path(w.pid, "quota")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(daemon.path(w.pid, "reset")).st_mode) == 0o200


def readme_file_table() -> set[str]:
    """The paths in the first column of the README's table under *The files*."""
    readme = (CHECKOUT / "README.md").read_text()
    section = readme.split("\n## The files\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE))


def test_readme_file_table_names_every_file(daemon, spawn):
    """`engine` was missing from the README's table."""
    w = spawn()
    daemon.register(w.pid)
    top = {name for name in os.listdir(daemon.mountpoint) if not name.isdigit()}
    mine = {f"PID/{name}" for name in os.listdir(daemon.path(w.pid))}
    documented = readme_file_table()
    assert top | mine | {"PID/"} <= documented, "files the README's table leaves out"
    assert documented <= top | mine | {"PID/"}, "names in the README's table the mount lacks"


def ls_a(path: Path) -> list[tuple[int, str]]:
    """`ls -a1i` of `path`, unsorted (the order readdir gives): (inode, name) pairs."""
    out = subprocess.run(["ls", "-a1iU", str(path)], capture_output=True, text=True, check=True)
    return [(int(ino), name) for ino, name in (line.split() for line in out.stdout.splitlines())]


def test_ls_a_shows_dot_and_dotdot(daemon, spawn):
    """`ls -la` showed no `.` and `..`: readdir gives both, first, with the
    directory's own inode and its parent's (the root's)."""
    w = spawn()
    daemon.register(w.pid)
    root, pid_dir = daemon.mountpoint, daemon.path(w.pid)
    root_ino, dir_ino = os.stat(root).st_ino, os.stat(pid_dir).st_ino
    top = ls_a(root)
    # (`ls -i` shows the root's `..` as the mount point's parent: it stats that one)
    assert top[0] == (root_ino, ".") and top[1][1] == "..", top
    assert sorted(name for _, name in top[2:]) == sorted(os.listdir(root))
    inside = ls_a(pid_dir)
    assert inside[:2] == [(dir_ino, "."), (root_ino, "..")], inside
    assert sorted(name for _, name in inside[2:]) == sorted(PROCESS_FILES)
    long = subprocess.run(["ls", "-la", str(pid_dir)], capture_output=True, text=True)
    assert [line.split()[-1] for line in long.stdout.splitlines()[1:3]] == [".", ".."]


def test_process_dir_owned_by_process_owner(daemon, spawn):
    w = spawn(uid=65534)
    daemon.register(w.pid)
    info = os.stat(daemon.path(w.pid))
    assert (info.st_uid, info.st_gid) == (65534, 65534)


def test_values_end_with_newline(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    for name in ["heapsize", "openfile_count", "quota", "stat", "heap_peak", "openfile_peak"]:
        assert daemon.read(w.pid, name).endswith("\n")
    assert daemon.read(w.pid, "fds").endswith("\n")
    assert daemon.read("metrics").endswith("\n")


# ----- measurement ----------------------------------------------------------------------


def test_heapsize_counts_mmap_exactly(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    assert daemon.read(w.pid, "heapsize") == "0\n"
    w.do("mmap", 20 * MiB)
    assert abs(int(daemon.read(w.pid, "heapsize")) - 20 * MiB) <= PAGE
    w.do("munmap")
    assert int(daemon.read(w.pid, "heapsize")) <= PAGE


def test_heapsize_counts_brk_and_malloc(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    w.do("sbrk", 3 * MiB)
    assert abs(int(daemon.read(w.pid, "heapsize")) - 3 * MiB) <= PAGE
    w.do("malloc", 3 * MiB)  # above the mmap threshold: its own mapping
    assert abs(int(daemon.read(w.pid, "heapsize")) - 6 * MiB) <= 2 * PAGE


def test_thread_stack_counts_as_heap(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    w.thread()
    assert int(daemon.read(w.pid, "heapsize")) >= 8 * MiB


def test_openfile_count_follows_opens_and_closes(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    w.do("open", 7)
    assert daemon.read(w.pid, "openfile_count") == "7\n"
    w.do("close", 4)
    assert daemon.read(w.pid, "openfile_count") == "3\n"
    w.do("close", 3)
    assert daemon.read(w.pid, "openfile_count") == "0\n"


def test_usage_is_floored_at_zero(daemon, spawn):
    w = spawn()
    w.do("mmap", 4 * MiB)
    w.do("open", 2)
    daemon.register(w.pid)
    w.do("munmap")
    w.do("close", 2)
    assert daemon.read(w.pid, "heapsize") == "0\n"
    assert daemon.read(w.pid, "openfile_count") == "0\n"


def test_values_are_fresh_on_every_read(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    with opened(daemon, w.pid, "openfile_count") as fd:
        assert os.pread(fd, 100, 0) == b"0\n"
        w.do("open", 5)
        assert os.pread(fd, 100, 0) == b"5\n"
        assert os.pread(fd, 100, 1) == b"\n"  # a pread after the whole text: of now


@contextmanager
def heapsize_open(daemon, spawn):
    """A tracked workload and a descriptor of its heapsize, closed at the end."""
    w = spawn()
    daemon.register(w.pid)
    with opened(daemon, w.pid, "heapsize") as fd:
        yield w, fd


def test_a_value_read_in_pieces_continues_its_own_text(daemon, spawn):
    """seq_file's rule: reads after a partial one at offset 0 continue that text,
    though the value changed meanwhile."""
    with heapsize_open(daemon, spawn) as (w, fd):
        assert os.read(fd, 1) == b"0"
        w.do("mmap", 20 * MiB)
        assert os.read(fd, 4096) == b"\n"
        assert os.read(fd, 4096) == b""


def test_a_value_read_whole_ends_there_and_a_pread_into_it_renders_afresh(daemon, spawn):
    """A read at 0 that returned all of the text keeps only its end (handles.keep_end):
    the next read is end of file; a pread before that end renders the value of now,
    as a pread of a /proc file regenerates it."""
    with heapsize_open(daemon, spawn) as (w, fd):
        assert os.read(fd, 4096) == b"0\n"
        w.do("mmap", 20 * MiB)
        assert os.read(fd, 4096) == b""
        assert os.pread(fd, 4096, 1) == b"0971520\n"


def test_stat_file(daemon, spawn):
    w = spawn()
    before = time.time()
    daemon.register(w.pid)
    w.do("mmap", 2 * MiB)
    w.do("open", 2)
    fields = stat_fields(daemon, w.pid)
    assert list(fields) == [
        "pid", "comm", "heapsize", "openfile_count", "heap_quota", "file_quota",
        "action", "heap_total", "openfile_total", "registered", "heap_peak", "openfile_peak",
    ]  # fmt: skip
    assert fields["heap_peak"] == fields["heapsize"] and fields["openfile_peak"] == "2"
    assert fields["pid"] == str(w.pid)
    assert fields["comm"] == "workload"
    assert int(fields["heapsize"]) == 2 * MiB
    assert fields["openfile_count"] == "2"
    assert (fields["heap_quota"], fields["file_quota"], fields["action"]) == ("max", "max", "kill")
    assert int(fields["heap_total"]) == proc_vm_data(w.pid)
    assert int(fields["openfile_total"]) == len(os.listdir(f"/proc/{w.pid}/fd"))
    assert int(before) <= int(fields["registered"]) <= time.time()


def test_thread_id_registers_its_process(daemon, spawn):
    w = spawn()
    tid = w.thread()
    daemon.register(tid)
    assert os.path.isdir(daemon.path(w.pid))
    assert not os.path.exists(daemon.path(tid))


# ----- shell forms ----------------------------------------------------------------------


def test_shell_session(daemon, spawn):
    w = spawn()
    m, pid = daemon.mountpoint, w.pid
    assert sh(f"echo {pid} > {m}/register").returncode == 0
    assert sh(f"cat {m}/{pid}/heapsize").stdout == "0\n"
    assert sh(f"echo 'heap=40M files=10' > {m}/{pid}/quota").returncode == 0
    assert sh(f"cat {m}/{pid}/quota").stdout == "heap=41943040 files=10 action=kill\n"
    assert sh(f"echo 1 > {m}/{pid}/reset").returncode == 0
    assert sh(f"cat {m}/{pid}/quota").stdout == "heap=max files=max action=kill\n"
    assert sh(f"echo {pid} >> {m}/deregister").returncode == 0
    assert not os.path.exists(daemon.path(pid))
    assert sh(f"echo {pid} >> {m}/register").returncode == 0
    assert os.path.isdir(daemon.path(pid))


def test_mkdir_and_rmdir(daemon, spawn):
    w = spawn()
    assert sh(f"mkdir {daemon.mountpoint}/{w.pid}").returncode == 0
    assert os.path.isdir(daemon.path(w.pid))
    assert sh(f"rmdir {daemon.mountpoint}/{w.pid}").returncode == 0
    assert not os.path.exists(daemon.path(w.pid))
    assert str(w.pid) not in os.listdir(daemon.mountpoint)


def test_shell_prints_meaningful_errors(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    result = sh(f"echo {w.pid} > {daemon.mountpoint}/register")
    assert result.returncode != 0 and "File exists" in result.stderr
    result = sh(f"echo bogus=1 > {daemon.mountpoint}/{w.pid}/quota")
    assert "Invalid argument" in result.stderr


# ----- quotas ---------------------------------------------------------------------------


def test_quota_round_trip_and_once_only(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    assert daemon.read(w.pid, "quota") == "heap=max files=max action=kill\n"
    daemon.write("heap=1G files=100 action=notify\n", w.pid, "quota")
    assert daemon.read(w.pid, "quota") == "heap=1073741824 files=100 action=notify\n"
    assert errno_of(lambda: daemon.write("heap=2G", w.pid, "quota")) == errno.EBUSY
    daemon.write("quota", w.pid, "reset")
    daemon.write("files=5", w.pid, "quota")
    assert daemon.read(w.pid, "quota") == "heap=max files=5 action=kill\n"


def test_max_quota_still_defines_it(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    daemon.write("heap=max files=max", w.pid, "quota")
    assert errno_of(lambda: daemon.write("files=1", w.pid, "quota")) == errno.EBUSY


def test_kill_on_file_quota(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    daemon.write("files=3", w.pid, "quota")
    w.do("open", 3)
    assert w.alive()
    w.ask("open", 1)
    assert w.wait() == -9
    wait_until(lambda: "restrackfs.enforce" in daemon.log_text(), what="enforcement log line")
    line = next(x for x in daemon.log_text().splitlines() if "restrackfs.enforce" in x)
    assert f"pid={w.pid} comm=workload quota=files usage=4 limit=3 action=kill" in line
    assert 'restrack_enforcements_total{action="kill"} 1' in daemon.read("metrics")


def test_kill_on_heap_quota(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    daemon.write("heap=10M", w.pid, "quota")
    w.do("mmap", 8 * MiB)
    assert w.alive()
    w.ask("mmap", 4 * MiB)
    assert w.wait() == -9


def test_quota_already_exceeded_is_enforced_at_once(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    w.do("mmap", 2 * MiB)
    daemon.write("heap=1M", w.pid, "quota")
    assert w.wait() == -9


def test_notify_reports_and_spares(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    daemon.write("files=1 action=notify", w.pid, "quota")
    w.do("open", 2)
    wait_until(
        lambda: 'restrack_enforcements_total{action="notify"} 1' in daemon.read("metrics"),
        what="notify counted",
    )
    assert w.alive()
    assert "action=notify" in daemon.log_text()


@pytest.mark.parametrize("uid", [None, 65534])
def test_deny_heap(daemon, spawn, uid):
    w = spawn(uid=uid)
    original = limits_of(w.pid, "Max data size")
    daemon.register(w.pid)
    base = int(stat_fields(daemon, w.pid)["heap_total"])
    daemon.write("heap=10M action=deny", w.pid, "quota")
    assert limits_of(w.pid, "Max data size") == (str(base + 10 * MiB), original[1])
    assert w.ask("mmap", 20 * MiB) == f"err {errno.ENOMEM}"
    w.do("mmap", 5 * MiB)
    assert w.alive()
    daemon.write("1", w.pid, "reset")
    assert limits_of(w.pid, "Max data size") == original
    w.do("mmap", 20 * MiB)


@pytest.mark.parametrize("uid", [None, 65534])
def test_deny_files(daemon, spawn, uid):
    w = spawn(uid=uid)
    original = limits_of(w.pid, "Max open files")
    daemon.register(w.pid)
    daemon.write("files=3 action=deny", w.pid, "quota")
    assert w.ask("open", 5) == f"ok 3 {errno.EMFILE}"
    assert daemon.read(w.pid, "openfile_count") == "3\n"
    w.do("close", 3)
    wait_until(lambda: w.ask("open", 1) == "ok 1", what="room after closing")
    daemon.write(f"{w.pid}", "deregister")
    assert limits_of(w.pid, "Max open files") == original


def test_deny_limit_raised_by_process_is_lowered_back(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    daemon.write("files=2 action=deny", w.pid, "quota")
    lowered = limits_of(w.pid, "Max open files")
    w.do("setrlimit", "nofile", -1)
    wait_until(lambda: limits_of(w.pid, "Max open files") == lowered, what="lowered back")
    assert 'restrack_enforcements_total{action="deny"} 1' in daemon.read("metrics")
    assert w.ask("open", 5) == f"ok 2 {errno.EMFILE}"


def test_usage_reset_restarts_counters(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    w.do("mmap", 3 * MiB)
    w.do("open", 2)
    daemon.write("usage\n", w.pid, "reset")
    assert daemon.read(w.pid, "heapsize") == "0\n"
    assert daemon.read(w.pid, "openfile_count") == "0\n"


def test_usage_reset_keeps_quota_and_gives_room(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    w.do("open", 2)
    daemon.write("files=3", w.pid, "quota")
    daemon.write("usage", w.pid, "reset")
    assert daemon.read(w.pid, "quota") == "heap=max files=3 action=kill\n"
    w.do("open", 3)
    assert w.alive()


# ----- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["abc", "0", "-1", "\n", "1.5", "0x10", " 12", "١٢", "12 13"])
def test_register_malformed(daemon, text):
    assert errno_of(lambda: daemon.write(text, "register")) == errno.EINVAL


def test_register_errors(daemon, spawn):
    w = spawn()
    assert errno_of(lambda: daemon.register(2**22 + 1)) == errno.ESRCH
    assert errno_of(lambda: daemon.register(99999999999999999999)) == errno.ESRCH
    daemon.register(w.pid)
    assert errno_of(lambda: daemon.register(w.pid)) == errno.EEXIST
    assert errno_of(lambda: os.mkdir(daemon.path(w.pid))) == errno.EEXIST
    assert errno_of(lambda: os.mkdir(daemon.path("abc"))) == errno.EINVAL


def test_register_zombie(daemon):
    child = subprocess.Popen(["sleep", "100"])
    child.kill()
    wait_until(lambda: Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] == "Z")
    try:
        assert errno_of(lambda: daemon.register(child.pid)) == errno.ESRCH
    finally:
        child.wait()


def test_deregister_errors(daemon, spawn):
    w = spawn()
    assert errno_of(lambda: daemon.write("x", "deregister")) == errno.EINVAL
    assert errno_of(lambda: daemon.write("0", "deregister")) == errno.EINVAL
    assert errno_of(lambda: daemon.write(str(w.pid), "deregister")) == errno.ESRCH
    assert errno_of(lambda: os.rmdir(daemon.path(w.pid))) == errno.ENOENT


def test_untracked_paths(daemon, spawn):
    w = spawn()
    for name in PROCESS_FILES:
        assert errno_of(lambda n=name: os.stat(daemon.path(w.pid, n))) == errno.ENOENT
    assert errno_of(lambda: os.stat(daemon.path("nope"))) == errno.ENOENT


@pytest.mark.parametrize(
    "text",
    ["heap", "heap=", "heap=-1", "heap=10MB", "heap=1.5M", "files=x", "bogus=1",
     "heap=1M heap=2M", "action=stop", "heap=99999999999T", "\n", "   ", "heap=1M\0"],
)  # fmt: skip
def test_quota_malformed(daemon, spawn, text):
    w = spawn()
    daemon.register(w.pid)
    before = snapshot(daemon)
    assert errno_of(lambda: daemon.write(text, w.pid, "quota")) == errno.EINVAL
    assert snapshot(daemon) == before
    daemon.write("files=9", w.pid, "quota")  # still settable: the bad write defined nothing


@pytest.mark.parametrize("text", ["2", "ALL", "quotas", "\n", "1 1", "1\0"])
def test_reset_malformed(daemon, spawn, text):
    w = spawn()
    daemon.register(w.pid)
    daemon.write("files=4", w.pid, "quota")
    w.do("open", 1)
    before = snapshot(daemon)
    assert errno_of(lambda: daemon.write(text, w.pid, "reset")) == errno.EINVAL
    assert snapshot(daemon) == before


@pytest.mark.parametrize(
    ("name", "gone", "code"),
    [
        pytest.param("heapsize", lambda daemon, w: w.stop(), errno.ESRCH, id="exit_is_esrch"),
        pytest.param(
            "stat",
            lambda daemon, w: daemon.write(str(w.pid), "deregister"),
            errno.ENOENT,
            id="deregister_is_enoent",
        ),
    ],
)
def test_a_read_through_a_held_descriptor_after(daemon, spawn, name, gone, code):
    w = spawn()
    daemon.register(w.pid)
    with opened(daemon, w.pid, name) as fd:
        gone(daemon, w)
        assert errno_of(lambda: os.pread(fd, 100, 0)) == code


def test_empty_write_is_a_no_op(daemon, spawn):
    # The kernel never passes a zero-byte write() to the filesystem (as in sysfs).
    w = spawn()
    daemon.register(w.pid)
    before = snapshot(daemon)
    daemon.write("", w.pid, "quota")
    daemon.write("", "register")
    assert snapshot(daemon) == before


def test_oversized_write(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    assert errno_of(lambda: daemon.write("files=1" + " " * 4096, w.pid, "quota")) == errno.EINVAL
    daemon.write("files=1" + " " * 4089, w.pid, "quota")  # exactly 4096 bytes is fine


def test_refused_operations(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    m = daemon.mountpoint
    assert errno_of(lambda: os.open(m / "newfile", os.O_CREAT | os.O_WRONLY)) == errno.EPERM
    assert errno_of(lambda: os.unlink(m / "metrics")) == errno.EPERM
    assert errno_of(lambda: os.unlink(daemon.path(w.pid, "stat"))) == errno.EPERM
    assert errno_of(lambda: os.rename(m / "metrics", m / "other")) == errno.EPERM
    assert errno_of(lambda: os.symlink("/etc/passwd", m / "link")) == errno.EPERM
    assert errno_of(lambda: os.link(m / "metrics", m / "hard")) == errno.EPERM
    assert errno_of(lambda: os.chmod(m / "register", 0o777)) == errno.EPERM
    assert errno_of(lambda: os.chown(daemon.path(w.pid, "quota"), 1, 1)) == errno.EPERM
    assert errno_of(lambda: os.mkdir(daemon.path(w.pid, "sub"))) == errno.EPERM


def test_wrong_open_mode(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    assert errno_of(lambda: os.open(daemon.path(w.pid, "heapsize"), os.O_WRONLY)) == errno.EACCES
    assert errno_of(lambda: os.open(daemon.path("register"), os.O_RDONLY)) == errno.EACCES


# ----- exit and cleanup -----------------------------------------------------------------


def test_exited_process_disappears_within_100ms(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    assert os.path.isdir(daemon.path(w.pid))
    w.proc.kill()
    w.proc.wait()
    gone_at = time.monotonic()
    wait_until(
        lambda: (
            str(w.pid) not in os.listdir(daemon.mountpoint)
            and not os.path.exists(daemon.path(w.pid))
        ),  # the kernel's dentry cache too
        what="dir gone",
    )
    assert time.monotonic() - gone_at < 0.1
    assert "restrack_tracked_processes 0" in daemon.read("metrics")


def test_reregistered_pid_is_a_new_directory(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    w.do("open", 3)
    first_inode = os.stat(daemon.path(w.pid)).st_ino
    daemon.write(str(w.pid), "deregister")
    daemon.register(w.pid)
    assert os.stat(daemon.path(w.pid)).st_ino != first_inode
    assert daemon.read(w.pid, "openfile_count") == "0\n"


# ----- metrics --------------------------------------------------------------------------


def test_metrics(daemon, spawn):
    a, b = spawn(), spawn()
    daemon.register(a.pid)
    daemon.register(b.pid)
    a.do("mmap", MiB)
    daemon.write("heap=2M files=4", b.pid, "quota")
    text = daemon.read("metrics")
    assert f'restrack_heap_bytes{{pid="{a.pid}",comm="workload"}} {MiB}' in text
    assert f'restrack_open_files{{pid="{b.pid}",comm="workload"}} 0' in text
    assert f'restrack_heap_quota_bytes{{pid="{b.pid}",comm="workload"}} {2 * MiB}' in text
    assert f'restrack_open_files_quota{{pid="{b.pid}",comm="workload"}} 4' in text
    assert f'restrack_heap_quota_bytes{{pid="{a.pid}"' not in text
    assert "restrack_tracked_processes 2" in text
    assert "# TYPE restrack_enforcements_total counter" in text


def test_listing_of_many_spans_readdir_calls_without_loss_or_repeat(daemon):
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(400)]
    try:
        for proc in sleepers[:200]:
            daemon.register(proc.pid)
        daemon.write(str(sleepers[50].pid), "deregister")
        daemon.register(sleepers[50].pid)  # re-registered: last in the listing now
        for proc in sleepers[200:]:
            daemon.register(proc.pid)
        names = os.listdir(daemon.mountpoint)  # several readdir calls at this size
        assert len(names) == len(set(names)) == 400 + 6  # the top files and 400 pids
        assert {int(n) for n in names if n.isdigit()} == {p.pid for p in sleepers}
        dotted = [name for _, name in ls_a(daemon.mountpoint)]  # `.` and `..` too
        assert sorted(dotted) == sorted([".", "..", *names]), "a name lost or repeated"
    finally:
        for proc in sleepers:
            proc.kill()
            proc.wait()
