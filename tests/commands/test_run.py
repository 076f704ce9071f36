"""`restrack run` and restrack.h: C programs written for the kernel patch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from restrackfs import seccomp
from restrackfs.cli import include_dir
from tests.support.build import compile_c
from tests.support.cli import restrack_run
from tests.support.paths import C_SOURCES, CHECKOUT, DATA
from tests.support.users import NOBODY
from tests.support.waiting import wait_until

# The kernel patch's README, with its example program: the repository's own copy,
# so the example runs in every clone.
VENDORED_SEED = DATA / "kernel-patch-README.md"


@pytest.fixture(scope="session")
def binaries(bin_dir: Path) -> dict[str, Path]:
    out = bin_dir
    example = re.search(r"```c\n(.*?)```", VENDORED_SEED.read_text(), re.S)
    assert example, "the seed README's example program"
    (out / "example.c").write_text(example[1])
    return {
        "abi": compile_c(C_SOURCES / "abi.c", out / "abi"),
        "outer": compile_c(C_SOURCES / "outer_filter.c", out / "outer"),
        "header": compile_c(C_SOURCES / "header.c", out / "header", f"-I{include_dir()}"),
        "example": compile_c(out / "example.c", out / "example", "-w"),
    }


def lines(output: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in output.splitlines())


def test_every_return_code_of_the_abi(daemon, binaries):
    result = restrack_run(daemon, binaries["abi"], "codes")
    assert result.returncode == 0, result.stderr
    got = lines(result.stdout)
    expected = {
        "sanity": "0 0",
        "register_zero": "-1 EINVAL",
        "register_negative": "-1 EINVAL",
        "register_nopid": "-1 ESRCH",
        "register": "0 0",
        "register_again": "-1 ENFILE",
        "fetch": "0 0",
        "fetch_null": "-1 EINVAL",
        "fetch_wild": "-1 EINVAL",
        "fetch_readonly": "-1 EINVAL",
        "readonly_untouched": "1",
        "fetch_untracked": "-1 EINVAL",
        "cap_nopid": "-1 ESRCH",
        "cap_untracked": "-1 EINVAL",
        "cap_below_minus_one": "-1 EINVAL",
        "cap": "0 0",
        "cap_again": "-1 ENFILE",
        "capped": "40 -1",
        "reset_nopid": "-1 ESRCH",
        "reset_untracked": "-1 EINVAL",
        "reset": "0 0",
        "after_reset": "-1 -1",
        "deregister_zero": "-1 EINVAL",
        "deregister": "0 0",
        "deregister_again": "-1 ESRCH",
    }
    assert {key: got.get(key) for key in expected} == expected
    pid, heap, files, heap_quota, file_quota = got["fetched"].split()
    assert int(pid) > 0 and (heap, files, heap_quota, file_quota) == ("0", "0", "-1", "-1")


def test_eperm_for_another_users_process(daemon, binaries):
    root_process = subprocess.Popen(["sleep", "60"])
    try:
        result = restrack_run(daemon, binaries["abi"], "eperm", root_process.pid, uid=NOBODY)
        assert lines(result.stdout).get("register_other") == "-1 EPERM", result.stderr
        assert str(root_process.pid) not in os.listdir(daemon.mountpoint)
    finally:
        root_process.kill()
        root_process.wait()


def test_six_mib_half_sbrk_half_malloc(daemon, binaries):
    result = restrack_run(daemon, binaries["abi"], "sixmib")
    assert lines(result.stdout) == {"fetch": "0 0", "heap": "6"}


def test_five_forked_children_each_run_the_sequence(daemon, binaries):
    result = restrack_run(daemon, binaries["abi"], "forks")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"child {i} status 0" for i in range(5)]


def test_a_thread_calls_fetch(daemon, binaries):
    result = restrack_run(daemon, binaries["abi"], "thread")
    got = lines(result.stdout)
    assert got["thread_fetch"] == "0 0"
    assert got["thread_pid"].endswith("ok 1 heap_ge_2 1")


def test_child_over_file_quota_is_killed_by_the_daemon(daemon, binaries):
    result = restrack_run(daemon, binaries["abi"], "killed")
    assert lines(result.stdout) == {"child_signal": str(int(signal.SIGKILL))}


def test_kernel_patch_example_unmodified(daemon, binaries, tmp_path):
    result = restrack_run(daemon, binaries["example"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[1:4] == [
        "Process registered successfully.",
        "Resource quotas set successfully (heap: 40, files: 1).",
        out[3],
    ]
    fetched = [line for line in out if line.startswith("Fetched stats")]
    assert len(fetched) == 2
    for line in fetched:
        assert re.fullmatch(
            r"Fetched stats: PID: \d+, Heap: 20, Files: 0, Heap Quota: 40, File Quota: 1", line
        )
    assert out[-1] == "Process deregistered successfully."
    # the opens of /bin/dummy_* fail: they do not exist, so no file quota breach
    assert "open failed" in result.stderr


def readme_transcript() -> list[str]:
    """The output lines of the README's `restrack run -- ./kernel-patch-example`."""
    readme = (CHECKOUT / "README.md").read_text()
    block = re.search(r"```\n\$ restrack run -- \./kernel-patch-example\n(.*?)```", readme, re.S)
    assert block, "the README's transcript of the example"
    return block[1].splitlines()


def test_the_readmes_transcript_is_the_real_output(daemon, binaries, tmp_path):
    """The README hid two `open failed` lines behind `...`: its transcript
    is the whole output, stdout and stderr (on a terminal they interleave there)."""
    result = restrack_run(daemon, binaries["example"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pid = re.search(r"PID: (\d+)", result.stdout)[1]
    shown = [re.sub(r"PID: \d+", f"PID: {pid}", line) for line in readme_transcript()]
    errors = [line for line in shown if line.startswith("open failed")]
    assert result.stderr.splitlines() == errors
    assert result.stdout.splitlines() == [line for line in shown if line not in errors]


def test_without_emulation_the_example_gets_enosys(binaries, tmp_path):
    result = subprocess.run([binaries["example"]], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert "Function not implemented" in result.stderr


def test_restrack_h_over_the_mount(daemon, binaries):
    env = {**os.environ, "RESTRACK_MOUNT": str(daemon.mountpoint)}
    result = subprocess.run([binaries["header"]], capture_output=True, text=True, env=env)
    got = lines(result.stdout)
    assert got == {
        "register_zero": "-1 EINVAL",
        "register_nopid": "-1 ESRCH",
        "register": "0 0",
        "register_again": "-1 ENFILE",
        "cap_nopid": "-1 ESRCH",
        "cap_untracked": "-1 EINVAL",
        "cap_below_minus_one": "-1 EINVAL",
        "cap": "0 0",
        "cap_again": "-1 ENFILE",
        "fetch": "0 0",
        "fetched": "1 20 0 40 3",
        "fetch_null": "-1 EINVAL",
        "reset_untracked": "-1 EINVAL",
        "reset": "0 0",
        "after_reset": "0 -1 -1",
        "deregister": "0 0",
        "deregister_again": "-1 ESRCH",
        "fetch_untracked": "-1 EINVAL",
    }


def test_exit_status_is_the_programs(daemon):
    assert restrack_run(daemon, "sh", "-c", "exit 7").returncode == 7
    assert restrack_run(daemon, "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM
    result = restrack_run(daemon, "/nonexistent/program")
    assert result.returncode == 127 and "No such file or directory" in result.stderr


def test_sigterm_is_forwarded(daemon):
    argv = [sys.executable, "-m", "restrackfs.cli", "--mount", str(daemon.mountpoint)]
    supervisor = subprocess.Popen([*argv, "run", "--", "sleep", "60"])
    try:
        wait_until(
            lambda: any(
                Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"sleep\x0060")
                for p in _children(supervisor.pid)
            ),
            what="the program started",
        )
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(20) == 128 + signal.SIGTERM
    finally:
        supervisor.kill()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def test_orphaned_descendants_are_still_served(daemon, binaries, tmp_path):
    out = tmp_path / "orphan.txt"
    script = f"( sleep 0.3; {binaries['abi']} sixmib > {out} ) & exit 3"
    result = restrack_run(daemon, "sh", "-c", script)
    assert result.returncode == 3  # the program's own status, after the orphan finished
    assert lines(out.read_text()) == {"fetch": "0 0", "heap": "6"}


def test_no_mount_is_said_in_words(tmp_path):
    argv = [sys.executable, "-m", "restrackfs.cli", "--mount", str(tmp_path), "run", "--", "true"]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 8
    assert f"no restrackfs daemon serves {tmp_path}" in result.stderr


def test_outer_seccomp_filter_is_detected(daemon, binaries):
    argv = [binaries["outer"], sys.executable, "-m", "restrackfs.cli"]
    argv += ["--mount", str(daemon.mountpoint), "run", "--", binaries["abi"], "sixmib"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 125
    assert "outer seccomp filter" in result.stderr
    assert result.stdout == ""  # the program never ran


def test_fetch_answers_reach_only_the_address_space_that_asked(tmp_path):
    """The supervisor pins the caller's address space before it checks the call is
    still waiting: once another thread's exec has taken the tid (de_thread hands
    the leader's id over at once), a write lands nowhere, never in the new image."""
    child = subprocess.Popen(
        ["sh", "-c", "read line; exec sleep 30"], stdin=subprocess.PIPE, text=True
    )
    try:
        maps = Path(f"/proc/{child.pid}/maps").read_text().splitlines()
        address = next(int(line.split("-")[0], 16) for line in maps if " rw-p " in line)
        memory = seccomp.CallerMemory(child.pid)
        assert memory.write(address, b"\0")  # before the exec: its own, writable page
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        wait_until(lambda: Path(f"/proc/{child.pid}/comm").read_text() == "sleep\n", 5, "exec")
        assert not memory.write(address, b"\0" * 40)  # the old image is gone
        memory.close()
        readonly = next(int(line.split("-")[0], 16)
                        for line in Path(f"/proc/{child.pid}/maps").read_text().splitlines()
                        if " r--p " in line)  # fmt: skip
        with seccomp.CallerMemory(child.pid) as fresh:
            assert not fresh.write(readonly, b"\0")  # protections hold, as documented
    finally:
        child.kill()
        child.wait()
