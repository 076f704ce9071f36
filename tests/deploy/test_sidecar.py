"""Sidecars: automatic tracking in a PID namespace, metrics, events, textfile."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from restrackfs.daemon import parse_args
from tests.support.mount import events_from_fd, opened
from tests.support.paths import CHECKOUT, SUPPORT
from tests.support.procs import MiB
from tests.support.tempdirs import shared_tempdir
from tests.support.waiting import wait_until
from tracker.engine.autotrack import in_initial_pid_namespace


def in_pid_namespace(*daemon_options: str) -> dict:
    argv = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable]
    argv += [str(SUPPORT / "sidecar_scenario.py"), *daemon_options]
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert not os.path.lexists(seen["mount"]) and not os.path.lexists(seen["state"])
    return seen


def test_track_all_in_a_pid_namespace_with_default_quota():
    seen = in_pid_namespace("--track-all", "--default-quota", "heap=1G files=64 action=notify")
    # namespace pids: the scenario is pid 1, everything else is small too
    assert seen["me"] == 1
    assert all(pid < 100 for pid in seen["tracked"])
    expected = {seen["me"], seen["before"], seen["parent"], seen["child"]}
    assert expected <= set(seen["tracked"]) | {seen["before"]}
    assert seen["daemon"] not in seen["tracked"]
    assert seen["seen_after"] < 1.0  # every new process within one second
    assert set(seen["quotas"].values()) == {"heap=1073741824 files=64 action=notify"}
    assert seen["stays_deregistered"] is True


def test_track_comm_narrows():
    seen = in_pid_namespace("--track-comm", "sleep")
    assert seen["before"] in seen["tracked"] or seen["stays_deregistered"]
    assert seen["me"] not in seen["tracked"]  # python3
    assert seen["child"] in seen["tracked"]  # sleep
    assert seen["quotas"] and set(seen["quotas"].values()) == {"heap=max files=max action=kill"}


def test_track_children_narrows():
    # in the namespace, the scenario is pid 1: its descendants only, not itself
    seen = in_pid_namespace("--track-children", "1", "--track-comm", "sleep")
    assert seen["child"] in seen["tracked"]
    assert seen["parent"] in seen["tracked"]
    assert seen["me"] not in seen["tracked"]


def test_default_quota_is_validated_at_start(tmp_path):
    argv = [sys.executable, "-m", "restrackfs.daemon", "--foreground", "--track-all"]
    result = subprocess.run(
        [*argv, "--default-quota", "heap=lots", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "--default-quota: bad size 'lots': want bytes with K/M/G/T suffix" in result.stderr
    result = subprocess.run(
        [*argv[:-1], "--default-quota", "files=1", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "needs --track-all" in result.stderr


def parse_metrics(text: str) -> dict[str, list]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_metrics_parse_with_prometheus_client(daemon, spawn):
    a, b = spawn(), spawn()
    daemon.register(a.pid)
    daemon.register(b.pid)
    a.do("mmap", 2 * MiB)
    daemon.write("files=1 action=notify", b.pid, "quota")
    b.do("open", 2)
    text = daemon.read("metrics")
    families = parse_metrics(text)
    heap = {s.labels["pid"]: s.value for s in families["restrack_heap_bytes"]}
    assert heap == {str(a.pid): 2 * MiB, str(b.pid): 0}
    assert {s.labels["comm"] for s in families["restrack_heap_bytes"]} == {"workload"}
    quota = {s.labels["pid"]: s.value for s in families["restrack_open_files_quota"]}
    assert quota == {str(b.pid): 1}
    assert families.get("restrack_heap_quota_bytes", []) == []
    enforcements = {s.labels["action"]: s.value for s in families["restrack_enforcements"]}
    assert enforcements == {"kill": 0, "deny": 0, "notify": 1, "warn": 0}
    (tracked,) = families["restrack_tracked_processes"]
    assert tracked.value == 2


def test_metrics_escape_hostile_comm(daemon, spawn):
    name = 'a"b\\c'
    proc = subprocess.Popen(
        [sys.executable, "-c", f"open('/proc/self/comm','w').write({name!r}); input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        comm = Path(f"/proc/{proc.pid}/comm")
        while comm.read_text().strip() != name:
            pass
        daemon.register(proc.pid)
        families = parse_metrics(daemon.read("metrics"))
        (sample,) = families["restrack_heap_bytes"]
        assert sample.labels["comm"] == name
    finally:
        proc.kill()
        proc.wait()


def test_textfile_for_node_exporter(daemon, spawn, tmp_path):
    tmp_path = tmp_path / "textfile"
    tmp_path.mkdir()
    w = spawn()
    daemon.register(w.pid)
    argv = [sys.executable, "-m", "restrackfs.cli", "--mount", str(daemon.mountpoint)]
    result = subprocess.run([*argv, "metrics", "--textfile", str(tmp_path)], capture_output=True)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["restrack.prom"]  # no temp file left behind
    families = parse_metrics((tmp_path / "restrack.prom").read_text())
    assert [s.labels["pid"] for s in families["restrack_heap_bytes"]] == [str(w.pid)]
    printed = subprocess.run([*argv, "metrics"], capture_output=True, text=True).stdout
    assert "restrack_tracked_processes 1" in printed


@pytest.mark.parametrize("action", ["notify", "kill"])
def test_poll_on_events_wakes_when_a_quota_is_crossed(daemon, spawn, action):
    w = spawn()
    daemon.register(w.pid)
    own = os.open(daemon.path(w.pid, "events"), os.O_RDONLY)
    top = os.open(daemon.path("events"), os.O_RDONLY)
    try:
        assert events_from_fd(own) == {
            "exceeded": 0,
            "killed": 0,
            "denied": 0,
            "notified": 0,
            "warned": 0,
        }
        poller = select.poll()
        poller.register(own, select.POLLPRI | select.POLLIN)
        poller.register(top, select.POLLPRI)
        assert poller.poll(50) == []  # nothing happened: nothing to read
        daemon.write(f"files=1 action={action}", w.pid, "quota")
        w.ask("open", 2)
        ready = dict(poller.poll(5000))
        assert top in ready and ready[top] & select.POLLPRI
        if action == "notify":
            assert ready[own] & select.POLLPRI
            assert events_from_fd(own) == {
                "exceeded": 1,
                "killed": 0,
                "denied": 0,
                "notified": 1,
                "warned": 0,
            }
            assert own not in dict(poller.poll(50))  # read: quiet again
        assert events_from_fd(top)["exceeded"] == 1
        assert events_from_fd(top)["killed" if action == "kill" else "notified"] == 1
    finally:
        os.close(own)
        os.close(top)


def test_plain_files_poll_ready(daemon, spawn):
    w = spawn()
    daemon.register(w.pid)
    with opened(daemon, w.pid, "heapsize") as fd:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(1000) == [(fd, select.POLLIN)]


# ----- the host's pid namespace ---------------------------------------------------------


def daemon_argv(*options: str) -> list[str]:
    return [sys.executable, "-m", "restrackfs.daemon", "--foreground", *options]


@pytest.mark.parametrize("quota", ["files=4096", "heap=2G action=deny"])
def test_track_all_with_a_kill_or_deny_quota_is_refused_on_the_host(tmp_path, quota):
    """Without `--fork --mount-proc`, or with no namespace at all, --track-all would
    cap every process of the machine: refused, and nothing is mounted."""
    assert in_initial_pid_namespace(), "the suite runs in the host's pid namespace"
    result = subprocess.run(
        [*daemon_argv("--track-all", "--default-quota", quota), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2, result.stderr
    assert "refusing --track-all with a kill or deny --default-quota" in result.stderr
    assert "unshare --pid --fork --mount-proc" in result.stderr
    assert "--yes-all-host-processes" in result.stderr
    assert not os.path.ismount(tmp_path)


@pytest.mark.parametrize(
    "options",
    [
        ["--track-all", "--default-quota", "files=4096", "--yes-all-host-processes"],
        ["--track-all", "--default-quota", "files=4096 action=notify"],
        ["--track-all", "--default-quota", "heap=max files=max"],
        ["--track-all"],
        ["--track-all", "--track-comm", "myapp*", "--default-quota", "files=64"],
        ["--track-children", "1", "--default-quota", "files=64"],
    ],
)
def test_what_cannot_cap_the_whole_host_is_accepted(options):
    assert in_initial_pid_namespace()
    args = parse_args([*options, "/restrack"])  # parsing only: nothing starts
    assert args.selection.enabled


def parse_in(unshare: list[str], *options: str) -> subprocess.CompletedProcess[str]:
    code = f"from restrackfs.daemon import parse_args; parse_args({[*options, '/restrack']!r})"
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    return subprocess.run(
        [*unshare, sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=20
    )


def test_track_all_with_a_kill_quota_is_accepted_in_a_pid_namespace():
    result = parse_in(
        ["unshare", "--pid", "--fork", "--mount-proc"], "--track-all", "--default-quota", "files=64"
    )
    assert result.returncode == 0, result.stderr


def test_a_proc_of_another_pid_namespace_is_refused():
    """`unshare --pid --fork` without `--mount-proc`: /proc is the host's, whose pids
    name other processes than the daemon's own namespace gives the same numbers to."""
    result = parse_in(["unshare", "--pid", "--fork"], "--track-all")
    assert result.returncode == 2
    assert "/proc shows another pid namespace than the daemon's" in result.stderr


def test_a_mount_made_in_the_namespace_is_shared_through_a_shared_mount_point(tmp_path):
    """The README's recipe: a mount made inside `--mount-proc` is the namespace's own,
    unless the mount point is a shared mount and unshare leaves propagation as it is."""
    point = shared_tempdir("restrack-mnt-")
    subprocess.run(["mount", "--bind", point, point], check=True)
    try:
        subprocess.run(["mount", "--make-shared", point], check=True)
        unshare = ["unshare", "--pid", "--fork", "--mount-proc", "--propagation", "unchanged"]
        argv = [*unshare, *daemon_argv("--state", str(tmp_path / "state.json"), str(point))]
        proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        try:
            wait_until(lambda: (point / "metrics").exists() or proc.poll() is not None, 20)
            assert "restrack_tracked_processes 0" in (point / "metrics").read_text()
        finally:  # unshare does not pass SIGTERM on: stop the daemon, its child
            for daemon in children.read_text().split() if proc.poll() is None else []:
                os.kill(int(daemon), signal.SIGTERM)
            proc.wait(20)
        wait_until(lambda: not (point / "metrics").exists(), 10, "the namespace's unmount")
    finally:
        subprocess.run(["umount", point], check=True)
        point.rmdir()
