"""The file table: every file of the mount, its mode, and how it reads and writes.

A new per-process file is one entry in `PROCESS_FILES`. Read functions return
the file's whole text; write functions get one whole written value (already
decoded) and raise the engine's errors, which carry the errno to answer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import trio

from restrackfs import metrics
from tracker.engine.access import may_see
from tracker.engine.engine import Engine
from tracker.engine.entry import Entry, Measurement, TreeReading
from tracker.engine.reading import Reader, UidTurns, check_current
from tracker.errors import InvalidArgument, NoSuchProcess, NoTree
from tracker.linux.procfs import escape_comm
from tracker.quota import WHITESPACE, parse_quota, parse_reset
from tracker.vocabulary import (
    ACTION,
    COMM,
    EVENTS,
    FD_KINDS,
    FILE_QUOTA,
    HEAP_QUOTA,
    OPENFILE_TOTAL,
    REGISTERED,
    STAT_FIELDS,
    TREE_STAT_FIELDS,
    format_limit,
)

MAX_WRITE = 4096
_DECIMAL = re.compile(r"[0-9]+", re.ASCII)


@dataclass(frozen=True, slots=True)
class Caller:
    uid: int
    hidepid: bool

    def sees(self, entry: Entry) -> bool:
        return visible(entry, self.uid, self.hidepid)


def visible(entry: Entry, uid: int, hidepid: bool) -> bool:
    """Whether `uid` may see `entry` at all: the one place --hidepid is decided."""
    return may_see(uid, entry.owner_uid, hidepid)


TextOf = Callable[[Engine, Entry | None, Caller], str]
AsyncTextOf = Callable[[Engine, Entry | None, Caller], Awaitable[str]]
# a write: the command it gives, awaited; the entry it removed (deregister), if any
Command = Callable[[Engine, Entry | None, str, Caller], Awaitable[Entry | None]]


@dataclass(frozen=True, slots=True)
class FileSpec:
    name: str
    mode: int  # permission bits shown by ls; the daemon checks callers itself
    read: TextOf | None = None
    write: Command | None = None
    pollable: bool = False  # poll() reports a change since the reader last looked
    # a read that takes long (O(descriptors)): awaited, so other requests go on meanwhile
    read_async: AsyncTextOf | None = None
    # what poll() compares for a pollable file, where the text is too long to compare
    version: Callable[[Engine, Entry | None, Caller], object] | None = None
    readable: bool = field(init=False)  # derived once: every open asks

    def __post_init__(self) -> None:
        object.__setattr__(self, "readable", self.read is not None or self.read_async is not None)


def parse_pid(text: str) -> int:
    """A decimal pid >= 1; trailing whitespace allowed (what `echo` writes)."""
    value = text.rstrip(WHITESPACE)
    if not _DECIMAL.fullmatch(value) or int(value) < 1:
        raise InvalidArgument(f"{value!r} is not a pid")
    return int(value)


def parse_pid_name(name: str) -> int:
    """A directory name: only the canonical spelling, so each process has one name
    (an alias like `0123` would outlive the directory in the kernel's cache)."""
    pid = parse_pid(name)
    if name != str(pid):
        raise InvalidArgument(f"{name!r} is not a pid directory name")
    return pid


def _number(measure: Callable[[Reader, Entry], int]) -> TextOf:
    """A file whose text is one number the reader measures (the hot path: one call)."""

    def read(engine: Engine, entry: Entry | None, caller: Caller) -> str:
        assert entry is not None
        return f"{measure(engine.reader, entry)}\n"

    return read


async def read_fds(engine: Engine, entry: Entry | None, caller: Caller) -> str:
    """The descriptors by kind, then `openfile_total`: their sum, the size of the
    one listing they come from (kinds only: no path is ever shown)."""
    assert entry is not None
    kinds = await engine.reader.fds(entry, caller.uid)
    lines = [f"{kind} {kinds[kind]}\n" for kind in FD_KINDS]
    return "".join(lines) + f"{OPENFILE_TOTAL} {sum(kinds.values())}\n"


# How a stat field is shown where it is not the Measurement's attribute as it is.
_SHOWN: dict[str, Callable[[Measurement], object]] = {
    COMM: lambda m: escape_comm(m.comm),
    HEAP_QUOTA: lambda m: format_limit(m.quota.heap),
    FILE_QUOTA: lambda m: format_limit(m.quota.files),
    ACTION: lambda m: m.quota.action,
    REGISTERED: lambda m: int(m.registered),
}


def read_stat(engine: Engine, entry: Entry | None, caller: Caller) -> str:
    """STAT_FIELDS; then TREE_STAT_FIELDS while a tree quota is set (so a process
    quota's stat reads exactly as before trees existed)."""
    assert entry is not None
    m = engine.reader.measure(entry)
    text = "".join(
        f"{key} {_SHOWN[key](m) if key in _SHOWN else getattr(m, key)}\n" for key in STAT_FIELDS
    )
    if m.tree is not None:
        text += "".join(f"{key} {getattr(m.tree, key)}\n" for key in TREE_STAT_FIELDS)
    return text


def _tree_reading(engine: Engine, entry: Entry | None) -> TreeReading:
    """The tree checked now (members found, sums enforced); ENOENT once it ended."""
    assert entry is not None
    check_current(entry)
    if entry.tree is None:
        raise NoTree(f"{entry.pid}: no tree quota")
    return engine.reader.tree(entry)


def read_tree_heapsize(engine: Engine, entry: Entry | None, caller: Caller) -> str:
    return f"{_tree_reading(engine, entry).tree_heapsize}\n"


def read_tree_openfile_count(engine: Engine, entry: Entry | None, caller: Caller) -> str:
    return f"{_tree_reading(engine, entry).tree_openfile_count}\n"


def read_members(engine: Engine, entry: Entry | None, caller: Caller) -> str:
    """The live members' pids, one a line, the root first."""
    _tree_reading(engine, entry)
    assert entry is not None and entry.tree is not None
    return "".join(f"{pid}\n" for pid in entry.tree.pids())


# The daemon's own counts for its metrics: one daemon a process, one set.
STATS = metrics.DaemonStats()


def read_metrics(engine: Engine, entry: Entry | None, caller: Caller) -> str:
    """The exposition in one go (the scrape endpoint's, which renders one at a time)."""
    started = time.perf_counter()
    measurements = _measured(engine, caller, list(engine.entries()))
    return _exposition(engine, measurements, caller, 0.0, started)


METRICS_BATCH = 32  # processes measured between two turns of the other requests
_metrics_turns = UidTurns()


async def read_metrics_async(engine: Engine, entry: Entry | None, caller: Caller) -> str:
    """The exposition, measured in batches with the loop free between them, and one
    render at a time per uid but root: however many renders a user starts (16
    threads over 3,000 processes), another user's read waits for one batch.
    Its render time counts the batches, not the turns of others between them."""
    async with _metrics_turns.of(caller.uid):
        entries, measurements, spent = list(engine.entries()), [], 0.0
        for start in range(0, len(entries), METRICS_BATCH):
            if start:
                await trio.lowlevel.checkpoint()
            began = time.perf_counter()
            measurements += _measured(engine, caller, entries[start : start + METRICS_BATCH])
            spent += time.perf_counter() - began
        return _exposition(engine, measurements, caller, spent, time.perf_counter())


def _measured(engine: Engine, caller: Caller, entries: list[Entry]) -> list[Measurement]:
    """The measurements of the entries `caller` sees and that are still tracked."""
    measured, measure = [], engine.reader.measure
    for tracked in entries:
        if tracked.ended is None and caller.sees(tracked):
            try:  # noqa: SIM105 (a `suppress` per process costs more than its read's parse)
                measured.append(measure(tracked))
            except NoSuchProcess:  # exited while we read the others
                pass
    return measured


def _exposition(
    engine: Engine, measurements: list[Measurement], caller: Caller, spent: float, since: float
) -> str:
    """The text, with the previous exposition's time; then this one's (`spent`
    measuring, and the render from `since`) is kept for the next."""
    backend = engine.backend
    text = metrics.render(
        measurements, engine.enforcements, backend.name, backend.events_dropped, STATS
    )
    series = engine.enforcer.records.series(caller.uid, caller.hidepid)
    text += metrics.render_process_enforcements(series)
    STATS.render_seconds = spent + time.perf_counter() - since
    return text


def count_refused_quota_write() -> None:
    """A write to a `quota` file was answered with an errno (the filesystem calls this)."""
    STATS.quota_writes_refused += 1


async def write_register(
    engine: Engine, entry: Entry | None, text: str, caller: Caller
) -> Entry | None:
    engine.register(parse_pid(text), caller.uid)
    return None


async def write_deregister(
    engine: Engine, entry: Entry | None, text: str, caller: Caller
) -> Entry | None:
    return await engine.deregister(parse_pid(text), caller.uid)


async def write_quota(
    engine: Engine, entry: Entry | None, text: str, caller: Caller
) -> Entry | None:
    assert entry is not None
    await engine.set_quota(entry, parse_quota(text), caller.uid)
    return None


async def write_reset(
    engine: Engine, entry: Entry | None, text: str, caller: Caller
) -> Entry | None:
    assert entry is not None
    await engine.reset(entry, parse_reset(text), caller.uid)
    return None


def _events_text(counters: Mapping[str, int]) -> str:
    return "".join(f"{name} {counters[name]}\n" for name in EVENTS)


def read_events(engine: Engine, entry: Entry | None, caller: Caller) -> str:
    """`exceeded killed denied notified` counters; the top file's are the totals."""
    if entry is None:
        return _events_text(engine.events)
    check_current(entry)
    return _events_text(entry.events)


def read_enforcements(engine: Engine, entry: Entry | None, caller: Caller) -> str:
    """The kept enforcement records the caller may see, oldest first, a JSON object a line."""
    return engine.enforcer.records.text(caller.uid, caller.hidepid)


def enforcements_version(engine: Engine, entry: Entry | None, caller: Caller) -> int:
    """The newest record the caller may see: a poller wakes when it changes."""
    return engine.enforcer.records.last_seen(caller.uid, caller.hidepid)


def read_engine(engine: Engine, entry: Entry | None, caller: Caller) -> str:
    """`bpf` or `procfs`: the engine in force."""
    return f"{engine.backend.name}\n"


def read_quota(engine: Engine, entry: Entry | None, caller: Caller) -> str:
    assert entry is not None
    check_current(entry)
    return entry.effective_quota.format() + "\n"


TOP_FILES = (
    FileSpec("register", 0o222, write=write_register),
    FileSpec("deregister", 0o222, write=write_deregister),
    FileSpec("metrics", 0o444, read_async=read_metrics_async),
    FileSpec("events", 0o444, read=read_events, pollable=True),
    FileSpec("engine", 0o444, read=read_engine),
    FileSpec(
        "enforcements",
        0o444,
        read=read_enforcements,
        pollable=True,
        version=enforcements_version,
    ),
)

PROCESS_FILES = (
    FileSpec("heapsize", 0o444, read=_number(Reader.heapsize)),
    FileSpec("openfile_count", 0o444, read=_number(Reader.openfile_count)),
    FileSpec("quota", 0o644, read=read_quota, write=write_quota),
    FileSpec("reset", 0o200, write=write_reset),
    FileSpec("stat", 0o444, read=read_stat),
    FileSpec("events", 0o444, read=read_events, pollable=True),
    FileSpec("heap_peak", 0o444, read=_number(Reader.heap_peak)),
    FileSpec("openfile_peak", 0o444, read=_number(Reader.openfile_peak)),
    FileSpec("fds", 0o444, read_async=read_fds),
)

# The files a tree quota adds to PROCESS_FILES, for as long as it is set.
TREE_FILES = (
    FileSpec("tree_heapsize", 0o444, read=read_tree_heapsize),
    FileSpec("tree_openfile_count", 0o444, read=read_tree_openfile_count),
    FileSpec("members", 0o444, read=read_members),
)


_TREE_FILE_NAMES = frozenset(spec.name for spec in TREE_FILES)


def is_tree_file(spec: FileSpec | None) -> bool:
    return spec is not None and spec.name in _TREE_FILE_NAMES


def files_of(entry: Entry) -> tuple[FileSpec, ...]:
    """The files of a process directory now: the tree's only while it has one."""
    return PROCESS_FILES if entry.tree is None else PROCESS_FILES + TREE_FILES
