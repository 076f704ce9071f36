"""`restrack top` on a terminal: the rows of `restrackfs.top` drawn with curses.

Only drawing and keys live here. The screen is laid out anew at every frame
from its size, so a resize (KEY_RESIZE, which ncurses makes of SIGWINCH) is
one more frame: columns are dropped by priority, and the name column shrinks,
until a row fits on one line; nothing ever wraps.
"""

from __future__ import annotations

import contextlib
import curses
import locale
import time
from collections.abc import Callable
from dataclasses import dataclass

from restrackfs.top import (
    SORT_KEYS,
    Mark,
    Row,
    SortKey,
    Top,
    human_size,
    rate_text,
    record_text,
    sparkline,
    use_bar,
)

HEADER_LINES = 3  # the title, the keys, the column titles
FOOTER_LINES = 1  # the last enforcement records
NAME_MIN = 8
NAME_MAX = 24


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    text: Callable[[Row, bool], str]  # (row, ascii_only) -> the cell
    right: bool = True


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def _name(row: Row, ascii_only: bool) -> str:
    tree = "" if row.members is None else f" ({row.members})"
    branch = ("`-" if ascii_only else "└ ") if row.depth else ""
    return branch + row.name + tree


# Every column, in the order shown; PRIORITY says which stay when space is short.
COLUMNS: dict[str, Column] = {
    "PID": Column("PID", 7, lambda r, a: str(r.pid)),
    "USER": Column("USER", 8, lambda r, a: r.user, right=False),
    "NAME": Column("NAME", NAME_MIN, _name, right=False),
    "HEAP": Column("HEAP", 6, lambda r, a: human_size(r.heap)),
    "VMDATA": Column("VMDATA", 6, lambda r, a: human_size(r.heap_total)),
    "FILES": Column("FILES", 5, lambda r, a: _number(r.files)),
    "FDS": Column("FDS", 5, lambda r, a: _number(r.files_total)),
    "USE": Column("USE", 12, lambda r, a: use_bar(r.use, 12), right=False),
    "RATE/MIN": Column("RATE/MIN", 8, lambda r, a: rate_text(r.rate)),
    "PEAK": Column("PEAK", 6, lambda r, a: human_size(r.heap_peak)),
    "FPEAK": Column("FPEAK", 5, lambda r, a: _number(r.files_peak)),
    "RSS": Column("RSS", 6, lambda r, a: human_size(r.rss)),
    "HISTORY": Column("HISTORY", 10, lambda r, a: sparkline(r.history, 10, a), right=False),
    "ACTION": Column("ACTION", 6, lambda r, a: r.action or "-", right=False),
}
PRIORITY = (
    "PID", "NAME", "HEAP", "USE", "RATE/MIN", "FILES", "HISTORY", "USER", "VMDATA", "FDS",
    "PEAK", "FPEAK", "ACTION", "RSS",
)  # fmt: skip
MARK_WIDTH = 1


def layout(width: int) -> list[Column]:
    """The columns that fit `width` (one space before each), in display order; the
    name column takes what is left, up to NAME_MAX."""
    chosen: set[str] = set()
    used = MARK_WIDTH
    for title in PRIORITY:
        need = 1 + COLUMNS[title].width
        if used + need <= width:
            chosen.add(title)
            used += need
    columns = [column for title, column in COLUMNS.items() if title in chosen]
    spare = min(width - used, NAME_MAX - NAME_MIN)
    return [
        Column(c.title, c.width + spare, c.text, c.right) if c.title == "NAME" else c
        for c in columns
    ]


def cells(row: Row, columns: list[Column], ascii_only: bool) -> str:
    """One row as a line: the mark character, then each cell cut to its width."""
    parts = [row.mark.value]
    for column in columns:
        text = column.text(row, ascii_only)[: column.width]
        parts.append(text.rjust(column.width) if column.right else text.ljust(column.width))
    return " ".join(parts)


def titles(columns: list[Column], key: SortKey) -> str:
    sorted_by = {SortKey.HEAP: "HEAP", SortKey.FILES: "FILES", SortKey.RATE: "RATE/MIN",
                 SortKey.USE: "USE"}[key]  # fmt: skip
    parts = [" "]
    for c in columns:
        title = c.title + ("v" if c.title == sorted_by else "")
        parts.append(title.rjust(c.width) if c.right else title.ljust(c.width))
    return " ".join(parts)


KEYS_HELP = "sort: h heap  f files  r rate  u use   q quit   ! over quota  * warned"


class Screen:
    """The curses side: colours where the terminal has them, one frame at a time."""

    def __init__(self, window: curses.window, ascii_only: bool) -> None:
        self.window = window
        self.ascii_only = ascii_only
        self.colours: dict[Mark, int] = {}
        with contextlib.suppress(curses.error):  # a terminal without a cursor to hide
            curses.curs_set(0)
        if curses.has_colors():
            curses.start_color()
            background = curses.COLOR_BLACK
            with contextlib.suppress(curses.error):
                curses.use_default_colors()
                background = -1  # the terminal's own
            curses.init_pair(1, curses.COLOR_RED, background)
            curses.init_pair(2, curses.COLOR_YELLOW, background)
            self.colours = {
                Mark.OVER: curses.color_pair(1) | curses.A_BOLD,
                Mark.WARNED: curses.color_pair(2),
            }

    def draw(self, top: Top, key: SortKey, engine: str | None) -> None:
        height, width = self.window.getmaxyx()
        self.window.erase()
        columns = layout(width)
        room = max(0, height - HEADER_LINES - FOOTER_LINES)
        rows = top.rows(key, room)
        title = (
            f"restrack top - {time.strftime('%H:%M:%S')} - {top.count} tracked"
            + (f" - {engine}" if engine else "")
            + f" - sort: {key.value}"
        )
        self._line(0, title, width, curses.A_BOLD)
        self._line(1, KEYS_HELP, width, curses.A_DIM)
        self._line(2, titles(columns, key), width, curses.A_REVERSE)
        for y, row in enumerate(rows, start=HEADER_LINES):
            self._line(
                y, cells(row, columns, self.ascii_only), width, self.colours.get(row.mark, 0)
            )
        if height > HEADER_LINES:
            self._line(height - 1, footer(top), width, curses.A_BOLD)
        self.window.refresh()

    def _line(self, y: int, text: str, width: int, attribute: int) -> None:
        if y >= self.window.getmaxyx()[0]:
            return
        with contextlib.suppress(curses.error):  # writing the last cell of the last line
            self.window.addnstr(y, 0, text.ljust(width), width, attribute)


def footer(top: Top) -> str:
    """The last enforcement records, newest first; empty when there are none."""
    if not top.records:
        return ""
    return "last: " + " | ".join(record_text(r) for r in reversed(top.records))


def run(
    mount: str | None,
    delay: float,
    iterations: int | None,
    sort: SortKey,
    engine: Callable[[], str | None],
) -> int:
    """The screen until `q` (exit 0), Ctrl-C, or `iterations` frames."""
    locale.setlocale(locale.LC_ALL, "")
    ascii_only = locale.getpreferredencoding(False).lower().replace("-", "") != "utf8"
    return curses.wrapper(_loop, mount, delay, iterations, sort, engine(), ascii_only)


def _loop(
    window: curses.window,
    mount: str | None,
    delay: float,
    iterations: int | None,
    sort: SortKey,
    engine: str | None,
    ascii_only: bool,
) -> int:
    screen = Screen(window, ascii_only)
    top = Top(mount)
    frames = 0
    while True:
        top.refresh()
        screen.draw(top, sort, engine)
        frames += 1
        if iterations is not None and frames >= iterations:
            return 0
        deadline = time.monotonic() + delay
        while (key := _next_key(window, deadline)) is not None:
            if key in (ord("q"), ord("Q")):
                return 0
            if key == curses.KEY_RESIZE:
                curses.update_lines_cols()
                screen.draw(top, sort, engine)
            elif 0 <= key < 256 and chr(key) in SORT_KEYS:
                sort = SORT_KEYS[chr(key)]
                screen.draw(top, sort, engine)


def _next_key(window: curses.window, deadline: float) -> int | None:
    """The next key pressed before `deadline`, or None once it passed; keys already
    typed are taken even at `--delay 0`."""
    while True:
        remaining = deadline - time.monotonic()
        window.timeout(max(0, int(remaining * 1000)))
        key = window.getch()
        if key >= 0:
            return key
        if remaining <= 0 or time.monotonic() >= deadline:
            return None


def can_draw() -> bool:
    """Whether the terminal $TERM names can be drawn on: known to terminfo, with cursor
    addressing (`dumb` has none). Elsewhere `restrack top` prints plain tables."""
    try:
        curses.setupterm()
    except curses.error:
        return False
    return curses.tigetstr("cup") is not None
