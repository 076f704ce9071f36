"""No process can make the bpf daemon fall behind: a user's own
notify quota flipped over and back as fast as the CPU allows floods the kernel's
ring on today's main (root's reads stall for seconds, crossings go uncounted).
The kernel reports a change of an entry once, and keeps the counts in the map."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.harness import status_kib
from tests.support.bpf import BPF, needs_bpf
from tests.support.daemon import Daemon, DaemonFactory
from tests.support.procs import nofile_soft
from tests.support.users import NOBODY, as_user
from tests.support.waiting import wait_until
from tests.support.workload import Workload

pytestmark = needs_bpf
FLIPS = 300_000


def _as_nobody_write(daemon: Daemon, text: str, *parts: object) -> None:
    path = daemon.path(*parts)
    subprocess.run(as_user(NOBODY, ["sh", "-c", f'echo "{text}" > {path}']), check=True)


def test_a_flood_of_crossings_is_counted_whole_and_stalls_no_read(
    bpf_factory: DaemonFactory,  # noqa: F811
    grow_binary: Path,
    spawn,
) -> None:
    daemon = bpf_factory(*BPF)
    other: Workload = spawn()  # root's process, read throughout
    daemon.register(other.pid)
    argv = as_user(NOBODY, [grow_binary, "flip", 0, FLIPS])
    flipper = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert flipper.stdin and flipper.stdout
    pid = int(flipper.stdout.readline().split()[1])
    _as_nobody_write(daemon, str(pid), "register")
    _as_nobody_write(daemon, "files=0 action=notify", pid, "quota")
    assert daemon.proc is not None
    rss_before = status_kib(daemon.proc.pid, "VmRSS")
    flipper.stdin.write("go\n")
    flipper.stdin.flush()
    worst = 0.0
    while flipper.poll() is None:
        started = time.monotonic()
        daemon.read(other.pid, "heapsize")
        worst = max(worst, time.monotonic() - started)
    lines = flipper.stdout.read().splitlines()
    assert f"flipped {FLIPS}" in lines
    # every crossing counted, none lost to a full ring (the entry leaves at exit:
    # the top-level counter keeps them)
    wait_until(lambda: _top(daemon)["notified"] >= FLIPS, 5, f"{FLIPS} crossings counted")
    assert _top(daemon)["notified"] == FLIPS
    print(f"root's worst heapsize read during the flood: {worst * 1000:.1f} ms")
    assert worst < 0.5, f"root's read took {worst:.3f} s during the flood"
    assert status_kib(daemon.proc.pid, "VmRSS") - rss_before < 50 * 1024


def _top(daemon: Daemon) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in daemon.read("events").splitlines())}


def test_a_raise_during_a_flood_is_lowered_back(
    bpf_factory: DaemonFactory,  # noqa: F811
    grow_binary: Path,
    spawn,
) -> None:
    """While a user floods, a process under root's deny quota raises its soft
    RLIMIT_NOFILE: the raise is not lost behind the flood's events."""
    daemon = bpf_factory(*BPF)
    argv = as_user(NOBODY, [grow_binary, "flip", 0, 3 * FLIPS])
    flipper = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert flipper.stdin and flipper.stdout
    pid = int(flipper.stdout.readline().split()[1])
    _as_nobody_write(daemon, str(pid), "register")
    _as_nobody_write(daemon, "files=0 action=notify", pid, "quota")
    w: Workload = spawn(uid=NOBODY)
    daemon.register(w.pid)
    daemon.write("files=10 action=deny", w.pid, "quota")
    wanted = nofile_soft(w.pid)
    flipper.stdin.write("go\n")
    flipper.stdin.flush()
    try:
        assert w.ask("setrlimit", "nofile", -1) == "ok"
        raised = time.monotonic()
        wait_until(lambda: nofile_soft(w.pid) == wanted, 2, "the raise lowered back")
        lowered_after = time.monotonic() - raised
        assert flipper.poll() is None, "the flood ended before the raise was handled"
        assert lowered_after < 1.0  # not the 2 s polling
    finally:
        flipper.kill()
        flipper.wait()
