"""Process names a user chooses cannot forge a line, crash a reader or reach a
terminal raw: the log, the client, the CLI, `restrack run`, metrics labels."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from restrackfs import client
from tests.support.cli import restrack_run
from tests.support.daemon import Daemon
from tests.support.users import NOBODY, as_user
from tests.support.waiting import wait_until
from tracker.linux.procfs import escape_comm, escape_unprintable

FORGERS = {
    "fs pid 1": b"x\x1cpid 1",  # str.splitlines() splits on \x1c: a forged `pid 1` line
    "fs": b"a\x1cb",  # a line without a space: crashed `dict(...)` in the client
    "cr esc": b"\x1b[2J\rgotcha",  # clears a terminal, rewrites a log line
    "nel ls": "\x85\u2028p".encode(),  # C1 NEL and LINE SEPARATOR
}


RAW_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # what must never be printed raw


def shown_name(raw: bytes) -> str:
    """A name as the daemon shows it (README, Security): escape_comm of the comm."""
    return escape_comm(raw[:15].decode("utf-8", "replace"))


def restrack(daemon: Daemon, *args: object) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "restrackfs.cli", "--mount", daemon.mountpoint, *args]
    return subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=30)


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
    proc = subprocess.Popen(
        as_user(NOBODY, ["/usr/bin/python3", "-c", script]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout.readline() == b"done\n"
        wait_until(lambda: "action=notify" in daemon.log_text(), what="enforcement logged")
    finally:
        proc.kill()
        proc.wait()
    lines = daemon.log_text().splitlines()
    assert not [line for line in lines if line.startswith("FORGED")], "a forged log line"


def test_a_process_name_cannot_forge_a_line_in_the_client_or_the_cli(daemon, named):
    """Found by a review: `client.stat` split with `str.splitlines()`, which also splits
    on \\x1c, \\x85, \\u2028...: a process named `x\\x1cpid 1` showed as pid 1 in root's
    `restrack status`, `show`, `--json` and `fetch()`; `a\\x1cb` crashed `status` and
    `top` for everyone; \\r and ESC reached the terminal and the log raw. Now lines
    split on \\n alone and the daemon escapes every character that is not printable,
    wherever it prints a name."""
    processes = {label: named(raw) for label, raw in FORGERS.items()}
    for process in processes.values():
        daemon.register(process.pid)
    pids = {p.pid for p in processes.values()}
    for label, process in processes.items():
        record = client.stat(process.pid, mount=daemon.mountpoint)
        assert (record.pid, record.comm) == (process.pid, shown_name(FORGERS[label]))
        assert client.fetch(process.pid, mount=daemon.mountpoint).pid == process.pid
        show = restrack(daemon, "show", process.pid)
        assert show.returncode == 0, show.stderr
        assert f"pid{' ' * 13}{process.pid}" in show.stdout.split("\n")
        assert not RAW_CONTROL.search(show.stdout.replace("\n", "")), repr(show.stdout)
    listing = restrack(daemon, "status", "--json")
    assert listing.returncode == 0, listing.stderr
    assert {row["pid"] for row in json.loads(listing.stdout)} == pids
    for args in (["status"], ["top", "-n", "1"]):
        result = restrack(daemon, *args)
        assert result.returncode == 0, result.stderr
        body = result.stdout.removeprefix("\x1b[H\x1b[2J")  # top's own screen clearing
        assert not RAW_CONTROL.search(body.replace("\n", "")), repr(body)
        rows = [line.split()[0] for line in body.split("\n")[1:] if line[:1].isdigit()]
        assert sorted(map(int, rows)) == sorted(pids), body
    families = text_string_to_metric_families(daemon.read("metrics"))
    comms = {
        s.labels["pid"]: s.labels["comm"] for f in families for s in f.samples if "pid" in s.labels
    }
    for label, process in processes.items():
        assert comms[str(process.pid)] == escape_unprintable(FORGERS[label].decode())
    log = daemon.log_text()
    assert not RAW_CONTROL.search(log.replace("\n", "")), "a raw control character in the log"
    assert "gotcha" in log  # the name was logged, escaped


def test_the_run_supervisor_survives_a_fetch_of_a_forging_name(daemon, named, abi_ops):
    """Found by a review: fetch of a process named `a\\x1cb` crashed the `restrack run`
    supervisor (the client's stat parser), and the program's calls then got ENOSYS."""
    process = named(FORGERS["fs"])
    daemon.register(process.pid)
    result = restrack_run(daemon, abi_ops, process.pid, "fetch", "fetch")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "fetch 0 0\nfetch 0 0\n"


def test_names_from_the_kernel_reach_the_client_as_shown(daemon, named):
    """Every byte a process can put in its name, through the real kernel and mount."""
    process = named(uid=None)
    daemon.register(process.pid)

    @given(st.binary(min_size=1, max_size=15).filter(lambda raw: b"\0" not in raw))
    @settings(max_examples=150, deadline=None)
    def check(raw: bytes) -> None:
        process.name(raw)
        record = client.stat(process.pid, mount=daemon.mountpoint)
        assert (record.pid, record.comm) == (process.pid, shown_name(raw))

    check()
