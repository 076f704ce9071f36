"""The pyfuse3 `Operations`: translate FUSE requests into engine calls.

No policy lives here. The inode table is arithmetic, kept in `Inodes`: the root,
the top-level files, then one block of inodes per registration at a random slot
(of 2**40), so a pid registered again gets new inode numbers (stale kernel caches
cannot show the old entry as the new one) and inodes reveal nothing of other
users' registrations.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import inspect
import logging
import os
import secrets
import select
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import CoroutineType
from typing import Any, ParamSpec, TypeVar, overload

import pyfuse3
import trio

from restrackfs.files import (
    MAX_WRITE,
    PROCESS_FILES,
    TOP_FILES,
    TREE_FILES,
    Caller,
    FileSpec,
    count_refused_quota_write,
    files_of,
    is_tree_file,
    parse_pid_name,
    visible,
)
from restrackfs.handles import HandleTable, Kept, TooManyHandles
from tracker.engine.engine import Engine
from tracker.engine.entry import Entry
from tracker.errors import AccessDenied, InvalidArgument, NoSuchProcess, TrackerError

log = logging.getLogger("restrackfs.fs")

ROOT = pyfuse3.ROOT_INODE
FIRST_TOP = ROOT + 1
STRIDE = 16  # inodes per registration: the directory, then its files (room to grow)
FIRST_DIR = 1024
SLOT_BITS = 40  # random slots: inodes below 2**45, collisions drawn again
# readdir offsets: `.` and `..` first, then a child's inode + CHILD_OFFSET (so they
# rise with inode numbers and never meet the two: inodes start at ROOT = 1).
DOT_OFFSET, DOTDOT_OFFSET, CHILD_OFFSET = 1, 2, 2
# a directory's files: its process files, then a tree quota's (there or not)
ALL_PROCESS_FILES = PROCESS_FILES + TREE_FILES
assert len(ALL_PROCESS_FILES) < STRIDE
# Names that never change meaning can be cached by the kernel for long; a
# process directory is invalidated explicitly when it goes away.
STABLE_TIMEOUT = 300.0
MAX_CALLERS = 4096  # distinct uids whose Caller is kept for their next open
# Pollers of the pollable top files, by name (a process's `events`: its serial, >= 1)
TOP_POLL_KEYS = {"events": 0, "enforcements": -1}

P = ParamSpec("P")
R = TypeVar("R")


@overload
def boundary(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...
@overload
def boundary(handler: Callable[P, R]) -> Callable[P, Awaitable[R]]: ...
def boundary(handler: Callable[P, Any]) -> Callable[P, Awaitable[Any]]:
    """Answer every failure with an errno: no request may take the daemon down.

    `handler` may be a plain function: a handler that never waits (open, read,
    release...) is called directly, which spares a coroutine per request; one
    that must wait for a particular request returns a coroutine, awaited here.
    """
    if inspect.iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                return await handler(*args, **kwargs)
            except Exception as error:
                raise _errno_of(error, handler) from None

        return wrapper

    @functools.wraps(handler)
    async def direct(*args: P.args, **kwargs: P.kwargs) -> Any:
        try:
            result = handler(*args, **kwargs)
            if type(result) is CoroutineType:  # this request must wait after all (`fds`)
                result = await result
            return result
        except Exception as error:
            raise _errno_of(error, handler) from None

    return direct


def _errno_of(error: Exception, handler: Callable[..., Any]) -> pyfuse3.FUSEError:
    """What the kernel is answered for `error`; an unexpected one is logged (EIO)."""
    if isinstance(error, pyfuse3.FUSEError):
        return error
    if isinstance(error, (TrackerError, NoSuchProcess, AccessDenied)):
        return pyfuse3.FUSEError(error.errno)
    log.error("unexpected error in %s", handler.__name__, exc_info=error)
    return pyfuse3.FUSEError(errno.EIO)


@dataclass(frozen=True, slots=True)
class Node:
    """What an inode names: the root, a top file, a process dir or one of its files."""

    inode: int
    spec: FileSpec | None = None  # None for directories
    entry: Entry | None = None

    @property
    def is_dir(self) -> bool:
        return self.spec is None


@dataclass(slots=True)
class Handle:
    node: Node
    caller: Caller
    kept: Kept = field(default_factory=Kept)  # between reads, bounded (restrackfs.handles)
    # a pollable file's text (or version) at the last read (or the open)
    seen: object = None


@dataclass
class Inodes:
    """The one place that maps inode numbers to nodes and back.

    A process directory's inode is FIRST_DIR + slot * STRIDE, its files the next
    ones; the slot is drawn at random when the registration is first seen, so the
    inodes of two directories say nothing of how many registrations (another
    user's, under --hidepid) came between them."""

    by_slot: dict[int, Entry] = field(default_factory=dict)
    _slot_of: dict[int, int] = field(default_factory=dict)  # serial -> slot
    # Nodes are immutable: each is made once per inode, not once per request.
    _nodes: dict[int, Node] = field(default_factory=dict)

    def dir_inode(self, entry: Entry) -> int:
        slot = self._slot_of.get(entry.serial)
        if slot is None:
            slot = secrets.randbits(SLOT_BITS)
            while slot in self.by_slot:
                slot = secrets.randbits(SLOT_BITS)
            self._slot_of[entry.serial] = slot
            self.by_slot[slot] = entry
        return FIRST_DIR + slot * STRIDE

    def remember(self, entry: Entry) -> Node:
        return Node(self.dir_inode(entry), entry=entry)

    def forget(self, entry: Entry) -> None:
        slot = self._slot_of.pop(entry.serial, None)
        if slot is None:
            return
        self.by_slot.pop(slot, None)
        first = FIRST_DIR + slot * STRIDE
        for inode in range(first, first + STRIDE):
            self._nodes.pop(inode, None)

    @staticmethod
    def top_files() -> list[tuple[str, Node]]:
        return [(spec.name, Node(FIRST_TOP + i, spec)) for i, spec in enumerate(TOP_FILES)]

    def process_files(self, entry: Entry) -> list[tuple[str, Node]]:
        base = self.dir_inode(entry) + 1
        return [(spec.name, Node(base + i, spec, entry)) for i, spec in enumerate(files_of(entry))]

    def top_file(self, name: str) -> Node | None:
        return next((node for child, node in self.top_files() if child == name), None)

    def process_file(self, entry: Entry, name: str) -> Node | None:
        return next((node for child, node in self.process_files(entry) if child == name), None)

    def node(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None:
            node = self._nodes[inode] = self._make_node(inode)
        if node.entry is not None and node.entry.tree is None and is_tree_file(node.spec):
            raise pyfuse3.FUSEError(errno.ENOENT)  # the tree quota ended: its files went
        return node

    def _make_node(self, inode: int) -> Node:
        if inode == ROOT:
            return Node(ROOT)
        if FIRST_TOP <= inode < FIRST_TOP + len(TOP_FILES):
            return Node(inode, TOP_FILES[inode - FIRST_TOP])
        slot, offset = divmod(inode - FIRST_DIR, STRIDE)
        entry = self.by_slot.get(slot)
        if entry is None or offset > len(ALL_PROCESS_FILES):
            raise pyfuse3.FUSEError(errno.ENOENT)
        spec = ALL_PROCESS_FILES[offset - 1] if offset else None
        return Node(inode, spec, entry)


class KernelNotices:
    """What the daemon tells the kernel unasked: directories gone, `events` changed.

    Poll handles of readers waiting on an `events` file (by entry serial, 0 for
    the top one) are notified when its counters move or its process leaves; a
    removed process directory is invalidated in the kernel's cache, at once for
    the request that removed it, in the background otherwise."""

    def __init__(self) -> None:
        self.pollers: dict[int, dict[int, pyfuse3.PollHandle]] = {}
        # Names of removed directories for `run_invalidations`; None while it does not run.
        self._invalidations: trio.MemorySendChannel[bytes] | None = None
        self._attached = True  # False once the session closes: no kernel notification then

    def entry_removed(self, entry: Entry) -> None:
        pollers = self.pollers.pop(entry.serial, {}).values()
        if not self._attached:
            return
        for poll_handle in pollers:
            poll_handle.notify()
        name = str(entry.pid).encode()
        if self._invalidations is None:
            return  # not mounted (engine-only use), or the session is ending
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self._invalidations.send_nowait(name)

    def events_moved(self, entry: Entry) -> None:
        for serial in (entry.serial, TOP_POLL_KEYS["events"]):
            pollers = self.pollers.pop(serial, {}).values()
            if self._attached:
                for poll_handle in pollers:
                    poll_handle.notify()

    def records_added(self) -> None:
        pollers = self.pollers.pop(TOP_POLL_KEYS["enforcements"], {}).values()
        if self._attached:
            for poll_handle in pollers:
                poll_handle.notify()

    async def run_invalidations(self) -> None:
        """Make the kernel forget removed process directories, one at a time.

        Run in the serving nursery instead of pyfuse3's `invalidate_entry_async`,
        whose thread could still hold a request when the session closed and then
        logged a traceback at a clean stop (a process exiting just before SIGTERM).
        Here an invalidation under way is finished (shielded, at most 1 s, since it
        blocks in the kernel) before the session closes, and those still queued
        are dropped with the mount.
        """
        send, receive = trio.open_memory_channel[bytes](float("inf"))
        self._invalidations = send
        try:
            async with receive:
                async for name in receive:
                    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                        await self._invalidate(name)
        finally:
            self._invalidations = None

    @staticmethod
    async def _invalidate(name: bytes) -> None:
        with contextlib.suppress(OSError):  # ENOENT: the kernel had nothing cached
            await trio.to_thread.run_sync(
                pyfuse3.invalidate_entry, ROOT, name, abandon_on_cancel=True
            )

    def detach(self) -> None:
        """The session is about to close: send the kernel nothing more."""
        self._attached = False
        self._invalidations = None

    @staticmethod
    async def invalidate_now(name: bytes) -> None:
        """Make the kernel forget a directory removed by this request before it returns.

        The background invalidation would race the caller's next lookup (the
        shell's `ls` right after `echo PID > deregister`). Blocking in a worker
        thread keeps the event loop free to answer the lookups the kernel may
        wait for meanwhile, so this cannot deadlock.
        """
        with contextlib.suppress(OSError):
            await trio.to_thread.run_sync(pyfuse3.invalidate_entry, ROOT, name)


def attributes_of(node: Node, mounted_at: int, dir_timeout: float) -> pyfuse3.EntryAttributes:
    """What stat(2) shows of a node: its owner the process's, its times the
    registration's (the mount's for the top files); process directories cached
    for `dir_timeout` only."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = node.inode
    attr.generation = 0
    attr.st_nlink = 2 if node.is_dir else 1
    if node.spec is None:
        attr.st_mode = stat.S_IFDIR | 0o555
    else:
        attr.st_mode = stat.S_IFREG | node.spec.mode
    if node.inode == ROOT:
        attr.st_mode = stat.S_IFDIR | 0o755
    timestamp = mounted_at
    if node.entry is not None:
        attr.st_uid, attr.st_gid = node.entry.owner_uid, node.entry.owner_gid
        timestamp = int(node.entry.registered * 1e9)
    attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = timestamp
    attr.st_size = 0
    attr.st_blksize = 4096
    attr.st_blocks = 0
    is_process_dir = node.entry is not None and node.is_dir
    attr.entry_timeout = dir_timeout if is_process_dir else STABLE_TIMEOUT
    attr.attr_timeout = dir_timeout if node.entry is not None else STABLE_TIMEOUT
    if is_tree_file(node.spec):  # there while a tree quota is: the kernel asks each time
        attr.entry_timeout = attr.attr_timeout = 0
    return attr


def _poll_key(handle: Handle) -> int:
    """Pollers of a process's `events` by entry serial; a top file's by its name."""
    node = handle.node
    if node.entry is not None:
        return node.entry.serial
    assert node.spec is not None
    return TOP_POLL_KEYS[node.spec.name]


class RestrackOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, engine: Engine, *, hidepid: bool = False) -> None:
        super().__init__()
        self.engine = engine
        self.hidepid = hidepid
        self.inodes = Inodes()
        self.handles = HandleTable()
        self._callers: dict[int, Caller] = {}
        self.notices = KernelNotices()
        self._mounted_at = time.time_ns()
        # With hidepid the kernel's shared dentry cache would show one user's
        # lookups to another, so process directories are not cached at all.
        self._dir_timeout = 0.0 if hidepid else STABLE_TIMEOUT
        engine.on_removal(self._entry_removed)
        engine.on_event(self.notices.events_moved)
        engine.enforcer.records.on_added(self.notices.records_added)

    def _entry_removed(self, entry: Entry) -> None:
        self.inodes.forget(entry)
        self.notices.entry_removed(entry)

    # ----- helpers -------------------------------------------------------

    def _visible(self, entry: Entry, uid: int) -> bool:
        return visible(entry, uid, self.hidepid)

    def _checked_node(self, inode: int, uid: int) -> Node:
        node = self.inodes.node(inode)
        if node.entry is not None and self.hidepid and not self._visible(node.entry, uid):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _caller(self, uid: int) -> Caller:
        """The caller `uid`, one object per uid (immutable; made once, not per open)."""
        caller = self._callers.get(uid)
        if caller is None:
            if len(self._callers) >= MAX_CALLERS:
                self._callers.clear()
            caller = self._callers[uid] = Caller(uid, self.hidepid)
        return caller

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        return attributes_of(node, self._mounted_at, self._dir_timeout)

    # ----- lookups -------------------------------------------------------

    @boundary
    def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._checked_node(parent_inode, ctx.uid)
        text = name.decode(errors="replace")
        node: Node | None
        if parent.inode == ROOT:
            node = self.inodes.top_file(text) or self._process_dir(text, ctx.uid)
        elif parent.entry is not None and parent.is_dir:
            node = self.inodes.process_file(parent.entry, text)
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(node)

    def _process_dir(self, name: str, uid: int) -> Node | None:
        try:
            entry = self.engine.get(parse_pid_name(name))
        except InvalidArgument:
            return None
        if entry is None or not self._visible(entry, uid):
            return None
        return self.inodes.remember(entry)

    @boundary
    def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self._checked_node(inode, ctx.uid))

    @boundary
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._checked_node(inode, ctx.uid)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size and (node.spec is None or node.spec.write is None):
            raise pyfuse3.FUSEError(errno.EPERM)
        # Truncation (shell `>`) of a writable file and time updates are accepted
        # and change nothing, as in sysfs.
        return self._attributes(node)

    # ----- directories ---------------------------------------------------

    @boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._checked_node(inode, ctx.uid)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return self._new_handle(Handle(node, self._caller(ctx.uid)))

    @boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.handles[fh]
        listing = handle.kept.listing
        if start_id == 0 or listing is None:
            listing = self._listing(handle)
        # Offsets follow inode numbers, so entries coming and going between two
        # readdir calls never make one listing skip or repeat a name; the
        # listing is kept for one pass (one `ls` of 10,000 pids makes ~50 calls),
        # and taken again if the budget of its uid dropped it meanwhile.
        start = bisect.bisect_right(listing, start_id, key=lambda item: item[2])
        for name, child, offset in listing[start:]:
            attributes = self._attributes(child)
            if not pyfuse3.readdir_reply(token, name.encode(), attributes, offset):
                self.handles.keep(fh, listing=listing)
                return
        self.handles.keep(fh)  # the pass is over

    def _listing(self, handle: Handle) -> list[tuple[str, Node, int]]:
        """`.`, `..` and the children, each with its readdir offset, ascending.

        `..` of a process directory is the root; of the root, the root itself (the
        kernel answers a mount root's `..` from the mount's parent anyway)."""
        dots = [(".", handle.node, DOT_OFFSET), ("..", self.inodes.node(ROOT), DOTDOT_OFFSET)]
        children = self._children(handle)
        return dots + [(name, child, child.inode + CHILD_OFFSET) for name, child in children]

    def _children(self, handle: Handle) -> list[tuple[str, Node]]:
        """The directory's children, in inode order (readdir offsets follow it)."""
        node = handle.node
        if node.inode == ROOT:
            dirs = [
                (str(entry.pid), self.inodes.remember(entry))
                for entry in self.engine.entries()
                if self._visible(entry, handle.caller.uid)
            ]
            return self.inodes.top_files() + sorted(dirs, key=lambda item: item[1].inode)
        assert node.entry is not None
        return [] if node.entry.ended is not None else self.inodes.process_files(node.entry)

    @boundary
    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh)

    @boundary
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.EPERM)
        entry = self.engine.register(parse_pid_name(name.decode(errors="replace")), ctx.uid)
        return self._attributes(self.inodes.remember(entry))

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.EPERM)
        pid = parse_pid_name(name.decode(errors="replace"))
        entry = self.engine.get(pid)
        if entry is None or not self._visible(entry, ctx.uid):
            raise pyfuse3.FUSEError(errno.ENOENT)
        await self.engine.deregister(pid, ctx.uid)

    # ----- files ---------------------------------------------------------

    def _new_handle(self, handle: Handle) -> int:
        try:
            return self.handles.add(handle)
        except TooManyHandles as error:
            log.warning("uid=%d: open refused: %s", handle.caller.uid, error.strerror)
            raise pyfuse3.FUSEError(error.errno) from None

    @boundary
    def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._checked_node(inode, ctx.uid)
        spec = node.spec
        if spec is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        access_mode = flags & os.O_ACCMODE
        wants_read = access_mode != os.O_WRONLY  # O_RDONLY or O_RDWR
        wants_write = access_mode != os.O_RDONLY
        if (wants_read and not spec.readable) or (wants_write and spec.write is None):
            raise pyfuse3.FUSEError(errno.EACCES)
        handle = Handle(node, self._caller(ctx.uid))
        if spec.pollable:
            handle.seen = self._seen(handle)  # poll() wakes on changes from here on
        fh = self._new_handle(handle)
        # direct_io: every read() reaches us, so values are never a stale page cache.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def _render(self, handle: Handle) -> bytes:
        spec = handle.node.spec
        assert spec is not None and spec.read is not None
        return spec.read(self.engine, handle.node.entry, handle.caller).encode()

    def _seen(self, handle: Handle) -> object:
        """What poll() compares of a pollable file: its version, else its text."""
        spec = handle.node.spec
        assert spec is not None
        if spec.version is not None:
            return spec.version(self.engine, handle.node.entry, handle.caller)
        return self._render(handle)

    async def _render_async(self, handle: Handle) -> bytes:
        """A slow file's text: awaited, so the loop serves other requests meanwhile."""
        spec = handle.node.spec
        assert spec is not None and spec.read_async is not None
        return (await spec.read_async(self.engine, handle.node.entry, handle.caller)).encode()

    @boundary
    def read(self, fh: int, off: int, size: int) -> bytes | Awaitable[bytes]:
        handle = self.handles[fh]
        kept = handle.kept
        # Like seq_file: a read at offset 0 computes the value afresh; reads
        # further on continue the same text, so a value never tears. What is kept
        # for that is bounded per uid (restrackfs.handles).
        if off and kept.content is not None:
            content = kept.content
        elif off and kept.end is not None and off >= kept.end:
            return b""  # past the end of a text returned whole, or dropped for the budget
        elif handle.node.spec is not None and handle.node.spec.read_async is not None:
            if off and kept.end is not None:
                # its text was dropped: this uid holds more than its budget in texts.
                # Rendering it again per chunk would let one user's readers cost the
                # loop a whole render per 128 KiB; say so instead.
                raise pyfuse3.FUSEError(errno.ENOBUFS)
            return self._read_slow(fh, handle, off, size)
        else:
            content = self._render(handle)
            spec = handle.node.spec
            if spec is not None and spec.pollable:
                handle.seen = content if spec.version is None else self._seen(handle)
            if not off and size >= len(content):
                self.handles.keep_end(fh, len(content))  # all of it goes now
            else:
                self.handles.keep(fh, content=content)
        return content[off : off + size]

    async def _read_slow(self, fh: int, handle: Handle, off: int, size: int) -> bytes:
        """A read at offset 0 of a file whose text takes long (read_async): awaited,
        so the loop serves other requests meanwhile."""
        content = await self._render_async(handle)
        self.handles.keep(fh, content=content)
        return content[off : off + size]

    @boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        spec = handle.node.spec
        assert spec is not None and spec.write is not None
        try:
            return await self._write(handle, spec, buf)
        except Exception:
            if spec.name == "quota":  # for the metrics: quota writes answered with an errno
                count_refused_quota_write()
            raise

    async def _write(self, handle: Handle, spec: FileSpec, buf: bytes) -> int:
        if len(buf) > MAX_WRITE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            text = buf.decode("ascii")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        # deny mode: the command answers once the rlimits are in force or given up on
        removed = await spec.write(self.engine, handle.node.entry, text, handle.caller)
        if removed is not None:  # the caller's next lookup must not find it cached
            await self.notices.invalidate_now(str(removed.pid).encode())
        return len(buf)

    @boundary
    def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        if handle is not None and handle.node.spec is not None and handle.node.spec.pollable:
            self.notices.pollers.get(_poll_key(handle), {}).pop(fh, None)

    @boundary
    async def poll(
        self,
        inode: int,
        fh: int,
        poll_handle: pyfuse3.PollHandle | None,
        ctx: pyfuse3.RequestContext,
    ) -> int:
        """Plain files are always ready; `events` is ready once its text changed
        since this reader's last read (or its open), as cgroup's memory.events;
        `enforcements` once a record it may see was added since then."""
        handle = self.handles[fh]
        spec = handle.node.spec
        assert spec is not None
        if not spec.pollable:
            return (select.POLLIN if spec.readable else 0) | (select.POLLOUT if spec.write else 0)
        try:
            changed = self._seen(handle) != handle.seen
        except (TrackerError, NoSuchProcess):
            return select.POLLIN | select.POLLERR  # gone: the next read says why
        if changed:
            return select.POLLIN | select.POLLPRI
        if poll_handle is not None:
            self.notices.pollers.setdefault(_poll_key(handle), {})[fh] = poll_handle
        return 0

    # ----- refused -------------------------------------------------------

    async def _refuse(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    create = mknod = unlink = rename = symlink = link = _refuse
    setxattr = removexattr = _refuse
