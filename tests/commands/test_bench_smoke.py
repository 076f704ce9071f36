"""The benchmark suite (bench/, scripts/bench) keeps working: run it at tiny sizes.

No timing is asserted: only that every group runs and the report has its rows.
The plot needs the `bench` extra (matplotlib) and the lxcfs rows need lxcfs;
without them those parts are checked to say so instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.paths import CHECKOUT

ROOT = CHECKOUT

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="the benchmarks mount FUSE filesystems as root",
)

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAVE_LXCFS = shutil.which("lxcfs") is not None


@pytest.fixture(scope="module")
def quick_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("bench-out")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, out


def test_quick_run_succeeds(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, _ = quick_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_every_group_has_its_rows(
    quick_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    done, out = quick_run
    report = (out / "benchmarks.md").read_text()
    for text in (
        "## Machine",
        "## Goals",
        "1. Read latency",
        "| PID/heapsize p50 |",
        "| PID/stat p99 |",
        "| /proc/PID/status p50 |",
        "| cat PID/heapsize p50 |",
        "| PID/heapsize, isolated reads p50 |",
        "| minimal pyfuse3 file, isolated reads p50 |",
        "requests per read of PID/heapsize",
        "2. Read throughput",
        "| PID/heapsize, 1 reader |",
        "| PID/heapsize, 4 readers |",
        "3. Enforcement latency (kill mode)",
        "| kill p99, --interval 100, 10 under quota |",
        "| kill p50, --interval 25, 1 under quota |",
        "| daemon CPU, --interval 25, 10 under quota |",
        "4. Overhead on the tracked process",
        "tracked / untracked wall time",
        "5. Scale",
        "| register all, 100 |",
        "| daemon RSS, 100 tracked |",
        "| daemon idle CPU, 20 tracked |",
        "ls /restrack, first, 100 tracked",
        "7. Command write latency (quota and reset)",
        "| deny, root: quota + reset p50 |",
        "| deny, uid 65534: quota p99 |",
        "8. Scrape cost side by side: restrackfs and process-exporter",
        "| restrackfs (procfs) CPU per scrape, 100 processes |",
        "| restrackfs (procfs) wall per scrape p50, 20 processes |",
        "| process-exporter CPU per scrape, 100 processes |",
        "9. Tree quotas (a fan-out job, fork cost)",
        "| procfs, N=8: usage at the kill (max) |",
        "| procfs: fork+exit+wait, a tree's root (median) |",
        "How it is measured:",
    ):
        assert text in report, text
    assert "**Error:**" not in report
    for machine in ("| kernel |", "| CPU |", "| cores (nproc) |", "| Python |", "| date |"):
        assert machine in report
    goals = [line for line in report.splitlines() if line.startswith(("PASS", "MISS", "N/A"))]
    # latency p50 (vs lxcfs, vs the minimal pyfuse3 file) and p99, 4-reader throughput,
    # kill at 2 intervals, overhead, idle CPU, RSS, deny's quota + reset vs kill's, and
    # the scrape's CPU against process-exporter's at 2 sizes and per process, a bpf
    # tree's usage at the kill and its root's fork cost
    assert len(goals) == 15, goals
    assert "| pyfuse3 |" in report
    assert "Goals:" in done.stdout and "PID/heapsize p50" in done.stdout


def test_lxcfs_rows(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = quick_run
    report = (out / "benchmarks.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| lxcfs proc/uptime p50 |"))
    if "unavailable" in row:  # not installed, or it could not run here: the reason is given
        reason = row.rstrip(" |").rsplit("|", 1)[-1].strip()
        assert reason, row
        if not HAVE_LXCFS:
            assert "lxcfs not installed" in reason, row
    else:
        assert HAVE_LXCFS


def test_plot(quick_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, out = quick_run
    png = out / "benchmarks.png"
    if not HAVE_MATPLOTLIB:
        assert not png.exists()
        assert "plot: skipped" in done.stdout
        pytest.skip("matplotlib not installed (the bench extra)")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![benchmark plot](benchmarks.png)" in (out / "benchmarks.md").read_text()


def test_only_one_group(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "overhead", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "benchmarks.md").read_text()
    assert "4. Overhead on the tracked process" in report
    assert "1. Read latency" not in report


def test_unknown_group_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "nope", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown group nope" in done.stderr


def test_reader_pauses_before_each_isolated_read(tmp_path: Path) -> None:
    """`reader gap` is `reader lat` with a pause before every read (warm-up untimed)."""
    from bench.harness import build_helpers

    reader = build_helpers(tmp_path)["reader"]
    paths = ["/proc/self/status", "/proc/uptime"]
    started = time.monotonic()
    out = subprocess.run(
        [str(reader), "gap", "5000", "3", "2", *paths], capture_output=True, text=True, check=True
    )
    elapsed = time.monotonic() - started
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(len(line.split()) == 6 for line in lines), out.stdout
    # 2 paths x 3 reads x 2 rounds, each after a 5 ms pause (the warm-up round pauses not)
    assert elapsed >= 12 * 0.005, elapsed
    assert all(int(v) > 0 for line in lines for v in line.split())
    plain = subprocess.run([str(reader), "gap", "0", "3", "2", *paths], capture_output=True)
    assert plain.returncode == 2  # a gap of 0 is no gap: use `lat`


def bench_mounts() -> set[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return {line.split()[4] for line in mountinfo if "/restrack-bench-" in line}


def test_a_terminated_run_unmounts_what_it_mounted(tmp_path: Path) -> None:
    """SIGTERM mid-run (a CI timeout): the run unwinds, its daemons stop and every
    mount it made goes, as on Ctrl-C."""
    before = bench_mounts()
    run = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--only", "latency", "--out", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not bench_mounts() - before:
            assert run.poll() is None, "the run ended before it mounted anything"
            assert time.monotonic() < deadline, "no mount within 120 s"
            time.sleep(0.05)
        run.terminate()
        assert run.wait(60) == 128 + signal.SIGTERM
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert bench_mounts() - before == set()
    assert not (tmp_path / "benchmarks.md").exists()
