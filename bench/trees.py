"""9. Tree quotas: a fan-out job killed whole, and what a fork costs a watched tree.

A job of N children (tests/support/c/fanout.c) each mapping and touching
1 MiB a step, 10 ms apart, runs under `heap=64M scope=tree action=kill`, as
`make -j` would under one quota. For each engine and N = 1, 8, 64: the tree's
usage at the kill (the daemon's log line: under bpf the kernel's sum in the
crossing call, under procfs the sum at the check that saw it), how far the
children had grown by their deaths (the steps they reported), and the time
from the first member's death to the last's (the daemon killing the rest).
Then the fork + exit + wait round trip of a process that is a tree's root,
against one that is not, interleaved.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Config, Daemon, MiB, median
from bench.report import Goal, GroupResult, Row
from tests.support.paths import C_SOURCES

NAME = "trees"
TITLE = "9. Tree quotas (a fan-out job, fork cost)"

QUOTA_MIB = 64
STEP = MiB
PAUSE_MS = 10
FAN_OUTS = (1, 8, 64)
QUICK_FAN_OUTS = (1, 8)
TRIALS = 3
FORKS = 2000
FORK_ROUNDS = 5
ENGINES = ("bpf", "procfs")
INTERVAL_MS = 100


@dataclass
class Kill:
    """One job's end: the figures of one trial."""

    usage_at_kill: float  # MiB, the daemon's log line
    grown: float  # MiB the children reported mapping, all together
    spread_ms: float  # first member's death to the last's


@dataclass
class Job:
    """A fan-out job whose root waits for "go" (so its quota is set first)."""

    fanout: Path
    children: int
    proc: subprocess.Popen[str] = field(init=False)
    steps: dict[int, int] = field(default_factory=dict)  # child pid -> its last step
    deaths: dict[int, float] = field(default_factory=dict)  # pid -> monotonic time of death

    def start(self) -> int:
        count = (2 * QUOTA_MIB) // self.children + 4  # the job goes well past the quota
        command = f"read go; exec {self.fanout} {self.children} mmap {STEP} {count}"
        env = {**os.environ, "FANOUT_PAUSE_MS": str(PAUSE_MS), "FANOUT_HOLD_MS": "-1"}
        self.proc = subprocess.Popen(
            ["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=env, start_new_session=True,
        )  # fmt: skip
        return self.proc.pid

    def go_and_watch(self, timeout: float) -> None:
        """Let the job run; follow its children until every member is dead."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        pidfds: dict[int, int] = {self.proc.pid: os.pidfd_open(self.proc.pid)}
        reader = threading.Thread(target=self._read_lines, args=(pidfds,), daemon=True)
        reader.start()
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                live = {fd: pid for pid, fd in list(pidfds.items()) if pid not in self.deaths}
                if not live and self.proc.pid in self.deaths:
                    return  # the root and every child that reported a step (one killed
                    # at its first call never does)
                ready, _, _ = select.select(list(live), [], [], 0.05)
                for fd in ready:
                    self.deaths[live[fd]] = time.monotonic()
            raise RuntimeError(f"the job of {self.children} was not killed in {timeout} s")
        finally:
            for fd in pidfds.values():
                os.close(fd)

    def _read_lines(self, pidfds: dict[int, int]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            words = line.split()
            if len(words) == 4 and words[0] == "child":
                pid, step = int(words[1]), int(words[3])
                if pid not in pidfds:
                    try:
                        pidfds[pid] = os.pidfd_open(pid)
                    except ProcessLookupError:
                        self.deaths[pid] = time.monotonic()
                self.steps[pid] = step

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def kill_usage(log: str, pid: int) -> float | None:
    found = re.search(rf"pid={pid} comm=\S+ quota=heap usage=(\d+) limit=\d+ action=kill", log)
    return None if found is None else int(found.group(1)) / MiB


def one_job(daemon: Daemon, fanout: Path, children: int) -> Kill:
    job = Job(fanout, children)
    root = job.start()
    try:
        daemon.register(root)
        daemon.set_quota(root, f"heap={QUOTA_MIB}M action=kill scope=tree")
        job.go_and_watch(timeout=60)
    finally:
        job.stop()
    usage = None
    deadline = time.monotonic() + 5
    while usage is None and time.monotonic() < deadline:
        usage = kill_usage(daemon.log_text(), root)
        time.sleep(0.02)
    if usage is None:
        raise RuntimeError(f"no kill line for the job of {children}")
    spread = (max(job.deaths.values()) - min(job.deaths.values())) * 1000
    return Kill(usage, sum(job.steps.values()) * STEP / MiB, spread)


def fork_round_trip(daemon: Daemon, forkloop: Path, watched: bool) -> float:
    """Mean ns of one fork + exit + wait, by a tree's root or by a process not tracked."""
    proc = subprocess.Popen(
        [str(forkloop), str(FORKS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("forkloop did not start")
        if watched:
            daemon.register(proc.pid)
            daemon.set_quota(proc.pid, "heap=1G files=1000 action=kill scope=tree")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        return float(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def build(cfg: Config, helpers: dict[str, Path]) -> Path:
    gcc = shutil.which("gcc") or "cc"
    fanout = cfg.work / "fanout"
    subprocess.run([gcc, "-O2", "-o", str(fanout), str(C_SOURCES / "fanout.c")], check=True)
    return fanout


def run(cfg: Config, helpers: dict[str, Path]) -> GroupResult:
    result = GroupResult(NAME, TITLE)
    fanout = build(cfg, helpers)
    fan_outs = QUICK_FAN_OUTS if cfg.quick else FAN_OUTS
    trials = 1 if cfg.quick else TRIALS
    kills: dict[tuple[str, int], list[Kill]] = {}
    forks: dict[tuple[str, bool], list[float]] = {}
    for engine in ENGINES:
        options = ("--engine", engine, "--interval", str(INTERVAL_MS))
        try:
            with Daemon(cfg.work, *options) as daemon:
                for children in fan_outs:
                    kills[engine, children] = [
                        one_job(daemon, fanout, children) for _ in range(trials)
                    ]
                for _ in range(1 if cfg.quick else FORK_ROUNDS):
                    for watched in (False, True):
                        took = fork_round_trip(daemon, helpers["forkloop"], watched)
                        forks.setdefault((engine, watched), []).append(took)
        except RuntimeError as error:
            result.rows.append(Row(f"{engine}: unavailable", None, "", str(error)[-300:]))
    result.rows += rows(kills, forks)
    result.goals = goals(kills, forks)
    result.method = method(fan_outs, trials)
    return result


def rows(kills: dict[tuple[str, int], list[Kill]], forks: dict[tuple[str, bool], list[float]]):
    out = []
    for (engine, children), trials in kills.items():
        note = f"n={len(trials)}; quota {QUOTA_MIB} MiB"
        label = f"{engine}, N={children}"
        out.append(Row(f"{label}: usage at the kill (max)", max(k.usage_at_kill for k in trials),
                       "MiB", note))  # fmt: skip
        out.append(Row(f"{label}: children grown by their deaths (max)",
                       max(k.grown for k in trials), "MiB", note))  # fmt: skip
        out.append(Row(f"{label}: first to last death (max)",
                       max(k.spread_ms for k in trials), "ms", note))  # fmt: skip
    for (engine, watched), took in forks.items():
        who = "a tree's root" if watched else "not tracked"
        out.append(Row(f"{engine}: fork+exit+wait, {who} (median)", median(took) / 1000, "us",
                       f"{FORKS} forks x {len(took)} rounds, interleaved"))  # fmt: skip
    return out


def goals(kills: dict[tuple[str, int], list[Kill]], forks: dict[tuple[str, bool], list[float]]):
    out = []
    bpf = [
        k.usage_at_kill for (engine, _), trials in kills.items() if engine == "bpf" for k in trials
    ]
    out.append(Goal(
        f"bpf: tree usage at the kill <= quota + 2 steps ({QUOTA_MIB + 2} MiB), every N",
        max(bpf) if bpf else None, QUOTA_MIB + 2, "MiB",
    ))  # fmt: skip
    plain, member = forks.get(("bpf", False)), forks.get(("bpf", True))
    ratio = median(member) / median(plain) if plain and member else None
    out.append(Goal("bpf: a tree root's fork round trip <= 1.25 x not tracked", ratio, 1.25, "x"))
    return out


def method(fan_outs: tuple[int, ...], trials: int) -> str:
    return (
        f"fanout.c: N = {', '.join(map(str, fan_outs))} children, each mapping and touching "
        f"1 MiB every {PAUSE_MS} ms, under heap={QUOTA_MIB}M scope=tree action=kill; the "
        f"job's root is `sh -c 'read go; exec fanout ...'`, registered and given the quota "
        f"before it forks; {trials} trial(s) per cell; procfs at --interval {INTERVAL_MS}. "
        f"Usage at the kill: the daemon's enforcement line (fork copies of the parent's "
        f"data included, as the quota counts them). Grown: the 1 MiB steps the children "
        f"reported, all together. Fork: forkloop.c, {FORKS} fork+exit+wait round trips."
    )
