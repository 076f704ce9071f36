"""The fixtures every test layer shares; the helpers behind them are in tests/support/."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.bpf import BPF, pin_dir, pin_dirs, scrub, scrub_all
from tests.support.build import compile_c
from tests.support.daemon import Daemon, DaemonFactory, unmount
from tests.support.grow import Grower, build_grow
from tests.support.paths import C_SOURCES
from tests.support.tempdirs import left_behind, shared_tempdir
from tests.support.tree import ShellRoot, build_fanout
from tests.support.users import remove_user_pythons
from tests.support.workload import Workload, build_workload
from tracker.backends.bpf import loader

BPF_TEST_FOLDER = "tests/bpf/"


@pytest.fixture(scope="session")
def bin_dir() -> Iterator[Path]:
    """Compiled test programs, in a directory unprivileged uids can reach."""
    path = shared_tempdir("restrack-bin-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def workload_binary(bin_dir: Path) -> Path:
    return build_workload(bin_dir)


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


@pytest.fixture(scope="session")
def leaderless(bin_dir: Path) -> Path:
    """c/leaderless.c: its main thread exits on a line, a second one lives on."""
    return compile_c(C_SOURCES / "leaderless.c", bin_dir / "leaderless")


@pytest.fixture(scope="session")
def grow_binary(bin_dir: Path) -> Path:
    return build_grow(bin_dir)


@pytest.fixture
def grower(grow_binary: Path) -> Iterator[Callable[[str, int, int], Grower]]:
    started: list[Grower] = []

    def start(mode: str, step: int, count: int) -> Grower:
        started.append(Grower(grow_binary, mode, step, count))
        return started[-1]

    yield start
    for one in started:
        one.stop()


@pytest.fixture(scope="session")
def fanout_binary(bin_dir: Path) -> Path:
    """c/fanout.c: forks N children that grow in steps (a job for a tree quota)."""
    return build_fanout(bin_dir)


@pytest.fixture
def shell_root(fanout_binary: Path) -> Iterator[Callable[..., ShellRoot]]:
    """A shell to be a tree's root (`run` a command line in it); killed with its session."""
    started: list[ShellRoot] = []

    def start(**env: str) -> ShellRoot:
        started.append(ShellRoot(fanout_binary, **env))
        return started[-1]

    yield start
    for root in started:
        root.stop()


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


@pytest.fixture(scope="module")
def bpf_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One bpf daemon shared by a module's enforcement tests: each stop detaches (~3 s)."""
    factory = DaemonFactory(tmp_path_factory.mktemp("bpfd"))
    try:
        daemon = factory(*BPF)
        yield daemon
    finally:
        factory.cleanup()
        scrub(pin_dir(factory.daemons[0]))


@pytest.fixture
def bpf_factory(daemon_factory: DaemonFactory) -> Iterator[DaemonFactory]:
    """daemon_factory whose daemons' pin directories are removed at the end."""
    try:
        yield daemon_factory
    finally:
        scrub_all(daemon_factory)


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_in_tmp() -> Iterator[None]:
    """The suite leaves nothing in /tmp: every shared temp dir is gone at the end
    (a daemon that outlived its test once recreated them by saving its state)."""
    yield
    left = left_behind()
    for path in left:
        unmount(path)
        shutil.rmtree(path, ignore_errors=True)
    assert not left, f"tests left these behind: {sorted(map(str, left))}"


@pytest.fixture(scope="session", autouse=True)
def _no_pins_left() -> Iterator[None]:
    """The suite leaves no BPF pins: a stopped daemon keeps its quotas enforced
    (programs attached machine-wide), so each test releases what its daemons
    left. Any pin directory the suite made and left is removed, and fails it."""
    before = pin_dirs()
    yield
    left = sorted(pin_dirs() - before)
    for path in left:
        loader.remove_tree(path)
    assert not left, f"tests left these pins behind: {[str(path) for path in left]}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    remove_user_pythons()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many BPF tests ran: a skip on a machine that loads BPF must be seen."""
    ran, skipped = 0, []
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if not nodeid.startswith(BPF_TEST_FOLDER) or report.when not in ("call", "setup"):
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
