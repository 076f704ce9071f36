"""8. Side by side with process-exporter: the same sleeping processes, scraped from both.

What a fleet pays per scrape for per-process metrics: restrackfs's `--metrics-listen`
endpoint against Debian's `prometheus-process-exporter` configured to report each of the
same processes on its own (a group per pid), in interleaved rounds.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import (
    Config,
    Daemon,
    Sleepers,
    StartedInWith,
    cpu_seconds,
    end_process,
    median,
    percentile,
    raise_limits,
)
from bench.report import Goal, GroupResult, Row

NAME = "exporter"
TITLE = "8. Scrape cost side by side: restrackfs and process-exporter"

EXPORTER = "prometheus-process-exporter"
RATIO_GOAL = 0.1  # restrackfs's CPU per scrape, as a share of process-exporter's
PER_PROCESS_STRETCH_US = 2.0
ENGINES = ("auto", "procfs")  # the default (bpf where it loads), and the polling engine
# One group per process: the same series per pid as restrackfs's, for the same processes
# (bench/c/sleepers.c's children and their parent, matched by comm).
EXPORTER_CONFIG = """\
process_names:
  - name: "{{.Comm}}:{{.PID}}"
    comm:
      - sleepers
"""
# (label, extra options): as installed, and its cheapest per-process configuration
EXPORTER_VARIANTS = (
    ("process-exporter", ()),
    ("process-exporter -gather-smaps=false -threads=false",
     ("-gather-smaps=false", "-threads=false")),
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_metrics(port: int, timeout: float = 120) -> bytes:
    """One scrape as Prometheus makes it, less compression: a fresh connection, GET, the
    whole body (no Accept-Encoding, so neither side spends CPU on gzip)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET /metrics on port {port}: {response.status}")
        return body
    finally:
        connection.close()


def sample_count(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))


@dataclass
class Target:
    """One scrape endpoint and the process whose CPU it costs."""

    label: str
    pid: int
    port: int
    cpu: list[float] = field(default_factory=list)  # seconds, one per scrape
    wall: list[float] = field(default_factory=list)
    samples: int = 0
    body_bytes: int = 0

    def scrape(self) -> None:
        before = cpu_seconds(self.pid)
        started = time.perf_counter()
        body = get_metrics(self.port)
        self.wall.append(time.perf_counter() - started)
        self.cpu.append(cpu_seconds(self.pid) - before)
        self.samples, self.body_bytes = sample_count(body), len(body)

    def cpu_per_scrape(self) -> float:
        """Total CPU over total scrapes: each delta is in clock ticks (10 ms), the sum is not."""
        return sum(self.cpu) / len(self.cpu)


class ProcessExporter(StartedInWith):
    """prometheus-process-exporter on 127.0.0.1, one group per matched process."""

    def __init__(self, work: Path, *options: str) -> None:
        self.work = work
        self.options = options
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix="process-exporter-", suffix=".log", dir=work)[1])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ProcessExporter:
        config = self.work / "process-exporter.yml"
        config.write_text(EXPORTER_CONFIG)
        argv = [EXPORTER, "-config.path", str(config), *self.options]
        argv += ["-web.listen-address", f"127.0.0.1:{self.port}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError, RuntimeError):
                get_metrics(self.port, timeout=30)
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{EXPORTER} did not serve: {self.log.read_text()[-500:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc, 10)
        self.proc = None


def endpoint_port(daemon: Daemon) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = re.search(r"metrics endpoint on http://127\.0\.0\.1:(\d+)/", daemon.log_text())
        if found:
            return int(found.group(1))
        time.sleep(0.02)
    raise RuntimeError("the daemon's log never gave the endpoint's port")


def measure_size(cfg: Config, helpers: dict[str, Path], size: int) -> list[Target]:
    """N sleepers registered with two fresh daemons (the default engine, and procfs) and
    one exporter per variant, scraped in interleaved rounds (each target once per round,
    the order rotated every round)."""
    available = shutil.which(EXPORTER) is not None
    with contextlib.ExitStack() as stack:
        sleepers = stack.enter_context(Sleepers(helpers["sleepers"], size))
        targets = []
        for engine in ENGINES:  # entered after the sleepers, so stopped before them
            daemon = stack.enter_context(
                Daemon(cfg.work, "--engine", engine, "--metrics-listen", "127.0.0.1:0")
            )
            for pid in sleepers.pids:
                daemon.register(pid)
            label = f"restrackfs ({daemon.read('engine').strip()})"
            targets.append(Target(label, daemon.pid, endpoint_port(daemon)))
        if available:
            for label, options in EXPORTER_VARIANTS:
                exporter = stack.enter_context(ProcessExporter(cfg.work, *options))
                targets.append(Target(label, exporter.pid, exporter.port))
        for target in targets:  # warm-up, untimed: first-scrape setup on both sides
            get_metrics(target.port)
        for round_ in range(cfg.exporter_scrapes):
            shift = round_ % len(targets)
            for target in targets[shift:] + targets[:shift]:
                target.scrape()
        return targets


def rows_of(size: int, targets: list[Target], reason: str) -> list[Row]:
    label = f"{size:,} processes"
    ours = [target for target in targets if target.label.startswith("restrackfs")]
    theirs = targets[len(ours) :]
    rows = []
    for target in targets:
        per_process_us = target.cpu_per_scrape() / size * 1e6
        rows += [
            Row(f"{target.label} CPU per scrape, {label}", target.cpu_per_scrape() * 1e3, "ms",
                f"{per_process_us:.1f} µs per process; {target.samples:,} samples,"
                f" {target.body_bytes / 1024:,.0f} KiB"),
            Row(f"{target.label} wall per scrape p50, {label}", median(target.wall) * 1e3, "ms",
                f"p90 {percentile(target.wall, 90) * 1e3:,.1f} ms"),
        ]  # fmt: skip
    if not theirs:
        for variant, _ in EXPORTER_VARIANTS:
            rows.append(Row(f"{variant} CPU per scrape, {label}", None, "ms", reason))
    for mine in ours:
        for other in theirs:
            rows.append(
                Row(f"{mine.label} / {other.label}, CPU per scrape, {label}",
                    mine.cpu_per_scrape() / other.cpu_per_scrape(), "x")
            )  # fmt: skip
    return rows


def run(cfg: Config, helpers: dict[str, Path]) -> GroupResult:
    result = GroupResult(NAME, TITLE)
    reason = raise_limits(max(cfg.exporter_sizes))
    if reason:
        raise RuntimeError(reason)
    missing = (
        ""
        if shutil.which(EXPORTER)
        else f"{EXPORTER} not installed" + (" (RESTRACK_SETUP_EXTRAS=bench scripts/setup)")
    )
    ratios: dict[int, float] = {}
    per_process: dict[int, float] = {}
    for size in cfg.exporter_sizes:
        targets = measure_size(cfg, helpers, size)
        result.rows += rows_of(size, targets, missing)
        default, as_installed = targets[0], targets[len(ENGINES) :][:1]
        per_process[size] = default.cpu_per_scrape() / size * 1e6
        if as_installed:
            ratios[size] = default.cpu_per_scrape() / as_installed[0].cpu_per_scrape()
    result.goals += goals(cfg, ratios, per_process, missing)
    result.plot = {"ratio": ratios, "per_process_us": per_process}
    result.method = method(cfg)
    return result


def goals(
    cfg: Config, ratios: dict[int, float], per_process: dict[int, float], missing: str
) -> list[Goal]:
    out = []
    quick = " (quick size)" if cfg.quick else ""
    for goal_n, size in zip((1000, 5000), cfg.exporter_sizes, strict=False):
        where = f"{size:,} processes{quick}"
        out.append(
            Goal(
                f"restrackfs CPU per scrape <= 0.1 x process-exporter's, {goal_n:,} processes",
                ratios.get(size),
                RATIO_GOAL,
                "x",
                where if size in ratios else missing,
            )
        )
    most = max(cfg.exporter_sizes)
    out.append(
        Goal(
            "stretch: restrackfs CPU per tracked process per scrape <= 2 µs, 5,000 processes",
            per_process.get(most),
            PER_PROCESS_STRETCH_US,
            "us",
            f"{most:,} processes{quick}",
        )
    )
    return out


def method(cfg: Config) -> str:
    sizes = " and ".join(f"{n:,}" for n in cfg.exporter_sizes)
    return f"""
For each size ({sizes}): bench/c/sleepers.c forks N children that only `pause()`;
two fresh restrackfs daemons (`--engine auto`, the default, which is bpf where it
loads, and `--engine procfs`; each with `--metrics-listen 127.0.0.1:0`) register every
one; Debian's {EXPORTER} runs with a config that names a group `{{{{.Comm}}}}:{{{{.PID}}}}`
for each process whose comm is `sleepers` (so each of the same N processes, and
their parent, is reported on its own), once as installed (smaps and per-thread
metrics on, its defaults) and once with `-gather-smaps=false -threads=false`. After
one untimed scrape of each, {cfg.exporter_scrapes} rounds scrape each endpoint once,
the order rotated every round: a fresh HTTP connection, `GET /metrics`, the whole
body read, without `Accept-Encoding` (no gzip on either side). CPU per scrape is
the serving process's utime + stime (/proc/PID/stat, every thread) across its
scrapes, summed over the rounds and divided by the scrapes; wall time is the
client's, request to last byte. The goals compare the default engine with
process-exporter as installed. The daemons are stopped before the sleepers.
"""
