"""7. Write latency of the commands: a quota set and reset, with and without deny's limit work.

A quota write in deny mode returns only once the kernel shows the new soft
limit, and a reset only once the process's own limit is back; for another
user's process, where the daemon lacks CAP_SYS_RESOURCE, each of those is a
`setpriv … prlimit` helper. These figures show what a writer waits for.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Config, Daemon, percentile
from bench.report import Goal, GroupResult, Row

NAME = "writes"
TITLE = "7. Command write latency (quota and reset)"

ROOT_UID = 0
NOBODY = 65534
ITERATIONS = 200  # quota + reset pairs per scenario, over ROUNDS rounds
QUICK_ITERATIONS = 20
ROUNDS = 4
WARMUP = 5  # pairs per round not counted: the first lookups of a fresh timer process
CAP_SYS_RESOURCE = 24


@dataclass(frozen=True)
class Scenario:
    """Who writes which quota to a process of their own."""

    label: str
    quota: str
    uid: int


KILL_AS_ROOT = Scenario("kill, root", "files=100 action=kill", ROOT_UID)
DENY_AS_ROOT = Scenario("deny, root", "files=100 action=deny", ROOT_UID)
DENY_AS_USER = Scenario(f"deny, uid {NOBODY}", "files=100 action=deny", NOBODY)
SCENARIOS = (KILL_AS_ROOT, DENY_AS_ROOT, DENY_AS_USER)

# Runs as the scenario's uid: a process of its own, so each write takes the path that
# user's writes take. Prints {"quota": [ns...], "reset": [ns...]} for the counted pairs.
TIMER = """
import json, os, sys, time
mount, pid, quota, count, warmup = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:6])
def write(path, text):
    start = time.perf_counter_ns()
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)
    return time.perf_counter_ns() - start
if not os.path.isdir(os.path.join(mount, pid)):
    write(os.path.join(mount, "register"), pid.encode() + b"\\n")
took = {"quota": [], "reset": []}
for i in range(warmup + count):
    q = write(os.path.join(mount, pid, "quota"), quota.encode() + b"\\n")
    r = write(os.path.join(mount, pid, "reset"), b"quota\\n")
    if i >= warmup:
        took["quota"].append(q)
        took["reset"].append(r)
print(json.dumps(took))
"""


def timer_python() -> str:
    """An interpreter every uid may run (a venv under /root is closed to nobody)."""
    system = Path("/usr/bin/python3")
    return str(system) if system.exists() else sys.executable


def as_uid(uid: int, argv: list[str]) -> list[str]:
    if uid == ROOT_UID:
        return argv
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


def real_uid(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return int(line.split()[1])


@contextmanager
def target(uid: int) -> Iterator[int]:
    """A sleeping process of `uid`'s, its pid once it runs as that uid; killed on exit."""
    proc = subprocess.Popen(as_uid(uid, ["sleep", "3600"]), stdin=subprocess.DEVNULL, cwd="/")
    try:
        deadline = time.monotonic() + 10
        while real_uid(proc.pid) != uid:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the target of uid {uid} did not start")
            time.sleep(0.005)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@dataclass
class Latencies:
    """Each counted write's wall time, in µs, by what was written."""

    quota: list[float] = field(default_factory=list)
    reset: list[float] = field(default_factory=list)

    @property
    def pair(self) -> list[float]:
        return [q + r for q, r in zip(self.quota, self.reset, strict=True)]

    def by_write(self) -> dict[str, list[float]]:
        return {"quota": self.quota, "reset": self.reset, "quota + reset": self.pair}


def time_writes(daemon: Daemon, scenario: Scenario, pid: int, count: int) -> Latencies:
    """`count` quota + reset pairs written by the scenario's uid to `pid`, timed."""
    argv = [timer_python(), "-c", TIMER, str(daemon.mountpoint), str(pid), scenario.quota]
    argv += [str(count), str(WARMUP)]
    done = subprocess.run(
        as_uid(scenario.uid, argv), capture_output=True, text=True, cwd="/", timeout=300
    )
    if done.returncode != 0:
        raise RuntimeError(f"{scenario.label}: the timer failed: {done.stderr.strip()[-500:]}")
    took = json.loads(done.stdout)
    return Latencies([ns / 1000 for ns in took["quota"]], [ns / 1000 for ns in took["reset"]])


def measure(daemon: Daemon, iterations: int = ITERATIONS) -> dict[str, Latencies]:
    """Every scenario against one daemon, in ROUNDS rounds of rotated order (drift
    over the run falls on every scenario alike); {label: latencies}."""
    per_round = max(1, iterations // ROUNDS)
    measured = {scenario.label: Latencies() for scenario in SCENARIOS}
    with target(ROOT_UID) as root_pid, target(NOBODY) as user_pid:
        pids = {ROOT_UID: root_pid, NOBODY: user_pid}
        for index in range(ROUNDS):
            order = SCENARIOS[index % len(SCENARIOS) :] + SCENARIOS[: index % len(SCENARIOS)]
            for scenario in order:
                took = time_writes(daemon, scenario, pids[scenario.uid], per_round)
                measured[scenario.label].quota += took.quota
                measured[scenario.label].reset += took.reset
    return measured


def daemon_has_cap_sys_resource(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    effective = status.split("CapEff:")[1].split()[0]
    return bool(int(effective, 16) & (1 << CAP_SYS_RESOURCE))


def run(cfg: Config, helpers: dict[str, Path]) -> GroupResult:
    result = GroupResult(NAME, TITLE)
    if shutil.which("setpriv") is None:
        result.error = "setpriv not installed (util-linux): no write as another uid"
        return result
    iterations = QUICK_ITERATIONS if cfg.quick else ITERATIONS
    with Daemon(cfg.work) as daemon:
        helper_runs = not daemon_has_cap_sys_resource(daemon.pid)
        measured = measure(daemon, iterations)
    result.rows = rows(measured, helper_runs)
    result.goals = goals(measured)
    result.method = method(iterations, helper_runs)
    return result


def rows(measured: dict[str, Latencies], helper_runs: bool) -> list[Row]:
    """p50 and p99 of each write of each scenario, and of the two together."""
    out = []
    for scenario in SCENARIOS:
        latencies = measured[scenario.label]
        note = f"n={len(latencies.quota)}"
        if scenario is DENY_AS_USER:
            note += "; through setpriv … prlimit helpers" if helper_runs else "; no helper"
        for write, took in latencies.by_write().items():
            for q in (50, 99):
                figure = f"{scenario.label}: {write} p{q}"
                out.append(Row(figure, percentile(took, q), "us", note))
    return out


def goals(measured: dict[str, Latencies]) -> list[Goal]:
    """Deny's limit work without a helper (prlimit and a few /proc reads, no process
    started) keeps a root writer within a small multiple of kill mode's bare write."""
    kill = percentile(measured[KILL_AS_ROOT.label].pair, 50)
    deny = percentile(measured[DENY_AS_ROOT.label].pair, 50)
    return [
        Goal(
            "quota + reset p50, deny as root <= 3.0 x kill as root",
            deny / kill,
            3.0,
            "x",
            f"{deny:.0f} µs vs {kill:.0f} µs",
        )
    ]


def method(iterations: int, helper_runs: bool) -> str:
    helper = (
        "the daemon lacks CAP_SYS_RESOURCE here, so each of that user's deny writes"
        " waits for a `setpriv … prlimit` helper"
        if helper_runs
        else "the daemon has CAP_SYS_RESOURCE here, so no helper runs"
    )
    return f"""
One daemon (engine procfs). A timer process of the writer's uid (root, or uid
{NOBODY} through setpriv) writes a quota to `PID/quota` of a sleeping process
of the same uid, then `quota` to `PID/reset`, {iterations} times, each write an
os.open + os.write + os.close timed with perf_counter_ns; {WARMUP} pairs per
timer process go uncounted. Scenarios: `files=100 action=kill` as root (no
limit work), `files=100 action=deny` as root (the daemon sets the soft limit
itself), and the deny quota as uid {NOBODY} ({helper}). The pairs run in
{ROUNDS} rounds with the scenario order rotated, so drift falls on all alike.
"""
