"""Who may do what: the rule of kill(2), and root's quotas bind."""

from __future__ import annotations

from tracker.errors import NotPermitted

ROOT = 0


def may_control(caller_uid: int, owner_uid: int) -> bool:
    """Register, deregister, set a quota or reset: root, or the process's owner."""
    return caller_uid in (ROOT, owner_uid)


def may_lift_quota(caller_uid: int, quota_setter_uid: int | None) -> bool:
    """A quota root set can be lifted (reset, deregister) by root only."""
    return quota_setter_uid != ROOT or caller_uid == ROOT


def may_see(caller_uid: int, owner_uid: int, hidepid: bool) -> bool:
    return not hidepid or caller_uid in (ROOT, owner_uid)


def check_control(caller_uid: int, owner_uid: int, pid: int) -> None:
    if not may_control(caller_uid, owner_uid):
        raise NotPermitted(f"{pid}: not your process")


def check_lift_quota(caller_uid: int, quota_setter_uid: int | None, pid: int) -> None:
    if not may_lift_quota(caller_uid, quota_setter_uid):
        raise NotPermitted(f"{pid}: quota was set by root")
