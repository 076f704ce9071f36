"""Persistence of the registrations, so a restart loses none of them.

The state file is a journal of JSON lines: a header, then one line per change
(`{"put": record}` or `{"drop": pid}`), each appended and fsynced before the
change is answered. A change therefore costs one small write whatever the
number of tracked processes (rewriting a whole snapshot on every change made
registering 10,000 processes quadratic). The journal is compacted into a
fresh snapshot, written to a temp file and renamed over, at start and when it
has grown to several times the live entries. A crash leaves at worst a torn
last line, which loading ignores; a failed append is cut off again, so the
file never holds half a change.

The peaks ride along: a record holds the entry's high-water mark as of its
line. They are never journaled on their own (every read may raise them: a
fsync per read), so a crash loses what they rose since the entry's last line
or the last compaction; a clean stop writes a snapshot with them.

This module owns both directions of a record (`record_of`: Entry -> record,
`entry_of`: record -> Entry) and the engine's side of the journal (`Store`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from tracker.deny.state import DenyState
from tracker.engine.entry import Entry, QuotaSetting
from tracker.engine.resources import Counters
from tracker.engine.tree import Tree
from tracker.errors import StateNotSaved
from tracker.linux.process import Process
from tracker.quota import Action, Quota, Scope

log = logging.getLogger(__name__)
engine_log = logging.getLogger("restrackfs.engine")

HEADER = {"restrackfs_state": 2}
Record = dict[str, Any]
_COMPACT_SLACK = 1000  # journal lines beyond the live entries before compaction


def load(path: Path) -> list[Record]:
    """The live records; none if there is no file or it cannot be understood."""
    try:
        lines = _read_trusted(path).splitlines()
    except FileNotFoundError:
        return []
    except OSError as error:
        log.error("state file %s not loaded, starting empty: %s", path, error)
        return []
    if not lines or _parse(lines[0]) != HEADER:
        log.error("state file %s has an unknown format, starting empty", path)
        return []
    records: dict[int, Record] = {}
    for number, line in enumerate(lines[1:], start=2):
        change = _parse(line)
        if isinstance(change, dict) and isinstance(change.get("put"), dict):
            record = change["put"]
            records[record.get("pid")] = record  # type: ignore[index]
        elif isinstance(change, dict) and "drop" in change:
            records.pop(change["drop"], None)
        else:
            log.error("state file %s: line %d unreadable, ignored", path, number)
    return list(records.values())


def check_location(path: Path) -> None:
    """Refuse (PermissionError, with the reason) a state file other users could tamper with.

    Its directory, or the nearest one that exists if it is still to be created,
    must belong to the daemon's user or root and be writable by nobody else: in
    a directory others may write, even a sticky one like /tmp, a user can plant
    names before the daemon makes them (the state file, its `.<name>.tmp`, the
    directory itself), which the daemon would trust or trip over for ever. Each
    directory above must belong to the daemon's user or root and be writable by
    nobody else or sticky (then none can rename or remove what is ours in it).
    Symlinks are resolved first: the directories checked are the real ones.
    """
    directory = Path(os.path.realpath(path.parent))
    nearest = directory
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    for place in (nearest, *nearest.parents):
        info = os.stat(place)
        others_write = bool(info.st_mode & 0o022)
        sticky = bool(info.st_mode & stat.S_ISVTX)
        if info.st_uid not in (0, os.geteuid()):
            problem = f"is owned by uid {info.st_uid}"
        elif others_write and (place == nearest or not sticky):
            problem = f"is writable by others (mode {info.st_mode & 0o7777:o})"
        else:
            continue
        raise PermissionError(
            errno.EPERM,
            f"state file {path}: directory {place} {problem}: another user could plant"
            " or replace files there; use a directory only root can write"
            " (the default /run/restrackfs/)",
        )


def _read_trusted(path: Path) -> bytes:
    """The file's bytes, if only the daemon's user can have written them.

    It names processes and quotas that a root daemon acts on (kill!), so a file
    another user owns or may write, or a symlink, is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise PermissionError(
                errno.EPERM, f"owned by uid {info.st_uid} with mode {info.st_mode & 0o777:o}"
            )
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _parse(line: bytes) -> object:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _line(change: object) -> bytes:
    return json.dumps(change, separators=(",", ":")).encode() + b"\n"


class Journal:
    """Appends changes to the state file; OSError when one cannot be saved."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = 0
        self._fd = -1

    def rewrite(self, records: list[Record]) -> None:
        """Replace the file with a snapshot of `records`, atomically."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = _line(HEADER) + b"".join(_line({"put": record}) for record in records)
        temp = self.path.with_name(f".{self.path.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)  # never write into a file someone else prepared
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temp, flags, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.path)
        _fsync_dir(self.path.parent)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.lines = len(records)

    def put(self, record: Record) -> None:
        self._append({"put": record})

    def drop(self, pid: int) -> None:
        self._append({"drop": pid})

    def is_attached(self) -> bool:
        """Does the path still name the file we append to (not deleted or replaced)?"""
        if self._fd < 0:
            return False
        try:
            on_disk, ours = os.stat(self.path, follow_symlinks=False), os.fstat(self._fd)
        except OSError:
            return False
        return (on_disk.st_dev, on_disk.st_ino) == (ours.st_dev, ours.st_ino)

    def wants_compaction(self, live: int) -> bool:
        return self.lines > 3 * live + _COMPACT_SLACK

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _append(self, change: object) -> None:
        size = os.fstat(self._fd).st_size
        try:
            _write_all(self._fd, _line(change))
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)  # never leave half a change behind
            raise
        self.lines += 1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record_of(entry: Entry) -> Record:
    """The entry as the state file keeps it."""
    quota = entry.quota
    return {
        "pid": entry.pid,
        "start_time": entry.process.start_time,
        "pidfd_inode": entry.process.inode,
        "heap_base": entry.heap_base,
        "files_base": entry.files_base,
        # the high-water marks (absolute), as of this line: journaled with the
        # changes that are written anyway, at compaction and at a clean stop
        "heap_high": entry.high.heap,
        "files_high": entry.high.files,
        "registered": entry.registered,
        "quota": None
        if quota is None
        else {"heap": quota.heap, "files": quota.files, "action": str(quota.action)}
        | ({"scope": str(quota.scope)} if quota.is_tree else {}),
        "tree": None if entry.tree is None else tree_record(entry.tree),
        "quota_uid": entry.quota_uid,
        "saved_soft": {str(k): v for k, v in entry.deny.saved_soft.items()},
    }


def entry_of(record: Record, serial: int) -> Entry:
    """The entry a record names, if its process is still the one it was.

    NoSuchProcess or AccessDenied when it is gone or recycled; KeyError,
    TypeError, ValueError (or AttributeError) for a malformed record."""
    inode = record.get("pidfd_inode")
    process = Process.open(
        int(record["pid"]), int(record["start_time"]), None if inode is None else int(inode)
    )
    try:
        status = process.status()
        quota = record.get("quota")
        uid = record.get("quota_uid")
        return Entry(
            process=process,
            serial=serial,
            owner_uid=status.real_uid,
            owner_gid=status.real_gid,
            baseline=Counters(heap=int(record["heap_base"]), files=int(record["files_base"])),
            high=Counters(_optional_int(record, "heap_high"), _optional_int(record, "files_high")),
            registered=float(record["registered"]),
            comm=status.name,
            setting=None
            if quota is None
            else QuotaSetting(
                Quota(
                    quota["heap"],
                    quota["files"],
                    Action(quota["action"]),
                    Scope(quota.get("scope", Scope.PROCESS)),
                ),
                uid,  # type: ignore[arg-type]
            ),
            deny=DenyState(
                saved_soft={int(k): int(v) for k, v in record.get("saved_soft", {}).items()}
            ),
            tree=tree_of(record, process) if quota and quota.get("scope") == Scope.TREE else None,
            workload=process.workload(),
        )
    except BaseException:
        process.close()
        raise


def tree_record(tree: Tree) -> Record:
    """A tree as the state file keeps it: its start, baseline, and members by identity."""
    return {
        "since": tree.since,
        "heap_base": tree.baseline.heap,
        "files_base": tree.baseline.files,
        "excluded": sorted(tree.excluded),
        "members": tree.identities(),
    }


def tree_of(entry_record: Record, root: Process) -> Tree:
    """The tree an entry's record names, its members pinned again: each only if its
    pid still names the process it was (start time checked: a recycled pid never
    joins). Members found since and not saved (a crash) are found again by the next
    scan while their parent is a member: the tree's start is kept."""
    record = entry_record.get("tree")
    if record is None:  # a tree quota saved without its tree: it starts anew
        base = Counters(int(entry_record["heap_base"]), int(entry_record["files_base"]))
        return Tree.start(root, base)
    baseline = Counters(int(record["heap_base"]), int(record["files_base"]))
    excluded = [(int(pid), int(start)) for pid, start in record.get("excluded", [])]
    tree = Tree(root, int(record["since"]), baseline, excluded)
    tree.follow((int(pid), int(start)) for pid, start in record["members"])
    return tree


def _optional_int(record: Record, key: str) -> int | None:
    """A value a record may lack (written before it existed): None, the entry's default."""
    value = record.get(key)
    return None if value is None else int(value)


class Store:
    """The engine's journal: each change saved before it is answered, or StateNotSaved."""

    def __init__(self, path: Path | None, live: Callable[[], Collection[Entry]]) -> None:
        self.path = path
        self._journal = None if path is None else Journal(path)
        self._live = live  # the entries a compaction writes

    def load(self) -> list[Record]:
        return [] if self.path is None else load(self.path)

    def put(self, entry: Entry) -> None:
        """Journal the entry as it is now; StateNotSaved (nothing saved) if impossible."""
        self._change(lambda journal: journal.put(record_of(entry)), put=entry)

    def drop(self, entry: Entry) -> None:
        self._change(lambda journal: journal.drop(entry.pid), dropped=entry.pid)

    def _change(
        self,
        change: Callable[[Journal], None],
        put: Entry | None = None,
        dropped: int | None = None,
    ) -> None:
        """Append `change`; compact when the journal has grown. The snapshot is of the
        entries *with this change made*: the engine journals a registration before the
        registry holds it and a removal before the registry lets go, so the live
        entries alone would lose the one and resurrect the other."""
        journal = self._journal
        if journal is None:
            return
        try:
            if not journal.is_attached():
                # deleted or replaced under us: appending to the old inode would lose it all
                engine_log.warning(
                    "state file %s was replaced or removed: writing it anew", journal.path
                )
                self.compact()
            change(journal)
        except OSError as error:
            engine_log.error("state file %s not saved: %s", journal.path, error)
            raise StateNotSaved(error) from error
        live = self._after(put, dropped)
        if journal.wants_compaction(len(live)):
            try:
                journal.rewrite([record_of(entry) for entry in live])
            except OSError as error:
                engine_log.error("state file %s not compacted: %s", journal.path, error)

    def _after(self, put: Entry | None, dropped: int | None) -> list[Entry]:
        """The live entries as the journal now has them."""
        changed = {dropped, None if put is None else put.pid}
        live = [entry for entry in self._live() if entry.pid not in changed]
        return live if put is None else [*live, put]

    def compact(self) -> None:
        """Write a fresh snapshot of the live entries (OSError if impossible)."""
        if self._journal is not None:
            self._journal.rewrite([record_of(entry) for entry in self._live()])

    def save_at_stop(self) -> None:
        """At a clean stop: a snapshot, so the peaks as they are now are kept (they
        are journaled only with other changes). Only into the file still ours: one
        deleted or replaced under us (its directory removed, say) is not made anew
        at a stop, where no change asks for it (OSError if it cannot be written)."""
        if self._journal is not None and self._journal.is_attached():
            self.compact()

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
