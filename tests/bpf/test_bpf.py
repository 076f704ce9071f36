"""The BPF engine's kernel side (tracker/backends/bpf) against the real kernel.

Every test watches only child processes it started. Where BPF cannot load
(no BTF, no CAP_BPF, no libbpf) the tests skip with the reason; where the
prerequisites are present but loading fails, they fail: on this machine and
in CI a skip would hide a broken engine.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.bpf import prerequisites_missing
from tests.support.paths import CHECKOUT
from tests.support.procs import MiB, exited, open_fds, proc_vm_data
from tests.support.waiting import wait_until
from tests.support.workload import Workload
from tracker.backends.bpf import loader
from tracker.backends.bpf.loader import BpfUnavailable, Event, KernelWatch, Kind, Which
from tracker.linux import procfs

PAGE = 4096
BPF_DIR = Path(loader.__file__).parent


def _pin_dir() -> Path:
    return loader.BPFFS / f"restrackfs-test-{uuid.uuid4().hex[:12]}"


def _open(pin_dir: Path) -> KernelWatch:
    try:
        return KernelWatch.open(pin_dir)
    except BpfUnavailable as error:
        missing = prerequisites_missing()
        if missing:
            pytest.skip(f"BPF unavailable: {missing}")
        pytest.fail(f"BPF prerequisites present but the engine does not load: {error}")


def scrub(pin_dir: Path) -> None:
    """Last resort after a failed close: unpinning detaches links and frees maps."""
    if pin_dir.exists():
        shutil.rmtree(pin_dir, ignore_errors=True)


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    path = _pin_dir()
    yield path
    scrub(path)


@pytest.fixture(scope="module")
def kwatch() -> Iterator[KernelWatch]:
    """One attached watch shared by the enforcement tests (each watches only its own
    children and reads only their events): detaching costs seconds (RCU grace
    periods per link), so the life-cycle tests below make their own."""
    path = _pin_dir()
    try:
        watch = _open(path)
        try:
            watch.attach()
            yield watch
        finally:
            watch.close(unpin=True)
    finally:
        scrub(path)


def _vm_data_pages(pid: int) -> int:
    return proc_vm_data(pid) // PAGE


def _watch(kwatch: KernelWatch, pid: int, *, heap: int | None = None, files: int | None = None,
           action: str = "kill", **extra: int) -> tuple[int | None, int | None]:  # fmt: skip
    """Watch `pid` with quotas over its current usage; the absolute limits set."""
    heap_limit = None if heap is None else _vm_data_pages(pid) + heap // PAGE
    fd_limit = None if files is None else open_fds(pid) + files
    kwatch.watch(pid, procfs.read_start_time(pid), heap_limit, fd_limit, action, **extra)
    return heap_limit, fd_limit


def _events(kwatch: KernelWatch, pid: int, until: Kind | None = None) -> list[Event]:
    """The events for `pid`, waiting until one of kind `until` has come."""
    seen: list[Event] = []

    def arrived() -> bool:
        seen.extend(event for event in kwatch.drain() if event.tgid == pid)
        return until is None or any(event.kind == until for event in seen)

    wait_until(arrived, 5, f"{until} event for {pid}")
    return seen


# --- kill at the crossing --------------------------------------------------------

QUOTA = 64 * MiB

MEMORY_PATHS = [
    ("mmap", MiB, 300),
    ("touch", MiB, 300),
    ("brk", MiB, 300),
    ("mprotect", MiB, 300),
    ("mremap", MiB, 300),
    ("thread", MiB, 300),
    ("leader", MiB, 300),
    ("mlocked", MiB, 300),
    ("mlockbrk", MiB, 300),
    ("mlockremap", MiB, 300),
    ("mlockprot", MiB, 300),
]


@pytest.mark.parametrize(("mode", "step", "count"), MEMORY_PATHS, ids=[p[0] for p in MEMORY_PATHS])
def test_heap_kill_in_the_crossing_call(kwatch: KernelWatch, grower, mode, step, count) -> None:
    child = grower(mode, step, count)
    heap_limit, _ = _watch(kwatch, child.pid, heap=QUOTA)
    child.go()
    sig, steps = child.finish()
    assert sig == signal.SIGKILL
    assert steps * step <= QUOTA, "a call that crossed the quota returned"
    killed = [e for e in _events(kwatch, child.pid, Kind.KILLED) if e.kind == Kind.KILLED]
    assert killed[0].which == Which.HEAP and killed[0].limit == heap_limit
    assert 0 < killed[0].usage - heap_limit <= step // PAGE, "overshoot beyond one request"


@pytest.mark.parametrize("mode", ["populate", "mlocked", "mlockbrk", "mlockremap", "mlockprot"])
def test_populating_call_killed_before_its_pages(kwatch: KernelWatch, grower, mode) -> None:
    """512 MiB that would be faulted in at once: stopped at syscall entry.
    (mlockremap: a first 48 MiB mmap, then its mremap to 96 MiB is the crossing call.)"""
    step, count = (48 * MiB, 2) if mode == "mlockremap" else (512 * MiB, 1)
    child = grower(mode, step, count)
    heap_limit, _ = _watch(kwatch, child.pid, heap=QUOTA)
    child.go()
    sig, steps = child.finish()
    assert (sig, steps) == (signal.SIGKILL, count - 1)
    assert child.maxrss_kib * 1024 < QUOTA, f"{child.maxrss_kib} KiB were resident"
    killed = [e for e in _events(kwatch, child.pid, Kind.KILLED) if e.kind == Kind.KILLED]
    assert killed[0].usage > heap_limit


FD_PATHS = [("open", 1), ("socket", 1), ("pipe", 2), ("dup", 1), ("ioctl", 1)]


@pytest.mark.parametrize(("mode", "per_call"), FD_PATHS, ids=[p[0] for p in FD_PATHS])
def test_fd_kill_in_the_crossing_call(kwatch: KernelWatch, grower, mode, per_call) -> None:
    child = grower(mode, 0, 300)
    _, fd_limit = _watch(kwatch, child.pid, files=100)
    child.go()
    sig, steps = child.finish()
    assert sig == signal.SIGKILL
    assert steps * per_call <= 100
    killed = [e for e in _events(kwatch, child.pid, Kind.KILLED) if e.kind == Kind.KILLED]
    assert killed[0].which == Which.FILES and killed[0].limit == fd_limit
    assert 0 < killed[0].usage - fd_limit <= per_call


def test_under_quota_nothing_happens(kwatch: KernelWatch, grower) -> None:
    child = grower("touch", MiB, 32)
    _watch(kwatch, child.pid, heap=QUOTA, files=100)
    child.go()
    assert child.finish() == (0, 32)


# --- notify, deny, peaks -------------------------------------------------------------


def _crossings(kwatch: KernelWatch, pid: int) -> tuple[int, int]:
    taken = kwatch.take(pid)
    assert taken is not None
    return taken.crossings


def test_notify_counts_each_crossing_once(kwatch: KernelWatch, spawn) -> None:
    child: Workload = spawn()
    _watch(kwatch, child.pid, heap=4 * MiB, action="notify")
    for _ in range(7):
        child.do("mmap", MiB)
    assert [e.kind for e in _events(kwatch, child.pid, Kind.NOTIFIED)] == [Kind.NOTIFIED]
    assert _crossings(kwatch, child.pid) == (1, 0)
    for _ in range(4):
        child.do("munmap")
    for _ in range(4):
        child.do("mmap", MiB)
    events = _events(kwatch, child.pid, Kind.NOTIFIED)
    assert [e.kind for e in events] == [Kind.NOTIFIED]
    assert _crossings(kwatch, child.pid) == (1, 0)
    assert child.alive()


def test_an_entry_changes_once_in_the_ring_until_taken(kwatch: KernelWatch, spawn) -> None:
    """A process flipping over and back puts one event in the ring, however often it
    crosses; the count of crossings waits in the map, taken once."""
    child: Workload = spawn()
    _watch(kwatch, child.pid, files=2, action="notify")
    for _ in range(50):
        child.do("open", 3)
        child.do("close", 3)
    assert [e.kind for e in _events(kwatch, child.pid, Kind.NOTIFIED)] == [Kind.NOTIFIED]
    assert _crossings(kwatch, child.pid) == (0, 50)
    assert _crossings(kwatch, child.pid) == (0, 0)  # taken
    child.do("open", 3)
    assert [e.kind for e in _events(kwatch, child.pid, Kind.NOTIFIED)] == [Kind.NOTIFIED]
    assert _crossings(kwatch, child.pid) == (0, 1)


def test_peaks_are_exact(kwatch: KernelWatch, spawn) -> None:
    child: Workload = spawn()
    fds = open_fds(child.pid)
    _watch(kwatch, child.pid, heap=QUOTA, files=1000, heap_peak_pages=_vm_data_pages(child.pid))
    child.do("open", 50)
    child.do("close", 50)
    child.do("mmap", 3 * MiB)
    top = _vm_data_pages(child.pid)
    child.do("munmap")
    state = kwatch.entry(child.pid)
    assert state is not None
    assert (state.fd_peak, state.heap_peak_pages) == (fds + 50, top)
    kwatch.reset_peaks(child.pid, 1, 2)
    state = kwatch.entry(child.pid)
    assert state is not None and (state.heap_peak_pages, state.fd_peak) == (1, 2)


def test_deny_sees_a_raised_soft_limit(kwatch: KernelWatch, spawn) -> None:
    child: Workload = spawn()
    child.do("setrlimit", "data", 1 << 30)
    child.do("setrlimit", "nofile", 200)
    _watch(kwatch, child.pid, heap=QUOTA, action="deny", data_soft=1 << 30, nofile_soft=200)
    child.do("setrlimit", "nofile", 150)  # lowering is no raise
    child.do("setrlimit", "data", -1)
    hard = resource.prlimit(child.pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(child.pid, resource.RLIMIT_NOFILE, (hard, hard))  # raised from outside
    events = _events(kwatch, child.pid, Kind.RAISED)
    assert [(e.kind, e.which) for e in events] == [(Kind.RAISED, Which.HEAP)]  # then coalesced
    taken = kwatch.take(child.pid)
    assert taken is not None and taken.raised == 2
    assert child.alive()


async def test_ring_fd_wakes_a_trio_loop(kwatch: KernelWatch, spawn) -> None:
    """The daemon waits on ring_fd() in its trio loop: a breach wakes it, no polling."""
    child: Workload = spawn()
    _watch(kwatch, child.pid, heap=2 * MiB, action="notify")
    kwatch.drain()
    ours: list[Event] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, child.do, "mmap", 4 * MiB)
        with trio.fail_after(5):
            while not ours:  # other tests' children may wake it too
                await trio.lowlevel.wait_readable(kwatch.ring_fd())
                ours = [e for e in kwatch.drain() if e.tgid == child.pid]
    assert [e.kind for e in ours] == [Kind.NOTIFIED]
    assert 0 <= time.monotonic_ns() - ours[0].time_ns < 5e9


# --- lifetime of entries --------------------------------------------------------------


def test_exit_removes_the_entry(kwatch: KernelWatch, spawn) -> None:
    child: Workload = spawn()
    child.thread()
    _watch(kwatch, child.pid, heap=QUOTA)
    child.proc.stdin.write("exit\n")  # type: ignore[union-attr]
    child.proc.stdin.flush()  # type: ignore[union-attr]
    child.wait()
    assert [e.kind for e in _events(kwatch, child.pid, Kind.EXITED)] == [Kind.EXITED]
    assert kwatch.entry(child.pid) is None


def test_watch_refuses_a_process_that_is_not_the_one_meant(kwatch: KernelWatch, spawn) -> None:
    child: Workload = spawn()
    start = procfs.read_start_time(child.pid)
    with pytest.raises(ProcessLookupError):
        kwatch.watch(child.pid, start - 1, 1, None, "kill")
    assert kwatch.entry(child.pid) is None


def test_watch_refuses_an_exited_unreaped_process(kwatch: KernelWatch, spawn) -> None:
    child: Workload = spawn()
    start = procfs.read_start_time(child.pid)
    child.proc.stdin.write("exit\n")  # type: ignore[union-attr]
    child.proc.stdin.flush()  # type: ignore[union-attr]
    wait_until(lambda: exited(child.pid), 5, "zombie")  # not reaped: /proc/PID stays
    with pytest.raises(ProcessLookupError):
        kwatch.watch(child.pid, start, 1, None, "kill")
    assert kwatch.entry(child.pid) is None


def test_recycled_pid_never_inherits(kwatch: KernelWatch, grower) -> None:
    """An entry left for an earlier owner of the pid (its start time differs)."""
    child = grower("touch", MiB, 32)
    stale = loader.WatchState(procfs.read_start_time(child.pid) - 1, 1, 1, 0, 0, None, None,
                              loader.KernelAction.KILL, 0)  # fmt: skip
    kwatch._update(child.pid, stale, 0)
    child.go()
    assert child.finish() == (0, 32)
    assert Kind.EXITED in [e.kind for e in _events(kwatch, child.pid, Kind.EXITED)]
    assert kwatch.entry(child.pid) is None


# --- attachment, pinning, adoption -----------------------------------------------------


def test_every_hook_exists_on_this_kernel() -> None:
    """A misspelt syscall would go unchecked: all but the optional ones exist here."""
    _open(_pin_dir()).close(unpin=True)  # mounts tracefs, or skips where BPF cannot run
    hooks = loader._hook_list()
    wanted = [tp for tracepoints in loader.HOOKS.values() for tp in tracepoints]
    found = {f"{category}/{tp}" for _, category, tp in hooks}
    missing = [tp for tp in wanted if tp not in found and f"syscalls/{tp}" not in found]
    assert [tp for tp in missing if tp not in loader.OPTIONAL] == []
    assert ("uring_files", "io_uring", "io_uring_complete") in hooks


def test_a_missing_tracepoint_keeps_the_engine_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that silently lacks a hook would accept quotas it cannot keep."""
    _open(_pin_dir()).close(unpin=True)
    hooks = {**loader.HOOKS, "files_exit": (*loader.HOOKS["files_exit"], "sys_exit_nosuch")}
    monkeypatch.setattr(loader, "HOOKS", hooks)
    pin_dir = _pin_dir()
    with pytest.raises(BpfUnavailable, match="^tracepoint syscalls/sys_exit_nosuch missing"):
        KernelWatch.open(pin_dir)
    assert not pin_dir.exists()


def test_attach_pins_every_link_and_detach_removes_them(pin_dir: Path, spawn) -> None:
    watch = _open(pin_dir)
    try:
        assert not watch.attached and not list(pin_dir.glob("links/*"))
        child: Workload = spawn()
        _watch(watch, child.pid, heap=QUOTA)
        watch.attach()
        links = watch.link_ids()
        assert watch.attached and len(links) == len(loader._hook_list())
        assert len(list(pin_dir.glob("links/*"))) == len(links)
        watch.unwatch(child.pid)
        watch.detach()
        assert not watch.attached and not list(pin_dir.glob("links/*"))
        wait_until(lambda: not any(loader.object_exists("link", i) for i in links), 5, "detach")
    finally:
        watch.close(unpin=True)


def _holder(pin_dir: Path, quotas: dict[int, int]) -> subprocess.Popen[str]:
    """A separate daemon-like process holding the watch, to be killed with -9."""
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from tracker.backends.bpf.loader import KernelWatch\n"
        "from tracker.linux.procfs import read_start_time\n"
        "watch = KernelWatch.open(Path(sys.argv[1]))\n"
        "for arg in sys.argv[2:]:\n"
        "    pid, limit = map(int, arg.split(':'))\n"
        "    watch.watch(pid, read_start_time(pid), limit, None, 'kill')\n"
        "watch.attach()\nprint('ready', flush=True)\nsys.stdin.read()\n"
    )
    args = [f"{pid}:{limit}" for pid, limit in quotas.items()]
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(pin_dir), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=CHECKOUT,
    )  # fmt: skip
    assert holder.stdout and holder.stdout.readline() == "ready\n"
    return holder


def test_enforced_while_holder_is_dead_and_adopted(pin_dir: Path, grower) -> None:
    victim, survivor = grower("touch", MiB, 300), grower("touch", MiB, 4)
    limits = {g.pid: _vm_data_pages(g.pid) + QUOTA // PAGE for g in (victim, survivor)}
    holder = _holder(pin_dir, limits)
    try:
        holder.kill()
        holder.wait()
        victim.go()
        assert victim.finish()[0] == signal.SIGKILL, "not enforced without a holder"
        adopted = _open(pin_dir)
    finally:
        holder.kill()
        holder.wait()
    try:
        assert adopted.attached and len(adopted.link_ids()) == len(loader._hook_list())
        assert set(adopted.entries()) == {survivor.pid}
        assert adopted.entries()[survivor.pid].heap_limit_pages == limits[survivor.pid]
        meanwhile = [(e.tgid, e.kind) for e in adopted.drain()]
        assert (victim.pid, Kind.KILLED) in meanwhile and (victim.pid, Kind.EXITED) in meanwhile
    finally:
        adopted.close(unpin=True)


def test_clean_close_leaves_nothing(pin_dir: Path, spawn) -> None:
    watch = _open(pin_dir)
    try:
        child: Workload = spawn()
        _watch(watch, child.pid, heap=QUOTA)
        watch.attach()
        programs, links = watch.program_ids(), watch.link_ids()
        assert links and all(loader.object_exists("link", i) for i in links)
    finally:
        watch.close(unpin=True)
    assert not pin_dir.exists()
    assert not list(loader.BPFFS.glob(f"{pin_dir.name}*"))
    wait_until(lambda: not any(loader.object_exists("link", i) for i in links), 5, "links gone")
    wait_until(lambda: not any(loader.object_exists("prog", i) for i in programs), 5, "progs gone")


def test_close_without_unpin_keeps_enforcing(pin_dir: Path, grower) -> None:
    child = grower("touch", MiB, 300)
    watch = _open(pin_dir)
    try:
        _watch(watch, child.pid, heap=QUOTA)
        watch.attach()
    finally:
        watch.close(unpin=False)
    try:
        child.go()
        assert child.finish()[0] == signal.SIGKILL
    finally:
        _open(pin_dir).close(unpin=True)
    assert not pin_dir.exists()


# --- failures say why in one line; the object is its source's ---------------------------


def test_missing_object_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pin_dir: Path
) -> None:
    monkeypatch.setattr(loader, "OBJECT", tmp_path / "no-such.bpf.o")
    with pytest.raises(BpfUnavailable) as caught:
        KernelWatch.open(pin_dir)
    assert "object missing" in str(caught.value) and "\n" not in str(caught.value)


def test_without_capabilities_is_one_line(pin_dir: Path) -> None:
    """A real privilege drop: root without CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN."""
    drop = "-bpf,-perfmon,-sys_admin"
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from tracker.backends.bpf.loader import KernelWatch, BpfUnavailable\n"
        "try:\n    KernelWatch.open(Path(sys.argv[1]))\n"
        "except BpfUnavailable as error:\n    print(error)\n"
    )
    result = subprocess.run(
        ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-c", code,
         str(pin_dir)],
        capture_output=True, text=True, cwd=CHECKOUT, check=True,
    )  # fmt: skip
    assert result.stdout == "no CAP_BPF/CAP_PERFMON (nor CAP_SYS_ADMIN)\n", result.stderr
    assert not pin_dir.exists()


BAD_PROGRAM = """
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("tracepoint") int bad(void *ctx) { return *(int *)(long)bpf_get_prandom_u32(); }
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.mark.skipif(not shutil.which("clang"), reason="clang not installed")
def test_verifier_rejection_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pin_dir: Path
) -> None:
    source, obj = tmp_path / "bad.bpf.c", tmp_path / "bad.bpf.o"
    source.write_text(BAD_PROGRAM)
    include = f"-I/usr/include/{os.uname().machine}-linux-gnu"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", include, "-c", source, "-o", obj],
                   check=True)  # fmt: skip
    monkeypatch.setattr(loader, "OBJECT", obj)
    monkeypatch.setattr(loader, "MAPS", ())
    with pytest.raises(BpfUnavailable) as caught:
        KernelWatch.open(pin_dir)
    message = str(caught.value)
    assert message.startswith("load failed: verifier: prog 'bad': ") and "\n" not in message
    assert "invalid mem access" in message


@pytest.mark.skipif(not shutil.which("clang"), reason="clang not installed: no rebuild")
def test_object_rebuilds_identically(tmp_path: Path) -> None:
    subprocess.run([BPF_DIR / "build.sh", tmp_path], check=True)
    for name in ("restrack.bpf.o", "counters.bpf.o"):
        assert (tmp_path / name).read_bytes() == (BPF_DIR / name).read_bytes(), name
