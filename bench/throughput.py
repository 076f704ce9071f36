"""2. Read throughput with 1, 4 and 16 concurrent reader processes."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Config, Daemon, Lxcfs, Sleepers, median
from bench.report import Goal, GroupResult, Row

NAME = "throughput"
TITLE = "2. Read throughput"

HEAPSIZE = "PID/heapsize"
PROC = "/proc/PID/status"
LXCFS = "lxcfs proc/uptime"


def burst(reader: Path, path: Path, readers: int, seconds: float) -> tuple[float, float, float]:
    """`readers` processes read `path` for `seconds` from one common instant.

    Returns (reads per second, median of the readers' p50, worst reader's p99), in µs.
    """
    start = time.monotonic_ns() + 300_000_000 + readers * 5_000_000
    duration = int(seconds * 1e9)
    procs = [
        subprocess.Popen(
            [str(reader), "tput", str(start), str(duration), str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(readers)
    ]
    total, p50s, p99s = 0, [], []
    errors = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 120)
        if proc.returncode != 0:
            errors.append(err.strip())
            continue
        count, p50, p99 = (int(v) for v in out.split())
        total += count
        p50s.append(p50 / 1000)
        p99s.append(p99 / 1000)
    if errors:
        raise RuntimeError(f"reader failed: {errors[0]}")
    return total / seconds, median(p50s), max(p99s)


@dataclass
class Bursts:
    """What the bursts measured, by target and concurrency K (the daemon's CPU by K)."""

    rate: dict[str, dict[int, float]] = field(default_factory=dict)  # reads/s
    spread: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)  # p50, p99
    cpu: dict[int, float] = field(default_factory=dict)  # % of one core
    cpu_per_read: dict[int, float] = field(default_factory=dict)  # seconds


def run(cfg: Config, helpers: dict[str, Path]) -> GroupResult:
    result = GroupResult(NAME, TITLE)
    with Sleepers(helpers["sleepers"], 1) as sleepers, Lxcfs(cfg.work) as lxcfs:
        pid = sleepers.pids[0]
        with Daemon(cfg.work, "--engine", "auto") as daemon:  # what a user gets
            engine = daemon.path("engine").read_text().strip()
            daemon.register(pid)
            targets = {HEAPSIZE: daemon.path(pid, "heapsize"), PROC: Path(f"/proc/{pid}/status")}
            if lxcfs.reason is None:
                targets[LXCFS] = lxcfs.uptime
            bursts = measure_bursts(cfg, helpers["reader"], daemon, targets)
    for readers in cfg.readers:
        result.rows += concurrency_rows(cfg, bursts, readers, lxcfs.reason)
    result.goals.append(throughput_goal(cfg, bursts.rate, lxcfs.reason))
    result.plot = {"throughput": bursts.rate, "daemon_cpu": bursts.cpu}
    result.method = method(cfg, engine)
    return result


def measure_bursts(cfg: Config, reader: Path, daemon: Daemon, targets: dict[str, Path]) -> Bursts:
    """A burst per target and concurrency, the daemon's CPU metered over each."""
    bursts = Bursts()
    labels = list(targets)
    for index, readers in enumerate(cfg.readers):
        # rotate the order of the targets for each concurrency
        order = labels[index % len(labels) :] + labels[: index % len(labels)]
        for label in order:
            meter = daemon.cpu()
            reads, p50, p99 = burst(reader, targets[label], readers, cfg.throughput_seconds)
            busy = meter.seconds()
            bursts.rate.setdefault(label, {})[readers] = reads
            bursts.spread.setdefault(label, {})[readers] = (p50, p99)
            if label == HEAPSIZE:
                bursts.cpu[readers] = busy / cfg.throughput_seconds * 100
                bursts.cpu_per_read[readers] = busy / max(reads * cfg.throughput_seconds, 1)
    return bursts


def concurrency_rows(
    cfg: Config, bursts: Bursts, readers: int, lxcfs_reason: str | None
) -> list[Row]:
    """The rows of one concurrency: reads/s of each target, ratios, scaling, daemon CPU."""
    rows = []
    rate = bursts.rate
    plural = "reader" if readers == 1 else "readers"
    for label in (HEAPSIZE, PROC, LXCFS):
        if label not in rate:
            rows.append(Row(f"{label}, {readers} {plural}", None, "/s", lxcfs_reason or ""))
            continue
        p50, p99 = bursts.spread[label][readers]
        note = f"reader p50 {p50:.0f} µs, worst reader's p99 {p99:.0f} µs"
        rows.append(Row(f"{label}, {readers} {plural}", rate[label][readers], "/s", note))
    mine = rate[HEAPSIZE][readers]
    for peer in (LXCFS, PROC):
        figure = f"{HEAPSIZE} / {peer} reads/s, {readers} {plural}"
        if peer in rate:
            rows.append(Row(figure, mine / rate[peer][readers], "x"))
        else:
            rows.append(Row(figure, None, "x", lxcfs_reason or ""))
    first = cfg.readers[0]
    if readers != first:
        figure = f"{HEAPSIZE} scaling, {readers} / {first} {plural}"
        rows.append(Row(figure, mine / rate[HEAPSIZE][first], "x"))
    per_read = f"{bursts.cpu_per_read[readers] * 1e6:.0f} µs of daemon CPU per read"
    rows.append(
        Row(
            f"daemon CPU, {readers} {plural} of {HEAPSIZE}",
            bursts.cpu[readers],
            "%",
            f"% of one core; {per_read}",
        )
    )
    return rows


def throughput_goal(
    cfg: Config, rate: dict[str, dict[int, float]], lxcfs_reason: str | None
) -> Goal:
    goal_readers = 4 if 4 in cfg.readers else cfg.readers[-1]
    if LXCFS not in rate:
        return Goal("reads/s of PID/heapsize >= lxcfs's", None, 1.0, "x", lxcfs_reason or "")
    ours, theirs = rate[HEAPSIZE][goal_readers], rate[LXCFS][goal_readers]
    return Goal(
        f"reads/s of PID/heapsize >= lxcfs's, {goal_readers} readers (lxcfs / ours <= 1.0)",
        theirs / ours,
        1.0,
        "x",
        f"{ours:,.0f} vs {theirs:,.0f} reads/s",
    )


def method(cfg: Config, engine: str) -> str:
    return f"""
K copies of the C reader (`reader tput`), separate processes started to begin at
one common CLOCK_MONOTONIC instant, each read the same file in a loop
(open + read to EOF + close) for {cfg.throughput_seconds:g} s; reads/s is the sum
over the K readers divided by the window. Each concurrency K in
{", ".join(map(str, cfg.readers))} runs the targets (restrackfs `PID/heapsize`
with the default engine, {engine} here,
the kernel's `/proc/PID/status`, lxcfs `proc/uptime`) one after the other in a
rotated order. The ratios divide restrackfs's reads/s by a peer's at the same K,
measured minutes apart at most in this run. Daemon CPU: utime + stime from
/proc/DAEMON/stat over the window, as a share of one core (100 % = the daemon's
one Python thread saturated), and divided by the reads served.
"""
