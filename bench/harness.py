"""What every benchmark group shares: C helpers, a daemon, lxcfs, sleepers, /proc.

Nothing here measures anything by itself; the group modules do. Every process
the bench starts is stopped by the context managers below, also on errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from tests.support import daemon as harness_daemon
from tests.support.daemon import end_process, release, unmount

ROOT = Path(__file__).resolve().parent.parent
C_SOURCES = Path(__file__).resolve().parent / "c"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 * 1024


# ----- sizes and time boxes ------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Everything a run may change; `quick()` gives the smoke-test sizes."""

    quick: bool = False
    work: Path = field(default_factory=Path)  # temp dir for mounts, state, binaries
    # 1. read latency
    latency_block: int = 100
    latency_rounds: int = 50
    latency_readers: int = 10  # reader processes the rounds are shared among
    latency_instances: int = 2  # daemons of each FUSE target, pooled
    gap_us: int = 2000  # isolated reads: the pause before each
    gap_block: int = 20
    gap_rounds: int = 2  # per reader process
    cat_block: int = 20
    cat_rounds: int = 25
    count_reads: int = 200  # reads for the request count and daemon CPU per read
    # 2. throughput
    readers: tuple[int, ...] = (1, 4, 16)
    throughput_seconds: float = 2.0
    # 3. enforcement
    intervals_ms: tuple[int, ...] = (100, 25)
    under_quota: tuple[int, ...] = (1, 100, 1000)
    kill_samples: int = 300
    kill_box_seconds: float = 90.0  # per (interval, N) cell
    cpu_window_seconds: float = 5.0
    # 4. overhead
    churn_iters: int = 1_000_000
    churn_pairs: int = 16
    # 5. scale
    scale_sizes: tuple[int, ...] = (1000, 10_000)
    register_box_seconds: float = 300.0  # per size
    idle_window_seconds: float = 10.0
    ls_runs: int = 3
    # 8. scrape cost against process-exporter
    exporter_sizes: tuple[int, ...] = (1000, 5000)
    exporter_scrapes: int = 10  # per endpoint and size

    @classmethod
    def quick_config(cls, work: Path) -> Config:
        return cls(
            quick=True,
            work=work,
            latency_block=10,
            latency_rounds=5,
            latency_readers=2,
            gap_block=5,
            gap_rounds=1,
            cat_block=2,
            cat_rounds=2,
            count_reads=20,
            readers=(1, 4),
            throughput_seconds=0.3,
            intervals_ms=(100, 25),
            under_quota=(1, 10),
            kill_samples=4,
            kill_box_seconds=5.0,
            cpu_window_seconds=0.5,
            churn_iters=20_000,
            churn_pairs=2,
            scale_sizes=(20, 100),
            register_box_seconds=20.0,
            idle_window_seconds=1.0,
            ls_runs=1,
            exporter_sizes=(20, 100),
            exporter_scrapes=2,
        )


# ----- statistics ----------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank: a value that was measured."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median (binomial order statistics)."""
    from math import comb

    ordered = sorted(values)
    n = len(ordered)
    tail = (1 - confidence) / 2
    k, mass = 0, 0.0
    while k < n // 2:
        nxt = mass + comb(n, k) / 2**n
        if nxt > tail:
            break
        mass, k = nxt, k + 1
    # P(fewer than k values below the median) <= tail: [x_(k), x_(n-k+1)], 1-based
    low = ordered[max(k - 1, 0)]
    high = ordered[min(n - k, n - 1)]
    return low, high


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# ----- /proc of the daemon -------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole thread group, in seconds (clock-tick resolution)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise KeyError(key)


class CpuMeter:
    """A process's CPU over a wall-clock window, as a share of one core."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu0 = cpu_seconds(pid)
        self.wall0 = time.monotonic()

    def seconds(self) -> float:
        return cpu_seconds(self.pid) - self.cpu0

    def share(self) -> float:
        """CPU seconds per wall second so far (1.0 = one core busy)."""
        wall = time.monotonic() - self.wall0
        return self.seconds() / wall if wall > 0 else 0.0


# ----- limits --------------------------------------------------------------


def raise_limits(processes: int) -> str | None:
    """Room for `processes` children and their pipes; the reason if there is none."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4096))
    if os.geteuid() == 0:
        with contextlib.suppress(ValueError, OSError):
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
            want = max(want, min(nr_open, 65536))
            hard = max(hard, want)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft != resource.RLIM_INFINITY and soft < processes + 1000:
        new = hard if hard == resource.RLIM_INFINITY else min(hard, processes + 1000)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NPROC, (new, hard))
    room = []
    for name in ("pid_max", "threads-max"):
        with contextlib.suppress(OSError, ValueError):
            room.append((name, int(Path(f"/proc/sys/kernel/{name}").read_text())))
    for name, limit in room:
        running = len([p for p in os.listdir("/proc") if p.isdigit()])
        if limit - running < processes + 100:
            return f"kernel.{name} = {limit} leaves no room for {processes} more processes"
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if os.geteuid() != 0 and soft != resource.RLIM_INFINITY and soft < processes + 100:
        return f"RLIMIT_NPROC = {soft} is below {processes}"
    return None


# ----- C helpers -----------------------------------------------------------


def build_helpers(dest: Path) -> dict[str, Path]:
    """Compile bench/c/*.c into `dest`; {name: binary}."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("no C compiler (gcc): run scripts/setup")
    dest.mkdir(parents=True, exist_ok=True)
    binaries = {}
    for source in sorted(C_SOURCES.glob("*.c")):
        binary = dest / source.stem
        subprocess.run(
            [gcc, "-O2", "-Wall", "-o", str(binary), str(source)],
            check=True,
            capture_output=True,
        )
        binaries[source.stem] = binary
    return binaries


# ----- the daemon ----------------------------------------------------------


def _daemon_command() -> list[str]:
    """The installed `restrackfs` script, as a user runs it; else the module."""
    script = Path(sys.executable).parent / "restrackfs"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "restrackfs.daemon"]


def _state_dir(work: Path) -> Path:
    """The state file lives on a tmpfs, as the default /run/restrackfs does."""
    for candidate in (Path("/dev/shm"), Path("/run")):
        with contextlib.suppress(OSError):
            if candidate.is_dir() and os.access(candidate, os.W_OK):
                return Path(tempfile.mkdtemp(prefix="restrack-bench-", dir=candidate))
    return Path(tempfile.mkdtemp(prefix="restrack-bench-", dir=work))


class StartedInWith:
    """`with thing:` calls its start() and stop(); a start cut short (a signal, a
    timeout) stops it too, so it leaves nothing."""

    def __enter__(self) -> Self:
        try:
            return self.start()  # type: ignore[attr-defined]
        except BaseException:
            self.stop()  # type: ignore[attr-defined]
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()  # type: ignore[attr-defined]


class Daemon(StartedInWith, harness_daemon.Daemon):
    """One restrackfs mounted in a temp dir (the tests' harness), removed on exit.

    `counting`: run bench/countingd.py instead, which writes its handler calls there.
    """

    def __init__(self, work: Path, *options: str, counting: Path | None = None) -> None:
        mountpoint = Path(tempfile.mkdtemp(prefix="mnt-", dir=work))
        mountpoint.chmod(0o755)
        self.state_dir = _state_dir(work)
        log = Path(tempfile.mkstemp(prefix="daemon-", suffix=".log", dir=work)[1])
        command, env = _daemon_command(), None
        if counting is not None:
            command = [sys.executable, "-m", "bench.countingd"]
            env = dict(os.environ)
            env["RESTRACK_BENCH_COUNTS"] = str(counting)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        super().__init__(
            mountpoint,
            self.state_dir / "state.json",
            log,
            *options,
            command=command,
            env=env,
            start_timeout=30,
        )
        self.counting = counting

    def start(self, *options: str) -> Daemon:
        try:
            super().start(*options)
        except harness_daemon.DaemonStartError as error:
            self.stop()
            raise RuntimeError(str(error)[-2000:]) from None
        return self

    def set_quota(self, pid: int, quota: str) -> None:
        self.write(quota + "\n", pid, "quota")

    def cpu(self) -> CpuMeter:
        return CpuMeter(self.pid)

    def request_counts(self) -> dict[str, int]:
        """Handler calls so far (a daemon started with `counting=`)."""
        assert self.counting is not None
        counting = self.counting

        def seq() -> int:
            try:
                return int(json.loads(counting.read_text())["seq"])
            except (OSError, ValueError, KeyError):
                return 0

        before = seq()
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while seq() == before:
            if time.monotonic() > deadline:
                raise RuntimeError("the counting daemon did not report its counts")
            time.sleep(0.005)
        return dict(json.loads(counting.read_text())["counts"])

    def rss_mib(self) -> float:
        return status_kib(self.pid, "VmRSS") / 1024

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Stop (SIGKILL after `timeout`), unmount, lift what the stop left enforcing
        (a stop keeps every quota) and remove the mount point and the state."""
        code = 0
        if self.proc is not None:
            end_process(self.proc, timeout)
            code = self.proc.returncode
        self.proc = None
        unmount(self.mountpoint)
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()
        release(self.state)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return code


# ----- lxcfs, the C FUSE peer ----------------------------------------------


class Lxcfs(StartedInWith):
    """lxcfs mounted in a temp dir (serves DIR/proc/uptime); `reason` if it cannot run."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.mountpoint = Path(tempfile.mkdtemp(prefix="lxcfs-", dir=work))
        self.proc: subprocess.Popen[bytes] | None = None
        self.reason: str | None = None
        self.log = work / "lxcfs.log"

    @property
    def uptime(self) -> Path:
        return self.mountpoint / "proc" / "uptime"

    def start(self) -> Lxcfs:
        binary = shutil.which("lxcfs")
        if binary is None:
            self.reason = "lxcfs not installed (RESTRACK_SETUP_EXTRAS=bench scripts/setup)"
            return self
        argv = [binary, "-f", "-p", str(self.work / "lxcfs.pid"), str(self.mountpoint)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if self.uptime.read_text().strip():
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                self.reason = "lxcfs did not serve proc/uptime" + (f": {tail[0]}" if tail else "")
                self.stop()
                return self
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc, 10)
        self.proc = None
        unmount(self.mountpoint)
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()


# ----- processes to track --------------------------------------------------


class Sleepers:
    """N tiny C processes (forks of bench/c/sleepers.c) that pause() until stopped."""

    def __init__(self, binary: Path, count: int) -> None:
        self.proc = subprocess.Popen(
            [str(binary), str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.pids: list[int] = []
        for line in self.proc.stdout:
            if line.startswith("ready"):
                break
            self.pids.append(int(line))
        if len(self.pids) < count:
            self.stop()
            raise RuntimeError(f"only {len(self.pids)} of {count} sleepers could be started")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Sleepers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_dead(pidfd: int, timeout: float) -> int | None:
    """CLOCK_MONOTONIC ns at which the pidfd said the process is gone; None on timeout."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if poller.poll(timeout * 1000):
        return time.monotonic_ns()
    return None


@contextlib.contextmanager
def work_dir() -> Iterator[Path]:
    """A temp dir every uid can enter, removed at the end."""
    path = Path(tempfile.mkdtemp(prefix="restrack-bench-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
