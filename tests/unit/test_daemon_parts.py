"""Pure parts of the daemon and the command line: the size format, the default state
path, the per-uid budget of kept texts, the log guard's count."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

from restrackfs.cli import human_size
from restrackfs.daemon import default_state_path
from restrackfs.files import Caller
from restrackfs.handles import HandleTable, Kept
from restrackfs.logguard import LogGuard
from tests.support.procs import MiB


def test_one_size_format():
    """A usage of about 30 MiB read `30.0M` beside a `40M` quota: now one format,
    at most one decimal and no trailing .0."""
    sizes = {
        0: "0", 1023: "1023", 1024: "1K", 1536: "1.5K", 30 * MiB + 5: "30M",
        40 * MiB: "40M", int(1.26 * MiB): "1.3M", 150 * MiB + MiB // 2: "150M",
        1024 * MiB - 1: "1G", None: "-",
    }  # fmt: skip
    assert {size: human_size(size) for size in sizes} == sizes


def test_default_state_path_is_per_mount_point():
    assert str(default_state_path(Path("/restrack"))) == "/run/restrackfs/restrack.json"
    assert default_state_path(Path("/a/b-c")) != default_state_path(Path("/a-b/c"))


def test_a_text_read_whole_keeps_no_bytes():
    """What keep_end leaves in the per-uid budget: nothing, whatever was kept before."""
    table = HandleTable()
    handle = SimpleNamespace(caller=Caller(1000, False), kept=Kept())
    fh = table.add(handle)
    table.keep(fh, content=b"x" * 100)
    assert table.kept_bytes(1000) == 100
    table.keep_end(fh, 5)
    assert table.kept_bytes(1000) == 0
    assert (handle.kept.content, handle.kept.end) == (None, 5)


def test_the_log_guard_counts_what_it_suppressed():
    """The count comes with the first line after the window (printk_ratelimit's
    "callbacks suppressed"); other messages are not held back meanwhile."""
    now = [0.0]
    guard = LogGuard(burst=3, interval=5.0, clock=lambda: now[0])
    logger = logging.getLogger("test.logguard")
    logger.propagate = False
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    handler.addFilter(guard)
    logger.addHandler(handler)
    try:
        for _ in range(100):
            logger.warning("pid=%d over: %s", 7, "x\x1b[2J")
        logger.warning("another")
        now[0] = 5.0
        logger.warning("pid=%d over: %s", 7, "x\x1b[2J")
    finally:
        logger.removeHandler(handler)
    line = "pid=7 over: x\\x1b[2J"
    assert records == [line] * 3 + ["another", f"{line} [97 identical messages suppressed]"]
