"""5. Scale: 1,000 and 10,000 tracked sleeping processes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench.harness import Config, Daemon, Sleepers, median, raise_limits
from bench.report import Goal, GroupResult, Row

NAME = "scale"
TITLE = "5. Scale"

IDLE_GOAL_N = 1000
RSS_GOAL_N = 10_000


def time_ls(mountpoint: Path, timeout: float) -> float:
    t0 = time.monotonic()
    subprocess.run(["ls", str(mountpoint)], stdout=subprocess.DEVNULL, check=True, timeout=timeout)
    return time.monotonic() - t0


class Registrar:
    """Registers pids one by one through `register` (one writer, one open/write/close
    each, the write timed), until a deadline for the whole run."""

    def __init__(self, daemon: Daemon, deadline: float) -> None:
        self.daemon = daemon
        self.deadline = deadline
        self.registered = 0
        self.spent = 0.0  # seconds, cumulative
        self.latencies: list[float] = []  # seconds, one per registration
        self.boxed = False  # the deadline passed

    def up_to(self, pids: list[int], size: int) -> None:
        t0 = time.monotonic()
        for pid in pids[self.registered : size]:
            if time.monotonic() > self.deadline:
                self.boxed = True
                break
            fd = os.open(self.daemon.path("register"), os.O_WRONLY | os.O_TRUNC)
            a = time.monotonic()
            try:
                os.write(fd, f"{pid}\n".encode())
            finally:
                os.close(fd)
            self.latencies.append(time.monotonic() - a)
            self.registered += 1
        self.spent += time.monotonic() - t0


def run(cfg: Config, helpers: dict[str, Path]) -> GroupResult:
    result = GroupResult(NAME, TITLE)
    most = max(cfg.scale_sizes)
    reason = raise_limits(most)
    if reason:
        raise RuntimeError(reason)
    idle: dict[int, float] = {}
    rss: dict[int, float] = {}
    deadline = time.monotonic() + cfg.register_box_seconds
    with (
        Sleepers(helpers["sleepers"], most) as sleepers,
        Daemon(cfg.work) as daemon,
    ):
        registrar = Registrar(daemon, deadline)
        for size in cfg.scale_sizes:
            registrar.up_to(sleepers.pids, size)
            result.rows += measure_size(cfg, daemon, registrar, size, idle, rss)
            if registrar.boxed:
                break
        daemon.stop()  # before the sleepers go, or it would record 10,000 exits
    result.goals += scale_goals(cfg, idle, rss)
    result.plot = {"idle_cpu": idle, "rss": rss}
    result.method = method(cfg, most)
    return result


def measure_size(
    cfg: Config,
    daemon: Daemon,
    registrar: Registrar,
    size: int,
    idle: dict[int, float],
    rss: dict[int, float],
) -> list[Row]:
    """The rows of one size: registration, `ls`, RSS and idle CPU (these two also
    recorded in `rss` and `idle` by the number tracked)."""
    tracked = registrar.registered
    label = f"{tracked:,} tracked"
    note = f"time-boxed: {tracked:,} of {size:,}" if registrar.boxed else ""
    rows = [Row(f"register all, {size:,}", registrar.spent, "s", note or "cumulative, one writer")]
    rows.append(registration_growth_row(registrar.latencies, label))
    runs = [time_ls(daemon.mountpoint, 120) for _ in range(max(1, cfg.ls_runs))]
    rows.append(Row(f"ls /restrack, first, {label}", runs[0], "s"))
    if len(runs) > 1:
        rows.append(Row(f"ls /restrack, again (median), {label}", median(runs[1:]), "s"))
    rss[tracked] = daemon.rss_mib() * 1.048576  # MiB -> MB
    rows.append(Row(f"daemon RSS, {label}", rss[tracked], "MB", "VmRSS"))
    meter = daemon.cpu()
    time.sleep(cfg.idle_window_seconds)
    idle[tracked] = meter.share() * 100
    rows.append(
        Row(
            f"daemon idle CPU, {label}",
            idle[tracked],
            "%",
            f"% of one core over {cfg.idle_window_seconds:g} s, no quota, nobody reading",
        )
    )
    return rows


def registration_growth_row(latencies: list[float], label: str) -> Row:
    """How one registration's time grew: the median of the last tenth over the first."""
    tail = latencies[-max(1, len(latencies) // 10) :]
    head = latencies[: max(1, len(latencies) // 10)]
    return Row(
        f"one register, last tenth / first tenth (p50), {label}",
        median(tail) / median(head),
        "x",
        f"{median(head) * 1e3:.2f} ms -> {median(tail) * 1e3:.2f} ms",
    )


def nearest(table: dict[int, float], goal_n: int) -> tuple[int, float] | None:
    """The measured size closest to the goal's, and its figure."""
    if not table:
        return None
    n = min(table, key=lambda k: abs(k - goal_n))
    return n, table[n]


def scale_goals(cfg: Config, idle: dict[int, float], rss: dict[int, float]) -> list[Goal]:
    goals = []
    for text, table, goal_n, limit, unit in (
        ("daemon idle CPU <= 1 % of a core, 1,000 tracked, nobody reading", idle, IDLE_GOAL_N,
         1.0, "%"),
        ("daemon RSS <= 150 MB with 10,000 tracked", rss, RSS_GOAL_N, 150.0, "MB"),
    ):  # fmt: skip
        got = nearest(table, goal_n)
        where = "" if got is None else f"{got[0]:,} tracked"
        if got is not None and got[0] != goal_n:
            where += " (quick size)" if cfg.quick else f" (time-boxed, not {goal_n:,})"
        goals.append(Goal(text, None if got is None else got[1], limit, unit, where))
    return goals


def method(cfg: Config, most: int) -> str:
    return f"""
A C program (bench/c/sleepers.c) forks {most:,} tiny children that only
`pause()`; the bench writes their pids one by one to `register` (one writer,
one `open`/`write`/`close` each; the daemon saves its state file, on a tmpfs, on
every change), up to {", ".join(f"{n:,}" for n in cfg.scale_sizes)} tracked,
time-boxed at {cfg.register_box_seconds:g} s in all. At each size: the
cumulative registration time and how one registration's time grew (median of the
last tenth over the first tenth); `ls MOUNTPOINT` ({cfg.ls_runs} run(s), the first
right after registering); the daemon's VmRSS from /proc/DAEMON/status; and its
CPU (utime + stime from /proc/DAEMON/stat) over {cfg.idle_window_seconds:g} s
with nobody reading and no quota set (for the cost of checking quotas, see group
3). The daemon is stopped before the sleepers.
"""
