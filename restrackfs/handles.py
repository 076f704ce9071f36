"""The open handles of the mount, and what they may keep, bounded per uid.

A file handle keeps the text of its last read at offset 0 (the seq_file habit:
a read at offset 0 renders afresh, reads further on continue the same text, so
a value never tears), and a directory handle its listing during one readdir
pass. A read at offset 0 that returns the whole text (`cat` of any value file)
keeps only where it ends: the next read is end of file, and nothing is kept.
What one uid can make the daemon hold is bounded twice:

- at most `MAX_HANDLES_PER_UID` open handles (files and directories) per uid
  but root's; one more open is ENFILE (the daemon's table is full for that
  user; EMFILE would read as the caller's own RLIMIT_NOFILE);
- at most `KEPT_BYTES_PER_UID` of kept renderings and listings per uid, or the
  one largest rendering if that is more: keeping one more drops that uid's
  least recently used ones. A handle whose text was dropped answers a read at
  or past the text's end with end of file, and a read before it with a fresh
  rendering (so that text may tear, which only a uid holding more than the
  budget in texts can see), or, for the files whose rendering is costly
  (`metrics`, `fds`), with ENOBUFS: a user's readers must not cost the loop one
  whole rendering per chunk; a listing is taken again, and since readdir
  offsets follow inode numbers the pass neither skips nor repeats a name.
"""

from __future__ import annotations

import errno
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MAX_HANDLES_PER_UID = 4096
KEPT_BYTES_PER_UID = 8 << 20
LISTING_ENTRY_BYTES = 200  # what one (name, Node) of a listing costs, measured roughly
ROOT_UID = 0
MAX_IDLE_ACCOUNTS = 1024  # uids with no handle open whose (empty) account is kept


class TooManyHandles(OSError):
    def __init__(self, uid: int) -> None:
        super().__init__(errno.ENFILE, f"uid {uid} holds {MAX_HANDLES_PER_UID} handles")


@dataclass(eq=False, slots=True)
class Kept:
    """What a handle keeps between reads: a rendering and where it ends."""

    content: bytes | None = None  # the text of the last read at offset 0
    end: int | None = None  # its length, kept when the text is dropped
    listing: list[Any] | None = None  # a directory's, during one readdir pass


@dataclass(slots=True)
class _Uid:
    handles: int = 0
    kept_bytes: int = 0
    kept: OrderedDict[int, int] = field(default_factory=OrderedDict)  # fh -> bytes, LRU first


class HandleTable:
    """fh -> handle, with the per-uid accounting above. Handles carry `caller.uid`
    and a `kept: Kept`."""

    def __init__(self) -> None:
        self._handles: dict[int, Any] = {}
        self._uids: defaultdict[int, _Uid] = defaultdict(_Uid)
        self._next_fh = 1

    def __getitem__(self, fh: int) -> Any:
        return self._handles[fh]

    def __len__(self) -> int:
        return len(self._handles)

    def __iter__(self) -> Iterator[int]:
        return iter(self._handles)

    def add(self, handle: Any) -> int:
        uid = handle.caller.uid
        account = self._uids[uid]
        if uid != ROOT_UID and account.handles >= MAX_HANDLES_PER_UID:
            raise TooManyHandles(uid)
        account.handles += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def pop(self, fh: int) -> Any | None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return None
        uid = handle.caller.uid
        self._forget(fh, uid)
        account = self._uids[uid]
        account.handles -= 1
        # An idle uid's account is kept for its next open (one reader's open and
        # close would otherwise make and drop it every time), unless there are many.
        if account.handles == 0 and len(self._uids) > MAX_IDLE_ACCOUNTS:
            del self._uids[uid]
        return handle

    def keep(
        self, fh: int, *, content: bytes | None = None, listing: list[Any] | None = None
    ) -> None:
        """Let handle `fh` keep `content` or `listing` (or nothing: both None),
        dropping its uid's least recently kept ones if over the budget."""
        handle = self._handles[fh]
        uid = handle.caller.uid
        self._forget(fh, uid)
        handle.kept.content, handle.kept.listing = content, listing
        handle.kept.end = None if content is None else len(content)
        size = len(content) if content is not None else 0
        size += len(listing) * LISTING_ENTRY_BYTES if listing is not None else 0
        if not size:
            return
        account = self._uids[uid]
        while account.kept and account.kept_bytes + size > KEPT_BYTES_PER_UID:
            oldest, _ = next(iter(account.kept.items()))
            self._drop(oldest, uid)
        account.kept[fh] = size
        account.kept_bytes += size

    def keep_end(self, fh: int, end: int) -> None:
        """Let handle `fh` keep where its text ends, not the text: the read at offset
        0 returned all of it, so the next read (at `end`) is end of file."""
        handle = self._handles[fh]
        kept = handle.kept
        if kept.content is not None or kept.listing is not None:
            self._forget(fh, handle.caller.uid)
            kept.content = kept.listing = None
        kept.end = end

    def kept_bytes(self, uid: int) -> int:
        return self._uids[uid].kept_bytes if uid in self._uids else 0

    def _forget(self, fh: int, uid: int) -> None:
        account = self._uids.get(uid)
        if account is not None and fh in account.kept:
            account.kept_bytes -= account.kept.pop(fh)

    def _drop(self, fh: int, uid: int) -> None:
        self._forget(fh, uid)
        kept = self._handles[fh].kept
        kept.content = kept.listing = None  # kept.end stays: end of file stays there
