"""The grammar of what is written to `PID/quota` and `PID/reset`: parsing and
formatting, nothing else.

The one parser of these values: the daemon's files use it, and so do the client
and the `restrack` command, to say why a value is invalid before writing it (the
daemon still decides). So this module stays pure: the standard library and
`tracker.errors` and `tracker.vocabulary` only, never the engine, trio or pyfuse3
(`test_the_client_imports_no_engine` checks it).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from tracker.errors import InvalidArgument
from tracker.vocabulary import FILES, HEAP, LIMIT_MAX, UNLIMITED, format_limit

# and the parse_* functions
__all__ = ["LIMIT_MAX", "NO_QUOTA", "UNLIMITED", "Action", "Quota", "Reset", "Scope"]
# Leading zeros, then at most 20 significant digits: anything longer is past
# LIMIT_MAX anyway, and int() of a huge digit string is slow (refused past 4300).
_SIZE = re.compile(r"0*([0-9]{1,20})([KMGTkmgt]?)", re.ASCII)
_COUNT = re.compile(r"0*([0-9]{1,20})", re.ASCII)
# What counts as whitespace in a written value: ASCII's, as sysfs's isspace().
# (str.split() would also take \x1c-\x1f as separators.)
WHITESPACE = " \t\n\v\f\r"
_WORDS = re.compile(r"[^ \t\n\v\f\r]+")
_SUFFIX = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


class Action(enum.StrEnum):
    KILL = "kill"
    DENY = "deny"
    NOTIFY = "notify"


class Scope(enum.StrEnum):
    """What a quota covers: one process, or the process and everything it starts."""

    PROCESS = "process"
    TREE = "tree"


# Why a tree cannot deny: each member's rlimit holds its own usage, never the sum.
TREE_CANNOT_DENY = "scope=tree cannot deny: per-process rlimits cannot hold a sum"
# Why a warning needs a limit: it is a share of one.
WARN_NEEDS_LIMIT = "warn needs a heap or files limit: it is a share of one"
WARN_MIN, WARN_MAX = 1, 99  # percent
_PERCENT = re.compile(r"([0-9]{1,2})%", re.ASCII)


@dataclass(frozen=True, slots=True)
class Quota:
    heap: int | None = None  # bytes; None is no limit
    files: int | None = None
    action: Action = Action.KILL
    scope: Scope = Scope.PROCESS
    warn: int | None = None  # percent of each limit; None: no warning

    def __post_init__(self) -> None:
        if self.scope is Scope.TREE and self.action is Action.DENY:
            raise InvalidArgument(TREE_CANNOT_DENY)
        if self.warn is not None:
            if not WARN_MIN <= self.warn <= WARN_MAX:
                raise InvalidArgument(f"warn={self.warn}%: want {WARN_MIN}-{WARN_MAX}%")
            if self.heap is None and self.files is None:
                raise InvalidArgument(WARN_NEEDS_LIMIT)

    @property
    def is_tree(self) -> bool:
        return self.scope is Scope.TREE

    def warn_threshold(self, limit: int | None) -> int | None:
        """The usage over which a resource with this `limit` is warned of:
        limit * warn // 100 (usage > it warns); None without a warning or a limit."""
        if self.warn is None or limit is None:
            return None
        return limit * self.warn // 100

    def format(self) -> str:
        """The `quota` file's text; ` warn=N%` and ` scope=tree` only when set, so a
        quota without them reads exactly as before they existed."""
        heap, files = format_limit(self.heap), format_limit(self.files)
        warn = "" if self.warn is None else f" warn={self.warn}%"
        scope = " scope=tree" if self.is_tree else ""
        return f"{HEAP}={heap} {FILES}={files} action={self.action}{warn}{scope}"


NO_QUOTA = Quota()


def parse_size(text: str) -> int | None:
    """`max`, or bytes with an optional K/M/G/T suffix (powers of 1024)."""
    if text == UNLIMITED:
        return None
    match = _SIZE.fullmatch(text)
    if not match:
        raise InvalidArgument(f"bad size {text!r}: want bytes with K/M/G/T suffix, or max")
    value = int(match[1]) << _SUFFIX[match[2].lower()]
    if value > LIMIT_MAX:
        raise InvalidArgument(f"size {text!r} is too large")
    return value


def parse_count(text: str) -> int | None:
    if text == UNLIMITED:
        return None
    match = _COUNT.fullmatch(text)
    if not match or int(match[1]) > LIMIT_MAX:
        raise InvalidArgument(f"bad count {text!r}: want a non-negative integer, or max")
    return int(match[1])


def parse_action(text: str) -> Action:
    try:
        return Action(text)
    except ValueError:
        raise InvalidArgument(f"bad action {text!r}: want kill, deny or notify") from None


def parse_scope(text: str) -> Scope:
    try:
        return Scope(text)
    except ValueError:
        raise InvalidArgument(f"bad scope {text!r}: want process or tree") from None


def parse_warn(text: str) -> int:
    """`N%`, N an integer 1-99: the share of each limit past which usage is warned of."""
    match = _PERCENT.fullmatch(text)
    if not match or not WARN_MIN <= int(match[1]) <= WARN_MAX:
        raise InvalidArgument(f"bad warn {text!r}: want a percentage {WARN_MIN}-{WARN_MAX}, as 80%")
    return int(match[1])


_PARSERS = {
    HEAP: parse_size,
    FILES: parse_count,
    "action": parse_action,
    "scope": parse_scope,
    "warn": parse_warn,
}


def parse_quota(text: str) -> Quota:
    """Parse `heap=SIZE files=N action=A warn=N% scope=S` (any subset, any order, at
    least one); `scope=tree` with `action=deny` is EINVAL (TREE_CANNOT_DENY), and so
    is `warn` without a heap or files limit (WARN_NEEDS_LIMIT)."""
    tokens = _WORDS.findall(text)
    if not tokens:
        raise InvalidArgument("empty quota: want heap=SIZE files=N action=kill|deny|notify")
    values: dict[str, object] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or key not in _PARSERS:
            raise InvalidArgument(f"bad quota token {token!r}")
        if key in values:
            raise InvalidArgument(f"{key} given twice")
        values[key] = _PARSERS[key](value)
    return Quota(**values)  # type: ignore[arg-type]


class Reset(enum.StrEnum):
    """What a write of `reset` clears: the quota, the usage counters (the peaks
    restart with them), or both; the value is the file's word, for the log."""

    ALL = "all"
    QUOTA = "quota"
    USAGE = "usage"

    @property
    def clears_quota(self) -> bool:
        return self is not Reset.USAGE

    @property
    def restarts_usage(self) -> bool:
        return self is not Reset.QUOTA


RESETS = {"1": Reset.ALL, "all": Reset.ALL, "quota": Reset.QUOTA, "usage": Reset.USAGE}


def parse_reset(text: str) -> Reset:
    """`1`/`all`, `quota` or `usage`."""
    try:
        return RESETS[text.rstrip(WHITESPACE)]
    except KeyError:
        raise InvalidArgument(
            f"reset: want 1, all, quota or usage, not {text.rstrip(WHITESPACE)!r}"
        ) from None
