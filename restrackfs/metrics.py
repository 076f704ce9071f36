"""The `metrics` file: Prometheus text exposition format 0.0.4."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from tracker.engine.entry import Measurement
from tracker.linux.procfs import escape_unprintable

# Each gauge: its name, its help, and its value in a measurement (None: not shown).
_GAUGES: tuple[tuple[str, str, Callable[[Measurement], int | None]], ...] = (
    (
        "restrack_heap_bytes",
        "Heap bytes gained since registration or the last usage reset.",
        lambda m: m.heapsize,
    ),
    (
        "restrack_open_files",
        "Open file descriptors gained since registration or the last reset.",
        lambda m: m.openfile_count,
    ),
    (
        "restrack_heap_peak_bytes",
        "Highest heap bytes gained since registration or the last usage reset"
        " (sampled at each read and check under procfs).",
        lambda m: m.heap_peak,
    ),
    (
        "restrack_open_files_peak",
        "Highest open file descriptors gained since registration or the last usage reset"
        " (sampled at each read and check under procfs).",
        lambda m: m.openfile_peak,
    ),
    (
        "restrack_heap_quota_bytes",
        "Heap quota in bytes (present only when set).",
        lambda m: m.quota.heap,
    ),
    (
        "restrack_open_files_quota",
        "Open file quota (present only when set).",
        lambda m: m.quota.files,
    ),
    (
        "restrack_tree_heap_bytes",
        "A tree quota's heap: its members' heap bytes summed, over the root's baseline"
        " (present only while a tree quota is set; labels of its root).",
        lambda m: None if m.tree is None else m.tree.tree_heapsize,
    ),
    (
        "restrack_tree_open_files",
        "A tree quota's open file descriptors summed over its members, over the root's"
        " baseline (present only while a tree quota is set).",
        lambda m: None if m.tree is None else m.tree.tree_openfile_count,
    ),
    (
        "restrack_tree_members",
        "A tree quota's live members, its root included (present only while one is set).",
        lambda m: None if m.tree is None else m.tree.members,
    ),
)


def _escape(value: str) -> str:
    """A label value by the exposition format's rules (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _comm_label(comm: str) -> str:
    return _escape(escape_unprintable(comm))


def render(
    measurements: Iterable[Measurement],
    enforcements: Mapping[str, int],
    engine: str | None = None,
    events_dropped: int | None = None,
) -> str:
    """The exposition; a `comm` label's value is the name itself, but for its
    unprintable characters, written `\\xHH`... (the format's own escapes cover only
    backslash, quote and newline), then escaped by the format's rules."""
    rows = [(f'pid="{m.pid}",comm="{_comm_label(m.comm)}"', m) for m in measurements]
    lines: list[str] = []
    for name, help_text, value in _GAUGES:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [f"{name}{{{labels}}} {value(m)}" for labels, m in rows if value(m) is not None]
    lines += [
        "# HELP restrack_enforcements_total Quota enforcement actions taken (and warnings"
        " given), by action.",
        "# TYPE restrack_enforcements_total counter",
    ]
    lines += [f'restrack_enforcements_total{{action="{a}"}} {n}' for a, n in enforcements.items()]
    lines += [
        "# HELP restrack_tracked_processes Processes currently tracked.",
        "# TYPE restrack_tracked_processes gauge",
        f"restrack_tracked_processes {len(rows)}",
    ]
    if engine is not None:
        lines += [
            "# HELP restrack_engine_info The engine watching quotas (bpf or procfs).",
            "# TYPE restrack_engine_info gauge",
            f'restrack_engine_info{{engine="{_escape(engine)}"}} 1',
        ]
    if events_dropped is not None:
        lines += [
            "# HELP restrack_kernel_events_dropped_total Events the bpf engine's ring could"
            " not take (their counts were taken from the map instead).",
            "# TYPE restrack_kernel_events_dropped_total counter",
            f"restrack_kernel_events_dropped_total {events_dropped}",
        ]
    return "\n".join(lines) + "\n"
