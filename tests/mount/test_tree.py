"""Tree quotas through the real mount, under both engines: the tree's files come
and go with its quota, `stat`, `metrics`, the client and `restrack` show its sums
and members, a job over its quota dies whole, and a restart of the daemon
resumes the tree."""

from __future__ import annotations

import errno
import io
import json
import os
import signal

import pytest

from restrackfs import cli, client
from tests.support.bpf import BPF, needs_bpf
from tests.support.daemon import Daemon
from tests.support.procs import MiB
from tests.support.tree import is_dead
from tests.support.waiting import wait_until
from tracker.vocabulary import STAT_FIELDS, TREE_STAT_FIELDS

TREE_FILES = {"tree_heapsize", "tree_openfile_count", "members"}
STEP = 2 * MiB


@pytest.fixture(params=["procfs", pytest.param("bpf", marks=needs_bpf)])
def daemon(request: pytest.FixtureRequest) -> Daemon:
    """A daemon of each engine (a bpf one's pins removed at the end)."""
    if request.param == "procfs":
        return request.getfixturevalue("daemon_factory")()
    return request.getfixturevalue("bpf_factory")(*BPF)


def restrack(mount: object, *args: object) -> str:
    out = io.StringIO()
    assert cli.main(["--mount", str(mount), *map(str, args)], out=out) == 0
    return out.getvalue()


def start_job(root, command: str) -> tuple[int, list[int]]:
    """Run `command` in the root shell: the job's pid and its two children's."""
    root.run(command)
    job = int(root.read_line("fanout")[1])
    children: list[int] = []
    while len(children) < 2:
        pid = int(root.read_line("child")[1])
        if pid not in children:
            children.append(pid)
    return job, children


def test_the_tree_files_come_and_go_with_a_tree_quota(daemon, shell_root):
    m, root = daemon.mountpoint, shell_root()
    client.register(root.pid, mount=m)
    directory = m / str(root.pid)
    assert not TREE_FILES & set(os.listdir(directory))
    client.set_quota(root.pid, heap="64M", action="notify", scope="tree", mount=m)
    assert (directory / "quota").read_text() == "heap=67108864 files=max action=notify scope=tree\n"
    assert set(os.listdir(directory)) >= TREE_FILES
    assert client.members(root.pid, mount=m) == [root.pid]

    job, children = start_job(root, f"{{fanout}} 2 mmap {STEP} 3")  # 12 MiB in all
    expected = {root.pid, job, *children}
    wait_until(lambda: set(client.members(root.pid, mount=m)) == expected, what="members")
    assert client.members(root.pid, mount=m)[0] == root.pid
    wait_until(lambda: client.tree_heapsize(root.pid, mount=m) >= 12 * MiB, what="the sum")
    assert client.tree_openfile_count(root.pid, mount=m) >= 3 * 3  # each member's own 0 1 2

    text = (directory / "stat").read_text()
    assert [line.split()[0] for line in text.splitlines()] == [*STAT_FIELDS, *TREE_STAT_FIELDS]
    s = client.stat(root.pid, mount=m)
    assert s.members == 4 and s.tree_heapsize is not None and s.tree_heapsize >= 12 * MiB
    metrics = client.metrics(mount=m)
    assert f'restrack_tree_members{{pid="{root.pid}",comm="sh"}} 4' in metrics
    assert f'restrack_tree_heap_bytes{{pid="{root.pid}",' in metrics

    row = next(r.split() for r in restrack(m, "status").splitlines() if r.startswith(str(root.pid)))
    assert row[1] == "sh(tree:4)"
    shown = dict(line.split(None, 1) for line in restrack(m, "show", root.pid).splitlines())
    assert shown["members"] == "4"
    assert json.loads(restrack(m, "status", "--json"))[0]["members"] == 4

    client.reset(root.pid, "quota", mount=m)
    assert not TREE_FILES & set(os.listdir(directory))
    for name in TREE_FILES:
        with pytest.raises(FileNotFoundError):
            (directory / name).read_text()
    text = (directory / "stat").read_text()
    assert [line.split()[0] for line in text.splitlines()] == list(STAT_FIELDS)
    assert "restrack_tree_members{" not in client.metrics(mount=m)


def test_a_process_quota_shows_no_tree(daemon, spawn):
    m, w = daemon.mountpoint, spawn()
    client.register(w.pid, mount=m)
    client.set_quota(w.pid, heap="64M", mount=m)
    assert not TREE_FILES & set(os.listdir(m / str(w.pid)))
    assert client.stat(w.pid, mount=m).members is None
    assert (m / str(w.pid) / "quota").read_text() == "heap=67108864 files=max action=kill\n"


def test_a_tree_cannot_deny(daemon, spawn):
    m, w = daemon.mountpoint, spawn()
    client.register(w.pid, mount=m)
    with pytest.raises(OSError) as info:
        (m / str(w.pid) / "quota").write_text("heap=1G action=deny scope=tree\n")
    assert info.value.errno == errno.EINVAL
    assert (m / str(w.pid) / "quota").read_text() == "heap=max files=max action=kill\n"


def test_a_job_over_its_tree_quota_is_killed_whole(daemon, shell_root):
    m, root = daemon.mountpoint, shell_root()
    client.register(root.pid, mount=m)
    client.set_quota(root.pid, heap="16M", scope="tree", mount=m)  # two children of 10 MiB
    root.run(f"{{fanout}} 2 mmap {STEP} 5")
    job = int(root.read_line("fanout")[1])
    wait_until(lambda: not root.alive(), what="the root killed")
    assert root.proc.returncode == -signal.SIGKILL
    wait_until(lambda: is_dead(job), what="the job killed")
    wait_until(lambda: client.tracked(mount=m) == [], what="the root's entry removed")


def test_a_restart_of_the_daemon_resumes_the_tree(daemon, shell_root):
    m, root = daemon.mountpoint, shell_root()
    client.register(root.pid, mount=m)
    client.set_quota(root.pid, heap="64M", action="notify", scope="tree", mount=m)
    # the job's parent exits: after the restart only the saved membership holds the job
    job, children = start_job(root, f"sh -c '{{fanout}} 2 mmap {STEP} 2 & sleep 0.3'")
    expected = {root.pid, job, *children}
    wait_until(lambda: set(client.members(root.pid, mount=m)) == expected, what="members")
    wait_until(lambda: _parent(job) not in expected, what="the job reparented")
    daemon.stop()
    daemon.start()
    assert set(client.members(root.pid, mount=m)) == expected
    assert client.tree_heapsize(root.pid, mount=m) >= 8 * MiB
    assert "scope=tree" in (m / str(root.pid) / "quota").read_text()


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        raw = stat.read()
    return int(raw[raw.rindex(b")") + 2 :].split()[1])
