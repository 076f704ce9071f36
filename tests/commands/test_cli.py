"""The `restrack` command, run as a real subprocess against a real mount."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from restrackfs import client
from tests.support.procs import MiB, dead_pid
from tests.support.tempdirs import shared_tempdir
from tests.support.users import NOBODY, as_user
from tracker.vocabulary import FD_KINDS

VENV_BIN = Path(sys.executable).parent
CONSOLE_SCRIPT = VENV_BIN / "restrack"
JSON_KEYS = {
    "pid", "comm", "heapsize", "openfile_count", "heap_quota", "file_quota", "action",
    "heap_total", "openfile_total", "registered", "heap_peak", "openfile_peak", "quota_use",
    "over_quota",
}  # fmt: skip
INT_KEYS = (
    "pid", "heapsize", "openfile_count", "heap_total", "openfile_total", "registered",
    "heap_peak", "openfile_peak",
)  # fmt: skip
NO_QUOTA = "heap=max files=max action=kill\n"
ROW = re.compile(r"^(\d+)\s")


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RESTRACK_MOUNT"}
    env.update(extra)
    return env


def restrack(
    mount: object | None,
    *args: object,
    uid: int | None = None,
    env: dict[str, str] | None = None,
    program: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = program or [str(VENV_BIN / "python"), "-m", "restrackfs.cli"]
    if mount is not None:
        argv = [*argv, "--mount", str(mount)]
    argv += [str(a) for a in args]
    if uid is not None:
        argv = as_user(uid, argv)
    return subprocess.run(
        argv, capture_output=True, text=True, cwd="/", env=env or environment(), timeout=30
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert (result.returncode, result.stderr) == (0, ""), result
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], code: int, message: str | None = None) -> str:
    """Exit `code`, nothing on stdout, exactly one line on stderr (`message` if given)."""
    assert result.returncode == code, result
    assert result.stdout == ""
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    if message is not None:
        assert result.stderr == f"restrack: {message}\n"
    else:
        assert result.stderr.startswith("restrack: ")
    return result.stderr


def show_fields(text: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in text.splitlines())


def rows(text: str) -> dict[int, list[str]]:
    """The data rows of a status table, by pid."""
    lines, _, footer = text.partition("\n\n")
    assert footer in ("engine: procfs\n", "engine: bpf\n"), footer
    lines = lines.splitlines()
    assert lines[0].split() == [
        "PID", "COMMAND", "HEAP", "PEAK", "FILES", "HEAP-QUOTA", "FILE-QUOTA", "USE", "ACTION",
    ]  # fmt: skip
    return {int(line.split()[0]): line.split() for line in lines[1:]}


@pytest.fixture
def m(daemon) -> Path:
    return daemon.mountpoint


# ----- the commands ---------------------------------------------------------------------


def test_register_and_deregister_several(m, daemon, spawn):
    workloads = [spawn() for _ in range(3)]
    pids = [w.pid for w in workloads]
    assert ok(restrack(m, "register", *pids)) == ""
    assert client.tracked(mount=m) == sorted(pids)
    assert ok(restrack(m, "deregister", *pids[:2])) == ""
    assert client.tracked(mount=m) == [pids[2]]


def test_cap_and_show(m, daemon, spawn):
    w = spawn()
    ok(restrack(m, "register", w.pid))
    assert (
        ok(restrack(m, "cap", w.pid, "--heap", "40M", "--files", "10", "--action", "notify")) == ""
    )
    assert daemon.read(w.pid, "quota") == "heap=41943040 files=10 action=notify\n"
    w.do("mmap", 20 * MiB)
    w.do("open", 2)
    fields = show_fields(ok(restrack(m, "show", w.pid)))
    assert fields["pid"] == str(w.pid)
    assert fields["comm"] == "workload"
    assert int(fields["heapsize"]) == client.fetch(w.pid, mount=m).heapsize
    assert fields["openfile_count"] == "2"
    assert (fields["heap_quota"], fields["file_quota"], fields["action"]) == (
        "41943040",
        "10",
        "notify",
    )
    assert fields["quota_use"] == "50%"

    assert fields["heap_peak"] == fields["heapsize"] and fields["openfile_peak"] == "2"
    kinds = re.fullmatch(
        r"file (\d+), dir (\d+), socket (\d+), pipe (\d+), anon (\d+), other (\d+) \(total (\d+)\)",
        fields["fds"],
    )
    assert kinds, fields["fds"]
    *counts, total = map(int, kinds.groups())
    assert sum(counts) == total == int(fields["openfile_total"])
    assert counts[1:3] == [0, 0] and counts[3] >= 2 and counts[5] >= 2  # stdio pipes, /dev/null

    record = json.loads(ok(restrack(m, "show", w.pid, "--json")))
    assert set(record) == JSON_KEYS | {"fds"}
    assert list(record["fds"]) == [*FD_KINDS, "openfile_total"]
    assert record["fds"]["openfile_total"] == total
    for key in INT_KEYS:
        assert type(record[key]) is int, key
    assert record["pid"] == w.pid and record["comm"] == "workload"
    assert abs(record["heapsize"] - 20 * MiB) <= 4096
    assert (record["openfile_count"], record["heap_quota"], record["file_quota"]) == (
        2,
        40 * MiB,
        10,
    )
    assert record["action"] == "notify"
    assert record["quota_use"] == pytest.approx(50, abs=0.1)


def test_show_without_quota(m, spawn):
    w = spawn()
    ok(restrack(m, "register", w.pid))
    fields = show_fields(ok(restrack(m, "show", w.pid)))
    assert (fields["heap_quota"], fields["file_quota"]) == ("max", "max")
    assert fields["action"] == "-"  # as status's ACTION: no limit, no action
    record = json.loads(ok(restrack(m, "show", w.pid, "--json")))
    assert (record["heap_quota"], record["file_quota"], record["quota_use"]) == (None, None, None)
    assert record["action"] is None  # said "kill" with no quota at all
    assert (record["heapsize"], record["openfile_count"]) == (0, 0)


@pytest.mark.parametrize("quota", ["action=notify", "files=3"])
def test_json_action_only_with_a_limit(m, daemon, spawn, quota):
    """`action` is what a breach does: null while neither quota is set (even when the
    quota was written with an action, `heap=max files=max action=notify`)."""
    w = spawn()
    ok(restrack(m, "register", w.pid))
    daemon.write(quota, w.pid, "quota")
    want = None if quota.startswith("action=") else "kill"
    assert json.loads(ok(restrack(m, "show", w.pid, "--json")))["action"] == want
    (record,) = json.loads(ok(restrack(m, "status", "--json")))
    assert record["action"] == want
    assert show_fields(ok(restrack(m, "show", w.pid)))["action"] == (want or "-")


def test_cap_files_or_action_alone(m, daemon, spawn):
    a, b = spawn(), spawn()
    ok(restrack(m, "register", a.pid, b.pid))
    ok(restrack(m, "cap", a.pid, "--files", "3"))
    assert daemon.read(a.pid, "quota") == "heap=max files=3 action=kill\n"
    ok(restrack(m, "cap", b.pid, "--heap", "1G", "--action", "deny"))
    assert daemon.read(b.pid, "quota") == f"heap={1024 * MiB} files=max action=deny\n"


def test_status_table_and_json(m, spawn):
    big, small, free = spawn(), spawn(), spawn()
    ok(restrack(m, "register", big.pid, small.pid, free.pid))
    big.do("mmap", 20 * MiB)
    ok(restrack(m, "cap", big.pid, "--heap", "40M", "--files", "10"))
    ok(restrack(m, "cap", small.pid, "--heap", "1536", "--files", "4", "--action", "notify"))
    small.do("open", 3)
    heap = client.fetch(big.pid, mount=m).heapsize

    table = ok(restrack(m, "status"))
    by_pid = rows(table)
    assert sorted(by_pid) == sorted([big.pid, small.pid, free.pid])
    assert by_pid[big.pid] == [
        str(big.pid), "workload", *["20M" if heap == 20 * MiB else "20.0M"] * 2, "0", "40M",
        "10", "50%", "kill",
    ]  # fmt: skip
    assert by_pid[small.pid] == [
        str(small.pid), "workload", "0", "0", "3", "1.5K", "4", "75%", "notify",
    ]  # fmt: skip
    cells = by_pid[free.pid]
    assert cells[:5] == [str(free.pid), "workload", "0", "0", "0"]
    assert cells[5] in ("-", "max") and cells[6] in ("-", "max") and cells[7] in ("-", "0%")

    listing = json.loads(ok(restrack(m, "status", "--json")))
    assert isinstance(listing, list)
    records = {r["pid"]: r for r in listing}
    assert sorted(records) == sorted(by_pid)
    for record in listing:
        assert set(record) == JSON_KEYS
        for key in INT_KEYS:
            assert type(record[key]) is int, key
    assert (records[big.pid]["heapsize"], records[big.pid]["heap_quota"]) == (heap, 40 * MiB)
    assert records[big.pid]["quota_use"] == pytest.approx(50, abs=0.1)
    assert (records[small.pid]["heap_quota"], records[small.pid]["file_quota"]) == (1536, 4)
    assert records[small.pid]["quota_use"] == pytest.approx(75)
    assert records[small.pid]["action"] == "notify"
    assert records[free.pid]["heap_quota"] is None and records[free.pid]["file_quota"] is None
    assert records[free.pid]["quota_use"] is None

    # ls is the same command
    assert ok(restrack(m, "ls")) == table
    assert json.loads(ok(restrack(m, "ls", "--json"))) == listing


def test_status_with_nothing_tracked(m):
    table = ok(restrack(m, "status"))
    assert rows(table) == {}
    assert json.loads(ok(restrack(m, "status", "--json"))) == []


def test_human_sizes_in_the_table(m, spawn):
    sizes = {"1536": "1.5K", "2G": "2G", "3T": "3T", "1023": "1023", "10M": "10M"}
    workloads = {text: spawn() for text in sizes}
    ok(restrack(m, "register", *(w.pid for w in workloads.values())))
    for text, w in workloads.items():
        ok(restrack(m, "cap", w.pid, "--heap", text))
    by_pid = rows(ok(restrack(m, "status")))
    for text, shown in sizes.items():
        assert by_pid[workloads[text].pid][5] == shown, text


def test_cap_takes_the_sizes_status_prints(m, daemon, spawn):
    """status printed 1.5K and cap --heap 1.5K was refused: a decimal with a suffix is
    taken, rounded down to a whole byte (the mount's own grammar stays integers)."""
    sizes = {  # given: (bytes, as status prints them)
        "1.5K": (1536, "1.5K"), "1.5G": (3 * 512 * MiB, "1.5G"), "1.3M": (1363148, "1.3M"),
        "0.1K": (102, "102"), "2.0T": (2 << 40, "2T"), "0.25k": (256, "256"),
    }  # fmt: skip
    workloads = {text: spawn() for text in sizes}
    ok(restrack(m, "register", *(w.pid for w in workloads.values())))
    for text, w in workloads.items():
        ok(restrack(m, "cap", w.pid, "--heap", text))
        assert daemon.read(w.pid, "quota") == f"heap={sizes[text][0]} files=max action=kill\n"
    by_pid = rows(ok(restrack(m, "status")))
    assert {text: by_pid[w.pid][5] for text, w in workloads.items()} == {
        text: shown for text, (_, shown) in sizes.items()
    }
    assert errno_of_write(daemon, "heap=1.5K", spawn) == errno.EINVAL


def errno_of_write(daemon, quota: str, spawn) -> int:
    """The mount's own grammar: the errno of writing `quota` to a fresh process's file."""
    w = spawn()
    daemon.register(w.pid)
    try:
        daemon.write(quota, w.pid, "quota")
    except OSError as error:
        return error.errno
    return 0


def test_cap_with_a_warning(m, daemon, spawn):
    w = spawn()
    ok(restrack(m, "register", w.pid))
    ok(restrack(m, "cap", w.pid, "--files", "10", "--warn", "80%", "--action", "notify"))
    assert daemon.read(w.pid, "quota") == "heap=max files=10 action=notify warn=80%\n"
    v = spawn()
    ok(restrack(m, "register", v.pid))
    refused = fails(restrack(m, "cap", v.pid, "--files", "10", "--warn", "100"), 2)
    assert refused.startswith(f"restrack: {v.pid}: bad warn '100%'")
    refused = fails(restrack(m, "cap", v.pid, "--action", "notify", "--warn", "50"), 2)
    assert refused.startswith(f"restrack: {v.pid}: warn needs a heap or files limit")
    assert daemon.read(v.pid, "quota") == NO_QUOTA
    ok(restrack(m, "cap", v.pid, "--heap", "40M", "--warn", "50"))  # the sign is optional here
    assert daemon.read(v.pid, "quota") == "heap=41943040 files=max action=kill warn=50%\n"


@pytest.mark.parametrize("size", ["1.5", "1.5KB", ".5K", "1.K", "1,5K", "1.5e3K"])
def test_cap_refuses_other_decimals(m, daemon, spawn, size):
    w = spawn()
    ok(restrack(m, "register", w.pid))
    reason = f"bad size {size!r}: want bytes with K/M/G/T suffix, or max"
    fails(restrack(m, "cap", w.pid, "--heap", size), 2, f"{w.pid}: {reason}")
    assert daemon.read(w.pid, "quota") == NO_QUOTA


def test_reset_forms(m, daemon, spawn):
    w = spawn()
    ok(restrack(m, "register", w.pid))
    ok(restrack(m, "cap", w.pid, "--files", "10"))
    w.do("open", 3)
    ok(restrack(m, "reset", w.pid, "--usage"))
    assert client.fetch(w.pid, mount=m) == client.Resource(w.pid, 0, 0, None, 10)
    w.do("open", 2)
    ok(restrack(m, "reset", w.pid, "--quota"))
    assert client.fetch(w.pid, mount=m) == client.Resource(w.pid, 0, 2, None, None)
    ok(restrack(m, "cap", w.pid, "--heap", "8M"))
    w.do("open", 1)
    ok(restrack(m, "reset", w.pid))
    assert client.fetch(w.pid, mount=m) == client.Resource(w.pid, 0, 0, None, None)
    assert daemon.read(w.pid, "quota") == NO_QUOTA
    resets = [
        line.split(" INFO ")[1] for line in daemon.log_text().splitlines() if " reset " in line
    ]
    assert resets == [f"reset pid={w.pid} {what} by uid=0" for what in ("usage", "quota", "all")]
    result = restrack(m, "reset", w.pid, "--quota", "--usage")
    assert result.returncode == 2 and "not allowed with" in result.stderr


def top_frames(text: str) -> list[list[int]]:
    """The pids of each frame `top` printed, in order."""
    frames: list[list[int]] = []
    for line in text.splitlines():
        if "COMMAND" in line and "PID" in line:
            frames.append([])
        elif match := ROW.match(line):
            frames[-1].append(int(match[1]))
    return frames


def test_top_orders_by_quota_use(m, spawn):
    half, most, none, little = spawn(), spawn(), spawn(), spawn()
    ok(restrack(m, "register", half.pid, most.pid, none.pid, little.pid))
    half.do("mmap", 20 * MiB)
    ok(restrack(m, "cap", half.pid, "--heap", "40M"))
    ok(restrack(m, "cap", most.pid, "--files", "4"))
    most.do("open", 3)
    ok(restrack(m, "cap", little.pid, "--files", "100"))
    little.do("open", 1)
    started = time.monotonic()
    out = ok(restrack(m, "top", "-n", "2", "--delay", "0"))
    assert time.monotonic() - started < 10
    expected = [most.pid, half.pid, little.pid, none.pid]
    assert top_frames(out) == [expected, expected]
    assert out.count("4 tracked") == 2


def test_top_prints_plain_tables_when_not_a_terminal(m, spawn):
    w = spawn()
    ok(restrack(m, "register", w.pid))
    out = ok(restrack(m, "top", "-n", "2", "--delay", "0"))
    assert "\x1b" not in out  # no clear-screen codes in a pipe or a file
    assert top_frames(out) == [[w.pid], [w.pid]]


def test_top_prints_plain_tables_to_a_terminal_without_keys(m, spawn):
    """stdout a terminal but stdin not (`restrack top < /dev/null`): no keys could
    reach the screen, so plain tables, as to a pipe."""
    w = spawn()
    ok(restrack(m, "register", w.pid))
    primary, secondary = pty.openpty()
    try:
        argv = [str(VENV_BIN / "python"), "-m", "restrackfs.cli", "--mount", str(m)]
        subprocess.run(
            [*argv, "top", "-n", "1"],
            stdin=subprocess.DEVNULL,
            stdout=secondary,
            env=environment(),
            timeout=30,
        )
        os.close(secondary)
        secondary = -1
        out = b""
        with contextlib.suppress(OSError):  # EIO once everything was read
            while chunk := os.read(primary, 65536):
                out += chunk
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    assert out.startswith(b"restrack top - ") and b"\x1b" not in out
    assert top_frames(out.decode()) == [[w.pid]]


def test_exceeded_zero_quota_sorts_first(m, spawn):
    over, half = spawn(), spawn()
    ok(restrack(m, "register", over.pid, half.pid))
    ok(restrack(m, "cap", over.pid, "--files", "0", "--action", "notify"))
    over.do("open", 1)
    ok(restrack(m, "cap", half.pid, "--files", "2"))
    half.do("open", 1)
    by_pid = rows(ok(restrack(m, "status")))
    assert by_pid[over.pid][6:] == ["0", "100%", "notify"]  # a zero quota counts as one
    assert by_pid[half.pid][7] == "50%"
    assert top_frames(ok(restrack(m, "top", "-n", "1"))) == [[over.pid, half.pid]]


def test_json_quota_use_of_an_exceeded_zero_quota_is_not_null(m, spawn):
    w = spawn()
    ok(restrack(m, "register", w.pid))
    ok(restrack(m, "cap", w.pid, "--files", "0", "--action", "notify"))
    w.do("open", 1)
    record = json.loads(ok(restrack(m, "show", w.pid, "--json")))
    assert record["quota_use"] == 100.0  # a zero quota counts as one file
    assert record["over_quota"] is True


def test_hostile_comm_keeps_one_row(m):
    code = (
        "import sys; open('/proc/self/comm', 'w').write('a b\\npid 1');"
        "print('ready', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [str(VENV_BIN / "python"), "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        ok(restrack(m, "register", proc.pid))
        lines = ok(restrack(m, "status")).partition("\n\n")[0].splitlines()
        # the PID column is as wide as its widest cell: "PID" (3) or the pid's digits
        assert len(lines) == 2 and re.match(rf"{proc.pid} +a b", lines[1]), lines
        record = json.loads(ok(restrack(m, "show", proc.pid, "--json")))
        assert record["pid"] == proc.pid and "\n" not in record["comm"]
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream:
                stream.close()


def read_until(proc: subprocess.Popen[bytes], condition, timeout: float = 10) -> str:
    """Collect proc's stdout without blocking until `condition(text)` holds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    text = b""
    deadline = time.monotonic() + timeout
    while not condition(text.decode(errors="replace")):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None and not select.select([fd], [], [], 0)[0]:
            pytest.fail(f"top printed no frame: {text!r}")
        if select.select([fd], [], [], min(remaining, 0.1))[0]:
            text += os.read(fd, 65536)
    return text.decode()


def test_top_until_ctrl_c(m, spawn):
    w = spawn()
    ok(restrack(m, "register", w.pid))
    proc = subprocess.Popen(
        [str(VENV_BIN / "python"), "-m", "restrackfs.cli", "--mount", str(m), "top"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(),
    )
    try:
        read_until(proc, lambda text: [w.pid] in top_frames(text))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


# ----- how it finds the mount -----------------------------------------------------------


def test_console_script(m, spawn):
    w = spawn()
    assert ok(restrack(m, "register", w.pid, program=[str(CONSOLE_SCRIPT)])) == ""
    assert w.pid in rows(ok(restrack(m, "status", program=[str(CONSOLE_SCRIPT)])))
    fails(
        restrack(m, "register", w.pid, program=[str(CONSOLE_SCRIPT)]),
        4,
        f"{w.pid}: already tracked",
    )


def test_mount_from_environment(m, spawn):
    w = spawn()
    env = environment(RESTRACK_MOUNT=str(m))
    ok(restrack(None, "register", w.pid, env=env))
    assert client.tracked(mount=m) == [w.pid]
    assert json.loads(ok(restrack(None, "show", w.pid, "--json", env=env)))["pid"] == w.pid


def test_mount_option_beats_environment(m, spawn):
    w = spawn()
    empty = shared_tempdir("restrack-empty-")
    try:
        env = environment(RESTRACK_MOUNT=str(empty))
        ok(restrack(m, "register", w.pid, env=env))
        assert client.tracked(mount=m) == [w.pid]
        fails(restrack(None, "status", env=env), 8)
    finally:
        empty.rmdir()


# ----- every error path -----------------------------------------------------------------


def test_no_such_process(m):
    pid = dead_pid()
    fails(restrack(m, "register", pid), 3, f"{pid}: no such process")


def kernel_thread() -> int | None:
    """A kernel thread's pid (kthreadd is 2 on the host), None where none is visible
    (in a PID namespace)."""
    for name in sorted(filter(str.isdigit, os.listdir("/proc")), key=int)[:200]:
        try:
            text = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        if int(text[text.rfind(b")") + 2 :].split()[6]) & client.PF_KTHREAD:
            return int(name)
    return None


def test_kernel_thread_is_named(m, daemon):
    """`restrack register 2` said "no such process": the daemon answers ESRCH (no
    address space, as a zombie), the command says why."""
    pid = kernel_thread()
    if pid is None:
        pytest.skip("no kernel thread visible in this PID namespace")
    fails(restrack(m, "register", pid), 3, f"{pid}: {client.KERNEL_THREAD}")
    with pytest.raises(ProcessLookupError):  # the daemon's own answer
        daemon.register(pid)
    assert client.tracked(mount=m) == []
    # a process that is gone is still "no such process"
    gone = dead_pid()
    fails(restrack(m, "register", gone), 3, f"{gone}: no such process")


def test_register_stops_at_the_first_error(m, spawn):
    w = spawn()
    pid = dead_pid()
    fails(restrack(m, "register", pid, w.pid), 3, f"{pid}: no such process")


def test_already_tracked(m, spawn):
    w = spawn()
    ok(restrack(m, "register", w.pid))
    fails(restrack(m, "register", w.pid), 4, f"{w.pid}: already tracked")


def test_deregister_untracked(m, spawn):
    w = spawn()
    fails(restrack(m, "deregister", w.pid), 5, f"{w.pid}: not tracked")


@pytest.mark.parametrize(
    "args", [["deregister"], ["show"], ["cap", "--files", "1"], ["reset"], ["reset", "--quota"]]
)
def test_a_pid_that_names_no_process(m, args):
    pid = dead_pid()
    fails(restrack(m, args[0], pid, *args[1:]), 3, f"{pid}: no such process")


@pytest.mark.parametrize(
    "args", [["show"], ["show", "--json"], ["cap", "--files", "1"], ["reset"], ["reset", "--usage"]]
)
def test_untracked_pid(m, spawn, args):
    w = spawn()
    fails(restrack(m, args[0], w.pid, *args[1:]), 5, f"{w.pid}: not tracked")


def test_not_permitted(m, daemon, spawn):
    untracked, tracked = spawn(), spawn()
    ok(restrack(m, "register", tracked.pid))
    fails(
        restrack(m, "register", untracked.pid, uid=NOBODY),
        6,
        f"{untracked.pid}: operation not permitted",
    )
    for args in (["cap", tracked.pid, "--files", "1"], ["reset", tracked.pid]):
        fails(restrack(m, *args, uid=NOBODY), 6, f"{tracked.pid}: operation not permitted")
    fails(
        restrack(m, "deregister", tracked.pid, uid=NOBODY),
        6,
        f"{tracked.pid}: operation not permitted",
    )
    assert daemon.read(tracked.pid, "quota") == NO_QUOTA
    # reading is everybody's right
    assert json.loads(ok(restrack(m, "show", tracked.pid, "--json", uid=NOBODY)))["pid"] == (
        tracked.pid
    )
    assert tracked.pid in rows(ok(restrack(m, "status", uid=NOBODY)))


def test_quota_already_set(m, daemon, spawn):
    w = spawn()
    ok(restrack(m, "register", w.pid))
    ok(restrack(m, "cap", w.pid, "--heap", "40M"))
    message = fails(restrack(m, "cap", w.pid, "--files", "1"), 7)
    assert message.startswith(f"restrack: {w.pid}: ")
    assert daemon.read(w.pid, "quota") == "heap=41943040 files=max action=kill\n"


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--heap", "10MB"], "bad size '10MB': want bytes with K/M/G/T suffix, or max"),
        (["--heap", "-5"], "bad size '-5': want bytes with K/M/G/T suffix, or max"),
        (["--files", "ten"], "bad count 'ten': want a non-negative integer, or max"),
        (["--heap", "40M", "--files", "-1"], "bad count '-1': want a non-negative integer, or max"),
        (["--heap", "9" * 20], f"size '{'9' * 20}' is too large"),
    ],
)
def test_invalid_quota(m, daemon, spawn, args, reason):
    w = spawn()
    ok(restrack(m, "register", w.pid))
    fails(restrack(m, "cap", w.pid, *args), 2, f"{w.pid}: {reason}")
    assert daemon.read(w.pid, "quota") == NO_QUOTA
    ok(restrack(m, "cap", w.pid, "--files", "5"))  # nothing was defined


def test_cap_needs_something_to_set(m, daemon, spawn):
    w = spawn()
    ok(restrack(m, "register", w.pid))
    fails(restrack(m, "cap", w.pid), 2)
    assert daemon.read(w.pid, "quota") == NO_QUOTA


def test_register_zero_is_invalid(m):
    fails(restrack(m, "register", 0), 2, "0: not a pid: want an integer >= 1")


@pytest.mark.parametrize(
    "args",
    [
        ["register", "abc"],
        ["register"],
        ["show"],
        ["show", "-3"],
        ["cap", "12x"],
        ["cap", "1", "--action", "explode"],
        ["top", "-n", "two"],
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors(m, args):
    result = restrack(m, *args)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "usage: restrack" in result.stderr and "Traceback" not in result.stderr


def test_bad_pid_is_named(m):
    result = restrack(m, "register", "abc")
    assert result.returncode == 2 and "'abc' is not a pid" in result.stderr


@pytest.mark.parametrize(
    "args",
    [["status"], ["ls", "--json"], ["register", "1"], ["show", "1"], ["top", "-n", "1"]],
)
def test_nothing_mounted(args):
    empty = shared_tempdir("restrack-empty-")
    try:
        message = fails(restrack(empty, *args), 8)
        assert str(empty) in message and "register" not in message.split(str(empty))[1]
    finally:
        empty.rmdir()


def test_killed_daemon(daemon, spawn):
    w = spawn()
    ok(restrack(daemon.mountpoint, "register", w.pid))
    daemon.stop(signal.SIGKILL)
    for args in (["status"], ["show", w.pid], ["cap", w.pid, "--files", "1"]):
        message = fails(restrack(daemon.mountpoint, *args), 8)
        assert str(daemon.mountpoint) in message
    assert w.alive()


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_textfile_directory_that_is_not_one(m, tmp_path, kind):
    """A missing --textfile directory exited 5, "not tracked" (its ENOENT read as the
    daemon's): now 1, saying which file could not be written and why."""
    (parent := tmp_path / "out").mkdir()  # tmp_path holds the daemon's files too
    directory = parent / "textfile"
    if kind == "a file":
        directory.write_text("")
    reason = "no such directory" if kind == "missing" else "not a directory"
    fails(
        restrack(m, "metrics", "--textfile", directory),
        1,
        f"cannot write {directory}/restrack.prom: {reason}",
    )
    assert os.listdir(parent) == ([] if kind == "missing" else ["textfile"])  # no temp file


def test_top_negative_delay_is_a_usage_error(m):
    result = restrack(m, "top", "-n", "2", "--delay", "-1")
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr


def test_help_lists_the_exit_codes():
    result = restrack(None, "--help")
    assert result.returncode == 0 and result.stderr == ""
    help_text = " ".join(result.stdout.split())
    for code, meaning in [
        (2, "invalid"), (3, "no such process"), (4, "already tracked"), (5, "not tracked"),
        (6, "not permitted"), (7, "quota already set"), (8, "no daemon"), (1, "anything else"),
    ]:  # fmt: skip
        assert f"{code} {meaning}" in help_text
