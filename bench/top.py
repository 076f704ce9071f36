"""10. top: what `restrack top` refreshing every second costs the daemon, by data source."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import Config, Daemon, Sleepers, raise_limits
from bench.report import Goal, GroupResult, Row
from restrackfs.top import Top

NAME = "top"
TITLE = "10. top"

GOAL_PERCENT = 5.0


def read_whole(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, 1 << 17):
            pass
    finally:
        os.close(fd)


def every_second(
    daemon: Daemon, seconds: float, collect: Callable[[], None]
) -> tuple[float, float]:
    """`collect()` once a second for `seconds`: (the daemon's CPU in % of one core over
    the window, the collecting process's CPU per collection in ms)."""
    meter = daemon.cpu()
    start = time.monotonic()
    spent, rounds = 0.0, 0
    while (elapsed := time.monotonic() - start) < seconds:
        c0 = time.process_time()
        collect()
        spent += time.process_time() - c0
        rounds += 1
        time.sleep(max(0.0, start + rounds - time.monotonic()))
    del elapsed
    return meter.share() * 100, spent / max(rounds, 1) * 1000


def options(daemon: Daemon, pids: list[int]) -> dict[str, Callable[[], None]]:
    """The ways a `top` can collect its figures once a second."""
    mount = daemon.mountpoint
    top = Top(str(mount))

    def stat_each() -> None:
        for pid in pids:
            read_whole(mount / str(pid) / "stat")

    return {
        "one PID/stat read per process": stat_each,
        "one metrics read": lambda: read_whole(mount / "metrics"),
        "restrack top's collection (metrics every 5 s, /proc by the client)": top.refresh,
    }


def run(cfg: Config, helpers: dict[str, Path]) -> GroupResult:
    result = GroupResult(NAME, TITLE)
    count = cfg.top_processes
    reason = raise_limits(count)
    if reason:
        raise RuntimeError(reason)
    chosen: dict[str, float] = {}
    with Sleepers(helpers["sleepers"], count) as sleepers:
        for engine in ("procfs", "bpf"):
            with Daemon(cfg.work, "--engine", engine) as daemon:
                for pid in sleepers.pids:
                    daemon.register(pid)
                idle, _ = every_second(daemon, cfg.top_seconds, lambda: None)
                result.rows.append(
                    Row(f"daemon CPU, nobody reading, {engine}", idle, "%", f"{count:,} tracked")
                )
                for label, collect in options(daemon, sleepers.pids).items():
                    if engine == "bpf" and not label.startswith("restrack top"):
                        continue  # the choice was made on procfs, the dearer engine to read
                    share, client_ms = every_second(daemon, cfg.top_seconds, collect)
                    note = f"{count:,} tracked; the collector's CPU {client_ms:.1f} ms a second"
                    result.rows.append(Row(f"daemon CPU, {label}, {engine}", share, "%", note))
                    if label.startswith("restrack top"):
                        chosen[engine] = share
                daemon.stop()  # before the sleepers go, or it would record every exit
    for engine, share in chosen.items():
        result.goals.append(
            Goal(
                f"daemon CPU <= {GOAL_PERCENT:g} % of a core while top refreshes every second,"
                f" {engine}",
                share,
                GOAL_PERCENT,
                "%",
                f"{count:,} tracked" + (" (quick size)" if cfg.quick else ""),
            )
        )
    result.method = method(cfg)
    return result


def method(cfg: Config) -> str:
    return f"""
{cfg.top_processes:,} sleeping processes (bench/c/sleepers.c) are registered with a
daemon of each engine; nobody sets a quota. For {cfg.top_seconds:g} s each, once a
second, one way of collecting what `restrack top` shows runs in the bench process, and
the daemon's CPU (utime + stime from /proc/DAEMON/stat) over that window is the figure,
in % of one core: reading every process's `PID/stat` (open, read, close: four FUSE
requests each), reading `metrics` once (every process measured inside the daemon, one
render), and `restrack top`'s own collection (`restrackfs.top.Top.refresh`: `metrics`
every 5 s, the top-level `events` every second, and /proc read by the client for the
rest, which costs the daemon nothing). The first two run under procfs only, where a
measurement is dearest; the note gives the collector's own CPU per collection.
"""
