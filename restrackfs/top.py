"""What `restrack top` shows, apart from how it is drawn: rows, history, rates, sort.

Where the figures come from, chosen by what they cost the daemon (measured in
`scripts/bench --only top`; docs/performance.md):

- the daemon's own figures (growth since registration, peaks, quotas, trees)
  from one read of `metrics` every `SYNC_SECONDS`, not one `stat` read per
  process per refresh: that is one FUSE request instead of four per process;
- between two such reads, every refresh reads /proc itself, as any user may
  (`status` for VmData, RSS and the owner; the `fd` directory's size for the
  descriptors), which costs the daemon nothing: growth is the live total over
  the baseline the last read implied (total minus growth);
- the top-level `events` counters at every refresh (one small read), and the
  `enforcements` records only when those moved;
- `PID/quota` (the action and `warn=N%`) once per sync for each row on screen
  that has a quota, and `PID/members` once per sync for each tree's root.

A process /proc hides from the caller (another user's, under /proc's own
hidepid, or its `fd` directory, which only its owner and root may list) keeps
the daemon's figures of the last sync. The daemon's `--hidepid` is its own: the
mount lists only the caller's processes, and so does this.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pwd
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from restrackfs import client
from restrackfs.client import NotMountedError
from tracker.linux import procfs
from tracker.linux.procfs import escape_unprintable

SYNC_SECONDS = 5.0  # how often the daemon's own figures are read (one `metrics` read)
RATE_WINDOW = 60.0  # seconds: the growth rate is taken over the last minute
HISTORY = 60  # samples kept per row (a minute at the default delay)
RECORDS_KEPT = 20  # enforcement records kept for the bottom line


# ----- the daemon's figures: `metrics` --------------------------------------


@dataclass
class Tracked:
    """One tracked process as the daemon's `metrics` showed it."""

    pid: int
    comm: str
    heapsize: int = 0
    openfile_count: int = 0
    heap_peak: int = 0
    openfile_peak: int = 0
    heap_quota: int | None = None
    file_quota: int | None = None
    heap_total: int | None = None  # VmData, where the daemon exposes it
    openfile_total: int | None = None
    tree_heapsize: int | None = None
    tree_openfile_count: int | None = None
    tree_members: int | None = None


# metric name -> the Tracked field it fills
_FIELDS = {
    "restrack_heap_bytes": "heapsize",
    "restrack_open_files": "openfile_count",
    "restrack_heap_peak_bytes": "heap_peak",
    "restrack_open_files_peak": "openfile_peak",
    "restrack_heap_quota_bytes": "heap_quota",
    "restrack_open_files_quota": "file_quota",
    "restrack_heap_total_bytes": "heap_total",
    "restrack_open_files_total": "openfile_total",
    "restrack_tree_heap_bytes": "tree_heapsize",
    "restrack_tree_open_files": "tree_openfile_count",
    "restrack_tree_members": "tree_members",
}

_LABEL_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def parse_labels(text: str) -> dict[str, str]:
    """`pid="1",comm="a\\"b"` -> {"pid": "1", "comm": 'a"b'} (the format's escapes)."""
    labels: dict[str, str] = {}
    i = 0
    while i < len(text):
        eq = text.index("=", i)
        name = text[i:eq].strip().lstrip(",").strip()
        if text[eq + 1] != '"':
            raise ValueError(f"label {name!r}: value not quoted")
        i, value = eq + 2, []
        while text[i] != '"':
            if text[i] == "\\":
                value.append(_LABEL_ESCAPES.get(text[i + 1], "\\" + text[i + 1]))
                i += 2
            else:
                value.append(text[i])
                i += 1
        labels[name] = "".join(value)
        i += 1
        while i < len(text) and text[i] in ", ":
            i += 1
    return labels


def parse_metrics(text: str) -> dict[int, Tracked]:
    """The per-process series of a `metrics` exposition, by pid. Other series and
    lines it cannot read are skipped (a newer daemon may add some)."""
    tracked: dict[int, Tracked] = {}
    for line in client.lines(text):
        if not line or line.startswith("#"):
            continue
        name, brace, rest = line.partition("{")
        attribute = _FIELDS.get(name)
        if attribute is None or not brace:
            continue
        labels_text, _, value_text = rest.rpartition("}")
        try:
            labels = parse_labels(labels_text)
            pid, value = int(labels["pid"]), int(float(value_text))
        except (ValueError, KeyError, IndexError):
            continue
        entry = tracked.setdefault(pid, Tracked(pid, labels.get("comm", "")))
        setattr(entry, attribute, value)
    return tracked


# ----- the process now: /proc, read by the client ----------------------------


@dataclass(frozen=True, slots=True)
class Live:
    """A process as /proc shows it to the caller now; None where /proc hides it."""

    uid: int
    comm: str
    vm_data: int
    rss: int
    fds: int | None  # None: its fd directory is not the caller's to list


def read_live(pid: int) -> Live | None:
    """None when the process is gone, a zombie, or hidden from the caller."""
    try:
        raw = procfs.read_status_text(pid)
        status = procfs.parse_status(pid, raw)
        vm_data = procfs.vm_data_of(status)
        rss = procfs.vm_rss_in(pid, raw)
    except (procfs.NoSuchProcess, procfs.AccessDenied):
        return None
    try:
        fds: int | None = procfs.count_fds(pid)
    except (procfs.NoSuchProcess, procfs.AccessDenied):
        fds = None
    return Live(status.real_uid, status.name, vm_data, rss, fds)


_USERS: dict[int, str] = {}


def user_name(uid: int) -> str:
    """The login name of `uid`, or the number (looked up once per uid)."""
    if uid not in _USERS:
        try:
            _USERS[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _USERS[uid] = str(uid)
    return _USERS[uid]


# ----- enforcement records ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One line of the `enforcements` file (the fields `top` shows)."""

    time: float
    pid: int
    comm: str
    quota: str
    usage: int
    limit: int
    action: str


def parse_records(text: str) -> list[Record]:
    """The records of an `enforcements` text, oldest first; a line that is not a
    record (cut short, or of a newer format) is skipped."""
    records = []
    for line in client.lines(text):
        try:
            raw = json.loads(line)
            records.append(
                Record(
                    float(raw["time"]),
                    int(raw["pid"]),
                    escape_unprintable(str(raw["comm"])),
                    str(raw["quota"]),
                    int(raw["usage"]),
                    int(raw["limit"]),
                    str(raw["action"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return records


# ----- what a row shows ------------------------------------------------------


class Mark(Enum):
    """A row's state; the screen shows it as a character, and as a colour where it can."""

    NONE = " "
    WARNED = "*"  # over its `warn=N%` level
    OVER = "!"  # over a quota


@dataclass
class Row:
    pid: int
    user: str
    name: str
    heap: int | None  # growth since registration (a tree root: its tree's); None: untracked member
    heap_total: int | None  # VmData now
    files: int | None
    files_total: int | None
    rss: int | None
    use: float | None  # the highest share of a quota in use, 1.0 = all of it
    rate: float | None  # heap growth, bytes per second over the last minute
    heap_peak: int | None
    files_peak: int | None
    history: list[int]  # heap growth, oldest first
    mark: Mark = Mark.NONE
    action: str | None = None
    members: int | None = None  # a tree root: its live members
    depth: int = 0  # 1: a member folded under its tree's root


class SortKey(Enum):
    HEAP = "heap"
    FILES = "files"
    RATE = "rate"
    USE = "use"


SORT_KEYS = {"h": SortKey.HEAP, "f": SortKey.FILES, "r": SortKey.RATE, "u": SortKey.USE}


def _descending(value: float | None) -> float:
    return -math.inf if value is None else value


_SORT_VALUE: dict[SortKey, Callable[[Row], float | None]] = {
    SortKey.HEAP: lambda r: r.heap,
    SortKey.FILES: lambda r: r.files,
    SortKey.RATE: lambda r: r.rate,
    SortKey.USE: lambda r: r.use,
}


def sort_rows(rows: Iterable[Row], key: SortKey) -> list[Row]:
    """Highest first; rows without that figure last; ties by pid."""
    value = _SORT_VALUE[key]
    return sorted(rows, key=lambda r: (-_descending(value(r)), r.pid))


def quota_share(used: int | None, limit: int | None) -> float | None:
    """A zero quota counts as one unit, so a breached zero quota reads as a large share."""
    if used is None or limit is None:
        return None
    return used / max(limit, 1)


def parse_warn(quota_text: str) -> float | None:
    """The `warn=N%` of a `quota` text as a share (0.8), or None."""
    for token in quota_text.split():
        key, _, value = token.partition("=")
        if key == "warn" and value.endswith("%") and value[:-1].isdigit():
            return int(value[:-1]) / 100
    return None


def parse_action(quota_text: str) -> str | None:
    for token in quota_text.split():
        key, _, value = token.partition("=")
        if key == "action":
            return value
    return None


@dataclass
class History:
    """A row's heap growth over time: the sparkline, and the rate over a minute."""

    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def add(self, when: float, heap: int) -> None:
        self.samples.append((when, heap))

    def values(self) -> list[int]:
        return [heap for _, heap in self.samples]

    def rate(self, now: float) -> float | None:
        """Bytes per second since the oldest sample of the last minute; None with fewer
        than two samples."""
        window = [(t, h) for t, h in self.samples if now - t <= RATE_WINDOW]
        if len(window) < 2 or window[-1][0] <= window[0][0]:
            return None
        (t0, h0), (t1, h1) = window[0], window[-1]
        return (h1 - h0) / (t1 - t0)


# ----- the model -------------------------------------------------------------


@dataclass
class Baseline:
    """What the last sync implied: VmData and descriptors at registration (or the
    last usage reset), so growth can be taken from /proc between syncs."""

    heap: int | None
    files: int | None


class Top:
    """The rows of `restrack top`, refreshed from the mount and /proc.

    `refresh()` once per frame; `rows(key)` in the order the screen wants them;
    `records` the latest enforcement records, newest last."""

    def __init__(
        self,
        mount: str | None,
        sync_seconds: float = SYNC_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mount = mount
        self.sync_seconds = sync_seconds
        self.clock = clock
        self.synced_at: float | None = None
        self.tracked: dict[int, Tracked] = {}
        self.baselines: dict[int, Baseline] = {}
        self.histories: dict[int, History] = {}
        self.quota_texts: dict[int, str] = {}
        self.members: dict[int, list[int]] = {}
        self.records: list[Record] = []
        self._events: dict[str, int] | None = None
        self._rows: list[Row] = []

    # -- reading --

    def refresh(self) -> None:
        now = self.clock()
        if self.synced_at is None or now - self.synced_at >= self.sync_seconds:
            self.sync(now)
        self._read_records()
        self._rows = self._build(now)

    def sync(self, now: float) -> None:
        """Read the daemon's figures (one `metrics` read) and take the baselines."""
        self.tracked = parse_metrics(client.metrics(mount=self.mount))
        self.synced_at = now
        self.baselines = {pid: self._baseline(t) for pid, t in self.tracked.items()}
        for gone in set(self.histories) - set(self.tracked):
            del self.histories[gone]
        self.quota_texts = {}
        self._read_members()

    def _baseline(self, t: Tracked) -> Baseline:
        heap_total, files_total = t.heap_total, t.openfile_total
        if heap_total is None or files_total is None:
            live = read_live(t.pid)
            if live is not None:
                heap_total = live.vm_data if heap_total is None else heap_total
                files_total = live.fds if files_total is None else files_total
        return Baseline(
            None if heap_total is None else heap_total - t.heapsize,
            None if files_total is None else files_total - t.openfile_count,
        )

    def _read_members(self) -> None:
        """`members` of the tree roots: one read per tree per sync."""
        self.members = {}
        for pid, t in self.tracked.items():
            if t.tree_members is not None:
                with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
                    self.members[pid] = client.members(pid, mount=self.mount)

    def _detail(self, row: Row) -> None:
        """The action and `warn=N%` of a row on screen with a quota: its `quota` read
        once per sync, so never one read per tracked process."""
        t = self.tracked.get(row.pid)
        if t is None or (t.heap_quota is None and t.file_quota is None):
            return
        if row.pid not in self.quota_texts:
            self.quota_texts[row.pid] = ""  # not tried again before the next sync
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
                self.quota_texts[row.pid] = _read_quota(self.mount, row.pid)
        text = self.quota_texts.get(row.pid, "")
        row.action = parse_action(text)
        row.mark = _mark(row.use, parse_warn(text))

    def _read_records(self) -> None:
        """The enforcement records, re-read only when the `events` counters moved."""
        try:
            events = client.events(mount=self.mount)
        except NotMountedError:
            raise
        except OSError:
            return
        if events == self._events:
            return
        self._events = events
        text = _read_top_file(self.mount, "enforcements")
        if text is not None:
            self.records = parse_records(text)[-RECORDS_KEPT:]

    # -- rows --

    def rows(self, key: SortKey, limit: int | None = None) -> list[Row]:
        """The rows sorted, a tree's members right after its root; the first `limit`
        (all without one) with their quota's action and warning level read."""
        folded = {m for root, pids in self.members.items() for m in pids if m != root}
        tops = [r for r in self._rows if r.pid not in folded or r.pid in self.members]
        by_pid = {r.pid: r for r in self._rows}
        ordered: list[Row] = []
        for row in sort_rows(tops, key):
            if limit is not None and len(ordered) >= limit:
                break
            self._detail(row)
            ordered.append(row)
            for member in self.members.get(row.pid, [])[1:]:
                ordered.append(self._member_row(member, by_pid.get(member)))
        return ordered if limit is None else ordered[:limit]

    @property
    def count(self) -> int:
        return len(self._rows)

    def _member_row(self, pid: int, tracked_row: Row | None) -> Row:
        if tracked_row is not None:
            return dataclasses.replace(tracked_row, depth=1)
        live = read_live(pid)
        return Row(
            pid=pid,
            user="-" if live is None else user_name(live.uid),
            name="?" if live is None else escape_unprintable(live.comm),
            heap=None,
            heap_total=None if live is None else live.vm_data,
            files=None,
            files_total=None if live is None else live.fds,
            rss=None if live is None else live.rss,
            use=None,
            rate=None,
            heap_peak=None,
            files_peak=None,
            history=[],
            depth=1,
        )

    def _build(self, now: float) -> list[Row]:
        rows = []
        for pid, t in self.tracked.items():
            live = read_live(pid)
            if live is None and _gone(pid):
                continue
            rows.append(self._row(now, t, live))
        return rows

    def _row(self, now: float, t: Tracked, live: Live | None) -> Row:
        base = self.baselines.get(t.pid, Baseline(None, None))
        heap, files = t.heapsize, t.openfile_count
        heap_total, files_total = t.heap_total, t.openfile_total
        if live is not None:
            heap_total = live.vm_data
            if base.heap is not None:
                heap = max(0, live.vm_data - base.heap)
            if live.fds is not None:
                files_total = live.fds
                if base.files is not None:
                    files = max(0, live.fds - base.files)
        judged_heap, judged_files = heap, files
        if t.tree_members is not None:
            judged_heap, judged_files = self._tree_usage(t)
        history = self.histories.setdefault(t.pid, History())
        history.add(now, judged_heap)
        use = _highest(
            quota_share(judged_heap, t.heap_quota), quota_share(judged_files, t.file_quota)
        )
        return Row(
            pid=t.pid,
            user="-" if live is None else user_name(live.uid),
            name=escape_unprintable(live.comm if live is not None else t.comm),
            heap=judged_heap,
            heap_total=heap_total,
            files=judged_files,
            files_total=files_total,
            rss=None if live is None else live.rss,
            use=use,
            rate=history.rate(now),
            heap_peak=max(t.heap_peak, heap),
            files_peak=max(t.openfile_peak, files),
            history=history.values(),
            mark=_mark(use, None),
            members=t.tree_members,
        )

    def _tree_usage(self, t: Tracked) -> tuple[int, int]:
        """A tree's sums now: its members' live totals over the root's baseline; the
        daemon's sums of the last sync where /proc hides a member."""
        base = self.baselines.get(t.pid, Baseline(None, None))
        lives = [read_live(pid) for pid in self.members.get(t.pid, [])]
        if base.heap is None or base.files is None or not lives or None in lives:
            return t.tree_heapsize or 0, t.tree_openfile_count or 0
        known = [live for live in lives if live is not None]
        if any(live.fds is None for live in known):
            return t.tree_heapsize or 0, t.tree_openfile_count or 0
        heap = sum(live.vm_data for live in known) - base.heap
        files = sum(live.fds or 0 for live in known) - base.files
        return max(0, heap), max(0, files)


def _highest(*shares: float | None) -> float | None:
    known = [share for share in shares if share is not None]
    return max(known) if known else None


def _mark(use: float | None, warn: float | None) -> Mark:
    if use is None:
        return Mark.NONE
    if use > 1.0:
        return Mark.OVER
    if warn is not None and use > warn:
        return Mark.WARNED
    return Mark.NONE


def _gone(pid: int) -> bool:
    """Whether `pid` names no live process (hidden from the caller is not gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _read_quota(mount: str | None, pid: int) -> str:
    root = client.mount_point(mount)
    return (root / str(pid) / "quota").read_text()


def _read_top_file(mount: str | None, name: str) -> str | None:
    """A top-level file of the mount; None where this daemon has none."""
    try:
        return (client.mount_point(mount) / name).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return None


# ----- text for the cells ----------------------------------------------------

SPARKS = "▁▂▃▄▅▆▇█"
ASCII_SPARKS = "_.-:=+*#"


def sparkline(values: Sequence[int], width: int, ascii_only: bool = False) -> str:
    """The last `width` values as bars scaled between their own lowest and highest."""
    bars = ASCII_SPARKS if ascii_only else SPARKS
    shown = list(values)[-width:]
    if not shown:
        return ""
    low, high = min(shown), max(shown)
    if high == low:
        return bars[0] * len(shown)
    top = len(bars) - 1
    return "".join(bars[round((v - low) * top / (high - low))] for v in shown)


def use_bar(use: float | None, width: int) -> str:
    """`[####    ] 52%`-style: a bar of `width` cells, then the percentage."""
    if use is None:
        return "-".ljust(width)
    percent = f"{use * 100:.0f}%"
    cells = max(0, width - len(percent) - 3)
    filled = min(cells, round(min(use, 1.0) * cells))
    return f"[{'#' * filled}{' ' * (cells - filled)}] {percent}"[:width].ljust(width)


def rate_text(rate: float | None) -> str:
    if rate is None:
        return "-"
    sign = "-" if rate < 0 else "+" if rate > 0 else ""
    return f"{sign}{human_size(abs(rate))}/s"


def human_size(size: float | None) -> str:
    """1536 -> 1.5K, 31457285 -> 30M: binary units, at most one decimal, never a
    trailing .0 (so a quota and a usage of about the same size read alike)."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("", "K", "M", "G", "T"):
        shown = round(value, 1) if value < 100 else float(round(value))
        if shown < 1024 or unit == "T":
            return f"{shown:.1f}".removesuffix(".0") + unit
        value /= 1024
    raise AssertionError("unreachable")


def record_text(record: Record) -> str:
    """`12:03:04 kill 4242 leak heap 41M>40M`: one record, short."""
    when = time.strftime("%H:%M:%S", time.localtime(record.time))
    size = human_size if record.quota == "heap" else str
    return (
        f"{when} {record.action} {record.pid} {record.comm} "
        f"{record.quota} {size(record.usage)}>{size(record.limit)}"
    )
