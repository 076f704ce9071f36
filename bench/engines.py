"""6. The two engines side by side: how tightly a kill quota holds,
what the daemon costs at 1,000 quota'd processes, and what every syscall on
the machine pays while the bpf programs are attached."""

from __future__ import annotations

import os
import re
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import bpf_cost
from bench.harness import Config, Daemon, MiB, Sleepers, raise_limits
from bench.report import Goal, GroupResult, Row
from tracker.backends.bpf.loader import BpfUnavailable, KernelWatch

NAME = "engines"
TITLE = "6. Engines side by side: bpf and procfs"

ENGINES = (("procfs", "100"), ("bpf", "2000"))  # (engine, --interval ms)
HEAP_QUOTA, FD_QUOTA = 64 * MiB, 100
BACKGROUND_QUOTA = "heap=1G files=1000 action=kill"
CPU_N = 1000
PATHS = bpf_cost.PATHS  # (grow mode, step, count, what the quota limits): tests/support/c/grow.c
WORKLOAD_OPS = ("getppid", "mmap", "open")


def one_kill(daemon: Daemon, grow: Path, mode: str, step: int, count: int, which: str,
             stamp: Path) -> dict[str, float]:  # fmt: skip
    """One grower under a kill quota through the daemon: what it got, how fast it died."""

    def arm(pid: int) -> None:
        daemon.register(pid)
        quota = f"heap={HEAP_QUOTA}" if which == "heap" else f"files={FD_QUOTA}"
        daemon.set_quota(pid, quota + " action=kill")

    pid, last_call, dead, out = bpf_cost.run_grower(grow, mode, step, count, stamp, arm)
    end = next(line for line in out.splitlines() if line.startswith("end ")).split()
    steps = sum(1 for line in out.splitlines() if line.startswith("step "))
    per_step = bpf_cost.request_of(mode, step, which) * (MiB if which == "heap" else 1)
    limit = HEAP_QUOTA if which == "heap" else FD_QUOTA
    got = max(0, steps * per_step - limit)  # granted beyond the quota: calls that returned
    logged = _logged_usage(daemon.log, pid)
    scale = MiB if which == "heap" else 1  # heap in MiB, files in descriptors
    return {
        "killed": float(int(end[1]) == signal.SIGKILL),
        "returned_over": got / scale,
        "usage_over": (logged - limit) / scale if logged is not None else float("inf"),
        "death_ms": (dead - last_call) / 1e6,
        "maxrss_mib": int(end[2]) / 1024,
    }


def _logged_usage(log: Path, pid: int) -> int | None:
    for _ in range(200):  # the log line follows within ms under bpf, at the check under procfs
        found = re.search(rf"pid={pid} comm=\S+ quota=\S+ usage=(\d+)", log.read_text())
        if found:
            return int(found[1])
        time.sleep(0.01)
    return None


def daemon_cpu(daemon: Daemon, sleepers: Sleepers, seconds: float) -> float:
    for pid in sleepers.pids:
        daemon.register(pid)
        daemon.set_quota(pid, BACKGROUND_QUOTA)
    time.sleep(1.0)  # registration's own work done
    meter = daemon.cpu()
    time.sleep(seconds)
    return meter.share() * 100


def workload_ns(daemon: Daemon | None, syscost: Path, op: str) -> float:
    """ns per op of a fresh process, tracked under a quota by `daemon` (None: untracked)."""

    def tracked(pid: int) -> None:
        assert daemon is not None
        daemon.register(pid)
        daemon.set_quota(pid, "heap=1G files=1000 action=notify")

    return bpf_cost.syscost(syscost, op, tracked if daemon else None)


@dataclass(frozen=True)
class Sizes:
    """How much of each measurement a run makes: all of it, or the smoke test's few."""

    sleepers: int  # the processes under kill quotas while the daemon's CPU is measured
    rounds: int  # kill runs per path, workload runs per op
    cost_rounds: int  # rounds of the machine-wide per-syscall cost
    paths: list[tuple[str, int, int, str]]
    ops: tuple[str, ...]

    @classmethod
    def of(cls, cfg: Config) -> Sizes:
        if cfg.quick:
            paths = [p for p in PATHS if p[0] in ("touch", "open")]
            return cls(20, 1, 1, paths, WORKLOAD_OPS[:1])
        return cls(CPU_N, 3, 7, PATHS, WORKLOAD_OPS)


def run(cfg: Config, helpers: dict[str, Path]) -> GroupResult:
    result = GroupResult(NAME, TITLE)
    sizes = Sizes.of(cfg)
    reason = raise_limits(sizes.sleepers + 50)
    if reason:
        raise RuntimeError(reason)
    tmp = Path(tempfile.mkdtemp(prefix="engines-", dir=cfg.work))
    binaries = bpf_cost.compile_helpers(tmp)
    kills: dict[str, dict[str, dict[str, float]]] = {}
    cpu: dict[str, float] = {}
    for engine, interval in ENGINES:
        with Daemon(cfg.work, "--engine", engine, "--interval", interval) as daemon:
            if daemon.path("engine").read_text().strip() != engine:
                raise RuntimeError(f"--engine {engine} not in force")
            for mode, worst in measure_kills(daemon, binaries["grow"], sizes, tmp).items():
                kills.setdefault(mode, {})[engine] = worst
            result.rows += workload_rows(daemon, engine, binaries["syscost"], sizes)
            with Sleepers(helpers["sleepers"], sizes.sleepers) as sleepers:
                cpu[engine] = daemon_cpu(daemon, sleepers, cfg.cpu_window_seconds)
            result.rows.append(
                Row(
                    f"daemon CPU, {sizes.sleepers} under kill quotas, {engine}"
                    f" (--interval {interval})",
                    cpu[engine],
                    "%",
                    "% of one core, nobody reading",
                )
            )
    result.rows += kill_rows(kills)
    result.method = method(cfg, sizes)
    costs = _syscall_costs(binaries["syscost"], sizes.cost_rounds, result.rows)
    if not cfg.quick:  # the smoke test: too few paths and rounds for the goals
        result.goals += engine_goals(kills, cpu, costs, sizes.sleepers)
    return result


def measure_kills(
    daemon: Daemon, grow: Path, sizes: Sizes, tmp: Path
) -> dict[str, dict[str, float]]:
    """Per growth path, the worst of its runs (the median for the time to death)."""
    worst = {}
    for mode, step, count, which in sizes.paths:
        runs = [
            one_kill(daemon, grow, mode, step, count, which, tmp / "stamp")
            for _ in range(sizes.rounds)
        ]
        worst[mode] = {key: max(r[key] for r in runs) for key in runs[0]} | {
            "death_ms": statistics.median(r["death_ms"] for r in runs),
            "killed": min(r["killed"] for r in runs),
        }
    return worst


def workload_rows(daemon: Daemon, engine: str, syscost: Path, sizes: Sizes) -> list[Row]:
    """What tracking adds to a workload's ns per op, against untracked runs alike."""
    rows = []
    for op in sizes.ops:
        bare = statistics.median(workload_ns(None, syscost, op) for _ in range(sizes.rounds))
        tracked = statistics.median(workload_ns(daemon, syscost, op) for _ in range(sizes.rounds))
        note = f"{tracked:.0f} vs {bare:.0f} ns untracked, same daemon"
        rows.append(Row(f"tracked workload {op}, {engine}", tracked - bare, "ns", note))
    return rows


def kill_rows(kills: dict[str, dict[str, dict[str, float]]]) -> list[Row]:
    rows = []
    for mode, by in kills.items():
        unit = "MiB" if next(w for m, _, _, w in PATHS if m == mode) == "heap" else "fds"
        for engine, r in by.items():
            killed = "every run killed" if r["killed"] else "NOT KILLED in some run"
            note = f"{killed}; max RSS {r['maxrss_mib']:.1f} MiB"
            over = None if r["usage_over"] == float("inf") else r["usage_over"]
            rows.append(Row(f"{mode}: usage at kill over quota, {engine}", over, unit, note))
            rows.append(
                Row(
                    f"{mode}: granted past quota (calls returned), {engine}",
                    r["returned_over"],
                    unit,
                )
            )
            rows.append(Row(f"{mode}: last call's start to death, {engine}", r["death_ms"], "ms"))
    return rows


def engine_goals(
    kills: dict[str, dict[str, dict[str, float]]],
    cpu: dict[str, float],
    costs: dict[str, float],
    sleepers: int,
) -> list[Goal]:
    bpf = {mode: by["bpf"] for mode, by in kills.items()}
    requests = {mode: bpf_cost.request_of(mode, step, which) for mode, step, _, which in PATHS}
    one_request = all(
        r["usage_over"] <= requests[m] and r["killed"] for m, r in bpf.items() if m != "populate"
    )
    goals = [
        Goal(
            "bpf: overshoot <= one syscall's request (every growth path)",
            1.0 if one_request else 0.0,
            1.0,
            "x",
            "1 = held on every path",
        ),
        Goal(
            "bpf: no page populated past the quota (512 MiB MAP_POPULATE, max RSS)",
            bpf["populate"]["maxrss_mib"],
            HEAP_QUOTA / MiB,
            "MiB",
        ),
        Goal(f"bpf: daemon CPU <= 1 % of a core at {sleepers} quota'd", cpu["bpf"], 1.0, "%"),
    ]
    if costs:
        goals.append(
            Goal(
                "bpf: getppid +ns while attached, process not watched <= 150",
                costs["getppid"],
                150.0,
                "ns",
            )
        )
    return goals


def method(cfg: Config, sizes: Sizes) -> str:
    return f"""
Both engines in one run, each in a fresh daemon: procfs at its default
`--interval 100`, bpf at `--interval 2000` (nothing polls under it). Growth
paths: tests/support/c/grow.c (1 MiB steps by mmap untouched/touched, brk, mprotect of
a PROT_NONE reservation, a second thread, ia32 mmap2 and brk, a CLONE_VM sharer
and a vfork child; one 512 MiB MAP_POPULATE mapping; descriptors by open,
socket, pipe (2 per call), dup, ia32 dup and open, a CLONE_FILES sharer,
io_uring opens completed by an io-wq worker and by the SQPOLL thread, and
batches: one recvmsg of 250 and one io_uring_enter of 300, whose request is the
batch), registered and given
`heap=64M` or `files=100` with `action=kill` through the mount, {sizes.rounds} run(s)
each (the worst shown). "usage at kill over quota" is the usage in the daemon's
enforcement log line minus the quota (bpf: the kernel's reading in the crossing
call; procfs: the sample that decided); "granted" counts calls that returned
beyond the quota. "last call's start to death": GROW_STAMP's last
CLOCK_MONOTONIC stamp to the pidfd (for bpf that call is the crossing one; for
procfs, see group 3 for kill latency against the interval). Daemon CPU:
{sizes.sleepers} sleepers under `{BACKGROUND_QUOTA}`, utime+stime over
{cfg.cpu_window_seconds:g} s with nobody reading. Tracked workload: bench/c/syscost.c
(100k-2M ops) registered with a notify quota vs untracked, medians of {sizes.rounds}.
Per-syscall cost machine-wide: bench/bpf_cost.py's rounds (detached / attached
with the process not watched / watched), alternating, min of {sizes.cost_rounds} rounds.
A procfs row "unavailable" with "NOT KILLED": the grower finished all its calls
and exited before a check saw it.
"""


def _syscall_costs(syscost: Path, rounds: int, rows: list[Row]) -> dict[str, float]:
    """Attached minus detached ns per op (a process not watched: what all pay)."""
    pin = Path(f"/sys/fs/bpf/restrackfs-bench-{os.getpid()}")
    try:
        kwatch = KernelWatch.open(pin)
    except BpfUnavailable as why:
        rows.append(Row("per-syscall cost attached", None, "ns", str(why)))
        return {}
    try:
        costs = bpf_cost.per_syscall_cost(kwatch, syscost, rounds, None)
    finally:
        kwatch.close(unpin=True)
    extra = {}
    for op, by in costs.items():
        detached, attached = by["detached"]["min"], by["attached"]["min"]  # type: ignore[index]
        watched = by["watched"]["min"]  # type: ignore[index]
        extra[op] = attached - detached
        rows.append(Row(f"per-syscall {op}: attached - detached (all processes)",
                        attached - detached, "ns", f"{detached:.0f} ns detached"))  # fmt: skip
        rows.append(Row(f"per-syscall {op}: watched - detached (tracked process)",
                        watched - detached, "ns"))  # fmt: skip
    return extra
