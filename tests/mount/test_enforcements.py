"""The `enforcements` file: one JSON record a line per enforcement action, through a
real mount: every field with its value, pollable, the last 1,000, hidepid's rule."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import select
import time

import pytest

from tests.support.bpf import needs_bpf
from tests.support.daemon import Daemon
from tests.support.mount import opened
from tests.support.procs import errno_of
from tests.support.users import NOBODY, sh
from tests.support.waiting import wait_until
from tracker.engine.records import FDS_IN_LOOP
from tracker.linux.cgroup import read_workload
from tracker.linux.procfs import read_fd_kinds
from tracker.vocabulary import FD_OTHER

FIELDS = [
    "time", "pid", "comm", "uid", "quota", "usage", "limit", "peak", "action", "fds",
    "container", "pod",
]  # fmt: skip


@pytest.fixture(params=["procfs", pytest.param("bpf", marks=needs_bpf)])
def engine_daemon(request: pytest.FixtureRequest) -> Daemon:
    """A procfs daemon of its own, or a bpf one of its own (records are per daemon)."""
    if request.param == "procfs":
        return request.getfixturevalue("daemon")
    return request.getfixturevalue("bpf_factory")("--engine", "bpf")


def records(daemon: Daemon) -> list[dict[str, object]]:
    return [json.loads(line) for line in daemon.read("enforcements").splitlines()]


def records_of(daemon: Daemon, pid: int) -> list[dict[str, object]]:
    return [record for record in records(daemon) if record["pid"] == pid]


def one_record(daemon: Daemon, pid: int) -> dict[str, object]:
    wait_until(lambda: records_of(daemon, pid), what="the record")
    time.sleep(0.3)  # a second record would come within the check interval
    found = records_of(daemon, pid)
    assert len(found) == 1, found
    return found[0]


def with_more_other(kinds: dict[str, int], more: int) -> dict[str, int]:
    return {**kinds, FD_OTHER: kinds[FD_OTHER] + more}  # the workload opens /dev/null


def test_a_kill_makes_one_record_with_every_field(engine_daemon, spawn):
    w = spawn()
    workload = read_workload(w.pid)
    engine_daemon.register(w.pid)
    engine_daemon.write("files=3", w.pid, "quota")
    w.do("open", 3)
    kinds = with_more_other(read_fd_kinds(w.pid), 1)
    before = time.time()
    with contextlib.suppress(ProcessLookupError):  # killed in the call under bpf
        w.ask("open", 1)
    assert w.wait() == -9
    record = one_record(engine_daemon, w.pid)
    assert list(record) == FIELDS
    assert before <= record["time"] <= time.time()
    fields = {key: record[key] for key in FIELDS if key not in ("time", "fds")}
    assert fields == {
        "pid": w.pid, "comm": "workload", "uid": os.getuid(), "quota": "files", "usage": 4,
        "limit": 3, "peak": 4, "action": "kill", "container": workload.container,
        "pod": workload.pod,
    }  # fmt: skip
    if engine_daemon.read("engine") == "procfs\n":
        assert record["fds"] == kinds  # read before the daemon's SIGKILL
    else:
        assert record["fds"] in (None, kinds)  # the kernel killed it: mostly gone by then


def test_a_deny_makes_one_record_and_the_process_lives(engine_daemon, spawn):
    """A deny quota set below what the process already holds: a breach at once."""
    w = spawn()
    engine_daemon.register(w.pid)
    w.do("open", 3)
    kinds = read_fd_kinds(w.pid)
    engine_daemon.write("files=1 action=deny", w.pid, "quota")
    record = one_record(engine_daemon, w.pid)
    assert (record["quota"], record["usage"], record["limit"], record["action"]) == (
        "files", 3, 1, "deny",
    )  # fmt: skip
    assert record["fds"] == kinds and record["peak"] == 3
    assert w.alive()


def test_a_notify_makes_one_record_and_the_process_lives(engine_daemon, spawn):
    w = spawn()
    engine_daemon.register(w.pid)
    w.do("mmap", 1 << 20)
    engine_daemon.write("heap=4M files=1 action=notify", w.pid, "quota")
    w.do("open", 2)
    kinds = read_fd_kinds(w.pid)
    record = one_record(engine_daemon, w.pid)
    assert (record["quota"], record["usage"], record["limit"], record["action"]) == (
        "files", 2, 1, "notify",
    )  # fmt: skip
    assert record["fds"] == kinds and record["comm"] == "workload"
    assert w.alive()
    metric = 'restrack_process_enforcements_total{action="notify",quota="files",comm="workload"} 1'

    assert metric in engine_daemon.read("metrics").splitlines()


def test_a_record_of_many_descriptors_lists_them_in_a_worker(daemon, spawn):
    """More than the daemon lists in its event loop: the record waits for a worker
    thread's listing, and comes with every descriptor counted."""
    many = 20 * FDS_IN_LOOP
    w = spawn()
    resource.prlimit(w.pid, resource.RLIMIT_NOFILE, (many + 64, many + 64))
    daemon.register(w.pid)
    daemon.write(f"files={many - 1} action=notify", w.pid, "quota")
    w.do("open", many)
    kinds = read_fd_kinds(w.pid)
    record = one_record(daemon, w.pid)
    assert (record["usage"], record["limit"], record["fds"]) == (many, many - 1, kinds)
    assert sum(kinds.values()) > many


def test_the_file_is_pollable(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    daemon.write("files=0 action=notify", w.pid, "quota")
    with opened(daemon, "enforcements") as fd:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        assert poller.poll(0) == []  # nothing new since the open
        w.do("open", 1)  # the periodic check sees it: no read of the process's files
        assert poller.poll(5000), "poll did not wake on the new record"
        text = os.pread(fd, 1 << 20, 0).decode()
        assert json.loads(text.splitlines()[-1])["pid"] == w.pid
        assert poller.poll(0) == []  # read since: quiet again
        w.do("close", 1)
        wait_until(lambda: daemon.read(w.pid, "openfile_count") == "0\n")
        assert poller.poll(200) == []  # back under: no record
        w.do("open", 1)
        assert poller.poll(5000), "poll did not wake on the second record"


def test_the_last_1000_records_are_kept(daemon, spawn):
    """101 processes, each crossing its notify quota 10 times (the log's limit for one
    process in 5 s), the last once: 1,001 records, of which the first is gone."""
    workloads = [spawn() for _ in range(101)]
    for w in workloads:
        daemon.register(w.pid)
        daemon.write("files=0 action=notify", w.pid, "quota")
    for w in workloads[:100]:
        for _ in range(10):
            w.do("open", 1)
            assert daemon.read(w.pid, "openfile_count") == "1\n"  # the crossing, seen now
            w.do("close", 1)
            assert daemon.read(w.pid, "openfile_count") == "0\n"
    last = workloads[100]
    last.do("open", 1)
    daemon.read(last.pid, "openfile_count")
    wait_until(lambda: records_of(daemon, last.pid), what="the 1,001st record")
    with open(daemon.path("enforcements"), "rb", buffering=0) as whole:
        text = whole.read()
    kept = [json.loads(line) for line in text.decode().splitlines()]
    assert len(kept) == 1000
    assert [r["pid"] for r in kept] == [w.pid for w in workloads[:100] for _ in range(10)][1:] + [
        last.pid
    ]
    assert all(r["time"] <= later["time"] for r, later in zip(kept, kept[1:], strict=False))
    with opened(daemon, "enforcements") as fd:  # small reads continue the same text
        chunks = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    assert b"".join(chunks) == text
    metric = 'restrack_process_enforcements_total{action="notify",quota="files",comm="workload"}'
    assert (
        f"{metric} 1001" in daemon.read("metrics").splitlines()
    )  # the counter keeps what the file no longer shows


def test_under_hidepid_a_user_sees_only_their_own_records(daemon_factory, spawn):
    hidden = daemon_factory("--hidepid")
    mine, theirs = spawn(uid=NOBODY), spawn()
    for w in (mine, theirs):
        hidden.register(w.pid)
        hidden.write("files=0 action=notify", w.pid, "quota")
        w.do("open", 1)
    wait_until(lambda: len(records(hidden)) == 2, what="both records")
    seen = sh(f"cat {hidden.path('enforcements')}", uid=NOBODY)
    assert seen.returncode == 0, seen.stderr
    shown = [json.loads(line) for line in seen.stdout.splitlines()]
    assert [(r["pid"], r["uid"]) for r in shown] == [(mine.pid, NOBODY)]
    plain = daemon_factory()  # without --hidepid every user sees every record
    plain.register(theirs.pid)
    plain.write("files=0 action=notify", theirs.pid, "quota")
    theirs.do("open", 1)
    wait_until(lambda: records(plain), what="the record")
    assert str(theirs.pid) in sh(f"cat {plain.path('enforcements')}", uid=NOBODY).stdout


def test_the_file_is_read_only(daemon):
    path = daemon.path("enforcements")
    assert errno_of(lambda: os.open(path, os.O_WRONLY)) == errno.EACCES
    assert errno_of(lambda: os.truncate(path, 0)) == errno.EPERM
    assert errno_of(lambda: os.chmod(path, 0o666)) == errno.EPERM
    assert daemon.read("enforcements") == ""


def test_a_tree_quota_kill_is_the_trees_record(daemon, shell_root):
    root = shell_root()
    daemon.register(root.pid)
    daemon.write("heap=16M scope=tree", root.pid, "quota")
    root.run("{fanout} 2 mmap 2097152 5")  # two children of 10 MiB: 20 MiB in all
    wait_until(lambda: not root.alive(), what="the tree killed")
    record = one_record(daemon, root.pid)
    assert list(record) == [*FIELDS, "scope"]
    assert (record["quota"], record["limit"], record["action"], record["scope"]) == (
        "heap", 16 << 20, "kill", "tree",
    )  # fmt: skip
    assert record["usage"] > 16 << 20 and record["peak"] == record["usage"]


def test_a_deny_limit_raised_and_lowered_back_is_a_deny_record(engine_daemon, spawn):
    w = spawn()
    engine_daemon.register(w.pid)
    engine_daemon.write("files=2 action=deny", w.pid, "quota")
    w.do("setrlimit", "nofile", -1)
    record = one_record(engine_daemon, w.pid)
    assert (record["quota"], record["usage"], record["limit"], record["action"]) == (
        "files", 0, 2, "deny",
    )  # fmt: skip
    assert w.alive()
