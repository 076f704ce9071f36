"""Shared fixtures: a real workload process, a real mounted daemon."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from restrackfs import daemon as restrackfs_daemon
from tests.support.grow import grow_binary, grower  # noqa: F401  (fixtures for every module)
from tests.support.paths import C_SOURCES, CHECKOUT
from tracker.backends.bpf import backend as bpf_backend
from tracker.backends.bpf import loader

NOBODY = 65534
MiB = 1024 * 1024
# The interpreters that run this checkout's code as root; another uid gets user_python().
CHECKOUT_PYTHONS = {sys.executable, str(Path(sys.executable).parent / "python")}


def wait_until(condition: Callable[[], object], timeout: float = 5.0, what: str = "") -> object:
    """Poll `condition` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or condition}")
        time.sleep(0.002)


@pytest.fixture(scope="session")
def bin_dir() -> Iterator[Path]:
    """Compiled test programs, in a directory unprivileged uids can reach."""
    path = shared_tempdir("restrack-bin-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def workload_binary(bin_dir: Path) -> Path:
    binary = bin_dir / "workload"
    subprocess.run(["gcc", "-O1", "-pthread", "-o", binary, C_SOURCES / "workload.c"], check=True)
    return binary


def as_user(uid: int, argv: Sequence[object]) -> list[str]:
    """`argv` run with `uid` as real, effective and saved uid and gid, and no groups.

    A checkout's own interpreter is swapped for user_python(): the checkout (and its
    virtualenv) may sit under a directory that uid cannot enter, such as /root.
    """
    argv = [str(word) for word in argv]
    if argv and argv[0] in CHECKOUT_PYTHONS:
        argv[0] = user_python()
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


_user_python_dirs: list[Path] = []

# What code run as another uid imports: the client, the command line, `restrack run`.
USER_MODULES = ("restrackfs.client", "restrackfs.cli", "restrackfs.run")


@functools.cache
def user_python() -> str:
    """An interpreter any uid can run, with a copy of this checkout any uid can read.

    Prepared once per run in a private temp directory of the tests (0755, removed at the
    end of the session): the project's packages and the third-party packages they import
    are copied there, and a two-line wrapper runs a Python that uid can execute with that
    copy first on its path. Fails with the reason when no interpreter qualifies.
    """
    root = Path(tempfile.mkdtemp(prefix="restrack-userpy-"))  # removed at session finish
    _user_python_dirs.append(root)
    site = root / "site"
    for package in ("restrackfs", "tracker"):
        shutil.copytree(CHECKOUT / package, site / package, ignore=_no_bytecode)
    for source in _third_party_imports():
        if source.is_dir():
            shutil.copytree(source, site / source.name, ignore=_no_bytecode)
        else:
            shutil.copy2(source, site / source.name)
    _readable_by_all(root)
    reasons = []
    for interpreter in _interpreter_candidates():
        wrapper = root / "python"
        wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {interpreter} "$@"\n')
        wrapper.chmod(0o755)
        check = subprocess.run(
            as_user(NOBODY, [wrapper, "-c", f"import {', '.join(USER_MODULES)}"]),
            capture_output=True,
            text=True,
            cwd="/",
        )
        if check.returncode == 0:
            return str(wrapper)
        reasons.append(f"{interpreter}: {(check.stderr.strip().splitlines() or ['?'])[-1]}")
    pytest.fail(
        "no Python interpreter that uid 65534 can run imports this checkout's copy "
        f"(install python3 system-wide): {'; '.join(reasons)}"
    )


def _third_party_imports() -> list[Path]:
    """Top-level files and packages outside the standard library that USER_MODULES import."""
    code = (
        f"import sys, {', '.join(USER_MODULES)}\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None)\n"
        "    if f and 'site-packages' in f: print(f)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    tops = set()
    for line in out.stdout.split("\n"):
        if not line:
            continue
        site, _, rest = line.partition("site-packages/")
        top = Path(site + "site-packages") / rest.split("/")[0]
        if not top.name.startswith("__editable__"):
            tops.add(top)
    return sorted(tops)


def _interpreter_candidates() -> list[str]:
    """This run's interpreter first, then the system's one of the same version."""
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = [sys.executable, os.path.realpath(sys.executable), f"/usr/bin/{minor}"]
    return [path for i, path in enumerate(found) if os.path.exists(path) and path not in found[:i]]


def _no_bytecode(directory: str, names: list[str]) -> list[str]:
    return [name for name in names if name == "__pycache__"]


def _readable_by_all(root: Path) -> None:
    for directory, _subdirs, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            path = os.path.join(directory, name)
            os.chmod(path, os.stat(path).st_mode | 0o444)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for root in _user_python_dirs:
        shutil.rmtree(root, ignore_errors=True)


class Workload:
    """A child process that maps memory and opens files when told to."""

    def __init__(self, binary: Path, uid: int | None = None) -> None:
        argv = [str(binary)]
        if uid is not None:
            argv = as_user(uid, argv)
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.pid = int(self.ask("pid").split()[1])
        assert self.pid == self.proc.pid

    def ask(self, *words: object) -> str:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        if not reply:
            raise ProcessLookupError(f"workload {self.pid} died (status {self.proc.poll()})")
        return reply

    def do(self, *words: object) -> str:
        reply = self.ask(*words)
        assert reply.startswith("ok"), f"{words}: {reply}"
        return reply

    def thread(self) -> int:
        return int(self.do("thread").split()[1])

    def wait(self, timeout: float = 5.0) -> int:
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()


@pytest.fixture
def spawn(workload_binary: Path) -> Iterator[Callable[..., Workload]]:
    started: list[Workload] = []

    def start(uid: int | None = None) -> Workload:
        workload = Workload(workload_binary, uid)
        started.append(workload)
        return workload

    yield start
    for workload in started:
        workload.stop()


_SHARED_TEMPDIRS: list[Path] = []


def shared_tempdir(prefix: str) -> Path:
    """A directory every uid can enter (pytest's tmp_path is root-only).

    Whoever makes one removes it; `_nothing_left_in_tmp` checks that at the end."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    _SHARED_TEMPDIRS.append(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_in_tmp() -> Iterator[None]:
    """The suite leaves nothing in /tmp: every shared temp dir is gone at the end
    (a daemon that outlived its test once recreated them by saving its state)."""
    yield
    left = [path for path in _SHARED_TEMPDIRS if os.path.lexists(path)]
    for path in left:
        _unmount(path)
        shutil.rmtree(path, ignore_errors=True)
    assert not left, f"tests left these behind: {sorted(map(str, left))}"


@pytest.fixture(scope="session", autouse=True)
def _no_pins_left() -> Iterator[None]:
    """The suite leaves no BPF pins: a stopped daemon keeps its quotas enforced
    (programs attached machine-wide), so each test releases what its daemons
    left. Any pin directory the suite made and left is removed, and fails it."""
    before = _pin_dirs()
    yield
    left = sorted(_pin_dirs() - before)
    for path in left:
        loader.remove_tree(path)
    assert not left, f"tests left these pins behind: {[str(path) for path in left]}"


def _pin_dirs() -> set[Path]:
    try:
        return set(bpf_backend.PIN_ROOT.iterdir())
    except OSError:
        return set()


class Daemon:
    """A restrackfs daemon serving a real mount in a temp dir."""

    def __init__(self, mountpoint: Path, state: Path, log: Path) -> None:
        self.mountpoint = mountpoint
        self.state = state
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *options: str) -> None:
        argv = [sys.executable, "-m", "restrackfs.daemon", "--foreground"]
        argv += ["--state", str(self.state), "--log-level", "debug", *options]
        if not any(option.startswith("--engine") for option in options):
            # procfs unless a test asks: a bpf daemon that had a quota takes ~3 s to
            # stop (detaching waits for RCU); tests/test_engine_bpf.py runs bpf.
            argv += ["--engine", "procfs"]
        argv.append(str(self.mountpoint))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self._serving() or self.proc.poll() is not None, 20, "mount")
        assert self.proc.poll() is None, self.log.read_text()

    def _serving(self) -> bool:
        """Mounted and answering (a stale mount of a killed daemon is not)."""
        try:
            return "restrack_tracked_processes" in self.path("metrics").read_text()
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(20)
        self.proc = None
        return code

    def path(self, *parts: object) -> Path:
        return self.mountpoint.joinpath(*map(str, parts))

    def read(self, *parts: object) -> str:
        return self.path(*parts).read_text()

    def write(self, text: str, *parts: object) -> None:
        """One write() of `text`, as `echo` does; raises OSError with the errno."""
        fd = os.open(self.path(*parts), os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def register(self, pid: int) -> None:
        self.write(f"{pid}\n", "register")

    def log_text(self) -> str:
        return self.log.read_text()


def release(state: Path) -> None:
    """Lift what a stopped daemon left enforcing (soft limits, BPF pins): a stop
    keeps every quota, and the machine is shared with the rest of the suite."""
    if state.exists() or os.path.lexists(bpf_backend.pin_dir_of(state)):
        restrackfs_daemon.release(state)


def _unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


class DaemonFactory:
    """Starts daemons on fresh mount points; `cleanup` stops and removes them all."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.daemons: list[Daemon] = []

    def __call__(self, *options: str, start: bool = True) -> Daemon:
        mountpoint = shared_tempdir("restrack-mnt-")
        state = self.tmp_path / f"state{len(self.daemons)}.json"
        daemon = Daemon(mountpoint, state, self.tmp_path / "daemon.log")
        self.daemons.append(daemon)
        if start:
            daemon.start(*options)
        return daemon

    def stop_all(self) -> None:
        """Stop every daemon still running (one that outlived a fixture's directory
        would write its state file there anew, recreating the directory)."""
        for daemon in self.daemons:
            if daemon.proc is None:
                continue
            try:
                daemon.stop()
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()
                daemon.proc = None

    def cleanup(self) -> None:
        self.stop_all()
        for daemon in self.daemons:
            release(daemon.state)
            if os.path.ismount(daemon.mountpoint) or not os.path.exists(daemon.mountpoint):
                _unmount(daemon.mountpoint)
            shutil.rmtree(daemon.mountpoint, ignore_errors=True)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> Daemon:
    return daemon_factory()


BPF_TEST_MODULES = ("tests/bpf/",)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many BPF tests ran: a skip on a machine that loads BPF must be seen."""
    ran, skipped = 0, []
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if not nodeid.startswith(BPF_TEST_MODULES) or report.when not in ("call", "setup"):
                continue
            if outcome == "skipped":
                longrepr = report.longrepr
                skipped.append(longrepr[2] if isinstance(longrepr, tuple) else str(longrepr))
            elif report.when == "call" or outcome == "error":
                ran += 1
    if not ran and not skipped:
        return
    reasons = sorted(set(skipped))
    why = f" ({'; '.join(reasons)})" if reasons else ""
    terminalreporter.write_line(f"BPF tests: {ran} ran, {len(skipped)} skipped{why}")
