"""The `metrics` file: Prometheus text exposition format 0.0.4.

Three parts, each a function of its own: the per-process gauges (labels `pid`,
`comm`, and `container` and `pod` where the process's cgroup named them at
registration), the enforcement counters, and the daemon's own series. Every
family has its HELP and TYPE lines, also when it has no sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from operator import attrgetter

from restrackfs.version import version
from tracker.engine.entry import Measurement
from tracker.linux.procfs import escape_unprintable
from tracker.quota import Action


def _tree(field: str) -> Callable[[Measurement], int | None]:
    get = attrgetter(field)
    return lambda m: None if m.tree is None else get(m.tree)


# Each gauge: its name, its help, and its value in a measurement (None: not shown).
_GAUGES: tuple[tuple[str, str, Callable[[Measurement], int | None]], ...] = (
    (
        "restrack_heap_bytes",
        "Heap bytes gained since registration or the last usage reset.",
        attrgetter("heapsize"),
    ),
    (
        "restrack_open_files",
        "Open file descriptors gained since registration or the last reset.",
        attrgetter("openfile_count"),
    ),
    (
        "restrack_heap_total_bytes",
        "Heap bytes now (VmData: the data segment and private mappings), whatever the baseline.",
        attrgetter("heap_total"),
    ),
    (
        "restrack_open_files_total",
        "Open file descriptors now, whatever the baseline (a gauge: the name is fixed"
        " by the interface).",
        attrgetter("openfile_total"),
    ),
    (
        "restrack_heap_peak_bytes",
        "Highest heap bytes gained since registration or the last usage reset"
        " (sampled at each read and check under procfs).",
        attrgetter("heap_peak"),
    ),
    (
        "restrack_open_files_peak",
        "Highest open file descriptors gained since registration or the last usage reset"
        " (sampled at each read and check under procfs).",
        attrgetter("openfile_peak"),
    ),
    (
        "restrack_heap_quota_bytes",
        "Heap quota in bytes (present only when set).",
        attrgetter("quota.heap"),
    ),
    (
        "restrack_open_files_quota",
        "Open file quota (present only when set).",
        attrgetter("quota.files"),
    ),
    (
        "restrack_tree_heap_bytes",
        "A tree quota's heap: its members' heap bytes summed, over the root's baseline"
        " (present only while a tree quota is set; labels of its root).",
        _tree("tree_heapsize"),
    ),
    (
        "restrack_tree_open_files",
        "A tree quota's open file descriptors summed over its members, over the root's"
        " baseline (present only while a tree quota is set).",
        _tree("tree_openfile_count"),
    ),
    (
        "restrack_tree_members",
        "A tree quota's live members, its root included (present only while one is set).",
        _tree("members"),
    ),
)


@dataclass(slots=True)
class DaemonStats:
    """What the daemon counts of itself for its metrics (one daemon a process)."""

    quota_writes_refused: int = 0  # writes to a `quota` file answered with an errno
    render_seconds: float = 0.0  # the time the previous exposition took, measuring included


def _escape(value: str) -> str:
    """A label value by the exposition format's rules (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _comm_label(comm: str) -> str:
    return _escape(escape_unprintable(comm))


def process_labels(m: Measurement) -> str:
    """`pid`, `comm`, then `container` and `pod` where the cgroup named them: a
    `comm` label's value is the name itself, but for its unprintable characters,
    written `\\xHH`... (the format's own escapes cover only backslash, quote and
    newline), then escaped by the format's rules. Container ids and pod UIDs are
    hex and dashes, as `tracker.linux.cgroup` matched them."""
    labels = f'pid="{m.pid}",comm="{_comm_label(m.comm)}"'
    container, pod = m.workload
    if container is not None:
        labels += f',container="{container}"'
    if pod is not None:
        labels += f',pod="{pod}"'
    return labels


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def process_lines(rows: list[tuple[str, Measurement]]) -> list[str]:
    """The per-process gauges, one family after the other."""
    lines: list[str] = []
    for name, help_text, value in _GAUGES:
        lines += _family(name, "gauge", help_text)
        for labels, m in rows:
            v = value(m)
            if v is not None:
                lines.append(f"{name}{{{labels}}} {v}")
    return lines


def enforcement_lines(enforcements: Mapping[Action, int]) -> list[str]:
    lines = _family(
        "restrack_enforcements_total",
        "counter",
        "Quota enforcement actions taken since the daemon started, by action.",
    )
    lines += [f'restrack_enforcements_total{{action="{a}"}} {enforcements[a]}' for a in Action]
    return lines


def daemon_lines(
    tracked: int, engine: str | None, events_dropped: int | None, stats: DaemonStats
) -> list[str]:
    """The daemon's own series. The dropped-events counter is 0 under procfs,
    which queues no kernel events, so the series exists under every engine."""
    lines = _family("restrack_tracked_processes", "gauge", "Processes currently tracked.")
    lines.append(f"restrack_tracked_processes {tracked}")
    if engine is not None:
        lines += _family(
            "restrack_engine_info", "gauge", "The engine watching quotas (bpf or procfs)."
        )
        lines.append(f'restrack_engine_info{{engine="{_escape(engine)}"}} 1')
    lines += _family("restrack_build_info", "gauge", "The daemon's version; always 1.")
    lines.append(f'restrack_build_info{{version="{_escape(version())}"}} 1')
    lines += _family(
        "restrack_up", "gauge", "Always 1: the daemon answered (Prometheus's own up is 0 if not)."
    )
    lines.append("restrack_up 1")
    lines += _family(
        "restrack_kernel_events_dropped_total",
        "counter",
        "Events the bpf engine's kernel ring could not take (their counts were taken from"
        " the map instead); coalesced events lose nothing; always 0 under procfs.",
    )
    lines.append(f"restrack_kernel_events_dropped_total {events_dropped or 0}")
    lines += _family(
        "restrack_quota_writes_refused_total",
        "counter",
        "Writes to a quota file answered with an errno (malformed, not permitted, busy...).",
    )
    lines.append(f"restrack_quota_writes_refused_total {stats.quota_writes_refused}")
    lines += _family(
        "restrack_exposition_render_seconds",
        "gauge",
        "Time the previous exposition took the daemon, its processes' reads included.",
    )
    lines.append(f"restrack_exposition_render_seconds {stats.render_seconds:.6f}")
    return lines


def render(
    measurements: Iterable[Measurement],
    enforcements: Mapping[Action, int],
    engine: str | None = None,
    events_dropped: int | None = None,
    stats: DaemonStats | None = None,
) -> str:
    """The exposition: the processes' gauges, the enforcements, the daemon's own."""
    rows = [(process_labels(m), m) for m in measurements]
    lines = process_lines(rows)
    lines += enforcement_lines(enforcements)
    lines += daemon_lines(len(rows), engine, events_dropped, stats or DaemonStats())
    return "\n".join(lines) + "\n"


def render_process_enforcements(series: Mapping[tuple[str, str, str, str, str], int]) -> str:
    """`restrack_process_enforcements_total`: enforcement records by (action, quota,
    comm, container, pod), no pid, so a series outlives its process (for alerts);
    the container and pod labels only where they were found (empty: none)."""
    lines = [
        "# HELP restrack_process_enforcements_total Enforcement actions recorded, by action,"
        " quota, process name, container and pod (no pid: outlives the process).",
        "# TYPE restrack_process_enforcements_total counter",
    ]
    for (action, quota, comm, container, pod), count in sorted(series.items()):
        labels = f'action="{_escape(action)}",quota="{_escape(quota)}",comm="{_comm_label(comm)}"'
        labels += f',container="{_escape(container)}"' if container else ""
        labels += f',pod="{_escape(pod)}"' if pod else ""
        lines.append(f"restrack_process_enforcements_total{{{labels}}} {count}")
    return "\n".join(lines) + "\n"
