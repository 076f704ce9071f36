"""1. Read latency: open + read + close, p50 and p99, against the kernel and lxcfs."""

from __future__ import annotations

import contextlib
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.harness import Config, Daemon, Lxcfs, Sleepers, percentile
from bench.minimalfs import MinimalFs
from bench.report import Goal, GroupResult, Row

NAME = "latency"
TITLE = "1. Read latency"

HEAPSIZE = "PID/heapsize"
HEAPSIZE_PROCFS = "PID/heapsize, procfs engine"
STAT = "PID/stat"
PROC = "/proc/PID/status"
LXCFS = "lxcfs proc/uptime"
FLOOR = "minimal pyfuse3 file"


def run_reader(reader: Path, mode: list[str], paths: dict[str, Path]) -> dict[str, list[int]]:
    """Run the C reader over `paths`; {label: latencies in ns}."""
    argv = [str(reader), *mode, *map(str, paths.values())]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"reader {' '.join(mode)} failed: {out.stderr.strip()}")
    lines = out.stdout.splitlines()
    return {label: [int(v) for v in line.split()] for label, line in zip(paths, lines, strict=True)}


def pooled_reader(
    reader: Path, mode: list[str], paths: dict[str, Path], processes: int
) -> dict[str, list[int]]:
    """`processes` reader processes, one after another, over `paths`; latencies pooled.

    Where a reader process runs relative to a daemon (same CPU, or the other one
    with a wake-up per request) is a draw that lasts the process's life: one
    daemon read in 46-235 µs p50 in successive reader processes. One process
    would measure one draw; several sample them.
    """
    pooled: dict[str, list[int]] = {label: [] for label in paths}
    for _ in range(processes):
        for label, values in run_reader(reader, mode, paths).items():
            pooled[label].extend(values)
    return pooled


def start_instances(
    stack: contextlib.ExitStack, cfg: Config, pid: int
) -> tuple[dict[str, list[Path]], str]:
    """The FUSE targets, `cfg.latency_instances` daemons of each, started in a shuffled
    order; {label: one path per daemon}, and the default engine's name.

    Each restrackfs file is read from daemons of its own (see the method). A daemon's
    speed is partly a draw (and the one started first was often the slowest), so
    several of each, in a random order, measure the targets rather than their start
    positions.
    """
    starts = {
        HEAPSIZE: lambda: _restrackfs(stack, cfg, pid, "heapsize", "--engine", "auto"),
        HEAPSIZE_PROCFS: lambda: _restrackfs(stack, cfg, pid, "heapsize"),
        STAT: lambda: _restrackfs(stack, cfg, pid, "stat", "--engine", "auto"),
        FLOOR: lambda: stack.enter_context(MinimalFs(cfg.work)).file,
    }
    order = [label for label in starts for _ in range(cfg.latency_instances)]
    random.shuffle(order)
    instances: dict[str, list[Path]] = {label: [] for label in starts}
    for label in order:
        instances[label].append(starts[label]())
    engine = (instances[HEAPSIZE][0].parent.parent / "engine").read_text().strip()
    return instances, engine


def _restrackfs(
    stack: contextlib.ExitStack, cfg: Config, pid: int, name: str, *options: str
) -> Path:
    daemon = stack.enter_context(Daemon(cfg.work, *options))
    daemon.register(pid)
    return daemon.path(pid, name)


def by_target(latencies: dict[str, list[int]]) -> dict[str, list[int]]:
    """The latencies of `LABEL #i` instances pooled under LABEL."""
    pooled: dict[str, list[int]] = {}
    for label, values in latencies.items():
        pooled.setdefault(label.split(" #")[0], []).extend(values)
    return pooled


def request_counts(cfg: Config, helpers: dict[str, Path], pid: int) -> dict[str, dict[str, float]]:
    """FUSE requests reaching the daemon's handlers per open+read+close of each file."""
    counts = {}
    cats = max(2, cfg.count_reads // 10)
    passes = (
        (HEAPSIZE, "heapsize", ["lat", str(cfg.count_reads), "1"], 2 * cfg.count_reads),
        (STAT, "stat", ["lat", str(cfg.count_reads), "1"], 2 * cfg.count_reads),
        (f"cat {HEAPSIZE}", "heapsize", ["cat", str(cats), "1", "/bin/cat"], 2 * cats),
    )
    with Daemon(cfg.work, counting=cfg.work / "counts.json") as daemon:
        daemon.register(pid)
        for label, name, mode, reads in passes:
            before = daemon.request_counts()
            # `lat N 1` reads N times untimed (warm-up), then N times timed; `cat` alike.
            run_reader(helpers["reader"], mode, {label: daemon.path(pid, name)})
            after = daemon.request_counts()
            counts[label] = {
                op: (after.get(op, 0) - before.get(op, 0)) / reads
                for op in sorted(after)
                if after.get(op, 0) != before.get(op, 0)
            }
    return counts


@dataclass
class Readings:
    """The latencies (ns) of one run by target: interleaved blocks, isolated reads, `cat`."""

    lat: dict[str, list[int]]
    gap: dict[str, list[int]]
    cat: dict[str, list[int]]
    rounds: int  # interleaved rounds per reader process


def run(cfg: Config, helpers: dict[str, Path]) -> GroupResult:
    result = GroupResult(NAME, TITLE)
    with Sleepers(helpers["sleepers"], 1) as sleepers, Lxcfs(cfg.work) as lxcfs:
        pid = sleepers.pids[0]
        with contextlib.ExitStack() as daemons:
            instances, engine = start_instances(daemons, cfg, pid)
            readings = read_targets(cfg, helpers["reader"], instances, pid, lxcfs)
        counts = request_counts(cfg, helpers, pid)
    n = cfg.latency_block * readings.rounds * cfg.latency_readers  # per instance
    n_of = {label: n * len(instances.get(label, [None])) for label in readings.lat}
    p50, p99 = microseconds_at(readings.lat, 50), microseconds_at(readings.lat, 99)
    result.rows += latency_rows(p50, p99, n_of, engine, lxcfs.reason)
    result.rows += ratio_rows(p50, p99, lxcfs.reason)
    result.rows += isolated_rows(readings.gap, engine)
    result.rows += cat_rows(readings.cat, cfg.cat_block * cfg.cat_rounds, lxcfs.reason)
    result.rows += count_rows(counts)
    result.goals += latency_goals(p50, p99, engine, lxcfs.reason)
    result.plot = {"latencies": dict(readings.lat)}
    result.method = method(cfg, readings.rounds, engine)
    return result


def read_targets(
    cfg: Config, reader: Path, instances: dict[str, list[Path]], pid: int, lxcfs: Lxcfs
) -> Readings:
    """Every instance of every target, the process's /proc status and lxcfs read alike:
    interleaved blocks, then isolated reads, then one `cat` per read."""
    paths = {
        f"{label} #{i + 1}": path
        for label, paths_of in instances.items()
        for i, path in enumerate(paths_of)
    }
    paths[PROC] = Path(f"/proc/{pid}/status")
    if lxcfs.reason is None:
        paths[LXCFS] = lxcfs.uptime
    rounds = -(-cfg.latency_rounds // cfg.latency_readers)  # per process
    lat_mode = ["lat", str(cfg.latency_block), str(rounds)]
    lat = by_target(pooled_reader(reader, lat_mode, paths, cfg.latency_readers))
    gap_mode = ["gap", str(cfg.gap_us), str(cfg.gap_block), str(cfg.gap_rounds)]
    gap = by_target(pooled_reader(reader, gap_mode, paths, cfg.latency_readers))
    cat_paths = {HEAPSIZE: instances[HEAPSIZE][0], PROC: paths[PROC]}
    if LXCFS in paths:
        cat_paths[LXCFS] = paths[LXCFS]
    cat_mode = ["cat", str(cfg.cat_block), str(cfg.cat_rounds), "/bin/cat"]
    cat = run_reader(reader, cat_mode, cat_paths)
    return Readings(lat, gap, cat, rounds)


def microseconds_at(latencies: dict[str, list[int]], q: float) -> dict[str, float]:
    """The q-th percentile of each target's latencies, in µs."""
    return {label: percentile(values, q) / 1000 for label, values in latencies.items()}


def _count_note(n: int, label: str, engine: str) -> str:
    """How many reads, and for the default-engine targets which engine `auto` chose."""
    return f"n={n}, engine {engine}" if label in (HEAPSIZE, STAT) else f"n={n}"


def latency_rows(
    p50: dict[str, float],
    p99: dict[str, float],
    n_of: dict[str, int],
    engine: str,
    lxcfs_reason: str | None,
) -> list[Row]:
    rows = []
    for label in (HEAPSIZE, HEAPSIZE_PROCFS, STAT, PROC, LXCFS, FLOOR):
        if label not in p50:
            reason = lxcfs_reason or "not run"
            rows.append(Row(f"{label} p50", None, "us", reason))
            rows.append(Row(f"{label} p99", None, "us", reason))
            continue
        note = _count_note(n_of[label], label, engine)
        rows.append(Row(f"{label} p50", p50[label], "us", note))
        rows.append(Row(f"{label} p99", p99[label], "us", note))
    return rows


def ratio_rows(p50: dict[str, float], p99: dict[str, float], lxcfs_reason: str | None) -> list[Row]:
    """Each restrackfs file's percentiles over lxcfs's, the kernel's and the minimal file's."""
    rows = []
    for label in (HEAPSIZE, HEAPSIZE_PROCFS, STAT):
        for peer in (LXCFS, PROC, FLOOR):
            for q, table in (("p50", p50), ("p99", p99)):
                figure = f"{label} {q} / {peer} {q}"
                if peer in table:
                    rows.append(Row(figure, table[label] / table[peer], "x"))
                else:
                    rows.append(Row(figure, None, "x", lxcfs_reason or ""))
    return rows


def isolated_rows(gap: dict[str, list[int]], engine: str) -> list[Row]:
    gap_p50 = microseconds_at(gap, 50)
    rows = []
    for label in gap:
        note = _count_note(len(gap[label]), label, engine)
        rows.append(Row(f"{label}, isolated reads p50", gap_p50[label], "us", note))
        rows.append(
            Row(f"{label}, isolated reads p99", percentile(gap[label], 99) / 1000, "us", note)
        )
    for label in (HEAPSIZE, HEAPSIZE_PROCFS):
        for peer in (LXCFS, FLOOR):
            if peer in gap_p50:
                ratio = gap_p50[label] / gap_p50[peer]
                rows.append(Row(f"{label}, isolated reads p50 / {peer}'s", ratio, "x"))
    return rows


def cat_rows(cat: dict[str, list[int]], cat_n: int, lxcfs_reason: str | None) -> list[Row]:
    rows = []
    for label in (HEAPSIZE, PROC, LXCFS):
        if label in cat:
            for q in (50, 99):
                us = percentile(cat[label], q) / 1000
                rows.append(Row(f"cat {label} p{q}", us, "us", f"n={cat_n}"))
        else:
            rows.append(Row(f"cat {label} p50", None, "us", lxcfs_reason or ""))
    for peer in (PROC, LXCFS):
        if peer in cat:
            ratio = percentile(cat[HEAPSIZE], 50) / percentile(cat[peer], 50)
            rows.append(Row(f"cat {HEAPSIZE} p50 / cat {peer} p50", ratio, "x"))
    return rows


def count_rows(counts: dict[str, dict[str, float]]) -> list[Row]:
    rows = []
    for label, per_op in counts.items():
        detail = ", ".join(f"{op} {value:.2f}" for op, value in per_op.items())
        rows.append(Row(f"requests per read of {label}", sum(per_op.values()), "req", detail))
    return rows


def latency_goals(
    p50: dict[str, float], p99: dict[str, float], engine: str, lxcfs_reason: str | None
) -> list[Goal]:
    def against_lxcfs(table: dict[str, float]) -> tuple[float | None, str]:
        if LXCFS not in table:
            return None, f"lxcfs unavailable: {lxcfs_reason}"
        where = f"{table[HEAPSIZE]:.0f} µs vs {table[LXCFS]:.0f} µs, engine {engine}"
        return table[HEAPSIZE] / table[LXCFS], where

    p50_ratio, p50_where = against_lxcfs(p50)
    p99_ratio, p99_where = against_lxcfs(p99)
    return [
        Goal(
            "read p50 of PID/heapsize <= 1.0 x lxcfs uptime read (stretch <= 0.5 x)",
            p50_ratio,
            1.0,
            "x",
            p50_where,
            stretch=0.5,
        ),
        Goal("read p99 of PID/heapsize <= 1.0 x lxcfs uptime read", p99_ratio, 1.0, "x", p99_where),
        Goal(
            "read p50 of PID/heapsize <= 1.1 x the minimal pyfuse3 file",
            p50[HEAPSIZE] / p50[FLOOR],
            1.1,
            "x",
            f"{p50[HEAPSIZE]:.0f} µs vs {p50[FLOOR]:.0f} µs, engine {engine}",
        ),
    ]


def method(cfg: Config, rounds: int, engine: str) -> str:
    return f"""
A compiled C reader (bench/c/reader.c) times each `open` + `read` to EOF + `close`
with CLOCK_MONOTONIC. The targets are read in interleaved rounds: each round gives
every target a block of {cfg.latency_block} reads, in an order rotated each round,
so drift and noise fall on all targets alike. The rounds are shared among
{cfg.latency_readers} reader processes run one after another ({rounds} rounds each,
after one untimed warm-up round), and their latencies pooled: where a reader process
runs relative to a daemon (on its CPU, or on the other one with a wake-up per
request) is a draw that lasts the process's life, and one daemon read in 46-235 µs
p50 in successive reader processes, so one process would measure one draw. Each
restrackfs target and the minimal file are served by {cfg.latency_instances} daemons
of their own, started in a random order and read alike, their latencies pooled as
well: a daemon's speed is partly a draw too, and in earlier runs the daemon started
first was often the slowest. The *isolated reads* rows read the same targets with a
pause of {cfg.gap_us} µs before each read ({cfg.gap_block} × {cfg.gap_rounds} per
target in each of the {cfg.latency_readers} processes), as a script polling a file
does: every read then finds the CPUs idle and the caches cold. Targets:
`PID/heapsize` of a tracked sleeping C process on a restrackfs mounted by the bench
with the default engine (`--engine auto`: {engine} on this machine; the goals are
its figures, what a user gets), `PID/stat` of the same process on a third restrackfs
with the default engine (each restrackfs file read from a daemon of its own: in A/B
runs a daemon that also served the heavier `PID/stat` read `heapsize` in 90-100 µs
where one serving `heapsize` alone took 55-60, so one daemon for both measures their
mix), `PID/heapsize` of the same process on a second restrackfs with `--engine
procfs` (heapsize read from `/proc/PID/status` at each read, the fallback where BPF
does not load), that process's `/proc/PID/status` (the kernel floor of the procfs
read), and `proc/uptime` of an lxcfs (a C FUSE filesystem) mounted by the bench in a
temp dir, and the one file of a minimal pyfuse3 + trio filesystem that answers a
constant (bench/minimalfs.py, its loop run with restrackfs's options, busy polling
included): the floor of the Python FUSE stack restrackfs is built on, before any
work of its own. The `cat` rows spawn one `/bin/cat PATH >/dev/null` per read
(posix_spawn + waitpid), as a shell loop does ({cfg.cat_block} × {cfg.cat_rounds}
per target, interleaved the same way). Requests per read: another daemon, with a
counter wrapped around each pyfuse3 handler (bench/countingd.py, not used for any
timing), serves {2 * cfg.count_reads} reads of each file and {
        2 * max(2, cfg.count_reads // 10)
    } `cat`s of `PID/heapsize`; the counts are the requests that
reach the daemon's Python code, per read.
"""
