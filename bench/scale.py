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


def run(cfg: Config, helpers: dict[str, Path]) -> GroupResult:
    result = GroupResult(NAME, TITLE)
    rows = result.rows
    most = max(cfg.scale_sizes)
    reason = raise_limits(most)
    if reason:
        raise RuntimeError(reason)
    idle: dict[int, float] = {}
    rss: dict[int, float] = {}
    box = time.monotonic() + cfg.register_box_seconds
    boxed_at: int | None = None
    with (
        Sleepers(helpers["sleepers"], most) as sleepers,
        Daemon(cfg.work) as daemon,
    ):
        registered = 0
        spent = 0.0
        latencies: list[float] = []
        for size in cfg.scale_sizes:
            t0 = time.monotonic()
            for pid in sleepers.pids[registered:size]:
                if time.monotonic() > box:
                    boxed_at = registered
                    break
                fd = os.open(daemon.path("register"), os.O_WRONLY | os.O_TRUNC)
                a = time.monotonic()
                try:
                    os.write(fd, f"{pid}\n".encode())
                finally:
                    os.close(fd)
                latencies.append(time.monotonic() - a)
                registered += 1
            spent += time.monotonic() - t0
            label = f"{registered:,} tracked"
            note = "" if boxed_at is None else f"time-boxed: {registered:,} of {size:,}"
            rows.append(
                Row(f"register all, {size:,}", spent, "s", note or "cumulative, one writer")
            )
            tail = latencies[-max(1, len(latencies) // 10) :]
            head = latencies[: max(1, len(latencies) // 10)]
            rows.append(
                Row(
                    f"one register, last tenth / first tenth (p50), {label}",
                    median(tail) / median(head),
                    "x",
                    f"{median(head) * 1e3:.2f} ms -> {median(tail) * 1e3:.2f} ms",
                )
            )
            runs = [time_ls(daemon.mountpoint, 120) for _ in range(max(1, cfg.ls_runs))]
            rows.append(Row(f"ls /restrack, first, {label}", runs[0], "s"))
            if len(runs) > 1:
                rows.append(Row(f"ls /restrack, again (median), {label}", median(runs[1:]), "s"))
            rss[registered] = daemon.rss_mib() * 1.048576  # MiB -> MB
            rows.append(Row(f"daemon RSS, {label}", rss[registered], "MB", "VmRSS"))
            meter = daemon.cpu()
            time.sleep(cfg.idle_window_seconds)
            idle[registered] = meter.share() * 100
            rows.append(
                Row(
                    f"daemon idle CPU, {label}",
                    idle[registered],
                    "%",
                    f"% of one core over {cfg.idle_window_seconds:g} s, no quota, nobody reading",
                )
            )
            if boxed_at is not None:
                break
        daemon.stop()  # before the sleepers go, or it would record 10,000 exits

    def nearest(table: dict[int, float], goal_n: int) -> tuple[int, float] | None:
        if not table:
            return None
        n = min(table, key=lambda k: abs(k - goal_n))
        return n, table[n]

    for text, table, goal_n, limit, unit in (
        ("daemon idle CPU <= 1 % of a core, 1,000 tracked, nobody reading", idle, IDLE_GOAL_N,
         1.0, "%"),
        ("daemon RSS <= 150 MB with 10,000 tracked", rss, RSS_GOAL_N, 150.0, "MB"),
    ):  # fmt: skip
        got = nearest(table, goal_n)
        where = "" if got is None else f"{got[0]:,} tracked"
        if got is not None and got[0] != goal_n:
            where += " (quick size)" if cfg.quick else f" (time-boxed, not {goal_n:,})"
        result.goals.append(Goal(text, None if got is None else got[1], limit, unit, where))
    result.plot = {"idle_cpu": idle, "rss": rss}
    result.method = f"""
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
    return result
