"""heapsize read in the kernel under the bpf engine (tracker/backends/bpf/counters.bpf.c).

The program reads `mm->data_vm` of the task with a given pid whose struct pid is
the one a pidfd names (its pidfs inode). These tests compare it with /proc on
real processes as they map and unmap, show that it never reads another process,
and that the engine's reads go through it under bpf and through /proc where it
cannot answer (a zombie leader whose threads go on, an object that did not load).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.bpf import needs_bpf, pin_dir
from tests.support.daemon import DaemonFactory
from tests.support.paths import CHECKOUT, DATA
from tests.support.procs import MiB, proc_vm_data
from tests.support.waiting import wait_until
from tracker.backends.bpf import loader
from tracker.backends.bpf.counters import CounterReader
from tracker.backends.readers import ProcReader
from tracker.engine.engine import open_engine
from tracker.linux import procfs

ROOT = 0

pytestmark = needs_bpf


@pytest.fixture(scope="module")
def reader():
    counters = CounterReader.open()
    yield counters
    counters.close()


def inode_of(pid: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        return os.fstat(pidfd).st_ino
    finally:
        os.close(pidfd)


def test_reads_vm_data_as_proc_shows_it(reader, spawn):
    w = spawn()
    inode = inode_of(w.pid)
    assert reader.data_vm(w.pid, inode) == proc_vm_data(w.pid)
    for step in (("mmap", 8 * MiB), ("sbrk", MiB), ("mmap", 64 * MiB), ("munmap", 8 * MiB)):
        before = proc_vm_data(w.pid)
        w.do(*step)
        assert proc_vm_data(w.pid) != before, step  # the step moved the counter
        assert reader.data_vm(w.pid, inode) == proc_vm_data(w.pid), step
    w.thread()  # a thread's stack is a private writable mapping: it counts
    assert reader.data_vm(w.pid, inode) == proc_vm_data(w.pid)


def test_another_process_is_never_read(reader, spawn):
    a, b = spawn(), spawn()
    b.do("mmap", 32 * MiB)
    assert reader.data_vm(b.pid, inode_of(b.pid)) == proc_vm_data(b.pid)
    assert reader.data_vm(b.pid, inode_of(a.pid)) is None  # b's number, a's identity
    assert reader.data_vm(a.pid, inode_of(b.pid)) is None


def test_the_name_is_the_one_status_shows(reader, tmp_path):
    """usage(): VmData and comm from one run. comm is the kernel's bytes, which
    status prints escaped (newline, backslash) and procfs.parse_status unescapes."""
    name = "a\\b\nc d"
    ready = tmp_path / "ready"
    script = f"open('/proc/self/comm', 'w').write({name!r}); open({str(ready)!r}, 'w'); input()"
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
    try:
        wait_until(ready.exists, 10, "the name set")
        inode = inode_of(proc.pid)
        assert procfs.read_status(proc.pid).name == name
        assert reader.usage(proc.pid, inode) == (proc_vm_data(proc.pid), name)
        assert reader.usage(proc.pid, inode + 1) is None  # never another process
    finally:
        proc.kill()
        proc.wait()
    assert reader.usage(proc.pid, inode) is None  # reaped


def test_a_zombie_and_a_reaped_process_give_none(reader, spawn):
    w = spawn()
    inode = inode_of(w.pid)
    w.proc.kill()
    wait_until(lambda: procfs.read_stat(w.pid).state == "Z", 5, "zombie")
    assert reader.data_vm(w.pid, inode) is None  # no address space: /proc decides
    w.proc.wait()
    assert reader.data_vm(w.pid, inode) is None


async def test_the_bpf_engine_reads_heapsize_without_proc(spawn, monkeypatch):
    w = spawn()
    async with open_engine(backend="bpf") as engine:
        entry = engine.register(w.pid, ROOT)

        def no_proc(*args: object) -> bytes:
            raise AssertionError("read /proc/PID/status for VmData")

        for name in ("read_status_text", "reread_status"):  # by path, or held
            monkeypatch.setattr(procfs, name, no_proc)
        w.do("mmap", 16 * MiB)
        assert engine.reader.heapsize(entry) == 16 * MiB
        w.do("munmap", 16 * MiB)
        assert engine.reader.heapsize(entry) == 0
        assert engine.reader.heap_peak(entry) == 16 * MiB  # the kernel read raised the mark
        w.do("mmap", 8 * MiB)
        w.do("open", 3)
        measured = engine.reader.measure(entry)  # stat and metrics: the name comes along
        assert (measured.heapsize, measured.openfile_count) == (8 * MiB, 3)
        assert measured.comm == entry.comm


async def test_the_procfs_engine_reads_proc(spawn, monkeypatch):
    """The other side of the test above: under procfs /proc/PID/status is read
    (through the held descriptor, tracker/linux/process.py), and the kernel program not."""
    w = spawn()
    async with open_engine(backend="procfs") as engine:
        entry = engine.register(w.pid, ROOT)
        calls: list[str] = []

        def recording(name: str) -> Callable[..., bytes]:
            real = getattr(procfs, name)
            return lambda *args: calls.append(name) or real(*args)

        for name in ("read_status_text", "reread_status"):
            monkeypatch.setattr(procfs, name, recording(name))
        w.do("mmap", 16 * MiB)
        assert engine.reader.heapsize(entry) == 16 * MiB
        assert calls == ["reread_status"]
        assert type(engine.reader.counters) is ProcReader
        assert engine.reader.measure(entry).heapsize == 16 * MiB
        assert calls == ["reread_status", "reread_status"]


async def test_a_zombie_leader_is_read_through_its_live_thread(leaderless):
    """c/leaderless.c: the main thread exits, another maps 32 MiB. The kernel
    program sees no address space on the leader (-ENODATA); /proc through the live
    thread answers."""
    proc = subprocess.Popen([leaderless], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        async with open_engine(backend="bpf") as engine:
            entry = engine.register(pid, ROOT)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "ready\n"
            assert "VmData" not in Path(f"/proc/{pid}/status").read_text()  # zombie leader
            proc.stdin.write("mmap 32\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "mapped 32\n"
            tid = next(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
            assert engine.reader.heapsize(entry) >= 32 * MiB  # and the thread's malloc arena
            assert entry.heap_base + engine.reader.heapsize(entry) == proc_vm_data(pid, tid)
            measured = engine.reader.measure(entry)  # the kernel read says no; the thread's /proc
            assert measured.heap_total == proc_vm_data(pid, tid)
            assert measured.comm == procfs.read_status(pid, tid).name
    finally:
        proc.kill()
        proc.wait()


def test_the_daemon_says_which_way_heapsize_is_read(daemon_factory: DaemonFactory, spawn):
    """One line at start either way; where the reader cannot load, /proc is read and
    nothing else changes (the engine stays bpf)."""
    fast = daemon_factory("--engine", "bpf")
    slow = daemon_factory(start=False)
    wrapper = DATA / "no_counters_object.py"
    argv = [sys.executable, str(wrapper), "--foreground", "--engine", "bpf"]
    with open(slow.log, "ab") as log:
        slow.proc = subprocess.Popen(
            [*argv, "--state", str(slow.state), str(slow.mountpoint)], stdout=log, stderr=log
        )
    try:
        wait_until(lambda: slow._serving() or slow.proc.poll() is not None, 20, "mount")
        w = spawn()
        w.do("mmap", 8 * MiB)
        for daemon in (fast, slow):
            daemon.register(w.pid)
            w.do("mmap", 4 * MiB)
            assert daemon.read(w.pid, "heapsize") == f"{4 * MiB}\n"
            assert daemon.read("engine") == "bpf\n"
            w.do("munmap", 4 * MiB)
        # the two daemons share one log file: one line each
        lines = sorted(line for line in fast.log_text().splitlines() if "heapsize read" in line)
        assert len(lines) == 2
        assert lines[0].endswith("bpf: heapsize read in the kernel (counters.bpf.o)")
        assert lines[1].endswith(
            "bpf: heapsize read through /proc (counters.bpf.o: BPF object missing: "
            "/nonexistent/counters.bpf.o (tracker/backends/bpf/build.sh))"
        )
        assert "Traceback" not in slow.log_text()
    finally:
        daemon_factory.stop_all()
        for daemon in (fast, slow):
            loader.remove_tree(pin_dir(daemon))


def test_an_engine_stopped_before_its_backend_ran_stops_cleanly(tmp_path):
    """Found here: the bpf backend's task, started after the stop, read the ring
    buffer of a closed watch (a segfault)."""
    script = (
        "import trio\n"
        "from tracker.engine.engine import open_engine\n"
        "async def main():\n"
        "    async with open_engine(backend='bpf'):\n"
        "        pass\n"
        "trio.run(main)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=CHECKOUT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_the_run_refuses_bad_arguments_with_a_precise_error(reader):
    """tracker/backends/bpf/_counters.c: wrong arguments are Python errors, a run the kernel
    refuses an OSError with its errno, never a crash or a value."""
    from tracker.backends.bpf import _counters

    pid = os.getpid()
    inode = inode_of(pid)
    assert _counters.data_vm_pages(reader._fd, pid, inode) * os.sysconf("SC_PAGE_SIZE") == (
        proc_vm_data(pid)
    )
    assert _counters.usage(reader._fd, pid, inode)[0] == _counters.data_vm_pages(
        reader._fd, pid, inode
    )
    with pytest.raises(TypeError):
        _counters.usage(reader._fd, pid)
    with pytest.raises(TypeError):
        _counters.data_vm_pages(reader._fd, pid)
    with pytest.raises(TypeError):
        _counters.data_vm_pages(reader._fd, str(pid), inode)
    for bad_pid in (0, -1, 2**31):
        with pytest.raises(ValueError):
            _counters.data_vm_pages(reader._fd, bad_pid, inode)
    with pytest.raises(OverflowError):
        _counters.data_vm_pages(reader._fd, pid, -1)
    with open("/dev/null") as not_a_program, pytest.raises(OSError) as refused:
        _counters.data_vm_pages(not_a_program.fileno(), pid, inode)
    assert refused.value.errno == errno.EINVAL
    closed = os.dup(0)
    os.close(closed)
    with pytest.raises(OSError) as refused:
        _counters.data_vm_pages(closed, pid, inode)
    assert refused.value.errno == errno.EBADF


def test_without_the_extension_the_reader_says_why_in_one_line():
    """An install that did not compile tracker/backends/bpf/_counters.c: the reader does not
    load (the daemon then reads heapsize through /proc, as above) and says why."""
    script = (
        "import sys; sys.modules['tracker.backends.bpf._counters'] = None\n"
        "from tracker.backends.bpf.counters import CounterReader\n"
        "from tracker.backends.bpf.loader import BpfUnavailable\n"
        "try:\n"
        "    CounterReader.open()\n"
        "except BpfUnavailable as error:\n"
        "    print(error)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=CHECKOUT, capture_output=True, text=True, check=True
    )
    line = out.stdout.strip()
    assert line.startswith("tracker.backends.bpf._counters not built (") and line.endswith(
        "): run scripts/setup"
    ), out
    assert "\n" not in line and not out.stderr


async def test_a_run_the_kernel_refuses_is_answered_from_proc(spawn, monkeypatch):
    """The kernel may refuse a run (ENOMEM, ...): that read, heapsize or stat, comes
    from /proc, with the same values, and no error reaches the caller."""
    w = spawn()
    async with open_engine(backend="bpf") as engine:
        entry = engine.register(w.pid, ROOT)
        with open("/dev/null") as not_a_program:
            monkeypatch.setattr(engine.backend._counters, "_fd", not_a_program.fileno())
            with pytest.raises(OSError):  # what each run now meets
                engine.backend._counters.data_vm(w.pid, inode_of(w.pid))
            w.do("mmap", 16 * MiB)
            assert engine.reader.heapsize(entry) == 16 * MiB
            measured = engine.reader.measure(entry)
            assert (measured.heapsize, measured.comm) == (16 * MiB, entry.comm)
