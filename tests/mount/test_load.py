"""Load: many threads reading and writing while processes come, go and get killed.

Reader/writer threads hammer the mount (listings, every file of a few stable
processes, metrics, the files of processes that may vanish at any moment, and
writes whose answer is known: EEXIST, EBUSY, EINVAL, a usage reset) while
churn threads start workload processes, register them, drive them, and end
each one in one of six ways: it exits, it is killed for its file quota, killed
for its heap quota, deregistered, SIGKILLed from outside, or refused by a deny
quota. At the end: no unexpected error in any thread, no entry left for a dead
process (mount, metrics, state file), every quota kill happened, the daemon
holds as many descriptors as before and its RSS did not grow.

The normal suite runs a short version; `scripts/test --long` the full one
(32 threads, 200 processes, 30 s).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.daemon import Daemon
from tests.support.procs import MiB
from tests.support.users import NOBODY
from tests.support.waiting import wait_until
from tests.support.workload import Workload
from tracker.engine import state as state_file

STABLE_FILES = ["heapsize", "openfile_count", "stat", "quota"]
ENDINGS = ["exit", "killed-files", "killed-heap", "deregistered", "sigkill", "deny"]
QUOTA_OF = {
    "killed-files": "files=4",
    "killed-heap": "heap=32M",
    "deny": "files=3 action=deny",
}


@dataclass(frozen=True)
class Shape:
    threads: int
    processes: int
    seconds: float
    churners: int


SHORT = Shape(threads=8, processes=40, seconds=4, churners=2)
FULL = Shape(threads=32, processes=200, seconds=30, churners=4)


def daemon_figures(daemon: Daemon) -> dict[str, int]:
    pid = daemon.proc.pid
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "rss_kib": int(re.search(r"VmRSS:\s+(\d+)", status)[1]),
        "threads": int(re.search(r"Threads:\s+(\d+)", status)[1]),
    }


@dataclass
class Tally:
    """What the threads did; shared, guarded by a lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ops: Counter[str] = field(default_factory=Counter)
    expected_errors: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    endings: Counter[str] = field(default_factory=Counter)

    def merge(self, ops: Counter[str], expected: Counter[str], unexpected: list[str]) -> None:
        with self.lock:
            self.ops.update(ops)
            self.expected_errors.update(expected)
            self.unexpected.extend(unexpected[:20])


class Hammer(threading.Thread):
    """One reader/writer thread: random operations whose correct answers are known."""

    def __init__(self, index: int, daemon: Daemon, stable: dict[str, int], tally: Tally,
                 stop: threading.Event) -> None:  # fmt: skip
        super().__init__(name=f"hammer-{index}", daemon=True)
        self.rng = random.Random(index)
        self.d, self.stable, self.tally, self.stop_event = daemon, stable, tally, stop
        self.ops: Counter[str] = Counter()
        self.expected: Counter[str] = Counter()
        self.unexpected: list[str] = []

    def read(self, *parts: object) -> str:
        fd = os.open(self.d.path(*parts), os.O_RDONLY)
        try:
            return os.read(fd, 65536).decode()
        finally:
            os.close(fd)

    def write(self, text: str, *parts: object) -> None:
        fd = os.open(self.d.path(*parts), os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def attempt(self, name: str, action, allowed: tuple[int, ...] = ()) -> object:
        self.ops[name] += 1
        try:
            return action()
        except OSError as error:
            if error.errno in allowed:
                self.expected[f"{name}:{errno.errorcode[error.errno]}"] += 1
                return None
            self.unexpected.append(f"{name}: {error!r}")
        except Exception as error:  # a malformed answer
            self.unexpected.append(f"{name}: {error!r}")
        return None

    def expect_errno(self, name: str, code: int, action) -> None:
        def run() -> None:
            try:
                action()
            except OSError as error:
                if error.errno != code:
                    raise
                return
            raise AssertionError(f"succeeded, want {errno.errorcode[code]}")

        self.attempt(name, run)

    def one_op(self) -> None:
        rng, stable = self.rng, self.stable
        pid = rng.choice(list(stable.values()))
        choice = rng.randrange(100)
        if choice < 10:
            self.attempt("ls", lambda: os.listdir(self.d.mountpoint))
        elif choice < 45:
            name = rng.choice(STABLE_FILES)
            self.attempt(f"read {name}", lambda: self.check_value(name, self.read(pid, name)))
        elif choice < 55:
            self.attempt("metrics", lambda: self.check_metrics(self.read("metrics")))
        elif choice < 75:
            others = [n for n in os.listdir(self.d.mountpoint) if n.isdigit()]
            churned = [int(n) for n in others if int(n) not in stable.values()]
            if churned:
                target = rng.choice(churned)
                name = rng.choice(STABLE_FILES)
                self.attempt(
                    "read churned",
                    lambda: self.read(target, name),
                    (errno.ENOENT, errno.ESRCH),
                )
        elif choice < 82:
            self.attempt("reset usage", lambda: self.write("usage\n", stable["plain"], "reset"))
        elif choice < 88:
            self.expect_errno(
                "quota again", errno.EBUSY, lambda: self.write("files=1", stable["notify"], "quota")
            )
        elif choice < 94:
            self.expect_errno(
                "register again", errno.EEXIST, lambda: self.write(str(pid), "register")
            )
        else:
            bad = rng.choice(["x", "-3", "", "1.5", "heap=1M"])
            if bad:
                self.expect_errno("bad register", errno.EINVAL, lambda: self.write(bad, "register"))

    @staticmethod
    def check_value(name: str, text: str) -> None:
        if name in ("heapsize", "openfile_count"):
            assert re.fullmatch(r"\d+\n", text), text
        elif name == "stat":
            assert text.startswith("pid ") and text.count("\n") >= 10, text
        else:
            assert text.startswith("heap=") and text.endswith("\n"), text

    @staticmethod
    def check_metrics(text: str) -> None:
        assert text.endswith("\n") and "restrack_tracked_processes " in text, text[-200:]

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.one_op()
        finally:
            self.tally.merge(self.ops, self.expected, self.unexpected)


@dataclass
class Churned:
    workload: Workload
    ending: str
    ends_at: float
    dying_since: float | None = None


class Churner(threading.Thread):
    """Starts its share of the processes spread over the run and ends each one."""

    def __init__(self, index: int, count: int, shape: Shape, daemon: Daemon, binary: Path,
                 tally: Tally, started: list[int]) -> None:  # fmt: skip
        super().__init__(name=f"churn-{index}", daemon=True)
        self.index, self.count, self.shape = index, count, shape
        self.d, self.binary, self.tally, self.started = daemon, binary, tally, started
        self.rng = random.Random(1000 + index)
        self.errors: list[str] = []

    def spawn(self, number: int) -> Churned:
        ending = ENDINGS[number % len(ENDINGS)]
        uid = NOBODY if number % 3 == 0 and ending != "deny" else None
        w = Workload(self.binary, uid)
        self.started.append(w.pid)
        self.d.register(w.pid)
        if ending in QUOTA_OF:
            self.d.write(QUOTA_OF[ending], w.pid, "quota")
        lifetime = self.rng.uniform(0.1, min(2.0, self.shape.seconds / 4))
        return Churned(w, ending, time.monotonic() + lifetime)

    def poke(self, c: Churned) -> None:
        """A harmless operation, so usage moves while the threads read."""
        if c.ending in ("killed-files", "deny"):
            c.workload.do(self.rng.choice(["mmap 1048576", "munmap", "pid"]))
        elif c.ending == "killed-heap":
            c.workload.do(self.rng.choice(["open 1", "close 1", "pid"]))
        else:
            c.workload.do(self.rng.choice(["mmap 1048576", "munmap", "open 1", "close 1"]))

    def end(self, c: Churned) -> bool:
        """Start the ending; True once the process is gone."""
        w = c.workload
        if c.dying_since is None:
            c.dying_since = time.monotonic()
            if c.ending == "exit":
                w.proc.stdin.write("exit\n")
                w.proc.stdin.flush()
            elif c.ending == "killed-files":
                w.ask("open", 10)
            elif c.ending == "killed-heap":
                w.ask("mmap", 64 * MiB)
            elif c.ending == "deregistered":
                self.d.write(str(w.pid), "deregister")
                w.proc.kill()
            elif c.ending == "sigkill":
                w.proc.kill()
            elif c.ending == "deny":
                reply = w.ask("open", 10)
                if reply != f"ok 3 {errno.EMFILE}":
                    self.errors.append(f"deny {w.pid}: {reply}")
                w.proc.kill()
        code = w.proc.poll()
        if code is None:
            if time.monotonic() - c.dying_since > 10:
                self.errors.append(f"{c.ending} {w.pid}: still alive after 10 s")
                w.proc.kill()
            return False
        if c.ending.startswith("killed") and code != -9:
            self.errors.append(f"{c.ending} {w.pid}: exit status {code}, not SIGKILL")
        w.stop()
        with self.tally.lock:
            self.tally.endings[c.ending] += 1
        return True

    def run(self) -> None:
        live: list[Churned] = []
        start = time.monotonic()
        spawned = 0
        try:
            while spawned < self.count or live:
                now = time.monotonic()
                due = start + self.shape.seconds * spawned / self.count
                if spawned < self.count and now >= due:
                    live.append(self.spawn(spawned * self.shape.churners + self.index))
                    spawned += 1
                    continue
                ending = [c for c in live if c.dying_since is not None or now >= c.ends_at]
                for c in ending:
                    if self.end(c):
                        live.remove(c)
                pokeable = [c for c in live if c.dying_since is None]
                if pokeable:
                    self.poke(self.rng.choice(pokeable))
                elif live:  # all of them dying: let the daemon's check come round
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        live[0].workload.proc.wait(0.005)
        except Exception as error:  # noqa: BLE001 - reported below, with the others
            self.errors.append(f"churn {self.index}: {error!r}")
        finally:
            for c in live:
                c.workload.stop()


def start_stable(daemon: Daemon, spawn) -> dict[str, Workload]:
    """Four processes that live through the load, one under each kind of quota."""
    stable = {"plain": spawn(), "notify": spawn(), "deny": spawn(), "theirs": spawn(NOBODY)}
    for w in stable.values():
        daemon.register(w.pid)
    daemon.write("heap=1G files=100 action=notify", stable["notify"].pid, "quota")
    daemon.write("heap=512M files=50 action=deny", stable["deny"].pid, "quota")
    daemon.write("heap=1G files=100", stable["theirs"].pid, "quota")
    return stable


def warm_up(daemon: Daemon, stable: dict[str, int], threads: int) -> dict[str, int]:
    """The daemon starts its worker threads and fills its caches; then its figures."""
    warm_stop = threading.Event()
    warm = [Hammer(100 + i, daemon, stable, Tally(), warm_stop) for i in range(threads)]
    for thread in warm:
        thread.start()
    time.sleep(0.5)  # a duration of load, not a synchronisation
    warm_stop.set()
    for thread in warm:
        thread.join()
    return daemon_figures(daemon)


@dataclass
class Churn:
    """What the load phase gives: the processes started, its length, the RSS seen."""

    started: list[int]
    elapsed: float
    rss_samples: list[int]
    errors: list[str]


def churn(daemon: Daemon, binary: Path, stable: dict[str, int], shape: Shape, tally: Tally):
    """Hammer the stable processes' files while churners start, register and end
    `shape.processes` others; returns when the churn is done (time-boxed)."""
    stop = threading.Event()
    started: list[int] = []
    hammers = [Hammer(i, daemon, stable, tally, stop) for i in range(shape.threads)]
    share = [shape.processes // shape.churners] * shape.churners
    share[0] += shape.processes - sum(share)
    churners = [
        Churner(i, share[i], shape, daemon, binary, tally, started) for i in range(shape.churners)
    ]
    began = time.monotonic()
    for thread in [*hammers, *churners]:
        thread.start()
    rss_samples = []
    while any(c.is_alive() for c in churners) or time.monotonic() - began < shape.seconds:
        rss_samples.append(daemon_figures(daemon)["rss_kib"])
        for churner in churners:
            churner.join(0.25)
        if time.monotonic() - began > shape.seconds * 3 + 30:
            break
    stop.set()
    for thread in hammers:
        thread.join(30)
    elapsed = time.monotonic() - began
    assert not any(c.is_alive() for c in churners), "churn did not finish"
    errors = [e for c in churners for e in c.errors]
    return Churn(started, elapsed, rss_samples, errors)


def check_nothing_left(daemon: Daemon, stable: dict[str, int], started: list[int]) -> str:
    """Nothing is left behind for a dead process: the listing, metrics, the state file.
    Returns the metrics text."""
    stable_names = sorted(str(pid) for pid in stable.values())
    wait_until(
        lambda: sorted(n for n in os.listdir(daemon.mountpoint) if n.isdigit()) == stable_names,
        10,
        "only the stable processes listed",
    )
    metrics = daemon.read("metrics")
    assert f"restrack_tracked_processes {len(stable)}\n" in metrics
    for pid in started:
        assert f'pid="{pid}"' not in metrics
    assert sorted(str(r["pid"]) for r in state_file.load(daemon.state)) == stable_names
    return metrics


def run_load(daemon: Daemon, binary: Path, spawn, shape: Shape) -> dict[str, object]:
    stable_workloads = start_stable(daemon, spawn)
    stable = {name: w.pid for name, w in stable_workloads.items()}
    tally = Tally()
    before = warm_up(daemon, stable, shape.threads)
    load = churn(daemon, binary, stable, shape, tally)
    metrics = check_nothing_left(daemon, stable, load.started)

    # The figures of the moment the descriptors were back: a later sample can catch
    # a file the daemon has open for a moment (a /proc read), which is no leak.
    def settled() -> dict[str, int] | None:
        figures = daemon_figures(daemon)
        return figures if figures["fds"] <= before["fds"] else None

    after = wait_until(settled, 10, "fds back")
    kills = int(re.search(r'restrack_enforcements_total\{action="kill"\} (\d+)', metrics)[1])
    log = daemon.log_text()
    figures = {
        "shape": shape,
        "seconds": round(load.elapsed, 1),
        "ops": sum(tally.ops.values()),
        "ops_per_s": round(sum(tally.ops.values()) / load.elapsed),
        "ops_by_kind": dict(tally.ops),
        "expected_errors": dict(tally.expected_errors),
        "unexpected_errors": len(tally.unexpected),
        "processes": len(load.started),
        "endings": dict(tally.endings),
        "kills_counted": kills,
        "before": before,
        "after": after,
        "rss_kib_max": max(load.rss_samples),
    }
    print(f"\nload figures: {figures}")
    assert tally.unexpected == [], tally.unexpected[:20]
    assert load.errors == [], load.errors[:20]
    assert len(load.started) == shape.processes
    assert sum(tally.endings.values()) == shape.processes
    killed = tally.endings["killed-files"] + tally.endings["killed-heap"]
    assert kills == killed
    assert "unexpected error" not in log and "Traceback" not in log
    assert after["fds"] <= before["fds"], (before, after)
    assert after["rss_kib"] - before["rss_kib"] < 16 * 1024, (before, after)
    for name, w in stable_workloads.items():
        assert w.alive(), name
    return figures


@pytest.mark.parametrize(
    "shape",
    [pytest.param(SHORT, id="short"), pytest.param(FULL, id="full", marks=pytest.mark.slow)],
)
def test_load(daemon_factory, workload_binary, spawn, shape):
    daemon = daemon_factory("--log-level", "info")
    run_load(daemon, workload_binary, spawn, shape)
