"""`restrack top` in a real terminal (a pty read by pyte) against a real daemon."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.commands.test_cli import environment, ok, restrack
from tests.support.procs import MiB
from tests.support.terminal import Terminal
from tests.support.users import NOBODY, as_user

VENV_BIN = Path(sys.executable).parent
ROW = re.compile(r"^[ !*] +(\d+) ")


@pytest.fixture
def m(daemon) -> Path:
    return daemon.mountpoint


@pytest.fixture
def terminal_of() -> Iterator:
    """`restrack top` on a mount, in a terminal of the given size, as `uid` if given."""
    started: list[Terminal] = []

    def start(
        mount: Path, columns: int, lines: int, *options: str, uid: int | None = None
    ) -> Terminal:
        argv = [str(VENV_BIN / "python"), "-m", "restrackfs.cli", "--mount", str(mount), "top"]
        argv += options
        if uid is not None:
            argv = as_user(uid, argv)
        started.append(Terminal(argv, columns, lines, environment()))
        return started[-1]

    yield start
    for term in started:
        term.close()


@pytest.fixture
def terminal(m, terminal_of):
    def start(columns: int = 80, lines: int = 24, *options: str) -> Terminal:
        return terminal_of(m, columns, lines, *options)

    return start


def pids_shown(term: Terminal) -> list[int]:
    return [int(match[1]) for line in term.lines if (match := ROW.match(line))]


def row_of(term: Terminal, pid: int) -> str:
    return next(line for line in term.lines if (match := ROW.match(line)) and int(match[1]) == pid)


def test_hundred_processes_show_the_header_and_the_twenty_busiest(m, spawn, terminal):
    workloads = [spawn() for _ in range(100)]
    ok(restrack(m, "register", *(w.pid for w in workloads)))
    for i, w in enumerate(workloads):
        w.do("mmap", (i + 1) * 256 * 1024)
    busiest = [w.pid for w in reversed(workloads[-20:])]
    term = terminal(80, 24)
    term.wait_for(lambda t: pids_shown(t) == busiest)
    lines = term.lines
    assert lines[0].startswith("restrack top - ") and "100 tracked" in lines[0]
    assert "q quit" in lines[1] and "h heap" in lines[1]
    assert lines[2].split()[:4] == ["PID", "USER", "NAME", "HEAPv"]
    assert "25M" in row_of(term, workloads[-1].pid)  # 100 x 256 KiB of heap grown
    assert all(len(line) == 80 for line in lines)


@pytest.mark.parametrize("delay", ["1", "0"])
def test_q_quits_with_status_0(m, spawn, terminal, delay):
    w = spawn()
    ok(restrack(m, "register", w.pid))
    term = terminal(80, 24, "--delay", delay)
    term.wait_for(lambda t: pids_shown(t) == [w.pid])
    term.send("q")
    assert term.wait_exit() == 0


def test_a_terminal_without_cursor_addressing_gets_plain_tables(m, spawn):
    w = spawn()
    ok(restrack(m, "register", w.pid))
    argv = [str(VENV_BIN / "python"), "-m", "restrackfs.cli", "--mount", str(m), "top", "-n", "2"]
    term = Terminal(argv, 80, 24, environment(), term="dumb")
    try:
        assert term.wait_exit() == 0
        assert term.text().count("restrack top - ") == 2
        assert [line.split()[0] for line in term.lines if line.startswith("PID")] == ["PID"] * 2
    finally:
        term.close()


def test_a_resize_redraws_to_the_new_size_without_wrapping(m, spawn, terminal):
    workloads = [spawn() for _ in range(30)]
    ok(restrack(m, "register", *(w.pid for w in workloads)))
    term = terminal(100, 30, "--delay", "60")  # no refresh but the resize's
    term.wait_for(lambda t: len(pids_shown(t)) == 30 - 4 and "VMDATA" in t.lines[2])
    term.resize(60, 15)
    term.wait_for(lambda t: len(pids_shown(t)) == 15 - 4)
    header = term.lines[2].split()
    assert header[:2] == ["PID", "NAME"] and "USER" not in header and "HISTORY" not in header
    assert all(ROW.match(line) for line in term.lines[3:14])  # one line a row: no wrap
    term.resize(120, 40)
    term.wait_for(lambda t: len(pids_shown(t)) == 30 and "HISTORY" in t.lines[2])


def test_keys_sort_by_files(m, spawn, terminal):
    few, many, none = spawn(), spawn(), spawn()
    ok(restrack(m, "register", few.pid, many.pid, none.pid))
    few.do("mmap", 8 * MiB)
    few.do("open", 1)
    many.do("open", 5)
    term = terminal(80, 24, "--delay", "60")
    term.wait_for(lambda t: pids_shown(t) == [few.pid, many.pid, none.pid])
    term.send("f")
    term.wait_for(lambda t: pids_shown(t) == [many.pid, few.pid, none.pid])
    assert "FILESv" in term.lines[2] and "sort: files" in term.lines[0]


def test_over_quota_rows_are_marked(m, spawn, terminal):
    over, under = spawn(), spawn()
    ok(restrack(m, "register", over.pid, under.pid))
    ok(restrack(m, "cap", over.pid, "--files", "1", "--action", "notify"))
    ok(restrack(m, "cap", under.pid, "--files", "10", "--action", "notify"))
    over.do("open", 3)
    under.do("open", 1)
    term = terminal(80, 24, "--sort", "use")
    term.wait_for(lambda t: pids_shown(t) == [over.pid, under.pid])
    assert row_of(term, over.pid).startswith("!")
    assert row_of(term, under.pid).startswith(" ")
    assert "300%" in row_of(term, over.pid) and "10%" in row_of(term, under.pid)


def test_a_tree_quota_folds_its_members_under_its_root(m, shell_root, terminal):
    root = shell_root()
    ok(restrack(m, "register", root.pid))
    ok(restrack(m, "cap", root.pid, "--heap", "1G", "--tree", "--action", "notify"))
    root.run("{fanout} 2 mmap 1048576 1")
    members = {int(root.read_line("fanout")[1])}
    members |= {int(root.read_line("child")[1]) for _ in range(2)}
    term = terminal(80, 24)
    term.wait_for(lambda t: pids_shown(t)[:1] == [root.pid] and set(pids_shown(t)[1:]) == members)
    assert "(4)" in row_of(term, root.pid)
    assert all("└" in row_of(term, member) for member in members)


def test_a_process_killed_by_its_quota_shows_in_the_bottom_line(m, daemon, spawn, terminal):
    if not daemon.path("enforcements").exists():
        pytest.skip("needs the enforcements file")
    victim = spawn()
    ok(restrack(m, "register", victim.pid))
    ok(restrack(m, "cap", victim.pid, "--heap", "1M"))
    term = terminal(80, 24)
    term.wait_for(lambda t: pids_shown(t) == [victim.pid])
    with contextlib.suppress(ProcessLookupError):  # killed in the call (bpf), or after
        victim.do("mmap", 4 * MiB)
    term.wait_for(lambda t: f"kill {victim.pid} workload heap" in t.lines[-1])
    assert term.lines[-1].startswith("last: ")


def test_a_user_sees_their_own_processes_under_hidepid(daemon_factory, spawn, terminal_of):
    daemon = daemon_factory("--hidepid")
    mine, theirs = spawn(uid=NOBODY), spawn()
    ok(restrack(daemon.mountpoint, "register", mine.pid, theirs.pid))
    mine.do("mmap", 3 * MiB)
    mine.do("open", 2)
    term = terminal_of(daemon.mountpoint, 100, 24, uid=NOBODY)
    term.wait_for(lambda t: pids_shown(t) == [mine.pid])
    assert "1 tracked" in term.lines[0]

    def complete(t: Terminal) -> bool:  # a frame may be caught half drawn
        return len(row_of(t, mine.pid).split()) >= 6

    term.wait_for(complete)
    cells = row_of(term, mine.pid).split()
    assert cells[1:5] == ["nobody", "workload", "3M", cells[4]] and cells[5] == "2"


def test_a_row_over_its_warning_level_is_marked(m, daemon, spawn, terminal):
    warned, calm = spawn(), spawn()
    ok(restrack(m, "register", warned.pid, calm.pid))
    try:
        daemon.write("files=10 action=notify warn=50%\n", warned.pid, "quota")
    except OSError:
        pytest.skip("needs warn=N%")
    daemon.write("files=10 action=notify warn=50%\n", calm.pid, "quota")
    warned.do("open", 6)
    calm.do("open", 4)
    term = terminal(80, 24, "--sort", "use")
    term.wait_for(lambda t: pids_shown(t) == [warned.pid, calm.pid])
    assert row_of(term, warned.pid).startswith("*") and "60%" in row_of(term, warned.pid)
    assert row_of(term, calm.pid).startswith(" ")
