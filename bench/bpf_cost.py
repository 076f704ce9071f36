"""What the BPF engine costs and how tightly it holds, on the real kernel.

    .venv/bin/python -m bench.bpf_cost [--rounds N] [--json FILE]

1. Per-syscall cost for a process the engine does not watch (every process on
   the machine pays it while the programs are attached), detached vs attached,
   rounds alternating so load from others hits both alike; and the same for a
   watched process (the tracked workload's overhead).
2. Per growth path, with a 64 MiB heap quota or a quota of 100 descriptors:
   the overshoot at the kill (usage - limit, from the kernel's event), and the
   time from the start of the crossing call to the death seen on a pidfd.
Root and a kernel that loads tracker/backends/bpf are required.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import ROOT, MiB, status_kib, wait_dead
from tracker.backends.bpf import loader
from tracker.backends.bpf.loader import KernelWatch, Kind
from tracker.linux import procfs

PAGE = 4096
SETTLE_S = 1.0
OPS = {"getppid": 2_000_000, "mmap": 100_000, "open": 400_000}  # iterations per run
PATHS = [  # (grow mode, step, count, which)
    ("mmap", MiB, 300, "heap"),
    ("touch", MiB, 300, "heap"),
    ("brk", MiB, 300, "heap"),
    ("mprotect", MiB, 300, "heap"),
    ("thread", MiB, 300, "heap"),
    ("populate", 512 * MiB, 1, "heap"),
    ("open", 0, 300, "files"),
    ("socket", 0, 300, "files"),
    ("pipe", 0, 300, "files"),
    ("dup", 0, 300, "files"),
    # the ways around a per-call hook: ia32 calls, a sharer of the address space or
    # table, io_uring work completed by a worker or the SQ thread, batches
    ("ia32mmap", MiB, 300, "heap"),
    ("ia32brk", MiB, 300, "heap"),
    ("vmshare", MiB, 300, "heap"),
    ("vfork", MiB, 300, "heap"),
    ("ia32dup", 0, 300, "files"),
    ("ia32open", 0, 300, "files"),
    ("filesshare", 0, 300, "files"),
    ("uring_async", 0, 300, "files"),
    ("uring_sqpoll", 0, 300, "files"),
    ("recvmsg_batch", 250, 3, "files"),
    ("uring_batch", 300, 3, "files"),
]
BATCHES = frozenset({"recvmsg_batch", "uring_batch"})  # STEP descriptors in one call


def request_of(mode: str, step: int, which: str) -> float:
    """One call's request on a path: MiB for heap paths, descriptors for the others."""
    if which == "heap":
        return step / MiB
    return step if mode in BATCHES else 2 if mode == "pipe" else 1


def compile_helpers(into: Path) -> dict[str, Path]:
    sources = {"syscost": ROOT / "bench/c/syscost.c", "grow": ROOT / "tests/support/c/grow.c"}
    for name, source in sources.items():
        subprocess.run(["gcc", "-O2", "-pthread", "-o", into / name, source], check=True)
    return {name: into / name for name in sources}


def syscost(binary: Path, op: str, watch: Callable[[int], None] | None = None) -> float:
    """ns per op in a fresh process; `watch` is called with its pid before it starts."""
    argv = [str(binary), op, str(OPS[op])] + (["wait"] if watch else [])
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin and proc.stdout
    if watch:
        watch(int(proc.stdout.readline()))
        proc.stdin.write("go\n")
        proc.stdin.flush()
    out, _ = proc.communicate()
    return float(out)


class SysExitProbe:
    """bench/bpf/sys_exit_probe.bpf.c on tp_btf/sys_exit: the single-hook alternative."""

    def __init__(self, into: Path) -> None:
        obj = into / "sys_exit_probe.bpf.o"
        include = f"-I/usr/include/{os.uname().machine}-linux-gnu"
        source = ROOT / "bench/bpf/sys_exit_probe.bpf.c"
        subprocess.run(["clang", "-O2", "-g", "-target", "bpf", include, "-c", source, "-o", obj],
                       check=True)  # fmt: skip
        self._lib = loader.library()
        self._obj = self._lib.bpf_object__open_file(str(obj).encode(), None)
        if not self._obj or self._lib.bpf_object__load(self._obj):
            raise RuntimeError("sys_exit_probe does not load")
        self._prog = self._lib.bpf_object__find_program_by_name(self._obj, b"sys_exit_probe")
        self._link = 0

    def attach(self, on: bool) -> None:
        if on and not self._link:
            self._link = self._lib.bpf_program__attach(self._prog)
        elif not on and self._link:
            self._lib.bpf_link__destroy(self._link)
            self._link = 0

    def close(self) -> None:
        self.attach(False)
        self._lib.bpf_object__close(self._obj)


def per_syscall_cost(
    kwatch: KernelWatch, binary: Path, rounds: int, probe: SysExitProbe | None
) -> dict[str, object]:
    """min and median ns per op: detached, attached (a process not watched: what
    every process pays), watched (the tracked workload), and with --compare the
    single tp_btf/sys_exit hook alone."""
    runs: dict[str, dict[str, list[float]]] = {op: {} for op in OPS}

    def watched(pid: int) -> None:
        kwatch.watch(pid, procfs.read_start_time(pid), 1 << 40, 1 << 30, "notify")

    states = ["detached", "attached"] + (["tp_btf/sys_exit"] if probe else [])
    for _ in range(rounds):
        for state in states:
            kwatch.attach() if state == "attached" else kwatch.detach()
            if probe:
                probe.attach(state == "tp_btf/sys_exit")
            time.sleep(SETTLE_S)  # let the RCU work of (de)registration finish first
            for op in OPS:
                runs[op].setdefault(state, []).append(syscost(binary, op))
                if state == "attached":
                    runs[op].setdefault("watched", []).append(syscost(binary, op, watched))
    return {
        op: {state: {"min": min(v), "median": statistics.median(v)} for state, v in by.items()}
        for op, by in runs.items()
    }


def run_grower(grow: Path, mode: str, step: int, count: int, stamp: Path,
               arm: Callable[[int], None]) -> tuple[int, int, int, str]:  # fmt: skip
    """tests/support/c/grow.c under a quota: start it, `arm(pid)` (set the quota), let it grow
    until it dies. (pid, start of its last call, its death seen on a pidfd (monotonic ns),
    its output: "step" lines, then its reaper's "end SIGNAL MAXRSS_KIB")."""
    env = {**os.environ, "GROW_STAMP": str(stamp)}
    argv = [str(grow), mode, str(step), str(count)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdin and proc.stdout
    pid = int(proc.stdout.readline().split()[1])
    pidfd = os.pidfd_open(pid)
    try:
        arm(pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        dead = wait_dead(pidfd, 30) or time.monotonic_ns()
        last_call = int.from_bytes(stamp.read_bytes()[:8], "little")
        out, _ = proc.communicate(timeout=30)
    finally:
        os.close(pidfd)
        proc.kill()
    return pid, last_call, dead, out


def one_kill(kwatch: KernelWatch, grow: Path, mode: str, step: int, count: int, which: str,
             stamp: Path) -> dict[str, float]:  # fmt: skip
    """Overshoot (KiB or fds) and crossing-to-death ms for one grower."""

    def arm(pid: int) -> None:
        if which == "heap":
            vm_data = status_kib(pid, "VmData") * 1024 // PAGE
            kwatch.watch(pid, procfs.read_start_time(pid), vm_data + 64 * MiB // PAGE, None, "kill")
        else:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            kwatch.watch(pid, procfs.read_start_time(pid), None, fds + 100, "kill")

    pid, started, dead, out = run_grower(grow, mode, step, count, stamp, arm)
    maxrss_kib = int(next(line for line in out.splitlines() if line.startswith("end ")).split()[2])
    killed = [e for e in kwatch.drain() if e.tgid == pid and e.kind == Kind.KILLED]
    over = killed[0].usage - killed[0].limit if killed else float("nan")
    return {
        "overshoot": over * PAGE / 1024 if which == "heap" else over,
        "kill_us": (killed[0].time_ns - started) / 1e3 if killed else float("nan"),
        "death_ms": (dead - started) / 1e6,
        "maxrss_mib": maxrss_kib / 1024,
    }


def enforcement(kwatch: KernelWatch, grow: Path, rounds: int, tmp: Path) -> dict[str, object]:
    kwatch.attach()
    results: dict[str, object] = {}
    for mode, step, count, which in PATHS:
        runs = [one_kill(kwatch, grow, mode, step, count, which, tmp / "stamp")
                for _ in range(rounds)]  # fmt: skip
        results[mode] = {
            "unit": "KiB" if which == "heap" else "fds",
            "overshoot_max": max(r["overshoot"] for r in runs),
            "kill_us_median": statistics.median(r["kill_us"] for r in runs),
            "kill_us_max": max(r["kill_us"] for r in runs),
            "death_ms_median": statistics.median(r["death_ms"] for r in runs),
            "death_ms_max": max(r["death_ms"] for r in runs),
            "maxrss_mib_max": max(r["maxrss_mib"] for r in runs),
        }
    return results


def report(costs: dict[str, object], kills: dict[str, object]) -> str:
    states = list(next(iter(costs.values())))
    lines = ["per-syscall ns, min/median over rounds: " + ", ".join(states)]
    for op, by in costs.items():
        cells = [f"{by[s]['min']:6.0f}/{by[s]['median']:<6.0f}" for s in states]
        lines.append(f"  {op:<8} {'  '.join(cells)}")
    if not kills:
        return "\n".join(lines)
    lines.append("kill at 64 MiB / 100 fds: overshoot (max); from the crossing call's start:")
    lines.append("  to SIGKILL us (median/max), to death on a pidfd ms (median/max); max RSS MiB")
    for mode, r in kills.items():
        lines.append(
            f"  {mode:<10} {r['overshoot_max']:8.0f} {r['unit']:<4}"
            f" {r['kill_us_median']:8.1f}/{r['kill_us_max']:<8.1f}"
            f" {r['death_ms_median']:7.3f}/{r['death_ms_max']:<7.3f} {r['maxrss_mib_max']:6.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="cost rounds (kills: 3 each)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--compare", action="store_true",
                        help="also price a single tp_btf/sys_exit hook (needs clang)")  # fmt: skip
    parser.add_argument("--no-kills", action="store_true", help="costs only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        binaries = compile_helpers(Path(tmp))
        kwatch = KernelWatch.open(Path(f"/sys/fs/bpf/restrackfs-bench-{os.getpid()}"))
        probe = SysExitProbe(Path(tmp)) if args.compare else None
        try:
            costs = per_syscall_cost(kwatch, binaries["syscost"], args.rounds, probe)
            kills = {} if args.no_kills else enforcement(kwatch, binaries["grow"], 3, Path(tmp))
        finally:
            kwatch.close(unpin=True)
            if probe:
                probe.close()
    print(report(costs, kills))
    if args.json:
        args.json.write_text(json.dumps({"syscall_ns": costs, "kill": kills}, indent=2))


if __name__ == "__main__":
    main()
