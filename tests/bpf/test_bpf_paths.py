"""The bpf engine's kill quota on every way to the resource: a daemon
in a PID namespace, ia32 calls, io_uring work, batches. Each test runs a real
daemon (`--interval 2000`: whatever holds within the call is the kernel's doing)
and a c/grow.c process; where BPF cannot load, they skip with the reason."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.bpf import BPF, needs_bpf
from tests.support.build import compile_c
from tests.support.mount import capped, enforcement_line, events_of
from tests.support.paths import C_SOURCES, CHECKOUT, SUPPORT
from tests.support.procs import MiB, exited, nofile_soft
from tests.support.waiting import wait_until

pytestmark = needs_bpf


def in_pid_namespace(grow: Path, mode: str, step: int, count: int, quota: str) -> dict:
    """The daemon and the grower in a new PID namespace, as the sidecar runs."""
    argv = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable]
    argv += [str(SUPPORT / "bpf_namespace_scenario.py"), str(grow), mode, str(step), str(count)]
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    result = subprocess.run([*argv, quota], capture_output=True, text=True, timeout=90, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    ("mode", "step", "quota", "per_call", "limit"),
    [("touch", MiB, "heap=64M action=kill", MiB, 64 * MiB), ("dup", 0, "files=100", 1, 100)],
    ids=["heap", "files"],
)
def test_a_daemon_in_a_pid_namespace_enforces_in_the_crossing_call(
    grow_binary: Path, mode: str, step: int, quota: str, per_call: int, limit: int
) -> None:
    seen = in_pid_namespace(grow_binary, mode, step, 300, quota)
    assert seen["engine"] == "bpf"
    assert seen["signal"] == signal.SIGKILL, seen
    assert seen["steps"] * per_call <= limit, "a call that crossed the quota returned"
    assert seen["events"]["killed"] == 1, seen["events"]


# ----- one daemon on the host for the paths below ---------------------------------------


IA32_HEAP = ["ia32mmap", "ia32brk"]


@pytest.mark.parametrize("mode", IA32_HEAP)
def test_ia32_heap_growth_is_killed_in_the_crossing_call(bpf_daemon, grower, mode: str) -> None:
    child = capped(bpf_daemon, grower(mode, MiB, 300), "heap=64M action=kill")
    child.go()
    sig, steps = child.finish()
    assert sig == signal.SIGKILL and steps * MiB <= 64 * MiB
    wait_until(lambda: enforcement_line(bpf_daemon, child.pid), 2, "the enforcement line")
    usage, limit = enforcement_line(bpf_daemon, child.pid) or (0, 0)
    assert 0 < usage - limit <= MiB


# ia32 calls; io_uring opens completed by an io-wq worker and by the SQ thread, with
# no call of the process after the submission (a completion may land in a batch)
DESCRIPTOR_PATHS = [("ia32dup", 1), ("ia32open", 1), ("uring_async", 2), ("uring_sqpoll", 2)]


@pytest.mark.parametrize(("mode", "most"), DESCRIPTOR_PATHS, ids=[p[0] for p in DESCRIPTOR_PATHS])
def test_descriptors_made_past_the_syscall_hooks_are_killed_where_made(
    bpf_daemon, grower, mode: str, most: int
) -> None:
    child = capped(bpf_daemon, grower(mode, 0, 300), "files=100 action=kill")
    child.go()
    sig, steps = child.finish()
    assert sig == signal.SIGKILL and steps <= 100
    wait_until(lambda: enforcement_line(bpf_daemon, child.pid), 2, "the enforcement line")
    usage, limit = enforcement_line(bpf_daemon, child.pid) or (0, 0)
    assert limit == 100 and 0 < usage - limit <= most, f"overshoot {usage - limit}"


def test_an_ia32_raise_of_a_deny_limit_is_lowered_back_at_once(
    bpf_daemon, grower, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GROW_HOLD", "1")  # alive after its calls, until told
    child = capped(bpf_daemon, grower("ia32nofile", 0, 0), "files=10 action=deny")
    wanted = nofile_soft(child.pid)
    child.go()
    assert child.proc.stdout
    while child.proc.stdout.readline().strip() != "done":
        pass
    started = time.monotonic()
    wait_until(lambda: nofile_soft(child.pid) == wanted, 1.5, "the soft limit lowered back")
    assert time.monotonic() - started < 1.5, "not before the 2 s polling"
    child.go()
    child.finish()


@pytest.mark.parametrize(("mode", "batch"), [("uring_batch", 300), ("recvmsg_batch", 250)])
def test_one_request_of_many_descriptors(bpf_daemon, grower, mode: str, batch: int) -> None:
    """One call that makes `batch` descriptors: killed in it, overshoot measured."""
    child = capped(bpf_daemon, grower(mode, batch, 3), "files=100 action=kill")
    child.go()
    sig, steps = child.finish()
    assert sig == signal.SIGKILL and steps == 0
    wait_until(lambda: enforcement_line(bpf_daemon, child.pid), 2, "the enforcement line")
    usage, limit = enforcement_line(bpf_daemon, child.pid) or (0, 0)
    print(f"{mode} {batch}: usage at the kill {usage}, limit {limit}")
    assert limit == 100 and 0 < usage - limit <= batch


SHARERS = [("vmshare", MiB, "heap=64M action=kill", 64), ("vfork", MiB, "heap=64M action=kill", 64),
           ("filesshare", 0, "files=100 action=kill", 100)]  # fmt: skip


@pytest.mark.parametrize(("mode", "step", "quota", "most"), SHARERS, ids=[s[0] for s in SHARERS])
def test_another_group_sharing_the_resource_is_held_to_the_quota(
    bpf_daemon, grower, mode: str, step: int, quota: str, most: int
) -> None:
    """A thread group that shares the watched address space (CLONE_VM, vfork) or
    descriptor table (CLONE_FILES) grows the watched process: the sharer is killed
    in its crossing call, and the watched process with it."""
    child = capped(bpf_daemon, grower(mode, step, 300), quota)
    child.go()
    assert child.proc.stdout
    lines = child.proc.stdout.read().splitlines()
    child.proc.wait(20)
    sharer = int(next(line.split()[1] for line in lines if line.startswith("sharer ")))
    end = next(line.split() for line in lines if line.startswith("end "))
    steps = sum(1 for line in lines if line.startswith("step "))
    assert int(end[1]) == signal.SIGKILL, lines[-5:]
    assert steps <= most, "a sharer's call that crossed the quota returned"
    wait_until(lambda: exited(sharer), 5, "the sharer dead")


@pytest.mark.parametrize(
    ("mode", "step", "quota"), [("tryopen", 0, "files=10"), ("trymmap", MiB, "heap=16M")]
)
def test_every_call_refused_for_a_deny_limit_is_counted(
    bpf_daemon, grower, monkeypatch: pytest.MonkeyPatch, mode: str, step: int, quota: str
) -> None:
    """The kernel refuses each call past a deny limit (EMFILE, ENOMEM): each counts in
    the process's `denied`, exactly, with one log line for a burst. Read from the
    process's own `events` while it is held alive: the mount's totals also move with
    what other processes of this module's daemon hand over late."""
    monkeypatch.setenv("GROW_HOLD", "1")  # alive after its calls, until told
    child = capped(bpf_daemon, grower(mode, step, 600), f"{quota} action=deny")
    child.go()
    assert child.proc.stdout and child.proc.stdin
    lines = []
    while not lines or lines[-1] != "done":
        lines.append(child.proc.stdout.readline().strip())
    refused = int(next(line.split()[1] for line in lines if line.startswith("refused ")))
    assert refused >= 500
    denied = lambda: events_of(bpf_daemon, child.pid)["denied"]  # noqa: E731
    wait_until(lambda: denied() >= refused, 2, "counted")
    assert denied() == refused
    child.proc.stdin.write("exit\n")
    child.proc.stdin.flush()
    child.proc.wait(20)
    assert f"pid={child.pid} comm=grow quota=" in bpf_daemon.log_text()
    assert "refused=" in bpf_daemon.log_text()


def test_an_exec_does_not_hand_the_old_images_memory_to_the_new_one(
    bpf_daemon, bin_dir: Path
) -> None:
    """Registered with 200 MiB of VmData, the process execs a small image under a
    64 MiB kill quota: the new image gets 64 MiB beyond where it starts, not the
    200 MiB the old one held (the baseline follows an exec down, never up)."""
    binary = compile_c(C_SOURCES / "execgrow.c", bin_dir / "execgrow", threads=False)
    proc = subprocess.Popen([binary, str(200 * MiB), str(MiB), "300"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdin and proc.stdout
    pid = int(proc.stdout.readline().split()[1])
    bpf_daemon.register(pid)
    bpf_daemon.write("heap=64M action=kill", pid, "quota")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    steps = sum(1 for line in proc.stdout if line.startswith("step "))
    assert proc.wait(20) == -signal.SIGKILL
    assert steps <= 64, f"{steps} MiB mapped after the exec"
    wait_until(lambda: f"exec: pid={pid} heap baseline" in bpf_daemon.log_text(), 2, "rebased")
    kill = re.compile(rf"pid={pid} comm=\S+ quota=heap usage=(\d+) limit=(\d+) action=kill")
    usage, limit = map(int, wait_until(lambda: kill.search(bpf_daemon.log_text()), 2).groups())
    assert limit < usage <= limit + 2 * MiB, "the kill measured against the new image's base"


def test_track_children_watches_a_child_from_its_fork(bpf_factory, bin_dir: Path) -> None:
    """--track-children with a kill quota: a child that maps at once is held from
    its first instruction, not from the next 250 ms scan (157 MiB under a 64 MiB
    quota was measured before)."""
    binary = compile_c(C_SOURCES / "forkgrow.c", bin_dir / "forkgrow", threads=False)
    root = subprocess.Popen([binary, str(MiB), "300"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert root.stdin and root.stdout
    try:
        pid = int(root.stdout.readline().split()[1])
        daemon = bpf_factory(*BPF, "--track-children", str(pid),
                             "--default-quota", "heap=64M action=kill")  # fmt: skip
        wait_until(lambda: f"children of pid={pid} watched" in daemon.log_text(), 5, "the rule")
        root.stdin.write("go\n")
        root.stdin.flush()
        lines = root.stdout.read().splitlines()
        assert root.wait(20) == 0
        steps = sum(1 for line in lines if line.startswith("step "))
        assert f"end {signal.SIGKILL}" in lines, lines[-3:]
        assert steps <= 64, f"the child mapped {steps} MiB"
        wait_until(lambda: "(watched since its fork)" in daemon.log_text(), 2, "registered")
    finally:
        root.kill()
        root.wait()
