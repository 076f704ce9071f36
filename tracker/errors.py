"""The engine's errors: `OSError` subclasses carrying the errno users are promised (docs/files.md).

Each layer above (the filesystem, the client) answers with `error.errno`, so
the meaning of a failure is decided once, here, where it happens.
"""

from __future__ import annotations

import errno
from typing import ClassVar

from tracker.linux.procfs import AccessDenied, NoSuchProcess

__all__ = [
    "AccessDenied",
    "AlreadyTracked",
    "Deregistered",
    "InvalidArgument",
    "LimitNotInForce",
    "NoSuchProcess",
    "NotPermitted",
    "NotTracked",
    "QuotaBusy",
    "QuotaNotKept",
    "StateNotSaved",
    "TrackerError",
]


class TrackerError(OSError):
    code: ClassVar[int] = errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(self.code, message)

    def __str__(self) -> str:
        return self.strerror or ""


class InvalidArgument(TrackerError):
    code = errno.EINVAL


class AlreadyTracked(TrackerError):
    code = errno.EEXIST


class NotTracked(TrackerError):
    """Deregistering (or acting on) a pid nobody registered."""

    code = errno.ESRCH


class Deregistered(TrackerError):
    """The entry was deregistered while a file of it was open."""

    code = errno.ENOENT


class NoTree(TrackerError):
    """A tree file read once the tree quota ended (reset, or never set): the file is gone."""

    code = errno.ENOENT


class QuotaBusy(TrackerError):
    code = errno.EBUSY


class NotPermitted(TrackerError):
    code = errno.EPERM


class LimitNotInForce(TrackerError):
    """A deny limit the kernel does not show after it was set (its helper was stopped,
    killed or failed, or the process changed it meanwhile): the change was undone."""

    code = errno.EAGAIN


class QuotaNotKept(TrackerError):
    """The engine cannot enforce this quota (the kernel's map is full): refused,
    never accepted unenforced."""

    code = errno.ENOSPC


class StateNotSaved(TrackerError):
    """The state file could not be written; the change was rolled back."""

    # Errors a user can act on keep their errno; any other (EEXIST from a path
    # replaced by a file, say) would read as something else in the errno table.
    MEANINGFUL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})

    def __init__(self, cause: OSError) -> None:
        self.code = cause.errno if cause.errno in self.MEANINGFUL else errno.EIO
        super().__init__(f"state file not saved: {cause.strerror or cause}")
