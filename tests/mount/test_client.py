"""restrackfs.client: every call against a real mount with real processes."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from restrackfs import client
from restrackfs.client import NotMountedError, Resource
from tests.support.procs import MiB, dead_pid
from tests.support.tempdirs import shared_tempdir
from tests.support.users import NOBODY, as_user
from tests.support.waiting import wait_until
from tracker.vocabulary import STAT_FIELDS, TREE_STAT_FIELDS

PAGE = os.sysconf("SC_PAGE_SIZE")
NO_QUOTA = "heap=max files=max action=kill\n"
PYTHON = str(Path(sys.executable).parent / "python")


@pytest.fixture(autouse=True)
def _no_env_mount(monkeypatch):
    """Calls must name their mount, unless a test sets RESTRACK_MOUNT itself."""
    monkeypatch.delenv("RESTRACK_MOUNT", raising=False)


@pytest.fixture
def m(daemon) -> str:
    return str(daemon.mountpoint)


def raised(call, *args, **kwargs) -> OSError:
    with pytest.raises(OSError) as info:
        call(*args, **kwargs)
    return info.value


def empty_dir() -> Path:
    path = shared_tempdir("restrack-empty-")
    return path


def every_call(pid: int, mount: object) -> dict[str, object]:
    return {
        "register": lambda: client.register(pid, mount=mount),
        "deregister": lambda: client.deregister(pid, mount=mount),
        "resource_cap": lambda: client.resource_cap(pid, MiB, 1, mount=mount),
        "resource_reset": lambda: client.resource_reset(pid, mount=mount),
        "fetch": lambda: client.fetch(pid, mount=mount),
        "stat": lambda: client.stat(pid, mount=mount),
        "tracked": lambda: client.tracked(mount=mount),
        "metrics": lambda: client.metrics(mount=mount),
    }


# ----- the five calls -------------------------------------------------------------------


def test_register_fetch_deregister(m, daemon, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    assert os.path.isdir(daemon.path(w.pid))
    assert client.fetch(w.pid, mount=m) == Resource(w.pid, 0, 0, None, None)
    w.do("mmap", 20 * MiB)
    assert abs(client.fetch(w.pid, mount=m).heapsize - 20 * MiB) <= PAGE
    w.do("open", 2)
    record = client.fetch(w.pid, mount=m)
    assert record.openfile_count == 2
    assert abs(record.heapsize - 20 * MiB) <= PAGE
    assert record.pid == w.pid
    client.deregister(w.pid, mount=m)
    assert not os.path.exists(daemon.path(w.pid))
    assert w.alive()


def test_fetch_record_is_immutable(m, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    record = client.fetch(w.pid, mount=m)
    assert dataclasses.is_dataclass(record)
    assert [f.name for f in dataclasses.fields(record)] == [
        "pid", "heapsize", "openfile_count", "heapsize_quota", "openfile_quota",
    ]  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.heapsize = 1  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        record.extra = 1  # type: ignore[attr-defined]
    assert hash(record) == hash(client.fetch(w.pid, mount=m))


def test_fetch_is_one_read_of_stat(m, spawn, monkeypatch):
    w = spawn()
    client.register(w.pid, mount=m)
    w.do("mmap", 3 * MiB)
    w.do("open", 4)
    opened: list[str] = []
    real_open = os.open

    def recording_open(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    record = client.fetch(w.pid, mount=m)
    monkeypatch.undo()
    assert opened == [f"{m}/{w.pid}/stat"]
    # one consistent reading: the same numbers as the stat file, usage = total - baseline
    full = client.stat(w.pid, mount=m)
    assert full.resource() == record
    assert abs(record.heapsize - 3 * MiB) <= PAGE and record.openfile_count == 4
    w.do("munmap")
    w.do("close", 4)
    later = client.stat(w.pid, mount=m)
    assert later.heap_total - later.heapsize == full.heap_total - full.heapsize
    assert (later.openfile_count, later.openfile_total) == (0, full.openfile_total - 4)


def test_resource_cap_is_in_bytes(m, daemon, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    client.resource_cap(w.pid, 40 * MiB, 10, mount=m)
    assert daemon.read(w.pid, "quota") == "heap=41943040 files=10 action=kill\n"
    record = client.fetch(w.pid, mount=m)
    assert (record.heapsize_quota, record.openfile_quota) == (40 * MiB, 10)


@pytest.mark.parametrize(
    ("heap", "files", "text", "quotas"),
    [
        (None, None, "heap=max files=max", (None, None)),
        (-1, -1, "heap=max files=max", (None, None)),
        (None, 5, "heap=max files=5", (None, 5)),
        (-1, 0, "heap=max files=0", (None, 0)),
        (MiB, -1, f"heap={MiB} files=max", (MiB, None)),
    ],
)
def test_none_and_minus_one_mean_no_limit(m, daemon, spawn, heap, files, text, quotas):
    w = spawn()
    client.register(w.pid, mount=m)
    client.resource_cap(w.pid, heap, files, mount=m)
    assert daemon.read(w.pid, "quota") == text + " action=kill\n"
    record = client.fetch(w.pid, mount=m)
    assert (record.heapsize_quota, record.openfile_quota) == quotas


@pytest.mark.parametrize(("heap", "files"), [(-2, None), (40 * MiB, -2), (-1, -100), (-5, 5)])
def test_quota_below_minus_one_is_einval_and_changes_nothing(m, daemon, spawn, heap, files):
    w = spawn()
    client.register(w.pid, mount=m)
    error = raised(client.resource_cap, w.pid, heap, files, mount=m)
    assert type(error) is OSError and error.errno == errno.EINVAL
    assert daemon.read(w.pid, "quota") == NO_QUOTA
    client.resource_cap(w.pid, MiB, 3, mount=m)  # not EBUSY: nothing was defined
    assert daemon.read(w.pid, "quota") == f"heap={MiB} files=3 action=kill\n"


def test_unknown_action_is_einval_naming_the_pid(m, daemon, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    error = raised(client.resource_cap, w.pid, MiB, 1, action="explode", mount=m)
    assert type(error) is OSError and error.errno == errno.EINVAL
    assert str(w.pid) in str(error)
    assert daemon.read(w.pid, "quota") == NO_QUOTA


def test_action_deny_refuses_the_excess(m, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    client.resource_cap(w.pid, 10 * MiB, 2, action="deny", mount=m)
    assert client.stat(w.pid, mount=m).action == "deny"
    assert w.ask("mmap", 20 * MiB) == f"err {errno.ENOMEM}"
    w.do("mmap", 4 * MiB)
    assert w.do("open", 5) == f"ok 2 {errno.EMFILE}"
    assert w.alive()
    record = client.fetch(w.pid, mount=m)
    assert abs(record.heapsize - 4 * MiB) <= PAGE and record.openfile_count == 2


def test_action_notify_counts_and_spares(m, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    client.resource_cap(w.pid, MiB, None, action="notify", mount=m)
    w.do("mmap", 4 * MiB)
    wait_until(
        lambda: 'restrack_enforcements_total{action="notify"} 0' not in client.metrics(mount=m),
        what="a notify enforcement",
    )
    assert w.alive()
    assert client.stat(w.pid, mount=m).action == "notify"


def test_default_action_kills(m, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    client.resource_cap(w.pid, MiB, None, mount=m)
    w.ask("mmap", 4 * MiB)
    assert w.wait() == -signal.SIGKILL
    wait_until(lambda: w.pid not in client.tracked(mount=m), 1, "the killed process to leave")
    assert type(raised(client.fetch, w.pid, mount=m)) is ProcessLookupError


def test_resource_reset_clears_quota_and_counters(m, daemon, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    client.resource_cap(w.pid, 40 * MiB, 10, mount=m)
    w.do("mmap", 4 * MiB)
    w.do("open", 3)
    assert client.fetch(w.pid, mount=m).openfile_count == 3
    client.resource_reset(w.pid, mount=m)
    assert client.fetch(w.pid, mount=m) == Resource(w.pid, 0, 0, None, None)
    assert daemon.read(w.pid, "quota") == NO_QUOTA
    client.resource_cap(w.pid, 8 * MiB, 4, mount=m)  # settable again
    w.do("open", 1)
    assert client.fetch(w.pid, mount=m) == Resource(w.pid, 0, 1, 8 * MiB, 4)


def test_reset_extra_forms(m, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    client.resource_cap(w.pid, 40 * MiB, 10, mount=m)
    w.do("open", 3)
    client.reset(w.pid, "usage", mount=m)
    assert client.fetch(w.pid, mount=m) == Resource(w.pid, 0, 0, 40 * MiB, 10)
    w.do("open", 2)
    client.reset(w.pid, "quota", mount=m)
    assert client.fetch(w.pid, mount=m) == Resource(w.pid, 0, 2, None, None)
    error = raised(client.reset, w.pid, "everything", mount=m)
    assert type(error) is OSError and error.errno == errno.EINVAL
    assert str(error) == f"[Errno 22] {w.pid}: reset: want 1, all, quota or usage, not 'everything'"


def test_resource_cap_twice_is_ebusy(m, daemon, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    client.resource_cap(w.pid, None, None, mount=m)  # even "no limit" defines the quota
    error = raised(client.resource_cap, w.pid, MiB, 1, mount=m)
    assert type(error) is OSError  # exactly, not FileExistsError or another subclass
    assert error.errno == errno.EBUSY
    assert str(w.pid) in str(error)
    assert daemon.read(w.pid, "quota") == NO_QUOTA


def test_set_quota_accepts_daemon_size_strings(m, daemon, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    client.set_quota(w.pid, heap="40M", files="max", action="notify", mount=m)
    assert daemon.read(w.pid, "quota") == "heap=41943040 files=max action=notify\n"


# ----- extras ---------------------------------------------------------------------------


def test_stat_has_every_field(m, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    client.resource_cap(w.pid, 40 * MiB, None, action="notify", mount=m)
    w.do("open", 2)
    s = client.stat(w.pid, mount=m)
    assert (s.pid, s.comm, s.openfile_count) == (w.pid, "workload", 2)
    assert (s.heap_quota, s.file_quota, s.action) == (40 * MiB, None, "notify")
    assert s.openfile_total == len(os.listdir(f"/proc/{w.pid}/fd"))
    assert s.heap_total > 0 and s.registered > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.comm = "x"  # type: ignore[misc]


def test_tracked_lists_pids_ascending(m, spawn):
    assert client.tracked(mount=m) == []
    workloads = [spawn() for _ in range(3)]
    for w in reversed(workloads):
        client.register(w.pid, mount=m)
    assert client.tracked(mount=m) == sorted(w.pid for w in workloads)
    client.deregister(workloads[1].pid, mount=m)
    assert client.tracked(mount=m) == sorted([workloads[0].pid, workloads[2].pid])


def test_thread_id_registers_its_process(m, spawn):
    w = spawn()
    client.register(w.thread(), mount=m)
    assert client.tracked(mount=m) == [w.pid]


def test_pid_must_be_an_int(m, daemon):
    for bad in ("1", 1.0, True, None):
        with pytest.raises(TypeError):
            client.register(bad, mount=m)  # type: ignore[arg-type]
    assert client.tracked(mount=m) == []


# ----- every errno path -----------------------------------------------------------------


def test_register_no_such_process(m):
    pid = dead_pid()
    error = raised(client.register, pid, mount=m)
    assert type(error) is ProcessLookupError and error.errno == errno.ESRCH
    assert str(pid) in str(error)


@pytest.mark.parametrize("pid", [0, -1])
def test_register_invalid_pid(m, pid):
    error = raised(client.register, pid, mount=m)
    assert type(error) is OSError and error.errno == errno.EINVAL
    assert error.strerror == f"{pid}: not a pid: want an integer >= 1"


def test_register_twice(m, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    error = raised(client.register, w.pid, mount=m)
    assert type(error) is FileExistsError and error.errno == errno.EEXIST
    assert str(w.pid) in str(error)


def test_deregister_untracked(m, spawn):
    """The daemon answers ESRCH (README, *Errors*); a live process that is not
    tracked is "not tracked" (ENOENT) for the client, as for every other call."""
    w = spawn()
    error = raised(client.deregister, w.pid, mount=m)
    assert type(error) is FileNotFoundError and error.errno == errno.ENOENT
    assert error.strerror == f"{w.pid}: not tracked"
    client.register(w.pid, mount=m)
    client.deregister(w.pid, mount=m)
    assert type(raised(client.deregister, w.pid, mount=m)) is FileNotFoundError


@pytest.mark.parametrize("call", ["deregister", "fetch", "stat", "resource_cap", "resource_reset"])
def test_a_pid_that_names_no_process_is_no_such_process(m, call):
    pid = dead_pid()
    error = raised(every_call(pid, m)[call])
    assert type(error) is ProcessLookupError and error.errno == errno.ESRCH
    assert error.strerror == f"{pid}: no such process"


def test_a_zombie_is_no_such_process(m):
    zombie = subprocess.Popen(["true"])
    try:
        wait_until(lambda: b") Z " in Path(f"/proc/{zombie.pid}/stat").read_bytes(), 5, "zombie")
        error = raised(client.deregister, zombie.pid, mount=m)
        assert type(error) is ProcessLookupError, error
    finally:
        zombie.wait()


@pytest.mark.parametrize(
    "quota, reason",
    [
        ({"heap": "10MB"}, "bad size '10MB': want bytes with K/M/G/T suffix, or max"),
        ({"heap": "1 files=max"}, "bad size '1 files=max'"),
        ({"files": "ten"}, "bad count 'ten': want a non-negative integer, or max"),
        ({"files": -2}, "files quota -2: want >= 0, or -1/None for none"),
        ({"heap": 2**63}, "size '9223372036854775808' is too large"),
        ({"action": "explode"}, "bad action 'explode': want kill, deny or notify"),
    ],
)
def test_an_invalid_quota_says_why_and_changes_nothing(m, daemon, spawn, quota, reason):
    w = spawn()
    client.register(w.pid, mount=m)
    error = raised(client.set_quota, w.pid, mount=m, **quota)
    assert type(error) is OSError and error.errno == errno.EINVAL
    assert error.strerror.startswith(f"{w.pid}: {reason}"), error.strerror
    assert daemon.read(w.pid, "quota") == NO_QUOTA
    client.set_quota(w.pid, files=1, mount=m)  # nothing was defined


def test_the_client_imports_no_engine():
    """The client shares the daemon's grammar but stays light: no engine, trio, FUSE."""
    code = "import sys, restrackfs.client; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "tracker.quota" in loaded
    assert not {"trio", "pyfuse3", "tracker.engine.engine", "restrackfs.fs"} & set(loaded)


def test_the_vocabulary_imports_only_the_standard_library():
    """Shared by the daemon, the client and the CLI: it must pull in none of them."""
    code = "import sys, tracker.vocabulary; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    ours = {name for name in loaded if name.split(".")[0] in ("tracker", "restrackfs")}
    assert ours == {"tracker", "tracker.vocabulary"}


def test_stat_has_the_vocabulary_fields_in_order(m, spawn):
    """The daemon writes, and the client reads, the one list of stat fields."""
    w = spawn()
    client.register(w.pid, mount=m)
    written = [line.split(" ")[0] for line in Path(m, str(w.pid), "stat").read_text().splitlines()]
    assert written == list(STAT_FIELDS)
    fields = [field.name for field in dataclasses.fields(client.Stat)]
    assert fields == [*STAT_FIELDS, *TREE_STAT_FIELDS]  # the tree's only under a tree quota


@pytest.mark.parametrize("call", ["fetch", "stat", "resource_cap", "resource_reset"])
def test_untracked_pid_is_file_not_found(m, spawn, call):
    w = spawn()
    error = raised(every_call(w.pid, m)[call])
    assert type(error) is FileNotFoundError  # and not NotMountedError: the daemon is there
    assert error.errno == errno.ENOENT
    assert str(w.pid) in str(error)


def test_fetch_of_an_exited_process(m, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    w.proc.stdin.write("exit\n")
    w.proc.stdin.flush()
    assert w.wait() == 0
    wait_until(lambda: w.pid not in client.tracked(mount=m), 1, "the exited process to leave")
    assert type(raised(client.fetch, w.pid, mount=m)) is ProcessLookupError


NOBODY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from restrackfs import client
    pid, mount = int(sys.argv[1]), sys.argv[2]
    calls = {
        "register": lambda: client.register(pid, mount=mount),
        "resource_cap": lambda: client.resource_cap(pid, 1048576, 1, mount=mount),
        "resource_reset": lambda: client.resource_reset(pid, mount=mount),
        "deregister": lambda: client.deregister(pid, mount=mount),
        "fetch": lambda: client.fetch(pid, mount=mount).heapsize,
    }
    results = {}
    for name in sys.argv[3:]:
        try:
            results[name] = ["ok", calls[name]()]
        except OSError as error:
            results[name] = [type(error).__name__, error.errno, str(error)]
    print(json.dumps(results))
    """
)


def calls_as_nobody(pid: int, mount: str, *calls: str) -> dict[str, list]:
    argv = as_user(NOBODY, [PYTHON, "-c", NOBODY_SCRIPT, pid, mount, *calls])
    result = subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_permission_denied_as_another_user(m, daemon, spawn):
    untracked, tracked = spawn(), spawn()
    client.register(tracked.pid, mount=m)
    results = calls_as_nobody(untracked.pid, m, "register")
    assert results["register"][:2] == ["PermissionError", errno.EPERM]
    assert str(untracked.pid) in results["register"][2]
    results = calls_as_nobody(
        tracked.pid, m, "resource_cap", "resource_reset", "deregister", "fetch"
    )
    for call in ("resource_cap", "resource_reset", "deregister"):
        assert results[call][:2] == ["PermissionError", errno.EPERM], call
        assert str(tracked.pid) in results[call][2], call
    assert results["fetch"] == ["ok", 0]  # reading is everybody's right
    assert daemon.read(tracked.pid, "quota") == NO_QUOTA
    assert client.tracked(mount=m) == [tracked.pid]


def test_user_manages_own_process_through_the_library(m, daemon, spawn):
    w = spawn(uid=NOBODY)
    results = calls_as_nobody(w.pid, m, "register", "resource_cap", "fetch", "resource_reset")
    assert results == {
        "register": ["ok", None],
        "resource_cap": ["ok", None],
        "fetch": ["ok", 0],
        "resource_reset": ["ok", None],
    }
    assert daemon.read(w.pid, "quota") == NO_QUOTA
    assert calls_as_nobody(w.pid, m, "deregister") == {"deregister": ["ok", None]}
    assert client.tracked(mount=m) == []


# ----- where the mount is ---------------------------------------------------------------


def test_mount_argument_beats_environment(daemon_factory, spawn, monkeypatch):
    a, b = daemon_factory(), daemon_factory()
    w = spawn()
    monkeypatch.setenv("RESTRACK_MOUNT", str(b.mountpoint))
    client.register(w.pid, mount=a.mountpoint)  # a Path works too
    assert client.tracked(mount=str(a.mountpoint)) == [w.pid]
    assert client.tracked() == []
    assert client.fetch(w.pid, mount=a.mountpoint).pid == w.pid


def test_environment_beats_default(daemon_factory, spawn, monkeypatch):
    a = daemon_factory()
    w = spawn()
    monkeypatch.setenv("RESTRACK_MOUNT", str(a.mountpoint))
    assert client.mount_point() == a.mountpoint
    client.register(w.pid)
    assert os.path.isdir(a.path(w.pid))
    assert client.fetch(w.pid).pid == w.pid
    client.deregister(w.pid)
    assert client.tracked(mount=a.mountpoint) == []


def test_default_mount_is_slash_restrack(daemon, spawn, monkeypatch):
    assert client.mount_point() == Path("/restrack")
    if not os.path.ismount("/restrack"):
        error = raised(client.tracked)
        assert isinstance(error, NotMountedError) and "/restrack" in str(error)
    # the default is consulted at call time: point it at a live mount to see it used
    monkeypatch.setattr(client, "DEFAULT_MOUNT", str(daemon.mountpoint))
    w = spawn()
    client.register(w.pid)
    assert os.path.isdir(daemon.path(w.pid))


def check_not_mounted(path: Path, calls: dict[str, object]) -> None:
    for name, call in calls.items():
        error = raised(call)
        assert isinstance(error, NotMountedError), (name, error)
        assert isinstance(error, FileNotFoundError) and error.errno == errno.ENOENT
        message = str(error)
        assert str(path) in message, (name, message)
        assert "daemon" in message or "mounted" in message, (name, message)
        assert f"{path}/register" not in message and "/stat" not in message, (name, message)


def test_nothing_mounted_says_so(spawn):
    w = spawn()
    path = empty_dir()
    try:
        check_not_mounted(path, every_call(w.pid, path))
        check_not_mounted(path / "missing", every_call(w.pid, path / "missing"))
    finally:
        path.rmdir()


def test_killed_daemon_is_not_mounted(daemon, spawn):
    w = spawn()
    client.register(w.pid, mount=daemon.mountpoint)
    daemon.stop(signal.SIGKILL)
    check_not_mounted(daemon.mountpoint, every_call(w.pid, daemon.mountpoint))
    assert w.alive()


def test_directory_with_stray_register_file_is_not_mounted(spawn):
    w = spawn()
    path = empty_dir()
    try:
        (path / "register").write_text("")
        check_not_mounted(path, every_call(w.pid, path))
    finally:
        (path / "register").unlink()
        path.rmdir()


def test_regular_file_as_mount_is_not_mounted(spawn, tmp_path):
    w = spawn()
    path = tmp_path / "not-a-dir"
    path.write_text("")
    check_not_mounted(path, every_call(w.pid, path))


def test_hostile_comm_cannot_confuse_fetch(m):
    """A process may name itself anything (newline and a fake `pid` line included)."""
    code = (
        "import sys; open('/proc/self/comm', 'w').write('a b\\npid 1');"
        "print('ready', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [PYTHON, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        client.register(proc.pid, mount=m)
        record = client.fetch(proc.pid, mount=m)
        assert record == Resource(proc.pid, 0, 0, None, None)
        s = client.stat(proc.pid, mount=m)
        assert s.pid == proc.pid and s.comm.startswith("a b") and "\n" not in s.comm
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


# ----- the kernel patch README's example ------------------------------------------------


def test_kernel_patch_readme_flow(m, spawn):
    w = spawn()
    client.register(w.pid, mount=m)
    client.resource_cap(w.pid, 40 * MiB, 1, mount=m)
    w.do("mmap", 20 * MiB)
    record = client.fetch(w.pid, mount=m)
    assert record.pid == w.pid
    assert abs(record.heapsize - 20 * MiB) <= PAGE
    assert (record.openfile_count, record.heapsize_quota, record.openfile_quota) == (
        0,
        40 * MiB,
        1,
    )
    assert w.alive()
    client.deregister(w.pid, mount=m)
    assert client.tracked(mount=m) == []
    assert w.alive()


SELF_SCRIPT = textwrap.dedent(
    """
    import json, mmap, os, sys
    from restrackfs import client
    mount, me = sys.argv[1], os.getpid()
    client.register(me, mount=mount)
    client.resource_cap(me, 40 * 2**20, 1, mount=mount)
    block = mmap.mmap(-1, 20 * 2**20, flags=mmap.MAP_PRIVATE)
    record = client.fetch(me, mount=mount)
    client.deregister(me, mount=mount)
    print(json.dumps([record.pid, record.heapsize, record.openfile_count,
                      record.heapsize_quota, record.openfile_quota, me]))
    """
)


def test_kernel_patch_readme_flow_on_self(m):
    """The README registers the calling process itself; it must survive its own quota."""
    result = subprocess.run(
        [PYTHON, "-c", SELF_SCRIPT, m], capture_output=True, text=True, cwd="/", timeout=30
    )
    assert result.returncode == 0, result.stderr
    pid, heapsize, files, heap_quota, file_quota, me = json.loads(result.stdout)
    assert pid == me
    assert 20 * MiB <= heapsize <= 21 * MiB
    assert files <= 1  # the descriptor reading `stat` may be counted while it is open
    assert (heap_quota, file_quota) == (40 * MiB, 1)
    assert client.tracked(mount=m) == []
