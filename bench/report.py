"""Results, goals and their rendering: the stdout table, docs/benchmarks.md, the plot."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import ROOT

UNITS = {
    "us": "µs",
    "ms": "ms",
    "s": "s",
    "x": "×",
    "%": "%",
    "MB": "MB",
    "/s": "reads/s",
    "req": "requests",
    "ns": "ns",
    "KiB": "KiB",
    "MiB": "MiB",
    "fds": "fds",
    "": "",
}


@dataclass
class Row:
    """One figure of the table; `value` None means unavailable, `note` says why."""

    figure: str
    value: float | None
    unit: str = ""
    note: str = ""

    def formatted(self) -> str:
        if self.value is None:
            return "unavailable"
        return f"{format_number(self.value, self.unit)} {UNITS[self.unit]}".strip()


@dataclass
class Goal:
    """A goal the project set itself, checked against one figure of this run."""

    text: str  # what the goal asks, e.g. "read p50 of PID/heapsize <= 1.0 x lxcfs uptime"
    value: float | None  # the measured figure, in `unit`
    limit: float
    unit: str
    where: str = ""  # the configuration it was measured in, or why it was not
    stretch: float | None = None

    @property
    def status(self) -> str:
        if self.value is None:
            return "n/a"
        if self.stretch is not None and self.value <= self.stretch:
            return "pass (stretch)"
        return "pass" if self.value <= self.limit else "miss"

    def line(self) -> str:
        measured = (
            "not measured"
            if self.value is None
            else f"{format_number(self.value, self.unit)} {UNITS[self.unit]}".strip()
        )
        where = f" ({self.where})" if self.where else ""
        return f"{self.status.upper():<14} {self.text}: {measured}{where}"


@dataclass
class GroupResult:
    name: str  # the --only name
    title: str
    rows: list[Row] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    method: str = ""
    plot: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


def format_number(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}"
    if unit in ("%",):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    if unit == "req":
        return f"{value:.2f}"
    if unit == "s":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


# ----- the machine -------------------------------------------------------


def _run(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (done.stdout.strip() or done.stderr.strip()) if done.returncode == 0 else ""
    return text.splitlines()[0] if text else ""


def _revision() -> str:
    """The commit of the code under test, and whether restrackfs/ or tracker/ differ from it."""
    commit = _run("git", "rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    changed = _run("git", "status", "--porcelain", "--", "restrackfs", "tracker")
    dirty = " + uncommitted changes in restrackfs/ or tracker/" if changed else ""
    return f"git {commit}{dirty}"


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    lxcfs = shutil.which("lxcfs")
    return {
        "kernel": _run("uname", "-r") or platform.release(),
        "CPU": cpu,
        "cores (nproc)": _run("nproc") or str(os.cpu_count()),
        "memory": _meminfo(),
        "Python": platform.python_version(),
        "pyfuse3": _pyfuse3_version(),
        "restrackfs": _revision(),
        "lxcfs": (_run(lxcfs, "--version").strip('"') or "installed") if lxcfs else "not installed",
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def _pyfuse3_version() -> str:
    """`3.5.0+restrack.<hash>` is the build of scripts/setup with patches/ applied."""
    from importlib import metadata

    try:
        version = metadata.version("pyfuse3")
    except metadata.PackageNotFoundError:
        return "not installed"
    return f"{version} (patched: patches/)" if "+restrack." in version else version


def busy_share(seconds: float = 1.0) -> float:
    """How busy the whole machine is (0-1 over all cores), from /proc/stat over `seconds`."""
    import time

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def _meminfo() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    return "unknown"


# ----- text -----------------------------------------------------------------


def table(results: list[GroupResult]) -> str:
    lines = []
    width = max(
        [len(row.figure) for result in results for row in result.rows] + [20],
    )
    for result in results:
        lines.append(f"{result.title}  ({result.seconds:.0f} s)")
        if result.error:
            lines.append(f"  error: {result.error}")
        for row in result.rows:
            note = f"  {row.note}" if row.note else ""
            lines.append(f"  {row.figure:<{width}}  {row.formatted():>16}{note}")
        lines.append("")
    return "\n".join(lines)


def goal_lines(results: list[GroupResult]) -> list[str]:
    return [goal.line() for result in results for goal in result.goals]


LEVERS = Path(__file__).resolve().parent / "levers.md"


def markdown(
    results: list[GroupResult],
    info: dict[str, str],
    *,
    quick: bool,
    plot: str | None,
    plot_note: str,
    argv: list[str],
    seconds: float,
) -> str:
    out = ["# Benchmarks", ""]
    out.append(
        "Written by `scripts/bench` (the `bench/` package; see the README's *Benchmarks*"
        " section). Every figure below was measured in this one run: latencies are"
        " percentiles, comparisons are ratios between things measured side by side in"
        " the same run, CPU is a share of one core over a measured window. Do not"
        " compare absolute numbers with another run's; rerun the suite instead."
    )
    out.append("")
    if quick:
        out += ["**Quick run (`--quick`): tiny sizes, for the smoke test only.**", ""]
    out += ["## Machine", "", "| | |", "|---|---|"]
    for key, value in info.items():
        out.append(f"| {key} | {value} |")
    command = " ".join(["scripts/bench", *argv])
    out.append(f"| command | `{command}` |")
    out.append(f"| run time | {seconds:.0f} s |")
    out += ["", "## Goals", "", "```"]
    out += goal_lines(results) or ["(no goal measured in this run)"]
    out += ["```", ""]
    if plot:
        out += [f"![benchmark plot]({plot})", ""]
    elif plot_note:
        out += [f"(No plot: {plot_note}.)", ""]
    out += ["## Results", ""]
    for result in results:
        out += [f"### {result.title}", ""]
        if result.error:
            out += [f"**Error:** `{result.error}`", ""]
        if result.rows:
            out += ["| figure | value | note |", "|---|---:|---|"]
            for row in result.rows:
                out.append(f"| {row.figure} | {row.formatted()} | {row.note} |")
            out.append("")
        if result.method:
            out += ["How it is measured: " + " ".join(result.method.split()), ""]
        out += [f"(group run time {result.seconds:.0f} s)", ""]
    if LEVERS.exists():  # what was changed for speed, measured A/B when it was changed
        out += ["", LEVERS.read_text().strip(), ""]
    return "\n".join(out)


# ----- the plot --------------------------------------------------------------


def plot(results: list[GroupResult], path: Path, title: str) -> str | None:
    """Write the PNG; the reason if it cannot be drawn (no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (RESTRACK_SETUP_EXTRAS=bench scripts/setup)"
    data = {result.name: result.plot for result in results}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    fig.suptitle(title, fontsize=11)
    _plot_latency(axes[0][0], data.get("latency"))
    _plot_throughput(axes[0][1], data.get("throughput"))
    _plot_kill(axes[1][0], data.get("enforcement"))
    _plot_cpu(axes[1][1], data.get("enforcement"), data.get("scale"))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def _not_run(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}: not run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _label(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    """The axes' labels and title, the legend and the grid every panel has."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def _plot_latency(ax: Any, data: dict[str, Any] | None) -> None:
    if not data or not data.get("latencies"):
        _not_run(ax, "read latency")
        return
    for label, values in data["latencies"].items():
        ordered = sorted(values)
        n = len(ordered)
        ax.plot(
            [v / 1000 for v in ordered],
            [(i + 1) / n * 100 for i in range(n)],
            label=label,
        )
    ax.set_xscale("log")
    ax.axhline(50, color="grey", lw=0.5, ls=":")
    ax.axhline(99, color="grey", lw=0.5, ls=":")
    _label(
        ax,
        "open + read + close latency (µs, log)",
        "percentile",
        "1. Read latency (CDF, interleaved rounds)",
    )


def _plot_throughput(ax: Any, data: dict[str, Any] | None) -> None:
    if not data or not data.get("throughput"):
        _not_run(ax, "read throughput")
        return
    for label, points in data["throughput"].items():
        readers = sorted(points)
        ax.plot(readers, [points[k] for k in readers], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({k for points in data["throughput"].values() for k in points})
    ax.set_xticks(ticks, [str(k) for k in ticks])
    _label(ax, "concurrent reader processes", "reads per second (log)", "2. Read throughput")


def _plot_kill(ax: Any, data: dict[str, Any] | None) -> None:
    if not data or not data.get("kill"):
        _not_run(ax, "enforcement latency")
        return
    for interval, cells in sorted(data["kill"].items()):
        ns = sorted(cells)
        (line,) = ax.plot(
            ns, [cells[n][0] for n in ns], marker="o", label=f"p50, --interval {interval}"
        )
        ax.plot(
            ns,
            [cells[n][1] for n in ns],
            marker="^",
            ls="--",
            color=line.get_color(),
            label=f"p99, --interval {interval}",
        )
        ax.axhline(2 * interval, color=line.get_color(), lw=0.8, ls=":")
    ax.set_xscale("log")
    _label(
        ax,
        "processes under quota",
        "crossing -> death (ms); dotted: 2 × interval",
        "3. Kill latency",
    )


def _plot_cpu(ax: Any, enforcement: dict[str, Any] | None, scale: dict[str, Any] | None) -> None:
    plotted = False
    floor = 0.05  # a log axis has no zero: smaller values are drawn at the floor
    if enforcement and enforcement.get("cpu"):
        for interval, cells in sorted(enforcement["cpu"].items()):
            ns = sorted(cells)
            ax.plot(
                ns,
                [max(cells[n], floor) for n in ns],
                marker="o",
                label=f"under kill quota, --interval {interval}",
            )
            plotted = True
    if scale and scale.get("idle_cpu"):
        points = scale["idle_cpu"]
        ns = sorted(points)
        ax.plot(
            ns,
            [max(points[n], floor) for n in ns],
            marker="s",
            label="tracked, no quota, nobody reading",
        )
        plotted = True
    if not plotted:
        _not_run(ax, "daemon CPU")
        return
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 1.5)
    ax.set_xscale("log")
    _label(
        ax,
        "tracked processes",
        f"daemon CPU, % of one core (log; < {floor} drawn at {floor})",
        "Daemon CPU with nobody reading (dotted: 1 % goal)",
    )
