"""3. Enforcement latency in kill mode, and the daemon's CPU while it checks quotas."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

from bench.harness import Config, Daemon, MiB, Sleepers, percentile, raise_limits, wait_dead
from bench.report import Goal, GroupResult, Row

NAME = "enforcement"
TITLE = "3. Enforcement latency (kill mode)"

VICTIM_QUOTA = "heap=1M action=kill"
VICTIM_MAP = 2 * MiB
BACKGROUND_QUOTA = "heap=1G files=1000 action=kill"
GOAL_N = 100


class Timeout(Exception):
    pass


def one_kill(daemon: Daemon, victim: Path, interval_ms: int, rng: random.Random) -> float:
    """Milliseconds from the victim's crossing mmap to its death, seen on a pidfd."""
    proc = subprocess.Popen(
        [str(victim), str(VICTIM_MAP)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    pidfd = -1
    try:
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("victim did not start")
        pidfd = os.pidfd_open(proc.pid)
        daemon.register(proc.pid)
        daemon.set_quota(proc.pid, VICTIM_QUOTA)
        # A random phase against the daemon's periodic check.
        time.sleep(rng.uniform(0, interval_ms / 1000))
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        dead = wait_dead(pidfd, max(10.0, 100 * interval_ms / 1000))
        crossed = int(proc.stdout.readline())
        if dead is None:
            raise Timeout()
        status = proc.wait(10)
        if status != -signal.SIGKILL:
            raise RuntimeError(f"victim ended with status {status}, not SIGKILL")
        return (dead - crossed) / 1e6
    finally:
        if pidfd >= 0:
            os.close(pidfd)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def run(cfg: Config, helpers: dict[str, Path]) -> GroupResult:
    result = GroupResult(NAME, TITLE)
    rng = random.Random(6)
    reason = raise_limits(max(cfg.under_quota) + 50)
    if reason:
        raise RuntimeError(reason)
    kill: dict[int, dict[int, tuple[float, float]]] = {}
    cpu: dict[int, dict[int, float]] = {}
    for interval in cfg.intervals_ms:
        kill_cells, cpu[interval] = measure_interval(cfg, helpers, interval, rng, result.rows)
        if kill_cells:
            kill[interval] = kill_cells
    result.goals += kill_goals(cfg, kill)
    result.plot = {"kill": kill, "cpu": cpu}
    result.method = method(cfg)
    return result


def measure_interval(
    cfg: Config, helpers: dict[str, Path], interval: int, rng: random.Random, rows: list[Row]
) -> tuple[dict[int, tuple[float, float]], dict[int, float]]:
    """One daemon at `interval`, N growing through `cfg.under_quota`: its CPU with N - 1
    under quota, then kill samples; ({N: (p50, p99) ms}, {N: CPU %}), the rows appended."""
    kill: dict[int, tuple[float, float]] = {}
    cpu: dict[int, float] = {}
    with (
        Sleepers(helpers["sleepers"], max(cfg.under_quota) - 1) as sleepers,
        Daemon(cfg.work, "--interval", str(interval)) as daemon,
    ):
        active = 0
        for n in cfg.under_quota:
            # n processes under quota: n - 1 sleepers and the victim of the moment
            for pid in sleepers.pids[active : n - 1]:
                daemon.register(pid)
                daemon.set_quota(pid, BACKGROUND_QUOTA)
            active = max(active, n - 1)
            meter = daemon.cpu()
            time.sleep(cfg.cpu_window_seconds)
            cpu[n] = meter.share() * 100
            samples, timeouts = sample_kills(cfg, daemon, helpers["victim"], interval, rng)
            if samples:
                kill[n] = (percentile(samples, 50), percentile(samples, 99))
            label = f"--interval {interval}, {n} under quota"
            rows += kill_rows(cfg, label, interval, samples, timeouts)
            rows.append(
                Row(
                    f"daemon CPU, {label}",
                    cpu[n],
                    "%",
                    f"% of one core, {cfg.cpu_window_seconds:g} s with nobody reading",
                )
            )
    return kill, cpu


def sample_kills(
    cfg: Config, daemon: Daemon, victim: Path, interval: int, rng: random.Random
) -> tuple[list[float], int]:
    """Kill latencies (ms) of victims one at a time, and how many were never killed."""
    samples: list[float] = []
    timeouts = 0
    box = time.monotonic() + cfg.kill_box_seconds
    while len(samples) + timeouts < cfg.kill_samples and time.monotonic() < box:
        try:
            samples.append(one_kill(daemon, victim, interval, rng))
        except Timeout:
            timeouts += 1
    return samples, timeouts


def kill_rows(
    cfg: Config, label: str, interval: int, samples: list[float], timeouts: int
) -> list[Row]:
    boxed = "" if len(samples) + timeouts >= cfg.kill_samples else ", time-boxed"
    note = f"n={len(samples)}{boxed}" + (f", {timeouts} never killed" if timeouts else "")
    if not samples:
        return [Row(f"kill p50, {label}", None, "ms", note)]
    p50, p99 = percentile(samples, 50), percentile(samples, 99)
    return [
        Row(f"kill p50, {label}", p50, "ms", note),
        Row(f"kill p99, {label}", p99, "ms", note),
        Row(f"kill p99 / interval, {label}", p99 / interval, "x"),
    ]


def kill_goals(cfg: Config, kill: dict[int, dict[int, tuple[float, float]]]) -> list[Goal]:
    """p99 over the interval at GOAL_N under quota (the largest N in a quick run)."""
    goal_n = GOAL_N if GOAL_N in cfg.under_quota else max(cfg.under_quota)
    goals = []
    for interval in cfg.intervals_ms:
        cell = kill.get(interval, {}).get(goal_n)
        where = f"--interval {interval}, {goal_n} under quota"
        if goal_n != GOAL_N:
            where += f" (quick size, not {GOAL_N})"
        goals.append(
            Goal(
                f"kill detection p99 <= 2 x --interval at {GOAL_N} under quota",
                None if cell is None else cell[1] / interval,
                2.0,
                "x",
                where + ("" if cell is None else f": p99 {cell[1]:.0f} ms"),
            )
        )
    return goals


def method(cfg: Config) -> str:
    return f"""
A compiled C victim (bench/c/victim.c) is registered and given the quota
`{VICTIM_QUOTA}`; after a random delay in [0, interval) (a random phase against
the periodic check) the bench tells it to cross: it reads CLOCK_MONOTONIC,
writes the instant to a pipe, then maps {VICTIM_MAP // MiB} MiB of private
anonymous memory and sleeps. The bench waits on the victim's pidfd and reads
CLOCK_MONOTONIC when it becomes readable (the process is dead); the latency is
the difference, and the exit status must be SIGKILL. Nobody reads the victim's
files, so the kill comes from the periodic check. Victims are sampled one at a
time ({cfg.kill_samples} per cell, time-boxed at {cfg.kill_box_seconds:g} s),
while N - 1 other processes (forks of a tiny C sleeper) sit under the quota
`{BACKGROUND_QUOTA}`, for N in {", ".join(map(str, cfg.under_quota))} and
`--interval` {" and ".join(map(str, cfg.intervals_ms))} ms (a fresh daemon per
interval). Daemon CPU: utime + stime from /proc/DAEMON/stat over
{cfg.cpu_window_seconds:g} s just before the samples, with the N - 1 under quota
and nothing else going on: the cost of the periodic check, as a share of one core.
"""
