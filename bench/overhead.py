"""4. Overhead on the tracked process: a malloc/free + open/close loop, tracked or not."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Config, Daemon, median, median_ci, percentile
from bench.report import Goal, GroupResult, Row

NAME = "overhead"
TITLE = "4. Overhead on the tracked process"

QUOTA = "heap=1G files=1000 action=kill"


class Churn:
    """The C workload (bench/c/churn.c), one process for every run."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen(
            [str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.pid = self.proc.pid

    def run(self, iters: int) -> tuple[int, int]:
        """(wall ns, CPU ns) of `iters` rounds."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"run {iters}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().split()
        if len(line) != 2:
            raise RuntimeError(f"churn died (status {self.proc.poll()})")
        return int(line[0]), int(line[1])

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()


@dataclass
class Pairs:
    """Tracked / untracked ratios of the pairs of runs, and each mode's wall ns per round."""

    wall_ratios: list[float] = field(default_factory=list)
    cpu_ratios: list[float] = field(default_factory=list)
    per_round: dict[str, list[float]] = field(
        default_factory=lambda: {"tracked": [], "untracked": []}
    )


def run(cfg: Config, helpers: dict[str, Path]) -> GroupResult:
    result = GroupResult(NAME, TITLE)
    with Daemon(cfg.work) as daemon:
        churn = Churn(helpers["churn"])
        try:
            churn.run(cfg.churn_iters)  # warm up: caches, the heap's arenas
            pairs = measure_pairs(cfg, daemon, churn)
        finally:
            churn.stop()
    wall = (median(pairs.wall_ratios) - 1) * 100
    low, high = ((r - 1) * 100 for r in median_ci(pairs.wall_ratios))
    ci = f"95 % CI of the median {low:+.2f} % .. {high:+.2f} %"
    result.rows += overhead_rows(pairs, wall, ci)
    result.goals.append(
        Goal(
            "overhead on the tracked workload <= 1 %",
            wall,
            1.0,
            "%",
            f"median of {len(pairs.wall_ratios)} tracked/untracked pairs, {ci}",
        )
    )
    result.method = method(cfg)
    return result


def measure_pairs(cfg: Config, daemon: Daemon, churn: Churn) -> Pairs:
    """`cfg.churn_pairs` pairs of runs, tracked and untracked, the order alternating."""
    pairs = Pairs()
    for pair in range(cfg.churn_pairs):
        order = ("untracked", "tracked") if pair % 2 == 0 else ("tracked", "untracked")
        got = {}
        for mode in order:
            if mode == "tracked":
                daemon.register(churn.pid)
                daemon.set_quota(churn.pid, QUOTA)
            got[mode] = churn.run(cfg.churn_iters)
            if mode == "tracked":
                daemon.deregister(churn.pid)
            pairs.per_round[mode].append(got[mode][0] / cfg.churn_iters)
        pairs.wall_ratios.append(got["tracked"][0] / got["untracked"][0])
        pairs.cpu_ratios.append(got["tracked"][1] / got["untracked"][1])
    return pairs


def overhead_rows(pairs: Pairs, wall: float, ci: str) -> list[Row]:
    cpu = (median(pairs.cpu_ratios) - 1) * 100
    spread = (percentile(pairs.wall_ratios, 75) - percentile(pairs.wall_ratios, 25)) * 100
    n = len(pairs.wall_ratios)
    return [
        Row("tracked / untracked wall time - 1 (median of pairs)", wall, "%", f"{n} pairs, {ci}"),
        Row("interquartile range of the pair ratios", spread, "%", "the noise of this machine"),
        Row("tracked / untracked CPU time - 1 (median of pairs)", cpu, "%", f"{n} pairs"),
        Row(
            "untracked round p50 (one malloc/free + open/close)",
            median(pairs.per_round["untracked"]) / 1000,
            "us",
        ),
    ]


def method(cfg: Config) -> str:
    return f"""
One C process (bench/c/churn.c) runs {cfg.churn_iters:,} rounds of malloc/free
(16 B to 64 KiB, one byte written) + open/close of /dev/null, timed inside the
process (CLOCK_MONOTONIC and its CPU clock), {cfg.churn_pairs} times tracked and
{cfg.churn_pairs} times untracked, in pairs whose order alternates. Tracked: the
same process registered on a restrackfs (default `--interval`, 100 ms) with the
quota `{QUOTA}`, so the periodic check reads it throughout; deregistered after
the run. The figure is the median over the pairs of tracked / untracked, minus
one; the interquartile range of those ratios shows how much of it is this
machine's noise.
"""
