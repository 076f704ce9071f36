"""`restrack enforcements`: the daemon's records, readable or as JSON, followed as they
are made; and the record `restrack run` prints of its program's kill."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import time

from restrackfs import client
from tests.support.cli import restrack_run
from tests.support.daemon import Daemon
from tests.support.procs import MiB
from tests.support.users import NOBODY, as_user
from tests.support.waiting import wait_until

KILLED = 128 + signal.SIGKILL
COMMAND = [sys.executable, "-m", "restrackfs.cli"]


def line_within(stream, seconds: float) -> str:
    """The next line of `stream` (a pipe), or "" if none comes within `seconds`."""
    ready, _, _ = select.select([stream], [], [], seconds)
    return stream.readline() if ready else ""


def notify_crossing(daemon: Daemon, spawn) -> int:
    w = spawn()
    daemon.register(w.pid)
    daemon.write("heap=1M action=notify", w.pid, "quota")
    w.do("mmap", 2 * MiB)
    return w.pid


def test_it_prints_each_kept_record_on_one_readable_line(daemon, spawn):
    pid = notify_crossing(daemon, spawn)
    wait_until(lambda: client.enforcements(mount=daemon.mountpoint), what="the record")
    mount = ["--mount", str(daemon.mountpoint)]
    result = subprocess.run([*COMMAND, *mount, "enforcements"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    words = line.split()
    assert words[2:] == ["notify", "pid", str(pid), "(workload)", "heap", "2M/1M", "peak", "2M"]
    raw = subprocess.run([*COMMAND, *mount, "enforcements", "--json"], capture_output=True)
    [record] = [json.loads(line) for line in raw.stdout.splitlines()]
    assert (record["pid"], record["usage"], record["limit"]) == (pid, 2 * MiB, 1 * MiB)


def test_follow_prints_a_record_as_it_happens(daemon, spawn):
    argv = [*COMMAND, "--mount", str(daemon.mountpoint), "enforcements", "--follow", "--json"]
    follower = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert line_within(follower.stdout, 1.0) == ""  # nothing kept, nothing printed
        pid = notify_crossing(daemon, spawn)
        made = time.time()
        line = line_within(follower.stdout, 5.0)
        assert line, "the follower printed nothing"
        record = json.loads(line)
        assert (record["pid"], record["action"], record["quota"]) == (pid, "notify", "heap")
        assert record["time"] <= made + 1.0  # printed as it happened, not at some later read
        second = notify_crossing(daemon, spawn)
        assert json.loads(line_within(follower.stdout, 5.0))["pid"] == second  # and the next
        assert follower.poll() is None
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 0, follower.stderr.read() if follower.stderr else ""


def test_the_client_reads_the_records(daemon, spawn):
    mount = daemon.mountpoint
    assert client.enforcements(mount=mount) == []
    pid = notify_crossing(daemon, spawn)
    followed = client.follow_enforcements(mount=mount, timeout=5.0)
    first = next(followed)  # waits in poll() for it
    followed.close()
    assert client.enforcements(mount=mount) == [first]
    assert (first.pid, first.quota, first.usage, first.limit, first.action, first.scope) == (
        pid, "heap", 2 * MiB, 1 * MiB, "notify", "process",
    )  # fmt: skip
    assert first.fds is not None and sum(first.fds.values()) > 0
    assert list(client.follow_enforcements(mount=mount, new_only=True, timeout=0.2)) == []


def test_restrack_run_prints_the_daemons_record_of_its_kill(engine_daemon, runquota):
    started = time.time()
    result = restrack_run(engine_daemon, runquota, "heap", 256, options=["--heap", "16M"])
    assert result.returncode == KILLED
    lines = result.stderr.splitlines()
    assert lines[0].endswith("was killed by its quota: heap=16M files=max action=kill")
    prefix = "restrack run: the daemon's record: "
    assert lines[1].startswith(prefix) and len(lines) == 2
    record = json.loads(lines[1].removeprefix(prefix))
    assert (record["comm"], record["quota"], record["limit"], record["action"]) == (
        "runquota", "heap", 16 * MiB, "kill",
    )  # fmt: skip
    assert record["usage"] > 16 * MiB and record["time"] >= started
    assert f"(pid {record['pid']})" in lines[0]


def test_restrack_run_falls_back_to_its_own_words_without_a_record(daemon):
    result = restrack_run(daemon, "sh", "-c", "kill -KILL $$", options=["--heap", "1G"])
    assert result.returncode == KILLED
    assert "not counted by the daemon as its quota" in result.stderr
    assert "the daemon's record" not in result.stderr


def test_under_hidepid_a_user_follows_only_their_own_records(daemon_factory, spawn):
    hidden = daemon_factory("--hidepid")
    argv = as_user(NOBODY, [*COMMAND, "--mount", hidden.mountpoint, "enforcements", "-f", "--json"])
    follower = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/"
    )
    try:
        roots = notify_crossing(hidden, spawn)
        wait_until(lambda: client.enforcements(mount=hidden.mountpoint), what="root's record")
        assert line_within(follower.stdout, 1.0) == ""  # not theirs: not shown
        mine = spawn(uid=NOBODY)
        hidden.register(mine.pid)
        hidden.write("heap=1M action=notify", mine.pid, "quota")
        mine.do("mmap", 2 * MiB)
        record = json.loads(line_within(follower.stdout, 5.0))
        assert (record["pid"], record["uid"]) == (mine.pid, NOBODY) and roots != mine.pid
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 0, follower.stderr.read() if follower.stderr else ""
